"""Bad input meets a clear, typed error, and nothing is written: unsafe session ids, an
oversized prompt, a corrupted session.json, an unreadable workspace, links leading out of a
workspace, and a template or input naming a session that does not exist."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import tarfile
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from claudebox_pool import ClaudeBox
from claudebox_pool.producer import pool as producer_pool
from claudebox_pool.tasks import names
from claudebox_pool.tasks.errors import (
    InvalidRequestError,
    InvalidSessionIdError,
    SessionCorruptedError,
    SessionNotFoundError,
)
from claudebox_pool.tasks.settings import get_settings
from claudebox_pool.workers.store import SessionStore
from tests.faults.conftest import history, open_session
from tests.support.processes import Worker

BAD_IDS = ["../x", "a/b", "", "x" * 256, "café", ".", ".."]
NOBODY = 65534


def tree(root: Path) -> list[str]:
    """Every path under ``root`` (the home of the pool under test), links not followed."""
    return sorted(str(path.relative_to(root)) for path in root.rglob("*"))


@pytest.fixture
def home() -> Path:
    return get_settings().home.expanduser()


@pytest.mark.parametrize(
    "bad", BAD_IDS, ids=["dotdot", "slash", "empty", "256", "unicode", "dot", "dotdot-only"]
)
def test_an_unsafe_session_id_is_refused_before_anything_is_queued_or_written(
    bad: str, pool: list[Worker], clean_state: redis.Redis, home: Path
) -> None:
    before = tree(home)

    with pytest.raises(InvalidSessionIdError, match="Invalid session id"):
        ClaudeBox(session_id=bad)
    with pytest.raises(InvalidSessionIdError):
        ClaudeBox.reconnect(bad)
    with pytest.raises(InvalidSessionIdError):
        asyncio.run(ClaudeBox.cleanup_session(bad, remove_workspace=True))
    with pytest.raises(InvalidSessionIdError):
        SessionStore(get_settings().sessions_root).paths(bad)

    assert tree(home) == before
    assert clean_state.llen(names.QUEUE) == 0


@pytest.mark.parametrize("bad", ["../x", "a/b", "."])
def test_a_worker_refuses_an_unsafe_session_id_sent_past_the_producer(
    bad: str, pool: list[Worker], clean_state: redis.Redis, home: Path
) -> None:
    before = tree(home)
    payload = {"session_id": bad, "mode": "create"}

    task_id = producer_pool.send(names.OPEN, payload)
    with pytest.raises(InvalidSessionIdError, match=re.escape(f"Invalid session id {bad!r}")):
        asyncio.run(producer_pool.wait(task_id, 30))

    assert tree(home) == before


def test_a_worker_refuses_a_malformed_payload_with_what_is_wrong(
    pool: list[Worker], clean_state: redis.Redis
) -> None:
    task_id = producer_pool.send(names.OPEN, {"session_id": "ok-id", "mode": "sideways"})

    with pytest.raises(InvalidRequestError, match="malformed OpenRequest: mode"):
        asyncio.run(producer_pool.wait(task_id, 30))


@pytest.fixture
def small_prompt_limit(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    monkeypatch.setenv("CLAUDEBOX_MAX_PROMPT_BYTES", "1024")
    get_settings.cache_clear()
    yield 1024
    monkeypatch.undo()
    get_settings.cache_clear()


def test_a_prompt_over_the_size_limit_is_refused_before_it_is_queued(
    pool: list[Worker], clean_state: redis.Redis, small_prompt_limit: int
) -> None:
    open_session("big-prompt")
    before = history("big-prompt")

    async def scenario() -> None:
        async with ClaudeBox.reconnect("big-prompt") as box:
            await box.code("echo " + "x" * small_prompt_limit)

    with pytest.raises(InvalidRequestError, match="over the limit of 1024"):
        asyncio.run(scenario())
    assert history("big-prompt") == before


def test_a_raw_message_of_50_mb_is_refused_by_the_worker_at_the_default_limit(
    pool: list[Worker], clean_state: redis.Redis
) -> None:
    # Sent around the producer, as anything holding the broker URL could: the worker checks too.
    open_session("raw-huge")
    before = history("raw-huge")
    payload = {"session_id": "raw-huge", "prompt": "x" * (50 << 20), "agent": "shell"}

    task_id = producer_pool.send(names.CODE, payload)
    del payload

    with pytest.raises(InvalidRequestError, match=f"{50 << 20} bytes, over the limit of 1000000"):
        asyncio.run(producer_pool.wait(task_id, 120))
    assert history("raw-huge") == before


@pytest.mark.parametrize("damage", ["not json", "truncated"])
def test_a_corrupted_session_json_is_reported_and_left_as_it_is(
    damage: str, pool: list[Worker], clean_state: redis.Redis
) -> None:
    workspace = open_session("corrupt")
    session_json = workspace.parent / ".claudebox" / "session.json"
    whole = session_json.read_bytes()
    broken = b"this is not json" if damage == "not json" else whole[: len(whole) // 2]
    before = history("corrupt")

    async def scenario() -> None:
        async with ClaudeBox.reconnect("corrupt"):
            pass

    async def run_on_open_box() -> None:
        async with ClaudeBox.reconnect("corrupt") as box:
            session_json.write_bytes(broken)
            await box.code("echo never > never.txt")

    with pytest.raises(SessionCorruptedError, match=re.escape("session.json")):
        asyncio.run(run_on_open_box())
    with pytest.raises(SessionCorruptedError, match="is not valid JSON"):
        asyncio.run(scenario())
    assert session_json.read_bytes() == broken
    assert history("corrupt") == before
    assert not (workspace / "never.txt").exists()


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        ("file", "is not a directory"),
        ("dangling link", "is a link to nothing"),
        ("missing", "is missing"),
    ],
)
def test_an_unreadable_workspace_is_reported_before_anything_is_written(
    damage: str, problem: str, pool: list[Worker], clean_state: redis.Redis
) -> None:
    workspace = open_session("no-workspace")
    session_json = workspace.parent / ".claudebox" / "session.json"
    shutil.rmtree(workspace)
    if damage == "file":
        workspace.write_text("a file where the workspace was")
    elif damage == "dangling link":
        workspace.symlink_to(workspace.parent / "gone", target_is_directory=True)
    record, before = session_json.read_bytes(), history("no-workspace")
    damaged = tree(workspace.parent)

    async def scenario() -> None:
        async with ClaudeBox.reconnect("no-workspace") as box:
            await box.code("echo never > never.txt")

    with pytest.raises(SessionCorruptedError, match=re.escape(f"{workspace} {problem}")):
        asyncio.run(scenario())
    assert session_json.read_bytes() == record
    assert history("no-workspace") == before
    assert tree(workspace.parent) == damaged


def test_a_workspace_the_workers_user_may_not_read_is_reported_as_such() -> None:
    # Root reads any directory whatever its mode: take a user's rights to see what they see.
    root = Path(tempfile.mkdtemp(prefix="claudebox-unreadable-"))
    try:
        root.chmod(0o755)
        store = SessionStore(root)
        workspace = store.paths("locked").workspace
        workspace.mkdir(parents=True)
        workspace.chmod(0)
        as_root = os.geteuid() == 0
        if as_root:
            os.seteuid(NOBODY)
        try:
            with pytest.raises(SessionCorruptedError) as raised:
                store.check_workspace("locked")
        finally:
            if as_root:
                os.seteuid(0)
            workspace.chmod(0o700)
    finally:
        shutil.rmtree(root)

    assert str(raised.value).startswith(
        f"Session 'locked' is corrupted: {workspace} cannot be read by the worker's user "
        "(Permission denied)."
    )


def test_links_out_of_a_workspace_are_neither_followed_by_cleanup_nor_archived(
    pool: list[Worker], clean_state: redis.Redis, tmp_path: Path
) -> None:
    workspace = open_session("links")
    marker = f"OUTSIDE-{uuid.uuid4().hex}"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text(marker)
    (workspace / "own.txt").write_text("mine")
    (workspace / "dir-out").symlink_to(outside, target_is_directory=True)
    (workspace / "file-out").symlink_to(outside / "secret.txt")
    (workspace / "relative-out").symlink_to(os.path.relpath(outside, workspace))
    (workspace / "inside").symlink_to("own.txt")

    result = asyncio.run(ClaudeBox.cleanup_session("links", remove_workspace=True, archive=True))

    assert (outside / "secret.txt").read_text() == marker
    assert not workspace.exists()
    assert result.archive_path is not None
    with tarfile.open(result.archive_path) as archive:
        members = {member.name: member for member in archive.getmembers()}
        contents = [
            extracted.read()
            for member in members.values()
            if member.isreg() and (extracted := archive.extractfile(member)) is not None
        ]
    assert not any(marker.encode() in content for content in contents)
    for name in ("dir-out", "file-out", "relative-out"):
        assert f"links/workspace/{name}" not in members
    assert members["links/workspace/inside"].issym()
    assert b"mine" in contents


def test_a_template_session_that_does_not_exist_is_not_found_and_nothing_is_created(
    pool: list[Worker], clean_state: redis.Redis
) -> None:
    async def scenario() -> None:
        async with ClaudeBox(session_id="from-nothing", template_session="no-such-template"):
            pass

    with pytest.raises(SessionNotFoundError, match="no-such-template"):
        asyncio.run(scenario())
    assert not (get_settings().sessions_root / "from-nothing").exists()
    assert ClaudeBox.list_sessions() == []


def test_an_input_naming_a_session_that_does_not_exist_is_refused_and_nothing_is_created(
    pool: list[Worker], clean_state: redis.Redis
) -> None:
    async def scenario() -> None:
        async with ClaudeBox(session_id="chained", inputs={"data": "no-such-input"}):
            pass

    with pytest.raises(InvalidRequestError, match="'no-such-input', which does not exist"):
        asyncio.run(scenario())
    assert not (get_settings().sessions_root / "chained").exists()
    assert ClaudeBox.list_sessions() == []
