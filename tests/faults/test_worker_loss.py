"""A worker lost mid-task (SIGKILL of its pool child, of its whole process group) or asked to
stop (SIGTERM) loses no task: the task completes once, and history tells what happened.

The `local` runtime lets the task script name its pool child (``$PPID``); it also shows that an
agent of that runtime (development only) outlives a killed worker, so the tests reap it.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import redis

from tasks import keys
from tasks.app import app
from tests.conftest import WorkerFactory
from tests.faults.conftest import (
    entries_of,
    open_session,
    read_pid,
    reap_stray,
    result_of,
    send_code,
)
from tests.support.processes import Worker, wait_for

LOCK_TTL_S = 2

# First delivery: name the pool child and the agent, then hang. Any later one: finish at once.
ONCE_THEN_HANG = (
    'if [ -e .attempted ]; then echo "finished by $PPID"; exit 0; fi; '
    "touch .attempted; echo $$ > .agent.pid; echo $PPID > .child.pid; exec sleep 30"
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def crash_pool(start_workers: WorkerFactory) -> list[Worker]:
    # One slot each: a requeued task must be taken by whichever worker is left.
    return start_workers(
        2,
        concurrency=1,
        CLAUDEBOX_RUNTIME="local",
        CLAUDEBOX_LOCK_TTL_S=str(LOCK_TTL_S),
        CLAUDEBOX_LOCK_WAIT_S="30",
        CLAUDEBOX_MAX_ATTEMPTS="3",
    )


def _owner(workers: list[Worker], child_pid: int) -> Worker:
    for worker in workers:
        assert worker.proc is not None
        if os.getpgid(child_pid) == worker.proc.pid:
            return worker
    raise AssertionError(f"pid {child_pid} belongs to no worker of the test")


def test_a_killed_pool_child_requeues_its_task_which_completes_once(
    crash_pool: list[Worker], clean_state: redis.Redis
) -> None:
    workspace = open_session("child-killed")
    task_id = send_code("child-killed", ONCE_THEN_HANG)
    wait_for(lambda: read_pid(workspace / ".child.pid"), 20, "the first attempt to start")
    child, agent = read_pid(workspace / ".child.pid"), read_pid(workspace / ".agent.pid")
    assert child is not None
    try:
        os.kill(child, signal.SIGKILL)
        # Its renewer died with it: the lock lapses within one TTL, it is not held forever.
        assert clean_state.pttl(keys.session_lock("child-killed")) <= LOCK_TTL_S * 1000

        result = result_of(task_id, 60)
    finally:
        reap_stray(agent)

    assert result.success and result.response.startswith("finished by ")
    assert result.response != f"finished by {child}"
    assert len(entries_of("child-killed", "code_execution", task_id)) == 1
    assert len(entries_of("child-killed", "attempt_interrupted", task_id)) == 1
    assert clean_state.exists(keys.session_lock("child-killed")) == 0
    assert all(worker.proc is not None and worker.proc.poll() is None for worker in crash_pool)


def test_a_killed_worker_leaves_its_task_unacked_for_redelivery_after_the_visibility_timeout(
    crash_pool: list[Worker], start_workers: WorkerFactory, clean_state: redis.Redis
) -> None:
    workspace = open_session("worker-killed")
    task_id = send_code("worker-killed", ONCE_THEN_HANG)
    wait_for(lambda: read_pid(workspace / ".child.pid"), 20, "the first attempt to start")
    child, agent = read_pid(workspace / ".child.pid"), read_pid(workspace / ".agent.pid")
    assert child is not None
    victim = _owner(crash_pool, child)
    try:
        victim.kill()  # SIGKILL to the whole process group: nobody is left to reject the task
        crash_pool.remove(victim)
        crash_pool.extend(
            start_workers(
                1,
                concurrency=1,
                CLAUDEBOX_RUNTIME="local",
                CLAUDEBOX_LOCK_TTL_S=str(LOCK_TTL_S),
                CLAUDEBOX_LOCK_WAIT_S="30",
                CLAUDEBOX_MAX_ATTEMPTS="3",
            )
        )
        wait_for(
            lambda: clean_state.exists(keys.session_lock("worker-killed")) == 0,
            LOCK_TTL_S + 2,
            "the dead worker's session lock to expire",
        )
        # Not lost: the message waits in the broker's unacked set, not in the queue.
        unacked = clean_state.hvals("unacked")
        assert any(task_id.encode() in raw for raw in unacked)
        # Redis hands it back once it is older than the visibility timeout (over 600 s in
        # this pool); a restore pass with a zero timeout stands in for that wait.
        with app.connection_for_write(transport_options={"visibility_timeout": 0}) as connection:
            connection.default_channel.qos.restore_visible(num=100)
        started = time.monotonic()
        result = result_of(task_id, 60)
    finally:
        reap_stray(agent)

    assert result.success and result.response.startswith("finished by ")
    assert time.monotonic() - started < 30
    assert len(entries_of("worker-killed", "code_execution", task_id)) == 1
    assert len(entries_of("worker-killed", "attempt_interrupted", task_id)) == 1
    # Acked after its result is stored (late ack): gone from the unacked set soon after.
    wait_for(
        lambda: not any(task_id.encode() in raw for raw in clean_state.hvals("unacked")),
        10,
        "the redelivered task to be acked",
    )


def test_a_warm_shutdown_lets_the_running_task_finish_and_deliver_its_result(
    crash_pool: list[Worker], clean_state: redis.Redis
) -> None:
    workspace = open_session("warm-stop")
    task_id = send_code("warm-stop", "echo $PPID > .child.pid; sleep 3; echo done")
    wait_for(lambda: read_pid(workspace / ".child.pid"), 20, "the task to start")
    child = read_pid(workspace / ".child.pid")
    assert child is not None
    stopping = _owner(crash_pool, child)

    stopping.terminate()
    result = result_of(task_id, 30)
    stopping.wait_stopped(20)
    crash_pool.remove(stopping)

    assert result.success and result.response.strip() == "done"
    assert stopping.proc is not None and stopping.proc.returncode == 0
    assert len(entries_of("warm-stop", "code_execution", task_id)) == 1
    assert entries_of("warm-stop", "attempt_interrupted", task_id) == []
