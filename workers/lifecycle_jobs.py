"""The task bodies of a session's lifecycle: checkpoints, forks, archives, disk usage, sweeps.

Like :mod:`workers.jobs`, each takes the lock of every session it writes (a busy one makes the
task retry with backoff until ``CLAUDEBOX_LOCK_WAIT_S``) and leaves the work to a module of
its own. Sweeps are the exception: they never wait for a lock (see :mod:`workers.sweeps`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery import Task

from claudebox_pool.tasks import names
from claudebox_pool.tasks.app import app
from claudebox_pool.tasks.errors import ClaudeBoxError
from claudebox_pool.tasks.lifecycle import (
    CheckpointRequest,
    ForkRequest,
    RestoreArchiveRequest,
    RestoreCheckpointRequest,
    SweepReport,
    SweepRequest,
)
from claudebox_pool.tasks.models import parse_payload
from claudebox_pool.workers import archive, checkpoints, disk, fanout, forks, sweeps
from claudebox_pool.workers.context import WorkerContext, context
from claudebox_pool.workers.jobs import RETRYING, session_lock
from claudebox_pool.workers.lock import raise_fence


@app.task(name=names.CHECKPOINT, **RETRYING)
def checkpoint(self: Task[Any, Any], payload: dict[str, Any]) -> dict[str, Any]:
    request = parse_payload(CheckpointRequest, payload)
    ctx = context()
    with session_lock(self, ctx, request.session_id, request.enqueued_at) as lock:
        return checkpoints.create(ctx, request, lock).model_dump(mode="json")


@app.task(name=names.RESTORE_CHECKPOINT, **RETRYING)
def restore_checkpoint(self: Task[Any, Any], payload: dict[str, Any]) -> dict[str, Any]:
    request = parse_payload(RestoreCheckpointRequest, payload)
    ctx = context()
    with session_lock(self, ctx, request.session_id, request.enqueued_at) as lock:
        return checkpoints.restore(ctx, request, lock).model_dump(mode="json")


@app.task(name=names.FORK, **RETRYING)
def fork(self: Task[Any, Any], payload: dict[str, Any]) -> dict[str, Any]:
    request = parse_payload(ForkRequest, payload)
    ctx = context()
    # The new session's lock first, as for a template (workers.jobs.open_session): one order.
    with (
        session_lock(self, ctx, request.session_id, request.enqueued_at) as lock,
        session_lock(self, ctx, forks.other(request.source_session_id, lock), request.enqueued_at),
    ):
        return forks.fork(ctx, request, lock).model_dump(mode="json")


@app.task(name=names.RESTORE_ARCHIVE, **RETRYING)
def restore_archive(self: Task[Any, Any], payload: dict[str, Any]) -> dict[str, Any]:
    request = parse_payload(RestoreArchiveRequest, payload)
    ctx = context()
    contents = archive.inspect(ctx.settings, ctx.store, request.archive)
    # Before the lock is taken, so that its fencing number is above the archived one.
    raise_fence(ctx.redis, contents.session_id, contents.record.fence)
    with session_lock(self, ctx, contents.session_id, request.enqueued_at) as lock:
        return archive.restore(ctx, contents, lock).model_dump(mode="json")


@app.task(name=names.DISK_USAGE, throws=(ClaudeBoxError,))
def disk_usage(payload: dict[str, Any] | None = None) -> dict[str, Any]:
    ctx = context()
    return disk.usage(ctx.settings, ctx.store).model_dump(mode="json")


# Their reports go to <home>/sweeps.jsonl; nobody waits for a sweep's result.
@app.task(name=names.SWEEP_AGE, throws=(ClaudeBoxError,), ignore_result=True)
def sweep_age(payload: dict[str, Any]) -> dict[str, Any] | None:
    return _sweep(names.SWEEP_AGE, sweeps.sweep_age, payload)


@app.task(name=names.SWEEP_LEAKS, throws=(ClaudeBoxError,), ignore_result=True)
def sweep_leaks(payload: dict[str, Any]) -> dict[str, Any] | None:
    return _sweep(names.SWEEP_LEAKS, sweeps.sweep_leaks, payload)


def _sweep(
    name: str,
    run: Callable[[WorkerContext, float], SweepReport | None],
    payload: dict[str, Any],
) -> dict[str, Any] | None:
    request, ctx = parse_payload(SweepRequest, payload), context()
    if request.every_node:
        fanout.to_other_nodes(ctx, name, payload)
    report = run(ctx, request.every_s)
    return report.model_dump(mode="json") if report else None
