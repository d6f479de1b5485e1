"""New sessions from existing ones through the real pool: templates, forks, and session chains
(another session's workspace mounted read-only)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from pathlib import Path

import pytest
import redis

from claudebox_pool import (
    ClaudeBox,
    InvalidRequestError,
    SessionAlreadyExistsError,
    SessionNotFoundError,
)
from claudebox_pool.tasks import keys
from claudebox_pool.tasks.settings import get_settings

pytestmark = pytest.mark.usefixtures("pool", "clean_state")


def session_dir(session_id: str) -> Path:
    return get_settings().sessions_root / session_id


def files(root: Path) -> dict[str, bytes | str]:
    return {
        str(path.relative_to(root)): os.readlink(path) if path.is_symlink() else path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_symlink() or path.is_file()
    }


def history(session_id: str) -> list[dict[str, object]]:
    path = session_dir(session_id) / ".claudebox" / "history.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


async def make(session_id: str, command: str) -> None:
    async with ClaudeBox(session_id=session_id) as box:
        result = await box.code(command)
        assert result.success, result.error


# --- templates ---------------------------------------------------------------------------------


def test_a_session_from_a_template_starts_with_a_copy_of_its_workspace() -> None:
    asyncio.run(make("python-template", "mkdir -p src && echo 'print(1)' > src/main.py"))

    async def scenario() -> str:
        async with ClaudeBox(session_id="new-service", template_session="python-template") as box:
            return (await box.code("cat src/main.py && echo changed > src/main.py")).response

    assert asyncio.run(scenario()) == "print(1)\n"
    assert files(session_dir("python-template") / "workspace") == {"src/main.py": b"print(1)\n"}
    assert files(session_dir("new-service") / "workspace") == {"src/main.py": b"changed\n"}
    actions = [entry["action"] for entry in history("new-service")]
    assert actions[:2] == ["session_created", "template_applied"]


def test_a_missing_template_raises_session_not_found_and_creates_nothing() -> None:
    async def scenario() -> None:
        async with ClaudeBox(session_id="orphan", template_session="no-such-template"):
            pass

    with pytest.raises(SessionNotFoundError, match="no-such-template"):
        asyncio.run(scenario())
    assert not session_dir("orphan").exists()


def test_a_session_cannot_be_its_own_template() -> None:
    with pytest.raises(InvalidRequestError, match="its own template"):
        ClaudeBox(session_id="loop", template_session="loop")


# --- forks -------------------------------------------------------------------------------------


def test_a_fork_copies_workspace_history_and_agent_home_into_an_open_session() -> None:
    asyncio.run(make("origin", "echo one > a.txt && mkdir d && echo two > d/b.txt"))
    (session_dir("origin") / ".claudebox" / "agent-home" / "transcript.jsonl").write_text("t\n")

    async def scenario() -> str:
        box = await ClaudeBox.fork("origin", "branch")
        async with box:
            return (await box.code("cat a.txt && echo three > a.txt")).response

    assert asyncio.run(scenario()) == "one\n"
    assert files(session_dir("origin") / "workspace") == {"a.txt": b"one\n", "d/b.txt": b"two\n"}
    assert files(session_dir("branch") / "workspace") == {"a.txt": b"three\n", "d/b.txt": b"two\n"}
    agent_home = session_dir("branch") / ".claudebox" / "agent-home"
    assert (agent_home / "transcript.jsonl").read_text() == "t\n"
    origin, branch = history("origin"), history("branch")
    assert branch[: len(origin)] == origin
    assert branch[len(origin)] | {"timestamp": ""} == {
        "timestamp": "",
        "action": "session_forked",
        "context": {"source": "origin"},
    }
    listed = {s.session_id: s for s in ClaudeBox.list_sessions()}
    assert listed["branch"].workspace_path == str(session_dir("branch") / "workspace")


def test_a_fork_waits_for_the_sources_running_task(clean_state: redis.Redis) -> None:
    asyncio.run(make("busy-origin", "echo start > state.txt"))

    async def scenario() -> None:
        async with ClaudeBox.reconnect("busy-origin") as source:
            running = asyncio.create_task(source.code("sleep 1.5; echo done > state.txt"))
            deadline = time.monotonic() + 30
            while not clean_state.exists(keys.session_lock("busy-origin")):
                assert time.monotonic() < deadline, "the code task never took the lock"
                await asyncio.sleep(0.02)
            await ClaudeBox.fork("busy-origin", "busy-copy")
            assert (await running).success

    asyncio.run(scenario())

    assert files(session_dir("busy-copy") / "workspace") == {"state.txt": b"done\n"}


def test_forking_onto_an_existing_session_raises_session_already_exists() -> None:
    asyncio.run(make("fork-a", "true"))
    asyncio.run(make("fork-b", "echo mine > mine.txt"))

    with pytest.raises(SessionAlreadyExistsError, match="fork-b"):
        asyncio.run(ClaudeBox.fork("fork-a", "fork-b"))
    assert files(session_dir("fork-b") / "workspace") == {"mine.txt": b"mine\n"}


def test_forking_a_missing_session_raises_session_not_found() -> None:
    with pytest.raises(SessionNotFoundError, match="ghost"):
        asyncio.run(ClaudeBox.fork("ghost", "ghost-copy"))
    assert not session_dir("ghost-copy").exists()


# --- session chains ----------------------------------------------------------------------------


def test_an_input_session_is_readable_but_not_writable_in_the_sandbox() -> None:
    asyncio.run(make("data-prep", "printf 'x,y\\n1,2\\n' > data.csv"))

    async def scenario() -> tuple[str, bool]:
        async with ClaudeBox(session_id="analysis", inputs={"data": "data-prep"}) as box:
            read = await box.code("wc -l < /inputs/data/data.csv > lines.txt && cat lines.txt")
            write = await box.code("echo tampered > /inputs/data/data.csv")
            return read.response, write.success

    lines, wrote = asyncio.run(scenario())

    assert lines.strip() == "2"
    assert not wrote
    assert (session_dir("data-prep") / "workspace" / "data.csv").read_text() == "x,y\n1,2\n"
    assert files(session_dir("analysis") / "workspace") == {"lines.txt": b"2\n"}


def test_an_input_naming_a_missing_session_is_refused_at_creation() -> None:
    async def scenario() -> None:
        async with ClaudeBox(session_id="chained", inputs={"data": "not-there"}):
            pass

    with pytest.raises(InvalidRequestError, match=r"input 'data'.*'not-there'"):
        asyncio.run(scenario())
    assert not session_dir("chained").exists()


def test_a_bad_input_name_is_refused_before_anything_is_queued() -> None:
    with pytest.raises(InvalidRequestError, match=re.escape("Invalid input name '../up'")):
        ClaudeBox(session_id="chained", inputs={"../up": "data-prep"})
