"""Warm sandboxes through a real pool: a session's next task runs in the sandbox its last task
left running, on the worker keeping it; one sandbox per session at any time; a worker killed
while keeping one leaves nothing that blocks the session."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest
import redis

from claudebox_pool import ClaudeBox
from claudebox_pool.producer import pool, routing
from claudebox_pool.tasks import keys, names
from claudebox_pool.tasks.app import app
from claudebox_pool.tasks.models import CodeRequest
from claudebox_pool.tasks.settings import get_settings
from tests.conftest import WorkerFactory
from tests.faults.conftest import result_of
from tests.support.processes import Worker, redis_forgot, tcp_ports_of, wait_for
from tests.support.sandboxes import SANDBOX_ID, sandboxes_of


@pytest.fixture(scope="module")
def warm_pool(start_workers: WorkerFactory) -> list[Worker]:
    return start_workers(2, concurrency=2, CLAUDEBOX_WARM_IDLE_S="60")


def run_calls(session_id: str, prompts: list[str], *, new: bool = True) -> list[str]:
    """Run ``prompts`` one after another in a persistent session (``new``, or an existing
    one); their outputs."""

    async def scenario() -> list[str]:
        opened = ClaudeBox(session_id=session_id) if new else ClaudeBox.reconnect(session_id)
        async with opened as box:
            outputs = []
            for prompt in prompts:
                result = await box.code(prompt)
                assert result.success, result.error
                outputs.append(result.response.strip())
            return outputs

    return asyncio.run(scenario())


def workspace(session_id: str) -> Path:
    return get_settings().sessions_root / session_id / "workspace"


def keeper_of(client: redis.Redis, session_id: str) -> str | None:
    owner = client.get(keys.warm(session_id))
    return owner.decode() if isinstance(owner, bytes) else owner


def worker_named(workers: list[Worker], hostname: str | None) -> Worker:
    [found] = [worker for worker in workers if worker.hostname == hostname]
    return found


def test_the_next_calls_of_a_session_reuse_its_warm_sandbox(
    warm_pool: list[Worker], clean_state: redis.Redis
) -> None:
    outputs = run_calls("reused", [SANDBOX_ID] * 6 + ["touch /tmp/kept", "ls /tmp | grep -x kept"])

    assert len(set(outputs[:6])) == 1  # six calls, one sandbox
    assert outputs[-1] == "kept"  # the sandbox's own /tmp lives on between its tasks
    keeper = worker_named(warm_pool, keeper_of(clean_state, "reused"))
    assert list(sandboxes_of(workspace("reused")).values()) == [keeper.proc.pid]  # type: ignore[union-attr]
    route = asyncio.run(_route("reused"))
    assert route.queue == names.worker_queue(keeper.hostname)


def test_sessions_each_get_their_own_warm_sandbox(
    warm_pool: list[Worker], clean_state: redis.Redis
) -> None:
    first = run_calls("own-a", [SANDBOX_ID, "echo a > mine; cat mine"])
    second = run_calls("own-b", [SANDBOX_ID, "cat mine 2>&1 || true"])

    assert first[0] != second[0]
    assert first[1] == "a"
    assert "No such file" in second[1]


def test_cleanup_stops_the_warm_sandbox(warm_pool: list[Worker], clean_state: redis.Redis) -> None:
    run_calls("cleaned", [SANDBOX_ID])
    assert len(sandboxes_of(workspace("cleaned"))) == 1

    asyncio.run(ClaudeBox.cleanup_session("cleaned", remove_workspace=False))

    assert sandboxes_of(workspace("cleaned")) == {}
    assert keeper_of(clean_state, "cleaned") is None
    # The next call starts a new sandbox, and keeps it.
    run_calls("cleaned", [SANDBOX_ID], new=False)
    assert len(sandboxes_of(workspace("cleaned"))) == 1


def test_a_restored_workspace_is_never_served_by_a_sandbox_bound_to_the_old_one(
    warm_pool: list[Worker], clean_state: redis.Redis
) -> None:
    async def scenario() -> tuple[str, str]:
        async with ClaudeBox(session_id="restored") as box:
            await box.code("echo before > state")
            await box.checkpoint("before")
            await box.code("echo after > state")
            await box.restore("before")
            return (await box.code("cat state")).response.strip(), box.workspace_path

    state, path = asyncio.run(scenario())

    assert state == "before"
    assert len(sandboxes_of(path)) == 1


def test_a_run_through_the_model_gateway_is_cold_and_no_warm_sandbox_stays_beside_it(
    warm_pool: list[Worker], clean_state: redis.Redis
) -> None:
    run_calls("gated", [SANDBOX_ID])
    assert len(sandboxes_of(workspace("gated"))) == 1

    async def claude_run() -> str | None:
        async with ClaudeBox.reconnect("gated") as box:
            return (await box.code("say hello", agent="claude")).error

    error = asyncio.run(claude_run())

    assert error  # no model credential in this pool: the CLI says so, from a cold sandbox
    assert sandboxes_of(workspace("gated")) == {}
    assert keeper_of(clean_state, "gated") is None


def test_a_task_taken_by_another_worker_stops_the_first_ones_sandbox(
    warm_pool: list[Worker], clean_state: redis.Redis
) -> None:
    first_ns = run_calls("handed", [SANDBOX_ID])[0]
    holder = worker_named(warm_pool, keeper_of(clean_state, "handed"))
    [other] = [worker for worker in warm_pool if worker is not holder]

    # Sent past the routing, to the other worker's own queue.
    payload = CodeRequest(session_id="handed", prompt=SANDBOX_ID, agent="shell")
    task_id = app.send_task(
        names.CODE,
        args=[payload.model_dump(mode="json")],
        queue=names.worker_queue(other.hostname),
    ).id
    result = result_of(str(task_id), 30)

    assert result.success and result.response.strip() != first_ns
    assert keeper_of(clean_state, "handed") == other.hostname
    assert list(sandboxes_of(workspace("handed")).values()) == [other.proc.pid]  # type: ignore[union-attr]


def test_a_worker_stopped_cleanly_takes_its_sandboxes_and_leaves_no_task_behind(
    warm_pool: list[Worker], start_workers: WorkerFactory, clean_state: redis.Redis
) -> None:
    run_calls("left", [SANDBOX_ID])
    leaving = worker_named(warm_pool, keeper_of(clean_state, "left"))

    leaving.terminate()
    leaving.wait_stopped(30)
    warm_pool.remove(leaving)
    warm_pool.extend(start_workers(1, concurrency=2, CLAUDEBOX_WARM_IDLE_S="60"))
    # Sent to it by a producer that routed the task a moment before it stopped.
    payload = CodeRequest(session_id="left", prompt="echo rescued", agent="shell")
    task_id = pool.send(
        names.CODE, payload.model_dump(mode="json"), names.worker_queue(leaving.hostname)
    )
    result = result_of(task_id, 30)

    assert sandboxes_of(workspace("left")) != {}  # the new one, on the worker that ran it
    assert keeper_of(clean_state, "left") != leaving.hostname
    assert result.success and result.response.strip() == "rescued"
    assert leaving.proc is not None and leaving.proc.returncode == 0


def test_a_worker_killed_while_keeping_a_warm_sandbox_leaves_nothing_blocking_the_session(
    warm_pool: list[Worker], start_workers: WorkerFactory, clean_state: redis.Redis
) -> None:
    first_ns = run_calls("orphaned", [SANDBOX_ID])[0]
    victim = worker_named(warm_pool, keeper_of(clean_state, "orphaned"))
    assert victim.proc is not None
    survivors = [worker for worker in warm_pool if worker is not victim]

    ports = tcp_ports_of(victim.proc.pid)
    os.killpg(victim.proc.pid, signal.SIGKILL)
    warm_pool.remove(victim)
    victim.proc.wait(10)
    # Until Redis has noticed its connections closed, it may still hand the dead worker a
    # message it pops and nobody receives (kombu's Redis transport takes a message off its list
    # before it records it as unacked): no test of what happens after could be sure.
    wait_for(lambda: redis_forgot(clean_state, ports), 10, "Redis to drop the worker's links")
    # The sandbox dies with the worker's main process (bwrap's --die-with-parent).
    wait_for(lambda: not sandboxes_of(workspace("orphaned")), 5, "the sandbox to die")
    assert clean_state.exists(keys.session_lock("orphaned")) == 0
    # Its heartbeat is still fresh: the producer still sends the session's task its way.
    route = asyncio.run(_route("orphaned"))
    assert route.queue == names.worker_queue(victim.hostname)
    task_id = pool.send(
        names.CODE,
        CodeRequest(session_id="orphaned", prompt=SANDBOX_ID, agent="shell").model_dump(
            mode="json"
        ),
        route.queue,
    )

    # A surviving worker moves it out of the dead worker's queue and runs it.
    result = result_of(task_id, 30)

    assert result.success and result.response.strip() != first_ns
    assert clean_state.llen(names.worker_queue(victim.hostname)) == 0
    assert any("moved from a dead worker's queue" in worker.log() for worker in survivors)
    warm_pool.extend(start_workers(1, concurrency=2, CLAUDEBOX_WARM_IDLE_S="60"))


async def _route(session_id: str) -> routing.Route:
    return await routing.route({"session_id": session_id}, await pool.redis_client())
