"""The disk guard: sizes as the disk counts them, the free-space floor and the size limit, and
`claudebox-pool sessions du`; the limit through a real worker that has one."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from claudebox_pool import ClaudeBox, DiskFullError
from claudebox_pool.tasks.settings import Settings
from claudebox_pool.workers import disk
from claudebox_pool.workers.store import SessionStore
from tests.conftest import WorkerFactory
from tests.support.processes import REPO, Worker

LIMIT = 3_000_000


@pytest.fixture(scope="module")
def limited_pool(start_workers: WorkerFactory) -> list[Worker]:
    return start_workers(1, concurrency=2, CLAUDEBOX_MAX_SESSIONS_BYTES=str(LIMIT))


def fill(store: SessionStore, session_id: str, size: int) -> None:
    workspace = store.paths(session_id).workspace
    workspace.mkdir(parents=True)
    (workspace / "blob").write_bytes(os.urandom(size))


# --- sizes and the guard, on the real filesystem ----------------------------------------------


def test_a_file_linked_twice_is_counted_once(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(os.urandom(100_000))
    os.link(tmp_path / "a", tmp_path / "b")

    size, count = disk.tree_size(tmp_path, set())

    assert count == 1
    assert 100_000 <= size < 200_000


def test_below_the_free_space_floor_the_guard_names_the_largest_sessions(tmp_path: Path) -> None:
    store = SessionStore(tmp_path / "sessions")
    fill(store, "big", 300_000)
    fill(store, "small", 10_000)
    settings = Settings(home=tmp_path, min_free_bytes=2**62)

    with pytest.raises(DiskFullError) as raised:
        disk.guard(settings, store, "session 'small' cannot run a task")

    assert list(raised.value.largest) == ["big", "small"]
    assert "CLAUDEBOX_MIN_FREE_BYTES" in str(raised.value)
    assert "session 'small' cannot run a task" in str(raised.value)


def test_what_a_copy_adds_counts_against_the_limit(tmp_path: Path) -> None:
    store = SessionStore(tmp_path / "sessions")
    fill(store, "one", 200_000)
    settings = Settings(home=tmp_path, max_sessions_bytes=400_000, min_free_bytes=0)

    disk.guard(settings, store, "fits")
    with pytest.raises(DiskFullError, match=r"MB more are needed.*CLAUDEBOX_MAX_SESSIONS_BYTES"):
        disk.guard(settings, store, "session 'two' cannot be forked", adding=250_000)


# --- through a worker with a size limit --------------------------------------------------------


@pytest.mark.usefixtures("limited_pool", "clean_state")
def test_a_task_in_a_full_sessions_root_fails_with_disk_full_naming_the_largest() -> None:
    async def scenario() -> None:
        async with ClaudeBox(session_id="hog") as hog, ClaudeBox(session_id="tiny") as tiny:
            assert (await hog.code("head -c 2000000 /dev/urandom > a")).success
            assert (await tiny.code("echo small > s")).success
            # Past the limit during its run: stopped then, not left to fill the disk.
            stopped = await hog.code("head -c 2000000 /dev/urandom > b")
            assert not stopped.success
            assert stopped.error is not None and "CLAUDEBOX_MAX_SESSIONS_BYTES" in stopped.error
            await tiny.code("echo more >> s")

    with pytest.raises(DiskFullError) as raised:
        asyncio.run(scenario())

    assert next(iter(raised.value.largest)) == "hog"
    assert "session 'tiny' cannot run a task" in str(raised.value)
    assert "claudebox-pool sessions du" in str(raised.value)


@pytest.mark.usefixtures("limited_pool", "clean_state")
def test_sessions_du_lists_sessions_largest_first_with_the_limit() -> None:
    async def scenario() -> None:
        async with ClaudeBox(session_id="large") as large, ClaudeBox(session_id="light") as light:
            await large.code("head -c 500000 /dev/urandom > a")
            await light.code("echo x > b")

    asyncio.run(scenario())

    done = subprocess.run(
        [sys.executable, "-m", "claudebox_pool.producer.cli", "sessions", "du", "--json"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    usage = json.loads(done.stdout)
    assert [each["session_id"] for each in usage["sessions"]] == ["large", "light"]
    assert usage["sessions"][0]["bytes"] >= 500_000
    assert usage["max_sessions_bytes"] == LIMIT
