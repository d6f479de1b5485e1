"""A full disk (a small tmpfs as the sessions home): history lines are whole or absent,
session.json is never behind history, and the caller gets DiskFullError, not OSError."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from claudebox_pool import ClaudeBox, DiskFullError
from claudebox_pool.tasks.models import HistoryEntry, SessionRecord, utc_now
from claudebox_pool.workers.store import SessionStore, unguarded
from tests.conftest import WorkerFactory
from tests.support.processes import Worker

PAGE = 4096
"""tmpfs allocates a file's space a page at a time."""


@contextlib.contextmanager
def tmpfs(size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted on a fresh directory (the tests run as root)."""
    mountpoint = Path(tempfile.mkdtemp(prefix="claudebox-full-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", mountpoint], check=True)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", mountpoint], check=True)
        mountpoint.rmdir()


def fill(path: Path) -> None:
    """Write ``path`` until the disk holding it refuses one more byte."""
    with path.open("wb", buffering=0) as handle:
        chunk = b"\0" * (1 << 20)
        while len(chunk):
            try:
                handle.write(chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                chunk = chunk[: len(chunk) // 2]


def new_session(store: SessionStore, session_id: str) -> SessionRecord:
    now = utc_now()
    record = SessionRecord(
        session_id=session_id,
        created_at=now,
        updated_at=now,
        last_accessed=now,
        workspace_path=str(store.paths(session_id).workspace),
    )
    return store.create(record)


def big_entry(size: int) -> HistoryEntry:
    return HistoryEntry(action="code_execution", context={"response": "x" * size})


# --- the store on a real full disk -------------------------------------------------------------


@pytest.fixture
def small_store() -> Iterator[SessionStore]:
    with tmpfs("1m") as mountpoint:
        yield SessionStore(mountpoint / "sessions")


def test_a_history_write_the_full_disk_cuts_short_leaves_no_partial_line(
    small_store: SessionStore,
) -> None:
    new_session(small_store, "s")
    history = small_store.paths("s").history
    before = history.read_bytes()
    fill(small_store.root / "filler")
    # Longer than what is left of history.jsonl's last page: the first write is cut short
    # there, and the next one refused.
    entry = big_entry(2 * PAGE)

    with pytest.raises(DiskFullError, match=r"could not write history\.jsonl") as raised:
        small_store.append_history("s", entry, unguarded)

    assert history.read_bytes() == before
    assert "is full" in str(raised.value)
    (small_store.root / "filler").unlink()
    small_store.append_history("s", entry, unguarded)
    assert [each.action for each in small_store.history("s")] == ["session_created", entry.action]


def test_with_room_for_session_json_only_it_is_left_ahead_of_history(
    small_store: SessionStore,
) -> None:
    record = new_session(small_store, "s")
    paths = small_store.paths("s")
    before = paths.history.read_bytes()
    filler = small_store.root / "filler"
    fill(filler)
    # One page free: the new session.json takes it; the history lines then find none.
    with filler.open("r+b") as handle:
        handle.truncate(filler.stat().st_size - PAGE)
    counted = record.model_copy(update={"total_commands": 1})

    with pytest.raises(DiskFullError, match=r"history\.jsonl"):
        small_store.commit(counted, [big_entry(2 * PAGE)], unguarded)

    assert small_store.load("s").total_commands == 1
    assert paths.history.read_bytes() == before


def test_a_full_disk_while_saving_session_json_keeps_the_old_one(
    small_store: SessionStore,
) -> None:
    record = new_session(small_store, "s")
    paths = small_store.paths("s")
    fill(small_store.root / "filler")

    with pytest.raises(DiskFullError, match=r"could not write session\.json") as raised:
        small_store.commit(record.model_copy(update={"total_commands": 1}), [], unguarded)

    assert small_store.load("s") == record
    assert list(paths.meta.glob(".session.*")) == []
    assert set(raised.value.largest) == {"s"}


# --- torn lines ------------------------------------------------------------------------------


def test_a_torn_last_line_is_skipped_by_readers_and_cut_by_the_next_append(
    tmp_path: Path,
) -> None:
    store = SessionStore(tmp_path)
    new_session(store, "s")
    history = store.paths("s").history
    whole = history.read_bytes()
    torn = big_entry(100).model_dump_json().encode()[:40]
    history.write_bytes(whole + torn)

    assert [each.action for each in store.history("s")] == ["session_created"]
    assert store.recent_history("s", 1 << 20) == store.history("s")
    store.append_history("s", HistoryEntry(action="after"), unguarded)

    assert history.read_bytes().startswith(whole + b'{"timestamp"')
    assert torn not in history.read_bytes()
    assert [each.action for each in store.history("s")] == ["session_created", "after"]


def test_a_last_entry_missing_only_its_newline_is_kept(tmp_path: Path) -> None:
    store = SessionStore(tmp_path)
    new_session(store, "s")
    history = store.paths("s").history
    history.write_bytes(
        history.read_bytes() + HistoryEntry(action="kept").model_dump_json().encode()
    )

    store.append_history("s", HistoryEntry(action="after"), unguarded)

    assert [each.action for each in store.history("s")] == ["session_created", "kept", "after"]


# --- through a worker whose sessions home fills up --------------------------------------------


@pytest.fixture(scope="module")
def full_home() -> Iterator[Path]:
    with tmpfs("24m") as mountpoint:
        yield mountpoint


@pytest.fixture(scope="module")
def pool_on_small_disk(full_home: Path, start_workers: WorkerFactory) -> list[Worker]:
    # No free-space floor: the disk itself must say it is full, mid-task.
    return start_workers(
        1, concurrency=1, CLAUDEBOX_HOME=str(full_home), CLAUDEBOX_MIN_FREE_BYTES="0"
    )


def test_a_task_that_fills_the_disk_fails_with_disk_full_and_runs_once(
    full_home: Path, pool_on_small_disk: list[Worker]
) -> None:
    store = SessionStore(full_home / "sessions")
    filling = "echo ran >> count.txt; head -c 100000000 /dev/zero > fill; true"

    async def scenario() -> None:
        async with ClaudeBox(session_id="fills") as box:
            await box.code(filling)

    with pytest.raises(DiskFullError) as raised:
        asyncio.run(scenario())

    workspace = store.paths("fills").workspace
    assert "is full" in str(raised.value)
    assert "did run (exit code 0)" in str(raised.value)
    assert "fills" in raised.value.largest
    assert (workspace / "count.txt").read_text() == "ran\n"
    ran = [each for each in store.history("fills") if each.action == "code_execution"]
    assert store.load("fills").total_commands >= len(ran)

    (workspace / "fill").unlink()

    async def again() -> int:
        async with ClaudeBox.reconnect("fills") as box:
            result = await box.code("echo ran >> count.txt")
            assert result.success
            return store.load("fills").total_commands

    total = asyncio.run(again())
    ran = [each for each in store.history("fills") if each.action == "code_execution"]
    assert (workspace / "count.txt").read_text() == "ran\nran\n"
    assert total >= len(ran) >= 1


def test_a_checkpoint_on_a_full_disk_fails_with_disk_full(
    full_home: Path, pool_on_small_disk: list[Worker]
) -> None:
    store = SessionStore(full_home / "sessions")

    async def make() -> None:
        async with ClaudeBox(session_id="snap") as box:
            assert (await box.code("head -c 200000 /dev/urandom > data")).success

    asyncio.run(make())
    filler = full_home / "filler"
    fill(filler)

    async def snapshot() -> None:
        async with ClaudeBox.reconnect("snap") as box:
            await box.checkpoint("before")

    try:
        with pytest.raises(DiskFullError, match="is full") as raised:
            asyncio.run(snapshot())
    finally:
        filler.unlink()

    assert "snap" in raised.value.largest
    assert "before" not in store.load("snap").checkpoints
