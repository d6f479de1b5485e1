"""What every task runs inside: its delivery counted, its session's lock held.

A task that finds its session busy waits a moment for the lock, then gives its worker slot back
and retries with backoff until ``CLAUDEBOX_LOCK_WAIT_S`` after it was sent, when it fails with
SessionBusyError. A task delivered more than ``CLAUDEBOX_MAX_ATTEMPTS`` times (its worker died
each time: ``task_reject_on_worker_lost`` requeues it) is failed rather than requeued forever.
A new holder first kills what an earlier holder whose lock lapsed (frozen, cut off) still runs
in the session's sandboxes on this host, so that two runs never share a workspace.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery import Task, current_task
from celery.exceptions import Ignore, Retry

from claudebox_pool.tasks import keys
from claudebox_pool.tasks.errors import (
    LockLostError,
    SessionBusyError,
    TaskAttemptsExceededError,
)
from claudebox_pool.workers import disk, metrics, outage, registry
from claudebox_pool.workers.affinity import refuse_if_elsewhere
from claudebox_pool.workers.context import WorkerContext
from claudebox_pool.workers.lock import SessionLock
from claudebox_pool.workers.runtimes import limits
from claudebox_pool.workers.warm import rescue

log = logging.getLogger(__name__)

LOCK_POLL_S = 2.0
"""How long a task holds its worker slot waiting for a busy session before it retries."""
MAX_BACKOFF_S = 10.0


@contextmanager
def counted_delivery(ctx: WorkerContext, task_id: str) -> Iterator[int]:
    """Count this delivery of ``task_id``. The count is kept only if the worker dies or stops
    the task (SystemExit: a cold shutdown, a terminating revoke), since the task runs again: a
    task that ends forgets it, and a retry for a busy session takes its own delivery back. A
    delivery that lost its lock after the task was handed back and delivered again records
    nothing (Celery's Ignore): the task's outcome is the newer delivery's."""
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
    except LockLostError:
        hostname = getattr(current_task.request, "hostname", None)
        if hostname and rescue.handed_back(ctx, hostname, task_id):
            # Handed back while this worker was frozen or cut off, and delivered again: the
            # newer delivery's outcome is the task's, and this one must not overwrite it.
            log.warning("task %s was handed back to run elsewhere; dropping it here", task_id)
            raise Ignore() from None
        ctx.redis.delete(key)
        raise
    except Exception:
        ctx.redis.delete(key)
        raise
    else:
        # The task ended, perhaps while Redis restarted: its count must not outlive it.
        outage.retried(ctx.settings, "delivery count", lambda: ctx.redis.delete(key))


@contextmanager
def session_lock(
    task: Task[Any, Any],
    ctx: WorkerContext,
    session_id: str,
    enqueued_at: float,
    *,
    check_node: bool = True,
) -> Iterator[SessionLock]:
    """Hold the session's lock; with ``check_node``, refuse a session bound to another node.
    A session found corrupted meanwhile is listed as such; a disk found full is a DiskFullError."""
    lock = SessionLock(ctx.redis, session_id, ctx.settings.lock_ttl_s)
    asked = time.monotonic()
    acquired = lock.acquire(LOCK_POLL_S)
    metrics.record_lock_wait(time.monotonic() - asked, acquired)
    if not acquired:
        waited = time.time() - enqueued_at
        remaining = ctx.settings.lock_wait_s - waited
        if remaining <= 0:
            raise SessionBusyError(session_id, waited)
        backoff = min(0.5 * 2**task.request.retries, MAX_BACKOFF_S, remaining)
        raise task.retry(countdown=backoff)
    with (
        lock,
        registry.noting_corruption(ctx.redis, ctx.store),
        disk.full_as_error(ctx.store, f"a task on session '{session_id}' failed"),
    ):
        if check_node:
            refuse_if_elsewhere(ctx, session_id)
        # Before anything runs: what an earlier holder whose lock lapsed still runs dies.
        for group in limits.kill_others(session_id, {os.getpid(), os.getppid()}):
            log.warning("killed what a lapsed holder of %s still ran in %s", session_id, group)
        yield lock
