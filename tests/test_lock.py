"""The per-session lock against a real Redis: one owner, fenced, renewed, and loud when lost."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from claudebox_pool.tasks import keys
from claudebox_pool.tasks.errors import LockLostError
from claudebox_pool.workers.lock import SessionLock
from tests.support.processes import RedisServer

TTL_S = 2
RENEW_PERIOD_S = TTL_S / 3
SLACK_S = 0.5
"""Scheduling allowance on top of a renewal period for the renewer thread to notice."""


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis_server.client()
    yield client
    client.close()


@pytest.fixture
def session_id(client: redis.Redis) -> Iterator[str]:
    """A session id no other test uses, its lock and fence keys removed afterwards."""
    session_id = f"lock-{uuid.uuid4().hex[:12]}"
    yield session_id
    client.delete(keys.session_lock(session_id), keys.session_fence(session_id))


@pytest.fixture
def locks(client: redis.Redis, session_id: str) -> Iterator[list[SessionLock]]:
    """Two would-be holders of the same session's lock, released after the test."""
    pair = [SessionLock(client, session_id, TTL_S), SessionLock(client, session_id, TTL_S)]
    yield pair
    for lock in pair:
        lock.release()


def test_only_one_holder_at_a_time(locks: list[SessionLock]) -> None:
    first, second = locks
    assert first.acquire(0)

    assert not second.acquire(0)


def test_a_released_lock_can_be_taken_by_the_next_holder(locks: list[SessionLock]) -> None:
    first, second = locks
    first.acquire(0)
    first.release()

    assert second.acquire(0)


def test_release_by_a_holder_whose_lock_expired_does_not_free_the_new_owners_lock(
    locks: list[SessionLock], client: redis.Redis, session_id: str
) -> None:
    first, second = locks
    first.acquire(0)
    client.delete(keys.session_lock(session_id))  # as if first's TTL ran out while it stalled
    second.acquire(0)

    first.release()

    second.check()
    assert client.exists(keys.session_lock(session_id))


def test_release_by_a_non_holder_leaves_the_lock_held(
    locks: list[SessionLock], client: redis.Redis, session_id: str
) -> None:
    first, second = locks
    first.acquire(0)

    second.release()

    first.check()
    assert client.exists(keys.session_lock(session_id))


def test_each_acquisition_gets_a_higher_fence(client: redis.Redis, session_id: str) -> None:
    fences = []
    for _ in range(3):
        lock = SessionLock(client, session_id, TTL_S)
        lock.acquire(0)
        fences.append(lock.fence)
        lock.release()

    assert fences[0] < fences[1] < fences[2]


def test_renewal_keeps_the_lock_past_its_ttl_while_held(locks: list[SessionLock]) -> None:
    holder, contender = locks
    holder.acquire(0)

    # The contender keeps trying for 2.5 TTLs; without renewal it would win after one.
    started = time.monotonic()
    won = contender.acquire(5)

    assert not won
    assert time.monotonic() - started > 2 * TTL_S
    assert not holder.lost.is_set()
    holder.check()


def test_a_deleted_lock_is_noticed_within_a_renewal_period(
    locks: list[SessionLock], client: redis.Redis, session_id: str
) -> None:
    holder = locks[0]
    holder.acquire(0)

    client.delete(keys.session_lock(session_id))

    assert holder.lost.wait(RENEW_PERIOD_S + SLACK_S)
    with pytest.raises(LockLostError, match="was lost mid-task"):
        holder.check()


def test_a_stolen_lock_is_noticed_within_a_renewal_period(
    locks: list[SessionLock], client: redis.Redis, session_id: str
) -> None:
    holder, thief = locks
    holder.acquire(0)
    client.delete(keys.session_lock(session_id))

    thief.acquire(0)

    assert holder.lost.wait(RENEW_PERIOD_S + SLACK_S)
    with pytest.raises(LockLostError):
        holder.check()
    thief.check()


def test_check_notices_a_stolen_lock_before_the_renewer_does(
    locks: list[SessionLock], client: redis.Redis, session_id: str
) -> None:
    holder, thief = locks
    holder.acquire(0)
    client.delete(keys.session_lock(session_id))
    thief.acquire(0)

    with pytest.raises(LockLostError):
        holder.check()

    assert holder.lost.is_set()
