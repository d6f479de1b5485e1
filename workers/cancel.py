"""Cooperative cancellation of a running code task.

A producer asks by setting the task's cancel flag in Redis (``keys.task_cancel``); the task
watches that flag while its agent runs (read on the process's ticker thread, ``workers.ticker``)
and, when it appears, sets the Event the sandbox's exec watches, which kills the agent and
everything it started inside the sandbox. The same Event is set when the session lock is lost,
so one Event stops the agent for either reason. The task then ends normally: its result and
history say ``cancelled``, the lock is released, and the session takes its next task. Celery's
``revoke(terminate=True)`` is never used: it signals a worker process, which may already run
the next task by the time the signal lands.

The flag outlives the task (it expires on its own) so that a task redelivered after its worker
died, or one cancelled while still queued, stops as soon as it starts.
"""

from __future__ import annotations

import logging
import threading
from types import TracebackType
from typing import Self

import redis
from redis.exceptions import RedisError

from claudebox_pool.tasks import keys
from claudebox_pool.tasks.models import CodeRequest, CodeResult, HistoryEntry
from claudebox_pool.workers import ticker
from claudebox_pool.workers.lock import SessionLock
from claudebox_pool.workers.store import SessionStore

log = logging.getLogger(__name__)

POLL_S = 0.2
"""How often the flag is read: the delay between a cancel request and the agent's kill."""
NOT_STARTED_EXIT_CODE = -1
"""The exit code of a result whose agent never started."""


class CancelWatch:
    """Sets :attr:`stop` when the task's cancel flag appears or its session lock is lost."""

    def __init__(self, client: redis.Redis, task_id: str, lock_lost: threading.Event) -> None:
        self.stop = threading.Event()
        self.requested = False
        """True once the stop came from a cancel request rather than a lost lock."""
        self._client = client
        self._key = keys.task_cancel(task_id)
        self._lock_lost = lock_lost
        self._watch: ticker.Chore | None = None

    def _check(self) -> bool:
        """Set ``stop`` if there is a reason to; True once it is set."""
        if self._lock_lost.is_set():
            self.stop.set()
            return True
        try:
            if self._client.exists(self._key):
                self.requested = True
                self.stop.set()
                return True
        except RedisError as exc:
            # Cancelling waits for Redis to answer again; the task runs on meanwhile.
            log.warning("cannot read cancel flag %s: %s", self._key, exc)
        return False

    def __enter__(self) -> Self:
        # Checked once before the agent starts, so that a task cancelled while it was queued
        # never starts its agent at all.
        if not self._check():
            self._watch = ticker.every(POLL_S, lambda: not self._check())
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._watch is not None:
            self._watch.cancel()


def record_cancelled(
    store: SessionStore, session_id: str, task_id: str, lock: SessionLock, started: bool = True
) -> None:
    """Note in the session's history that this task was stopped on request."""
    context: dict[str, object] = {"task_id": task_id}
    if not started:
        context["before_start"] = True
    store.append_history(session_id, HistoryEntry(action="cancelled", context=context), lock.check)


def cancelled_before_start(
    store: SessionStore, request: CodeRequest, task_id: str, lock: SessionLock
) -> CodeResult:
    """The result of a task cancelled while queued: no agent ran, the history says so."""
    record_cancelled(store, request.session_id, task_id, lock, started=False)
    return CodeResult(
        success=False,
        response="",
        exit_code=NOT_STARTED_EXIT_CODE,
        raw_output="",
        error="cancelled",
        duration_s=0.0,
        session_id=request.session_id,
        task_id=task_id,
    )
