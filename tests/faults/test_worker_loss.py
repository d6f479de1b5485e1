"""A worker lost mid-task (SIGKILL of its pool child, of its main process) or asked to stop
(SIGTERM) loses no task: the task completes once, and history tells what happened. A lost
pool child's task is requeued at once; a dead main process's is handed back by the other
workers once its heartbeat is three beats old, and runs again within a minute with the default
settings, its caller still waiting; a stopping worker's task finishes where it runs within the
shutdown's grace period, and is requeued at once when it outlives it.

The `local` runtime lets the task script name its pool child (``$PPID``); it also shows that an
agent of that runtime (development only) outlives a killed worker, so the tests reap it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from datetime import UTC, datetime

import pytest
import redis

from claudebox_pool.producer import live, pool, routing
from claudebox_pool.tasks import keys, names
from claudebox_pool.tasks.models import CodeRequest, CodeResult
from tests.conftest import WorkerFactory
from tests.faults.conftest import (
    alive,
    entries_of,
    open_session,
    read_pid,
    reap_stray,
    result_of,
    send_code,
)
from tests.support.processes import Worker, wait_for

LOCK_TTL_S = 2
TASK_LIMIT_S = 10
LOCK_WAIT_S = 6
VISIBILITY_TIMEOUT_S = TASK_LIMIT_S + LOCK_WAIT_S + 1
SHUTDOWN_GRACE_S = 5
CRASH_ENV = {
    "CLAUDEBOX_RUNTIME": "local",
    "CLAUDEBOX_LOCK_TTL_S": str(LOCK_TTL_S),
    "CLAUDEBOX_LOCK_WAIT_S": str(LOCK_WAIT_S),
    "CLAUDEBOX_MAX_ATTEMPTS": "3",
    # Every task of this module ends well within the visibility timeout, which is short
    # enough to wait out: any worker restores what is unacked past it.
    "CLAUDEBOX_TASK_TIME_LIMIT_S": str(TASK_LIMIT_S),
    "CLAUDEBOX_VISIBILITY_MARGIN_S": "1",
    "CLAUDEBOX_SHUTDOWN_GRACE_S": str(SHUTDOWN_GRACE_S),
}

DEFAULT_ENV = {
    "CLAUDEBOX_RUNTIME": "local",
    # The defaults of tasks/settings.py, where tests/conftest.py shortens them.
    "CLAUDEBOX_WORKER_HEARTBEAT_S": "5",
    "CLAUDEBOX_LOCK_TTL_S": "30",
}
RERUN_WITHIN_S = 60
PRODUCER_BUDGET_S = 25
"""The caller's wait: shorter than the rerun takes (the dead holder's lock alone lasts 30 s),
so its outcome arrives only because the wait starts again at the task's second delivery."""

# First delivery: name the pool child and the agent, then hang. Any later one: finish at once.
ONCE_THEN_HANG = (
    'if [ -e .attempted ]; then echo "finished by $PPID"; exit 0; fi; '
    "touch .attempted; echo $$ > .agent.pid; echo $PPID > .child.pid; exec sleep 30"
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def crash_pool(start_workers: WorkerFactory) -> list[Worker]:
    # One slot each: a requeued task must be taken by whichever worker is left.
    return start_workers(2, concurrency=1, **CRASH_ENV)


def _owner(workers: list[Worker], child_pid: int) -> Worker:
    for worker in workers:
        assert worker.proc is not None
        if os.getpgid(child_pid) == worker.proc.pid:
            return worker
    raise AssertionError(f"pid {child_pid} belongs to no worker of the test")


def _delivered_at(client: redis.Redis, task_id: str) -> float | None:
    """When the broker handed ``task_id`` to a worker that has not acked it yet (kombu keeps
    the message in the ``unacked`` hash, scored by delivery time in ``unacked_index``)."""
    for tag, raw in client.hgetall(keys.broker_unacked()).items():
        if task_id.encode() in raw:
            score = client.zscore(keys.broker_unacked_index(), tag)
            return None if score is None else float(score)
    return None


def _epoch(timestamp: object) -> float:
    assert isinstance(timestamp, str)
    return datetime.fromisoformat(timestamp).replace(tzinfo=UTC).timestamp()


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


def test_a_warm_shutdown_lets_the_running_task_finish_and_deliver_its_result(
    crash_pool: list[Worker], clean_state: redis.Redis
) -> None:
    workspace = open_session("warm-stop")
    # Shorter than the grace period: it runs to its end where it started.
    task_id = send_code("warm-stop", "echo $PPID > .child.pid; sleep 2; echo done")
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


def test_a_warm_shutdown_requeues_a_task_that_outlives_the_grace_period_to_another_worker(
    crash_pool: list[Worker], start_workers: WorkerFactory, clean_state: redis.Redis
) -> None:
    crash_pool.extend(start_workers(2 - len(crash_pool), concurrency=1, **CRASH_ENV))
    workspace = open_session("grace-stop")
    task_id = send_code("grace-stop", ONCE_THEN_HANG)
    wait_for(lambda: read_pid(workspace / ".child.pid"), 20, "the first attempt to start")
    child, agent = read_pid(workspace / ".child.pid"), read_pid(workspace / ".agent.pid")
    assert child is not None
    delivered_at = _delivered_at(clean_state, task_id)
    assert delivered_at is not None
    stopping = _owner(crash_pool, child)
    try:
        signalled = time.monotonic()
        stopping.terminate()
        result = result_of(task_id, SHUTDOWN_GRACE_S + 30)
        wait_for(
            lambda: stopping.proc is not None and stopping.proc.poll() is not None,
            20,
            "the stopped worker to exit",
        )
        stopped_after_s = time.monotonic() - signalled
    finally:
        reap_stray(agent)
        stopping.wait_stopped(10)
        crash_pool.remove(stopping)

    assert result.success and result.response.startswith("finished by ")
    assert result.response != f"finished by {child}"
    assert not alive(child)
    assert stopping.proc is not None and stopping.proc.returncode == 0
    assert SHUTDOWN_GRACE_S <= stopped_after_s < SHUTDOWN_GRACE_S + 15
    [run] = entries_of("grace-stop", "code_execution", task_id)
    # Requeued at once, not left for the visibility timeout to hand back.
    assert _epoch(run.context["started_at"]) < delivered_at + VISIBILITY_TIMEOUT_S
    assert len(entries_of("grace-stop", "attempt_interrupted", task_id)) == 1
    wait_for(
        lambda: _delivered_at(clean_state, task_id) is None, 10, "the requeued task to be acked"
    )


def test_a_dead_worker_main_process_has_its_task_run_again_within_a_minute_for_its_caller(
    crash_pool: list[Worker], start_workers: WorkerFactory, clean_state: redis.Redis
) -> None:
    for worker in crash_pool:
        worker.stop()
    crash_pool.clear()
    workers = start_workers(2, concurrency=1, **DEFAULT_ENV)
    workspace = open_session("main-killed")
    sent = time.monotonic()
    task_id = send_code("main-killed", ONCE_THEN_HANG)
    wait_for(lambda: read_pid(workspace / ".child.pid"), 20, "the first attempt to start")
    child, agent = read_pid(workspace / ".child.pid"), read_pid(workspace / ".agent.pid")
    assert child is not None
    victim = _owner(workers, child)
    assert victim.proc is not None
    try:
        # The main process alone: its pool children die with it (Celery's pdeathsig), and
        # nobody is left to reject the task or to ack it.
        victim.proc.kill()
        victim.proc.wait(10)
        killed_at = time.time()
        workers.remove(victim)
        raw = asyncio.run(live.wait(task_id, PRODUCER_BUDGET_S))
        waited_s = time.monotonic() - sent
    finally:
        reap_stray(agent)

    result = CodeResult.model_validate(raw)
    assert result.success and result.response.startswith("finished by ")
    assert waited_s > PRODUCER_BUDGET_S, "the caller's wait outlived its budget"
    [run] = entries_of("main-killed", "code_execution", task_id)
    assert _epoch(run.context["started_at"]) - killed_at < RERUN_WITHIN_S
    assert len(entries_of("main-killed", "attempt_interrupted", task_id)) == 1
    # Nothing of it is left where nobody consumes: not unacked, not in the dead one's queue.
    wait_for(lambda: _delivered_at(clean_state, task_id) is None, 10, "the rerun to be acked")
    assert clean_state.llen(names.worker_queue(victim.hostname)) == 0
    assert clean_state.hlen(keys.worker_deliveries(victim.hostname)) == 0


def test_a_task_sent_to_a_dead_worker_own_queue_runs_again_on_its_node(
    start_workers: WorkerFactory, clean_state: redis.Redis
) -> None:
    # bwrap workers keep sandboxes warm, so a session's tasks go to its keeper's own queue.
    warm = start_workers(2, concurrency=1)
    workspace = open_session("own-queue")
    result_of(send_code("own-queue", "true"), 30)
    keeper: bytes | None = clean_state.get(keys.warm("own-queue"))  # type: ignore[assignment]
    assert keeper is not None
    [victim] = [worker for worker in warm if worker.hostname == keeper.decode()]
    assert victim.proc is not None
    route = asyncio.run(_route("own-queue"))
    assert route.queue == names.worker_queue(victim.hostname)
    task_id, _ = asyncio.run(live.send(names.CODE, _code("own-queue", ONCE_THEN_HANG)))
    wait_for(lambda: (workspace / ".attempted").exists(), 20, "the first attempt to start")

    victim.proc.kill()
    victim.proc.wait(10)
    warm.remove(victim)
    result = result_of(task_id, 60)

    assert result.success and result.response.startswith("finished by ")
    assert len(entries_of("own-queue", "attempt_interrupted", task_id)) == 1
    wait_for(lambda: _delivered_at(clean_state, task_id) is None, 10, "the rerun to be acked")
    assert clean_state.llen(names.worker_queue(victim.hostname)) == 0


async def _route(session_id: str) -> routing.Route:
    return await routing.route({"session_id": session_id}, await pool.redis_client())


def _code(session_id: str, prompt: str) -> dict[str, object]:
    return CodeRequest(session_id=session_id, prompt=prompt, agent="shell").model_dump(mode="json")
