"""A corrupted session (a truncated session.json, a bad timestamp) is listed as corrupted,
every path that meets it says so with the fix, cleanup removes it, and it never stops a
worker from starting."""

from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path

import pytest
import redis

from claudebox_pool import ClaudeBox
from claudebox_pool.tasks.errors import SessionCorruptedError
from claudebox_pool.tasks.registry import read_one
from claudebox_pool.tasks.settings import get_settings
from tests.conftest import WorkerFactory
from tests.faults.conftest import history, open_session
from tests.support.processes import Worker, claudebox_pool

FIX = "claudebox-pool sessions cleanup broken --yes"


def listed(session_id: str) -> str | None:
    """The session's status as `list_sessions()` shows it; None if it is not listed."""
    found = [r.status for r in ClaudeBox.list_sessions() if r.session_id == session_id]
    return found[0] if found else None


def truncate(workspace: Path) -> Path:
    session_json = workspace.parent / ".claudebox" / "session.json"
    whole = session_json.read_bytes()
    session_json.write_bytes(whole[: len(whole) // 2])
    return session_json


def test_a_truncated_session_json_is_corrupted_everywhere_and_cleanup_removes_it(
    pool: list[Worker], clean_state: redis.Redis
) -> None:
    workspace = open_session("broken")

    async def run(prompt: str) -> None:
        async with ClaudeBox.reconnect("broken") as box:
            await box.code(prompt)

    asyncio.run(run("echo ran >> count.txt"))
    session_json = truncate(workspace)
    problem = re.escape(f"{session_json} is not valid JSON")

    assert listed("broken") == "corrupted"
    with pytest.raises(SessionCorruptedError, match=problem):
        asyncio.run(run("echo ran >> count.txt"))

    async def create() -> None:
        async with ClaudeBox(session_id="broken"):
            pass

    with pytest.raises(SessionCorruptedError, match=problem):
        asyncio.run(create())
    # Refused before a sandbox uid was claimed for it: it still holds its one.
    claims = get_settings().sessions_root / ".sandbox-uids"
    assert [os.readlink(link) for link in claims.iterdir()] == ["broken"]
    reindexed = claudebox_pool("sessions", "reindex")
    assert "corrupted: broken" in reindexed.stderr
    # The registry itself now says so, for producers that cannot see the workers' disk.
    entry = read_one(clean_state, "broken")
    assert entry is not None and entry.status == "corrupted"
    assert entry.corruption is not None and entry.corruption.path == str(session_json)
    shown = claudebox_pool("sessions", "show", "broken")
    assert shown.returncode == 1
    assert "is corrupted" in shown.stderr and FIX in " ".join(shown.stderr.split())
    assert listed("broken") == "corrupted"
    in_cli = [
        json.loads(line)
        for line in claudebox_pool("sessions", "list", "--json").stdout.splitlines()
    ]
    assert [(each["session_id"], each["status"]) for each in in_cli] == [("broken", "corrupted")]
    assert (workspace / "count.txt").read_text() == "ran\n"
    assert [e.action for e in history("broken")].count("code_execution") == 1

    result = asyncio.run(ClaudeBox.cleanup_session("broken", remove_workspace=True))

    assert result.removed_workspace
    assert not workspace.parent.exists()
    assert listed("broken") is None
    assert read_one(clean_state, "broken") is None


def test_cleanup_keeping_the_files_of_a_corrupted_session_says_it_is_corrupted(
    pool: list[Worker], clean_state: redis.Redis
) -> None:
    session_json = truncate(open_session("broken"))
    broken = session_json.read_bytes()

    with pytest.raises(SessionCorruptedError, match=re.escape(FIX)):
        asyncio.run(ClaudeBox.cleanup_session("broken", remove_workspace=False))

    assert session_json.read_bytes() == broken


def test_a_worker_starts_and_heartbeats_with_a_bad_record_on_its_disk(
    start_workers: WorkerFactory, clean_state: redis.Redis
) -> None:
    # Written by hand before any worker of this module runs: the startup reindex meets them.
    root = get_settings().sessions_root
    stamp = "2025-01-01T10:00:00.000000"
    good = {
        "session_id": "good",
        "created_at": stamp,
        "updated_at": stamp,
        "last_accessed": stamp,
        "workspace_path": str(root / "good" / "workspace"),
    }
    bad = {
        **good,
        "session_id": "bad-time",
        "updated_at": "yesterday at noon",
        "workspace_path": str(root / "bad-time" / "workspace"),
    }
    for record in (good, bad):
        meta = root / str(record["session_id"]) / ".claudebox"
        meta.mkdir(parents=True)
        (meta.parent / "workspace").mkdir()
        (meta / "session.json").write_text(json.dumps(record))

    (worker,) = start_workers(1, concurrency=1)

    bad_json = root / "bad-time" / ".claudebox" / "session.json"
    assert f"{bad_json} has an invalid updated_at" in worker.log()
    statuses = {r.session_id: r.status for r in ClaudeBox.list_sessions()}
    assert statuses == {"good": "created", "bad-time": "corrupted"}


def test_a_session_json_restored_from_a_backup_is_listed_healthy_again(
    pool: list[Worker], clean_state: redis.Redis
) -> None:
    workspace = open_session("broken")
    session_json = workspace.parent / ".claudebox" / "session.json"
    backup = session_json.read_bytes()
    truncate(workspace)
    assert claudebox_pool("sessions", "reindex").returncode == 0
    assert listed("broken") == "corrupted"

    session_json.write_bytes(backup)

    assert listed("broken") == "created"

    async def reconnect() -> None:
        async with ClaudeBox.reconnect("broken"):
            pass

    asyncio.run(reconnect())
    entry = read_one(clean_state, "broken")
    assert entry is not None and entry.status == "created" and entry.corruption is None
