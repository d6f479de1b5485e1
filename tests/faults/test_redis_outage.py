"""Redis down for a minute while a task runs: the worker rides it out and serves the next task.

This module runs its own Redis (append-only, so that the queue and the registry come back),
home and worker, so that stopping Redis hurts no other test.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.conftest import WorkerFactory
from tests.faults.conftest import open_session, pool_of_its_own, read_pid, result_of, send_code
from tests.support.processes import RedisServer, Worker, wait_for

OUTAGE_S = 60

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def outage_redis(
    pool_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RedisServer, Worker]]:
    base = tmp_path_factory.mktemp("redis-outage")
    with pool_of_its_own(pool_env, base, CLAUDEBOX_LOCK_WAIT_S="30") as (server, worker):
        yield server, worker


def test_a_worker_survives_redis_down_for_a_minute_during_a_task(
    outage_redis: tuple[RedisServer, Worker], start_workers: WorkerFactory
) -> None:
    server, worker = outage_redis
    workspace = open_session("outage")
    send_code("outage", "echo $$ > .agent.pid; sleep 5; echo slept")
    wait_for(lambda: read_pid(workspace / ".agent.pid"), 20, "the task to start")

    assert server.proc is not None
    server.proc.kill()
    server.proc.wait(10)
    down_until = time.monotonic() + OUTAGE_S
    while time.monotonic() < down_until:
        assert worker.proc is not None and worker.proc.poll() is None, worker.log()[-4000:]
        time.sleep(1)  # watching the worker through the outage, not waiting for an event
    server.start()  # same port, same directory: the append-only file is replayed

    after = result_of(send_code("outage", "echo after the outage"), 60)

    assert after.success and after.response.strip() == "after the outage"
    assert worker.proc is not None and worker.proc.poll() is None, worker.log()[-4000:]
    assert "Unrecoverable error" not in worker.log()
