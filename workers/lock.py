"""The per-session lock: one owner at a time, fenced, renewed while its task runs.

redis-py's ``Lock`` gives the owner token, the TTL and the owner-only release (a Lua
compare-and-delete). On top of it this adds what long tasks need:

- a fencing number, bumped at every acquisition and written into session.json, so that a holder
  that stalled past its TTL (GC pause, SIGSTOP) cannot overwrite a newer holder's writes;
- a renewer thread that extends the TTL every third of it; when a renewal finds the lock gone,
  the ``lost`` event is set, the running agent is stopped and every later write is refused.
"""

from __future__ import annotations

import logging
import threading
import time
from types import TracebackType
from typing import Self

import redis
from redis.exceptions import LockError, RedisError

from tasks import keys
from tasks.errors import LockLostError

log = logging.getLogger(__name__)


class SessionLock:
    def __init__(self, client: redis.Redis, session_id: str, ttl_s: int) -> None:
        self.session_id = session_id
        self.ttl_s = ttl_s
        self._client = client
        self._lock = client.lock(keys.session_lock(session_id), timeout=ttl_s, thread_local=False)
        self.fence = 0
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def acquire(self, wait_s: float) -> bool:
        """Take the lock, waiting up to ``wait_s``; start renewing it. False if still busy."""
        if not self._lock.acquire(blocking=wait_s > 0, blocking_timeout=wait_s or None):
            return False
        self.fence = int(self._client.incr(keys.session_fence(self.session_id)))
        self._renewer = threading.Thread(
            target=self._renew_loop, name=f"lock-renew-{self.session_id}", daemon=True
        )
        self._renewer.start()
        return True

    def check(self) -> None:
        """Raise LockLostError unless this holder still owns the lock (the store's write guard)."""
        if self.lost.is_set():
            raise LockLostError(self.session_id)
        try:
            owned = self._lock.owned()
        except RedisError as exc:
            log.warning("cannot confirm lock on %s: %s", self.session_id, exc)
            owned = False
        if not owned:
            self.lost.set()
            raise LockLostError(self.session_id)

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        try:
            self._lock.release()
        except LockError:
            log.warning("lock on %s had already expired at release", self.session_id)
        except RedisError as exc:
            log.warning(
                "cannot release lock on %s (it expires by itself): %s", self.session_id, exc
            )

    def _renew_loop(self) -> None:
        period = self.ttl_s / 3
        renewed_at = time.monotonic()
        while not self._stop.wait(period):
            try:
                self._lock.reacquire()
                renewed_at = time.monotonic()
            except LockError as exc:
                log.error("lost the lock on session %s: %s", self.session_id, exc)
                self.lost.set()
                return
            except RedisError as exc:
                # A Redis blip is survivable until the TTL would have run out without us.
                if time.monotonic() - renewed_at >= self.ttl_s:
                    log.error(
                        "could not renew the lock on %s for its TTL: %s", self.session_id, exc
                    )
                    self.lost.set()
                    return
                log.warning("lock renewal on %s failed, retrying: %s", self.session_id, exc)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


_RAISE_FENCE = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) end
"""


def raise_fence(client: redis.Redis, session_id: str, at_least: int) -> None:
    """Make the session's next lock holder get a fencing number above ``at_least``.

    For a session.json that comes back from elsewhere (an archive) carrying the number of a
    holder this Redis may never have counted to: a lower number would fail every later write.
    """
    client.eval(_RAISE_FENCE, 1, keys.session_fence(session_id), at_least)
