"""Every producer call that meets an unreachable Redis raises the same PoolUnavailableError.

The translation lives in one place (``producer.pool.map_redis_errors``); these call it from
sync code, from async code and through kombu, against a port nothing listens on.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from celery import states

from claudebox_pool.producer import lifecycle, live, pool
from claudebox_pool.producer.client import ClaudeBox
from claudebox_pool.producer.pool import OUTAGE_MAX_PAUSE_S
from claudebox_pool.tasks import names
from claudebox_pool.tasks.app import app, configure
from claudebox_pool.tasks.errors import PoolUnavailableError
from claudebox_pool.tasks.settings import get_settings
from tests.support.processes import RedisServer, free_port

PASSWORD = "hunter2"


@pytest.fixture
def dead_redis(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The producer pointed at a Redis URL (with a password) where nothing listens."""
    where = f"127.0.0.1:{free_port()}"
    url = f"redis://:{PASSWORD}@{where}/0"
    monkeypatch.setenv("CLAUDEBOX_BROKER_URL", url)
    monkeypatch.setenv("CLAUDEBOX_RESULT_BACKEND", url)
    get_settings.cache_clear()
    configure()
    yield where
    monkeypatch.undo()
    get_settings.cache_clear()
    configure()


@pytest.fixture
def dead_broker(pool_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Only the broker unreachable: the result backend (which Celery subscribes to as it sends
    a task, and whose failure it reports as a RuntimeError of its own) is the test's Redis."""
    where = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("CLAUDEBOX_BROKER_URL", f"redis://:{PASSWORD}@{where}/0")
    get_settings.cache_clear()
    configure()
    yield where
    monkeypatch.undo()
    get_settings.cache_clear()
    configure()


async def _first_event(task_id: str) -> None:
    async for _ in live.events(task_id):
        break


CALLS: dict[str, Callable[[], object]] = {
    "list_sessions (sync)": ClaudeBox.list_sessions,
    "checkpoints (sync)": lambda: lifecycle.checkpoints("some-session"),
    "ensure_workers (async)": lambda: asyncio.run(pool.ensure_workers()),
    "cancel (async)": lambda: asyncio.run(live.cancel("5f1c2a")),
    "events (async generator)": lambda: asyncio.run(_first_event("5f1c2a")),
}


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
def test_an_unreachable_redis_is_a_pool_unavailable_error_naming_it(
    dead_redis: str, call: Callable[[], object]
) -> None:
    with pytest.raises(PoolUnavailableError) as raised:
        call()

    _assert_names(raised.value, dead_redis)


def test_an_unreachable_broker_when_sending_is_the_same_error(dead_broker: str) -> None:
    with pytest.raises(PoolUnavailableError) as raised:
        pool.send(names.CLEANUP, {"session_id": "x"})

    _assert_names(raised.value, dead_broker)


def _assert_names(error: PoolUnavailableError, where: str) -> None:
    message = str(error)
    assert "cannot reach Redis at redis://" in message and where in message
    assert "CLAUDEBOX_BROKER_URL" in message
    assert PASSWORD not in message
    # The redis-py traceback is left out: the message says all a user can act on.
    assert error.__suppress_context__


@pytest.fixture
def own_redis(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RedisServer]:
    """A Redis of this test's own, which it may kill; outages ridden out for 3 s."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    monkeypatch.setenv("CLAUDEBOX_BROKER_URL", server.url)
    monkeypatch.setenv("CLAUDEBOX_RESULT_BACKEND", server.url)
    monkeypatch.setenv("CLAUDEBOX_REDIS_OUTAGE_S", "3")
    get_settings.cache_clear()
    configure()
    try:
        yield server
    finally:
        server.stop()
        monkeypatch.undo()
        get_settings.cache_clear()
        configure()


def test_a_wait_rides_out_a_redis_restart_and_takes_the_result_stored_after_it(
    own_redis: RedisServer,
) -> None:
    task_id = str(uuid.uuid4())

    async def scenario() -> object:
        waiting = asyncio.ensure_future(pool.wait(task_id, 30))
        await asyncio.sleep(0.3)  # the wait's first read goes to the live Redis
        assert own_redis.proc is not None
        own_redis.proc.kill()
        own_redis.proc.wait(10)
        await asyncio.sleep(1)  # the outage, shorter than CLAUDEBOX_REDIS_OUTAGE_S
        own_redis.start()
        app.backend.store_result(task_id, {"answer": 42}, states.SUCCESS)
        return await waiting

    assert asyncio.run(scenario()) == {"answer": 42}


def test_a_wait_gives_up_once_redis_is_away_past_the_outage_limit(
    own_redis: RedisServer,
) -> None:
    async def scenario() -> float:
        waiting = asyncio.ensure_future(pool.wait(str(uuid.uuid4()), 60))
        await asyncio.sleep(0.3)
        own_redis.stop()
        lost_at = time.monotonic()
        with pytest.raises(PoolUnavailableError):
            await waiting
        return time.monotonic() - lost_at

    waited_s = asyncio.run(scenario())

    # The last try is at the limit; the one before it at most a pause earlier.
    assert 3 <= waited_s <= 3 + OUTAGE_MAX_PAUSE_S
