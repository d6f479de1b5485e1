"""Redis down for a minute while a task runs: the worker rides it out and serves the next task.

This module runs its own Redis (append-only, so that the queue and the registry come back),
home and worker, so that stopping Redis hurts no other test.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from tests.conftest import WorkerFactory
from tests.faults.conftest import open_session, read_pid, result_of, send_code
from tests.faults.test_redis_restart import reconfigure
from tests.support.processes import RedisServer, Worker, wait_for

OUTAGE_S = 60

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def outage_redis(
    pool_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RedisServer, Worker]]:
    base = tmp_path_factory.mktemp("redis-outage")
    server = RedisServer(base / "redis", appendonly=True)
    server.start()
    env = {
        "CLAUDEBOX_BROKER_URL": server.url,
        "CLAUDEBOX_RESULT_BACKEND": server.url,
        "CLAUDEBOX_HOME": str(base / "home"),
        "CLAUDEBOX_RUNTIME": "local",
        "CLAUDEBOX_LOCK_WAIT_S": "30",
    }
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    reconfigure()
    worker = Worker({**pool_env, **env}, base / "logs", concurrency=2)
    try:
        worker.start()
        worker.wait_ready(server.client())
        yield server, worker
    finally:
        worker.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        reconfigure()
        server.stop()


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
