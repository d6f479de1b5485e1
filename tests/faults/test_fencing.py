"""A worker paused past its lock's TTL (SIGSTOP) cannot write to a session that another worker
took over meanwhile: once resumed, its writes are refused with LockLostError."""

from __future__ import annotations

import os
import signal

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
