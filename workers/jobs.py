"""The task bodies: count the delivery, take the session's lock, do the work, release.

A task that finds its session busy waits a moment for the lock, then gives its worker slot back
and retries with backoff until ``CLAUDEBOX_LOCK_WAIT_S`` after it was sent, when it fails with
SessionBusyError. A task delivered more than ``CLAUDEBOX_MAX_ATTEMPTS`` times (its worker died
each time: ``task_reject_on_worker_lost`` requeues it) is failed rather than requeued forever.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery import Task
from celery.exceptions import Retry

from claudebox_pool.tasks import env_travel, keys, names
from claudebox_pool.tasks.app import app
from claudebox_pool.tasks.errors import ClaudeBoxError, SessionBusyError, TaskAttemptsExceededError
from claudebox_pool.tasks.lifecycle import ReindexRequest
from claudebox_pool.tasks.models import CleanupRequest, CodeRequest, OpenRequest, parse_payload
from claudebox_pool.workers import fanout, forks, registry, sessions
from claudebox_pool.workers.affinity import refuse_if_elsewhere
from claudebox_pool.workers.cancel import CancelWatch, cancelled_before_start, record_cancelled
from claudebox_pool.workers.context import WorkerContext, context
from claudebox_pool.workers.lock import SessionLock
from claudebox_pool.workers.streaming import OutputPublisher, announce_running

LOCK_POLL_S = 2.0
"""How long a task holds its worker slot waiting for a busy session before it retries."""
MAX_BACKOFF_S = 10.0


@contextmanager
def counted_delivery(ctx: WorkerContext, task_id: str) -> Iterator[int]:
    """Count this delivery of ``task_id``. The count is kept only if the worker dies or stops
    the task (SystemExit: a cold shutdown, a terminating revoke), since the task runs again: a
    task that ends forgets it, and a retry for a busy session takes its own delivery back."""
    key = keys.task_attempts(task_id)
    pipe = ctx.redis.pipeline()
    pipe.incr(key)
    pipe.expire(key, ctx.settings.visibility_timeout_s * 2)
    attempt = int(pipe.execute()[0])
    try:
        if attempt > ctx.settings.max_attempts:
            raise TaskAttemptsExceededError(task_id, attempt - 1)
        yield attempt
    except Retry:
        ctx.redis.decr(key)
        raise
    except Exception:
        ctx.redis.delete(key)
        raise
    else:
        ctx.redis.delete(key)


@contextmanager
def session_lock(
    task: Task[Any, Any],
    ctx: WorkerContext,
    session_id: str,
    enqueued_at: float,
    *,
    check_node: bool = True,
) -> Iterator[SessionLock]:
    """Hold the session's lock; with ``check_node``, refuse a session bound to another node."""
    lock = SessionLock(ctx.redis, session_id, ctx.settings.lock_ttl_s)
    if not lock.acquire(LOCK_POLL_S):
        waited = time.time() - enqueued_at
        remaining = ctx.settings.lock_wait_s - waited
        if remaining <= 0:
            raise SessionBusyError(session_id, waited)
        backoff = min(0.5 * 2**task.request.retries, MAX_BACKOFF_S, remaining)
        raise task.retry(countdown=backoff)
    with lock:
        if check_node:
            refuse_if_elsewhere(ctx, session_id)
        yield lock


# max_retries=None: a task waiting for a busy session retries until its own deadline.
RETRYING = {"bind": True, "throws": (ClaudeBoxError,), "max_retries": None}


@app.task(name=names.OPEN, **RETRYING)
def open_session(self: Task[Any, Any], payload: dict[str, Any]) -> dict[str, Any]:
    request = parse_payload(OpenRequest, payload)
    ctx = context()
    if request.mode == "reconnect":
        refuse_if_elsewhere(ctx, request.session_id)
        # Reading session.json needs no lock: it is only ever replaced whole.
        return ctx.store.load(request.session_id).model_dump(mode="json")
    with session_lock(self, ctx, request.session_id, request.enqueued_at) as lock:
        if request.template_session is None:
            return sessions.create_session(ctx, request, lock).model_dump(mode="json")
        template = forks.other(request.template_session, lock)
        with session_lock(self, ctx, template, request.enqueued_at):
            return forks.from_template(ctx, request, lock).model_dump(mode="json")


@app.task(name=names.CODE, **RETRYING)
def code(self: Task[Any, Any], payload: dict[str, Any]) -> dict[str, Any]:
    ctx = context()
    sent = parse_payload(CodeRequest, payload)
    request = env_travel.bring_back(ctx.redis, sent)
    task_id = self.request.id or ""
    with (
        counted_delivery(ctx, task_id) as attempt,
        session_lock(self, ctx, request.session_id, request.enqueued_at) as lock,
        OutputPublisher(ctx.redis, task_id, request.agent, ctx.settings) as output,
        CancelWatch(ctx.redis, task_id, lock.lost) as watch,
    ):
        if watch.requested:
            result = cancelled_before_start(ctx.store, request, task_id, lock)
        else:
            announce_running(self, request)
            result = sessions.run_code(
                ctx, request, lock, task_id, attempt, on_line=output.on_line, cancel=watch.stop
            )
            # The flag may come just as the agent ends by itself: then nothing was stopped.
            if watch.requested and (result.error or "").startswith("cancelled"):
                record_cancelled(ctx.store, request.session_id, task_id, lock)
        output.end(result)
    env_travel.forget(ctx.redis, sent)
    return result.model_dump(mode="json")


@app.task(name=names.CLEANUP, **RETRYING)
def cleanup(self: Task[Any, Any], payload: dict[str, Any]) -> dict[str, Any]:
    request = parse_payload(CleanupRequest, payload)
    ctx = context()
    with session_lock(self, ctx, request.session_id, request.enqueued_at) as lock:
        return sessions.cleanup_session(ctx, request, lock).model_dump(mode="json")


@app.task(name=names.REINDEX, throws=(ClaudeBoxError,))
def reindex(payload: dict[str, Any] | None = None) -> dict[str, Any]:
    request, ctx = parse_payload(ReindexRequest, payload or {}), context()
    if request.every_node:
        fanout.to_other_nodes(ctx, names.REINDEX, payload or {})
    return registry.reindex(ctx.redis, ctx.store).model_dump(mode="json")
