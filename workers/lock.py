"""The per-session lock: one owner at a time, fenced, renewed while its task runs.

redis-py's ``Lock`` gives the owner token, the TTL and the owner-only release (a Lua
compare-and-delete). On top of it this adds what long tasks need:

- a fencing number, bumped at every acquisition and written into session.json, so that a holder
  that stalled past its TTL (GC pause, SIGSTOP) cannot overwrite a newer holder's writes; the
  lock and its number are taken in one script, so one round trip and never one without the other;
- a renewal every third of the TTL, on the process's ticker thread (``workers.ticker``); when a
  renewal finds the lock gone, the ``lost`` event is set, the running agent is stopped and
  every later write is refused;
- a lease (:func:`lease_left`): how long the holder's sandbox may run its command without
  hearing of a renewal, which ends before Redis could free the lock.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from types import TracebackType
from typing import Self

import redis
from redis.exceptions import LockError, RedisError

from claudebox_pool.tasks import keys
from claudebox_pool.tasks.errors import LockLostError
from claudebox_pool.workers import ticker

log = logging.getLogger(__name__)

RETRY_S = 0.1
"""How often a waiting ``acquire`` tries again (redis-py's own lock polls as often)."""
LEASE_SHARE = 5 / 6
"""The share of the TTL after its last renewal that a holder's sandbox may go on running: the
rest covers the renewal's way to the sandbox, so that it stops before Redis frees the lock."""

_held: set[SessionLock] = set()
_held_guard = threading.Lock()

CHECK_FIRST_PAUSE_S = 0.1
CHECK_MAX_PAUSE_S = 2.0
"""Backoff of a write guard's check while Redis cannot be reached."""

_ACQUIRE = """
-- KEYS[1] the session's lock (keys.session_lock), KEYS[2] its fencing counter (session_fence)
-- ARGV[1] the new holder's token, ARGV[2] the lock's TTL in milliseconds
-- Returns the holder's fencing number, or 0 when another holder has the lock.
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return redis.call('INCR', KEYS[2])
end
return 0
"""


class SessionLock:
    def __init__(self, client: redis.Redis, session_id: str, ttl_s: int) -> None:
        self.session_id = session_id
        self.ttl_s = ttl_s
        self._client = client
        # redis-py's lock for what follows the acquisition: renew, owner check, release.
        self._lock = client.lock(keys.session_lock(session_id), timeout=ttl_s, thread_local=False)
        self._acquire = client.register_script(_ACQUIRE)
        self.fence = 0
        self.lost = threading.Event()
        # Held by a renewal and by the release, so that no renewal runs once released.
        self._renewing = threading.Lock()
        self._renewal: ticker.Chore | None = None
        self._renewed_at = 0.0

    def acquire(self, wait_s: float) -> bool:
        """Take the lock, waiting up to ``wait_s``; start renewing it. False if still busy."""
        token = uuid.uuid4().hex.encode()
        lock_keys = [keys.session_lock(self.session_id), keys.session_fence(self.session_id)]
        give_up_at = time.monotonic() + wait_s
        while True:
            taken_at = time.monotonic()
            fence = int(self._acquire(keys=lock_keys, args=[token, int(self.ttl_s * 1000)]))
            if fence:
                break
            if time.monotonic() + RETRY_S > give_up_at:
                return False
            time.sleep(RETRY_S)
        # What redis-py's own acquire records: its renew, owner check and release compare it.
        self._lock.local.token = token
        self.fence = fence
        with self._renewing:
            self._renewed_at = taken_at
            self._renewal = ticker.every(self.ttl_s / 3, self._renew)
        with _held_guard:
            _held.add(self)
        return True

    def lease_s(self) -> float:
        """How long this holder's commands may still run unless the lock is renewed meanwhile."""
        return self._renewed_at + self.ttl_s * LEASE_SHARE - time.monotonic()

    def check(self) -> None:
        """Raise LockLostError unless this holder still owns the lock (the store's write guard).

        While Redis cannot be asked, the check waits rather than refuse: a run that ended during
        a Redis restart still records its outcome. The renewal keeps the lock through a blip
        and sets ``lost`` once a whole TTL passed without it, which ends the wait."""
        pause = CHECK_FIRST_PAUSE_S
        while True:
            if self.lost.is_set():
                raise LockLostError(self.session_id)
            try:
                owned = self._lock.owned()
                break
            except RedisError as exc:
                log.warning("cannot confirm lock on %s, retrying: %s", self.session_id, exc)
            time.sleep(pause)
            pause = min(pause * 2, CHECK_MAX_PAUSE_S)
        if not owned:
            self.lost.set()
            raise LockLostError(self.session_id)

    def release(self) -> None:
        with _held_guard:
            _held.discard(self)
        with self._renewing:
            if self._renewal is not None:
                self._renewal.cancel()
                self._renewal = None
        try:
            self._lock.release()
        except LockError:
            log.warning("lock on %s had already expired at release", self.session_id)
        except RedisError as exc:
            log.warning(
                "cannot release lock on %s (it expires by itself): %s", self.session_id, exc
            )

    def _renew(self) -> bool:
        """One renewal, on the ticker's thread; False when there is nothing more to renew."""
        with self._renewing:
            if self._renewal is None:
                return False  # released meanwhile
            started = time.monotonic()
            try:
                self._lock.reacquire()
                self._renewed_at = started
                return True
            except LockError as exc:
                log.error("lost the lock on session %s: %s", self.session_id, exc)
                self.lost.set()
                return False
            except RedisError as exc:
                # A Redis blip is survivable until the TTL would have run out without us.
                if time.monotonic() - self._renewed_at >= self.ttl_s:
                    log.error(
                        "could not renew the lock on %s for its TTL: %s", self.session_id, exc
                    )
                    self.lost.set()
                    return False
                log.warning("lock renewal on %s failed, retrying: %s", self.session_id, exc)
                return True

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def lease_left() -> float | None:
    """The shortest lease among the session locks this process holds; None when it holds none.

    A pool process runs one task at a time, so these are its task's locks: a warm sandbox's
    exec server kills the task's command once this runs out unrenewed
    (``runtimes.exec_server``), even when this whole process is frozen.
    """
    with _held_guard:
        leases = [lock.lease_s() for lock in _held]
    return min(leases) if leases else None


_RAISE_FENCE = """
-- KEYS[1] the session's fencing counter (keys.session_fence)
-- ARGV[1] the number the counter must reach; a higher counter is left as it is
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) end
"""


def raise_fence(client: redis.Redis, session_id: str, at_least: int) -> None:
    """Make the session's next lock holder get a fencing number above ``at_least``.

    For a session.json that comes back from elsewhere (an archive) carrying the number of a
    holder this Redis may never have counted to: a lower number would fail every later write.
    """
    client.eval(_RAISE_FENCE, 1, keys.session_fence(session_id), at_least)
