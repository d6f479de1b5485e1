"""Shared fixtures: one real redis-server for the run, real worker processes per module.

The test process and the workers share HOME (a temp dir), so the guide's `~/.claudebox/...`
paths mean the same directory on both sides, as they would for a user on one machine.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from claudebox_pool.tasks import keys
from claudebox_pool.tasks.app import configure
from claudebox_pool.tasks.settings import default_cli_dir, get_settings
from tests.support.processes import RedisServer, Worker, wait_for

# A shell without job control starts a background command with SIGINT ignored, and an ignored
# signal stays ignored through exec: the Ctrl-C tests' processes would never see theirs. Handled
# here, it is the default again in every process the tests start.
signal.signal(signal.SIGINT, signal.default_int_handler)

_BASE = Path(tempfile.mkdtemp(prefix="claudebox-tests-"))
HOME = _BASE / "home"
HOME.mkdir()
# Found before the tests move HOME: the pinned CLI that scripts/setup installed, if any.
CLAUDE_CLI = os.environ.get("CLAUDEBOX_CLAUDE_CLI") or str(
    default_cli_dir() / "node_modules" / ".bin" / "claude"
)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer(_BASE / "redis")
    server.start()
    yield server
    server.stop()
    shutil.rmtree(_BASE, ignore_errors=True)


@pytest.fixture(scope="session")
def pool_env(redis_server: RedisServer) -> dict[str, str]:
    """The environment of the pool under test, applied to this process too."""
    env = {
        "HOME": str(HOME),
        "CLAUDEBOX_BROKER_URL": redis_server.url,
        "CLAUDEBOX_RESULT_BACKEND": redis_server.url,
        "CLAUDEBOX_RUNTIME": "bwrap",
        "CLAUDEBOX_AGENT": "shell",
        "CLAUDEBOX_LOCK_TTL_S": "10",
        "CLAUDEBOX_WORKER_HEARTBEAT_S": "1",
        "CLAUDEBOX_CLAUDE_CLI": CLAUDE_CLI,
    }
    for name in list(os.environ):
        if name.startswith("CLAUDEBOX_"):
            del os.environ[name]
    os.environ.update(env)
    get_settings.cache_clear()
    configure()
    return {**os.environ, **env}


WorkerFactory = Callable[..., list[Worker]]


@pytest.fixture(scope="module")
def start_workers(pool_env: dict[str, str], redis_server: RedisServer) -> Iterator[WorkerFactory]:
    started: list[Worker] = []

    def start(count: int = 1, concurrency: int = 2, **env: str) -> list[Worker]:
        batch = [
            Worker({**pool_env, **env}, _BASE / "logs", concurrency=concurrency)
            for _ in range(count)
        ]
        for worker in batch:
            worker.start()
        client = redis_server.client()
        for worker in batch:
            worker.wait_ready(client)
        started.extend(batch)
        return batch

    yield start
    for worker in started:
        worker.terminate()
    for worker in started:
        worker.wait_stopped()


@pytest.fixture(scope="module")
def pool(start_workers: WorkerFactory) -> list[Worker]:
    """A running pool: one worker process with two slots, bwrap runtime, shell agent."""
    return start_workers(1, concurrency=2)


@pytest.fixture
def clean_state(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """No session on disk and none registered, before and after the test."""
    client = redis_server.client()

    def wipe() -> None:
        sessions = get_settings().sessions_root

        def removed() -> bool:
            # A worker may still be finishing a file in it (a redelivered task's last step).
            try:
                shutil.rmtree(sessions)
            except FileNotFoundError:
                return not sessions.exists()  # something in it went meanwhile
            except OSError as exc:
                if exc.errno != errno.ENOTEMPTY:
                    raise
                return False
            return True

        wait_for(removed, 10, f"{sessions} to be removed")
        # What the running workers said of themselves stays: they (and their nodes) live on.
        kept = {keys.workers(), keys.nodes(), keys.worker_info(), keys.worker_queues()}
        for key in client.scan_iter(f"{keys.PREFIX}*"):
            if key.decode() not in kept:
                client.delete(key)

    wipe()
    yield client
    wipe()
