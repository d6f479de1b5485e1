"""A killed pool child leaves nothing of its command running in the sandbox, and its task
completes once on the redelivery; so does a task stopped at the end of a shutdown's grace
period."""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest
import redis

from claudebox_pool.tasks import keys
from tests.conftest import WorkerFactory
from tests.faults.conftest import entries_of, open_session, result_of, running_in, send_code
from tests.support.processes import Worker, wait_for
from tests.support.sandboxes import parent_of, processes_naming, sandboxes_of

pytestmark = pytest.mark.slow

SHUTDOWN_GRACE_S = 3


@pytest.fixture(scope="module")
def bwrap_pool(start_workers: WorkerFactory) -> list[Worker]:
    return start_workers(
        2,
        concurrency=1,
        CLAUDEBOX_LOCK_TTL_S="2",
        CLAUDEBOX_LOCK_WAIT_S="30",
        CLAUDEBOX_SHUTDOWN_GRACE_S=str(SHUTDOWN_GRACE_S),
    )


def orphaned_sandboxes(workspace: Path, workers: list[Worker]) -> list[int]:
    """Sandboxes (outer bwrap processes) binding ``workspace`` that no running worker started:
    whatever a stopped worker left behind."""
    running = {worker.proc.pid for worker in workers if worker.proc is not None}
    orphans = []
    for pid, parent in sandboxes_of(workspace).items():
        try:
            started_by_worker = parent is not None and os.getpgid(parent) in running
        except ProcessLookupError:
            started_by_worker = False
        if not started_by_worker and parent_of(pid) is not None:
            orphans.append(pid)
    return orphans


def hang_once(session_id: str) -> tuple[str, str]:
    """Send a task whose first attempt hangs in its sandbox and whose next one finishes; its
    task id and the marker naming what runs in the sandbox (a sleep of a unique length)."""
    marker = f"29.{random.randrange(10**8):08d}"
    task_id = send_code(
        session_id,
        f"if [ -e .attempted ]; then echo finished; exit 0; fi; touch .attempted; "
        f"exec sleep {marker}",
    )
    return task_id, marker


def hanging(workers: list[Worker], task_id: str, marker: str) -> tuple[Worker, int]:
    """Once the first attempt hangs in its sandbox: its worker and pool process."""
    wait_for(lambda: processes_naming(marker), 20, "the command in the sandbox")
    running = running_in(task_id)
    assert running is not None
    hostname, child = running
    [worker] = [worker for worker in workers if worker.hostname == hostname]
    return worker, child


def test_a_killed_pool_child_takes_its_sandbox_with_it(
    bwrap_pool: list[Worker], clean_state: redis.Redis
) -> None:
    open_session("sandboxed")
    task_id, marker = hang_once("sandboxed")
    _, child = hanging(bwrap_pool, task_id, marker)

    os.kill(child, signal.SIGKILL)
    wait_for(lambda: not processes_naming(marker), 5, "the sandbox to die with its worker")
    result = result_of(task_id, 60)

    assert result.success and result.response.strip() == "finished"
    assert len(entries_of("sandboxed", "code_execution", task_id)) == 1
    assert len(entries_of("sandboxed", "attempt_interrupted", task_id)) == 1
    assert clean_state.exists(keys.session_lock("sandboxed")) == 0


def test_a_task_stopped_at_the_end_of_the_shutdown_grace_takes_its_sandbox_with_it(
    bwrap_pool: list[Worker], clean_state: redis.Redis
) -> None:
    workspace = open_session("sandbox-stopped")
    task_id, marker = hang_once("sandbox-stopped")
    stopping, _ = hanging(bwrap_pool, task_id, marker)

    signalled = time.monotonic()
    stopping.terminate()
    try:
        wait_for(
            lambda: not processes_naming(marker),
            SHUTDOWN_GRACE_S + 10,
            "the sandbox to be stopped with its task",
        )
        stopped_after_s = time.monotonic() - signalled
        result = result_of(task_id, 60)
    finally:
        stopping.wait_stopped(20)
        bwrap_pool.remove(stopping)

    assert stopped_after_s >= SHUTDOWN_GRACE_S
    assert orphaned_sandboxes(workspace, bwrap_pool) == []
    assert result.success and result.response.strip() == "finished"
    assert len(entries_of("sandbox-stopped", "code_execution", task_id)) == 1
    assert len(entries_of("sandbox-stopped", "attempt_interrupted", task_id)) == 1
    assert stopping.proc is not None and stopping.proc.returncode == 0
