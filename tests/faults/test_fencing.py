"""A worker paused past its lock's TTL (SIGSTOP) cannot act on a session that another worker
took over meanwhile: once resumed, its writes are refused with LockLostError, and what its
sandbox still ran was killed before the new holder ran anything, so that two runs never share
the workspace."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import redis

from claudebox_pool.tasks import keys
from claudebox_pool.tasks.errors import LockLostError
from tests.conftest import WorkerFactory
from tests.faults.conftest import (
    entries_of,
    history,
    open_session,
    read_pid,
    result_of,
    running_in,
    send_code,
)
from tests.support.processes import Worker, wait_for

LOCK_TTL_S = 2

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_workers(start_workers: WorkerFactory) -> list[Worker]:
    return start_workers(
        2,
        concurrency=1,
        CLAUDEBOX_RUNTIME="local",
        CLAUDEBOX_LOCK_TTL_S=str(LOCK_TTL_S),
        CLAUDEBOX_LOCK_WAIT_S="30",
    )


def test_a_worker_paused_past_its_lock_ttl_cannot_write_after_a_takeover(
    two_workers: list[Worker], clean_state: redis.Redis
) -> None:
    workspace = open_session("paused")
    stalled_id = send_code("paused", "echo $PPID > .child.pid; sleep 2; echo stalled")
    wait_for(lambda: read_pid(workspace / ".child.pid"), 20, "the first task to start")
    child = read_pid(workspace / ".child.pid")
    assert child is not None
    fence_before = int(clean_state.get(keys.session_fence("paused")) or 0)

    os.kill(child, signal.SIGSTOP)
    try:
        # The other worker takes the session once the paused holder's lock has expired.
        takeover_id = send_code("paused", "echo took over")
        takeover = result_of(takeover_id, 30)
    finally:
        os.kill(child, signal.SIGCONT)

    with pytest.raises(LockLostError):
        result_of(stalled_id, 30)

    assert takeover.success and takeover.response.strip() == "took over"
    assert int(clean_state.get(keys.session_fence("paused")) or 0) > fence_before
    assert entries_of("paused", "code_execution", stalled_id) == []
    entries = history("paused")
    takeover_at = max(
        index
        for index, entry in enumerate(entries)
        if entry.action == "code_execution" and entry.context.get("task_id") == takeover_id
    )
    assert entries[takeover_at + 1 :] == [], "written after the takeover"
    record = (workspace.parent / ".claudebox" / "session.json").read_text()
    assert '"status": "stopped"' in record
    assert f'"fence": {fence_before + 1}' in record


# Each run tags its lines with an id of its own: the file shows which run wrote each line.
COUNTING = (
    'run=$(od -An -N4 -tx4 /dev/urandom | tr -d " "); '
    "for i in $(seq 1 {count}); do "
    'echo "$run $i $(date +%s.%N)" >> lines.txt; sleep 0.25; done; echo $run'
)


@pytest.fixture(scope="module")
def sandboxed_workers(two_workers: list[Worker], start_workers: WorkerFactory) -> list[Worker]:
    """Two bwrap workers (warm sandboxes, cgroups); the local ones of this module stop first."""
    for worker in two_workers:
        worker.stop()
    two_workers.clear()
    return start_workers(
        2, concurrency=1, CLAUDEBOX_LOCK_TTL_S=str(LOCK_TTL_S), CLAUDEBOX_LOCK_WAIT_S="30"
    )


def _wait_unwound(task_id: str) -> None:
    """Wait until the resumed worker's pool child has given up the task it was frozen in."""
    wait_for(lambda: running_in(task_id) is None, 30, "the resumed worker to drop its task")


def _runs(path: Path) -> list[tuple[str, int]]:
    """The file's lines as (run id, line number), in file order."""
    return [(run, int(n)) for run, n, _ in (line.split() for line in path.read_text().splitlines())]


def _written_at(path: Path, run: str) -> list[float]:
    """When each line of ``run`` was written (epoch seconds, from inside the sandbox)."""
    fields = (line.split() for line in path.read_text().splitlines())
    return [float(at) for tag, _, at in fields if tag == run]


def _interleaved(path: Path) -> list[str]:
    """The run ids in the order their blocks of lines appear; a run twice means interleaving."""
    order = [run for run, _ in _runs(path)]
    return [run for index, run in enumerate(order) if index == 0 or order[index - 1] != run]


def test_a_whole_worker_frozen_past_its_lock_ttl_never_runs_beside_the_next_holder(
    sandboxed_workers: list[Worker], clean_state: redis.Redis
) -> None:
    _frozen_then_taken_over(sandboxed_workers, clean_state, "frozen")


def _frozen_then_taken_over(workers: list[Worker], client: redis.Redis, session_id: str) -> None:
    """Freeze the worker running a session's counting command, run another command of the
    session meanwhile, and check that no two runs' lines interleave."""
    workspace = open_session(session_id)
    lines = workspace / "lines.txt"
    frozen_id = send_code(session_id, COUNTING.format(count=40))
    wait_for(lambda: lines.exists() and len(lines.read_text().splitlines()) >= 4, 30, "a run")
    found = running_in(frozen_id)
    assert found is not None
    [frozen] = [worker for worker in workers if worker.hostname == found[0]]
    assert frozen.proc is not None

    os.killpg(frozen.proc.pid, signal.SIGSTOP)  # the main process and its pool children
    try:
        takeover = result_of(send_code(session_id, COUNTING.format(count=8)), 60)
        # Silent for three heartbeats: the live worker hands its task back to the queue.
        wait_for(
            lambda: frozen_id.encode() not in client.hvals(keys.worker_deliveries(frozen.hostname)),
            30,
            "the frozen worker's task to be handed back",
        )
    finally:
        os.killpg(frozen.proc.pid, signal.SIGCONT)
    # The frozen run is handed back to the live worker meanwhile, and reruns there whole;
    # its outcome is the rerun's, which the resumed worker's lost delivery leaves alone.
    rerun = result_of(frozen_id, 60)
    _wait_unwound(frozen_id)
    assert result_of(frozen_id, 5) == rerun and rerun.success

    runs, blocks = _runs(lines), _interleaved(lines)
    assert len(blocks) == len(set(blocks)), f"two runs interleaved: {blocks}"
    taken = [n for run, n in runs if run == takeover.response.strip()]
    assert taken == list(range(1, 9))
    first = blocks[0]
    assert [n for run, n in runs if run == first][-1] < 40, "the frozen run was not stopped"


def test_a_frozen_worker_sandbox_stops_its_command_before_the_lock_can_lapse(
    sandboxed_workers: list[Worker], clean_state: redis.Redis
) -> None:
    workspace = open_session("lease")
    lines = workspace / "lines.txt"
    task_id = send_code("lease", COUNTING.format(count=24))
    wait_for(lambda: lines.exists() and len(lines.read_text().splitlines()) >= 4, 30, "a run")
    found = running_in(task_id)
    assert found is not None
    [frozen] = [worker for worker in sandboxed_workers if worker.hostname == found[0]]
    assert frozen.proc is not None
    first = _interleaved(lines)[0]

    os.killpg(frozen.proc.pid, signal.SIGSTOP)
    try:
        # Nothing can take the session before its lock lapses; only the frozen worker's own
        # sandbox can stop the command sooner. Then the task is handed back and rerun whole.
        lapses_at = time.time() + clean_state.pttl(keys.session_lock("lease")) / 1000
        rerun = result_of(task_id, 60)
    finally:
        os.killpg(frozen.proc.pid, signal.SIGCONT)
    _wait_unwound(task_id)

    assert result_of(task_id, 5) == rerun and rerun.success
    assert max(_written_at(lines, first)) < lapses_at
    assert len(_written_at(lines, first)) < 24
    assert _written_at(lines, rerun.response.strip()) and rerun.response.strip() != first
    blocks = _interleaved(lines)
    assert len(blocks) == len(set(blocks)), f"two runs interleaved: {blocks}"


@pytest.fixture(scope="module")
def cold_workers(sandboxed_workers: list[Worker], start_workers: WorkerFactory) -> list[Worker]:
    """Two bwrap workers without warm sandboxes: each run's sandbox is a child of its task."""
    for worker in sandboxed_workers:
        worker.stop()
    sandboxed_workers.clear()
    return start_workers(
        2,
        concurrency=1,
        CLAUDEBOX_LOCK_TTL_S=str(LOCK_TTL_S),
        CLAUDEBOX_LOCK_WAIT_S="30",
        CLAUDEBOX_WARM_IDLE_S="0",
    )


def test_a_whole_worker_frozen_with_a_cold_sandbox_never_runs_beside_the_next_holder(
    cold_workers: list[Worker], clean_state: redis.Redis
) -> None:
    _frozen_then_taken_over(cold_workers, clean_state, "frozen-cold")


def test_a_frozen_worker_cold_sandbox_stops_its_command_before_the_lock_can_lapse(
    cold_workers: list[Worker], clean_state: redis.Redis
) -> None:
    # Before the lock lapses no other holder can kill anything (the same-host cgroup kill
    # included): a command stopped by then was stopped by its own sandbox's lease watchdog.
    workspace = open_session("cold-lease")
    lines = workspace / "lines.txt"
    task_id = send_code("cold-lease", COUNTING.format(count=24))
    wait_for(lambda: lines.exists() and len(lines.read_text().splitlines()) >= 4, 30, "a run")
    found = running_in(task_id)
    assert found is not None
    [frozen] = [worker for worker in cold_workers if worker.hostname == found[0]]
    assert frozen.proc is not None
    first = _interleaved(lines)[0]

    os.killpg(frozen.proc.pid, signal.SIGSTOP)
    try:
        lapses_at = time.time() + clean_state.pttl(keys.session_lock("cold-lease")) / 1000
        rerun = result_of(task_id, 60)
    finally:
        os.killpg(frozen.proc.pid, signal.SIGCONT)
    _wait_unwound(task_id)

    assert result_of(task_id, 5) == rerun and rerun.success
    assert max(_written_at(lines, first)) < lapses_at
    assert len(_written_at(lines, first)) < 24
    assert _written_at(lines, rerun.response.strip()) and rerun.response.strip() != first
    blocks = _interleaved(lines)
    assert len(blocks) == len(set(blocks)), f"two runs interleaved: {blocks}"
