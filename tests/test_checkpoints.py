"""Checkpoints through the real pool: take, list, restore, and the lock a restore waits for."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from pathlib import Path

import pytest
import redis

from claudebox_pool import CheckpointNotFoundError, ClaudeBox, InvalidRequestError
from claudebox_pool.tasks import keys
from claudebox_pool.tasks.settings import get_settings

pytestmark = pytest.mark.usefixtures("pool", "clean_state")


def session_dir(session_id: str) -> Path:
    return get_settings().sessions_root / session_id


def files(root: Path) -> dict[str, bytes | str]:
    """Every file's bytes (a link's target) below ``root``, by relative path."""
    return {
        str(path.relative_to(root)): os.readlink(path) if path.is_symlink() else path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_symlink() or path.is_file()
    }


def actions(session_id: str) -> list[str]:
    """The session's history, without the file_created lines that follow a code_execution."""
    history = session_dir(session_id) / ".claudebox" / "history.jsonl"
    found = [json.loads(line)["action"] for line in history.read_text().splitlines()]
    return [action for action in found if action != "file_created"]


MAKE_FILES = (
    "mkdir -p src && echo 'print(1)' > src/app.py && printf 'a\\0b' > data.bin"
    " && ln -s src/app.py app && echo keep > keep.txt"
)


def test_restore_puts_the_workspace_back_as_the_checkpoint_holds_it() -> None:
    async def scenario() -> list[str]:
        async with ClaudeBox(session_id="cp") as box:
            await box.code(MAKE_FILES)
            made = await box.checkpoint("phase1")
            assert (made.name, made.files) == ("phase1", 3)
            await box.code("echo 'print(2)' >> src/app.py && rm keep.txt && touch new.txt")
            await box.restore("phase1")
            return box.checkpoints()

    listed = asyncio.run(scenario())

    workspace = files(session_dir("cp") / "workspace")
    assert workspace == {
        "app": "src/app.py",
        "data.bin": b"a\0b",
        "keep.txt": b"keep\n",
        "src/app.py": b"print(1)\n",
    }
    assert listed == ["phase1"]
    assert actions("cp")[-2:] == ["code_execution", "checkpoint_restored"]
    assert "checkpoint_created" in actions("cp")


def test_unchanged_files_share_the_previous_checkpoints_copy_never_the_workspaces() -> None:
    async def scenario() -> None:
        async with ClaudeBox(session_id="cp-links") as box:
            await box.code(MAKE_FILES)
            await box.checkpoint("one")
            await box.code("echo more >> keep.txt")  # in place: the workspace keeps its inode
            second = await box.checkpoint("two")
            assert (second.linked, second.files) == (2, 3)

    asyncio.run(scenario())

    checkpoints = session_dir("cp-links") / ".claudebox" / "checkpoints"
    one, two = checkpoints / "one" / "workspace", checkpoints / "two" / "workspace"
    workspace = session_dir("cp-links") / "workspace"
    assert (one / "data.bin").stat().st_ino == (two / "data.bin").stat().st_ino
    assert (one / "keep.txt").stat().st_ino != (two / "keep.txt").stat().st_ino
    assert (one / "keep.txt").read_text() == "keep\n"
    assert (workspace / "data.bin").stat().st_ino not in {
        (one / "data.bin").stat().st_ino,
        (two / "data.bin").stat().st_ino,
    }


def test_restoring_while_a_code_task_runs_waits_for_its_lock(clean_state: redis.Redis) -> None:
    async def scenario() -> tuple[bool, float, float]:
        async with ClaudeBox(session_id="cp-busy") as box:
            await box.code("echo clean > state.txt")
            await box.checkpoint("clean")
        # Another producer's box: its call is not ordered behind this one's.
        async with ClaudeBox.reconnect("cp-busy") as writer, ClaudeBox.reconnect("cp-busy") as box:
            running = asyncio.create_task(writer.code("sleep 2; echo late > late.txt"))
            deadline = time.monotonic() + 30
            while not clean_state.exists(keys.session_lock("cp-busy")):
                assert time.monotonic() < deadline, "the code task never took the lock"
                await asyncio.sleep(0.02)
            await box.restore("clean")
            restored_at = time.monotonic()
            result = await running
            return result.success, restored_at, time.monotonic()

    succeeded, restored_at, code_done_at = asyncio.run(scenario())

    assert succeeded
    assert restored_at >= code_done_at - 0.5  # the restore ended after the code task, not during
    assert files(session_dir("cp-busy") / "workspace") == {"state.txt": b"clean\n"}
    assert actions("cp-busy")[-2:] == ["code_execution", "checkpoint_restored"]


def test_an_existing_checkpoint_is_kept_unless_replaced() -> None:
    async def scenario() -> int:
        async with ClaudeBox(session_id="cp-again") as box:
            await box.code("touch a")
            await box.checkpoint("x")
            await box.code("touch b")
            with pytest.raises(InvalidRequestError, match="replace=True"):
                await box.checkpoint("x")
            return (await box.checkpoint("x", replace=True)).files

    assert asyncio.run(scenario()) == 2


def test_restoring_an_unknown_checkpoint_raises_checkpoint_not_found() -> None:
    async def scenario() -> None:
        async with ClaudeBox(session_id="cp-none") as box:
            await box.restore("never-made")

    with pytest.raises(CheckpointNotFoundError, match=re.escape("box.checkpoints()")):
        asyncio.run(scenario())


@pytest.mark.parametrize("name", ["../escape", "a/b", "", "x" * 256, "dot.name"])
def test_a_bad_checkpoint_name_is_refused_before_anything_is_queued(name: str) -> None:
    box = ClaudeBox(session_id="cp-names")

    with pytest.raises(InvalidRequestError, match="Invalid checkpoint name"):
        asyncio.run(box.checkpoint(name))
    assert not session_dir("cp-names").exists()
