"""Every Celery task a worker answers, one registration each: which code answers a task name.

Each registration parses its payload, takes the locks of the sessions it writes
(:mod:`workers.delivery`: a busy one makes the task retry with backoff until
``CLAUDEBOX_LOCK_WAIT_S``) and calls its body in the module that owns the idea. Sweeps are the
exception: they never wait for a lock (see :mod:`workers.sweeps`). Task names are spelled only
in :mod:`tasks.names`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery import Task

from claudebox_pool.tasks import env_travel, names
from claudebox_pool.tasks.app import app
from claudebox_pool.tasks.errors import ClaudeBoxError, InvalidRequestError, SessionNotFoundError
from claudebox_pool.tasks.lifecycle import (
    CheckpointRequest,
    ForkRequest,
    ReindexRequest,
    RestoreArchiveRequest,
    RestoreCheckpointRequest,
    SweepReport,
    SweepRequest,
)
from claudebox_pool.tasks.models import (
    AdoptRequest,
    CleanupRequest,
    CodeRequest,
    HistoryRequest,
    OpenRequest,
    SessionMissing,
    SessionView,
    TrajectoryRequest,
    parse_payload,
)
from claudebox_pool.tasks.workspace_files import FileRequest, TreeRequest
from claudebox_pool.workers import (
    archive,
    checkpoints,
    disk,
    failed_runs,
    fanout,
    forks,
    moves,
    registry,
    sessions,
    sweeps,
    trajectory,
    workspace_files,
)
from claudebox_pool.workers.affinity import refuse_if_elsewhere
from claudebox_pool.workers.context import WorkerContext, context
from claudebox_pool.workers.delivery import session_lock
from claudebox_pool.workers.lock import raise_fence

# max_retries=None: a task waiting for a busy session retries until its own deadline.
RETRYING = {"bind": True, "throws": (ClaudeBoxError,), "max_retries": None}


# --- a session's life: open, code, cleanup ----------------------------------------------------


@app.task(name=names.OPEN, **RETRYING)
def open_session(self: Task[Any, Any], payload: dict[str, Any]) -> dict[str, Any]:
    request, ctx = parse_payload(OpenRequest, payload), context()
    if request.mode == "reconnect":
        refuse_if_elsewhere(ctx, request.session_id)
        # Reading session.json needs no lock: it is only ever replaced whole.
        try:
            with registry.noting_corruption(ctx.redis, ctx.store):
                record = ctx.store.load(request.session_id)
        except SessionNotFoundError:
            # The routine probe before a create: an answer, not a failed task in monitors.
            return SessionMissing(session_id=request.session_id).model_dump(mode="json")
        registry.put_if_corrupted(ctx.redis, record)
        return record.model_dump(mode="json")
    # Get-or-create racing a creator on another node finds the session bound there once it
    # holds the lock: that is its answer (``sessions.existing``), not a wrong node.
    check_node = request.mode != "get_or_create"
    with session_lock(
        self, ctx, request.session_id, request.enqueued_at, check_node=check_node
    ) as lock:
        if request.mode == "get_or_create" and (found := sessions.existing(ctx, request)):
            return found.model_dump(mode="json")
        if request.template_session is None:
            return sessions.create_session(ctx, request, lock).model_dump(mode="json")
        template = forks.other(request.template_session, lock)
        with session_lock(self, ctx, template, request.enqueued_at):
            return forks.from_template(ctx, request, lock).model_dump(mode="json")


@app.task(name=names.CODE, **RETRYING)
def code(self: Task[Any, Any], payload: dict[str, Any]) -> dict[str, Any]:
    ctx = context()
    sent = parse_payload(CodeRequest, payload)
    result = sessions.code(self, ctx, env_travel.bring_back(ctx.redis, sent))
    env_travel.forget(ctx.redis, sent)
    if not result.success:
        # A failed task in monitors; the producer still gets the result (workers.failed_runs).
        raise failed_runs.failed(self, result)
    return result.model_dump(mode="json")


@app.task(name=names.CLEANUP, **RETRYING)
def cleanup(self: Task[Any, Any], payload: dict[str, Any]) -> dict[str, Any]:
    request, ctx = parse_payload(CleanupRequest, payload), context()
    with session_lock(self, ctx, request.session_id, request.enqueued_at) as lock:
        return sessions.cleanup_session(ctx, request, lock).model_dump(mode="json")


@app.task(name=names.TRAJECTORY, throws=(ClaudeBoxError,))
def trajectory_page(payload: dict[str, Any]) -> dict[str, Any]:
    # No lock: the CLI only appends to its transcript, and a torn last line is skipped.
    request, ctx = parse_payload(TrajectoryRequest, payload), context()
    refuse_if_elsewhere(ctx, request.session_id)
    return trajectory.page(ctx, request).model_dump(mode="json")


@app.task(name=names.HISTORY, throws=(ClaudeBoxError,))
def session_history(payload: dict[str, Any]) -> dict[str, Any]:
    # No lock: session.json is only ever replaced whole, history.jsonl only appended to (and a
    # torn last line is skipped).
    request, ctx = parse_payload(HistoryRequest, payload), context()
    refuse_if_elsewhere(ctx, request.session_id)
    with registry.noting_corruption(ctx.redis, ctx.store):
        record = ctx.store.load(request.session_id)
        entries = ctx.store.history(request.session_id)
    if request.limit is not None:
        entries = entries[len(entries) - request.limit :] if request.limit else []
    return SessionView(record=record, history=entries).model_dump(mode="json")


# --- files in and out, for producers that do not see the workers' disk ------------------------
# Reads take no lock (each path is resolved safely whatever the sandbox does meanwhile);
# writes, and downloads (a tree read whole), wait for the session's lock like a code call.


@app.task(name=names.FILES_READ, throws=(ClaudeBoxError,))
def files_read(payload: dict[str, Any]) -> dict[str, Any]:
    request, ctx = parse_payload(FileRequest, payload), context()
    refuse_if_elsewhere(ctx, request.session_id)
    sender = workspace_files.sender(ctx, _token(request.token))
    with sender.forgotten_on_error():
        return workspace_files.read(ctx, request, sender).model_dump(mode="json")


@app.task(name=names.FILES_LIST, throws=(ClaudeBoxError,))
def files_list(payload: dict[str, Any]) -> dict[str, Any]:
    request, ctx = parse_payload(FileRequest, payload), context()
    refuse_if_elsewhere(ctx, request.session_id)
    return workspace_files.listing(ctx, request).model_dump(mode="json")


@app.task(name=names.FILES_WRITE, **RETRYING)
def files_write(self: Task[Any, Any], payload: dict[str, Any]) -> dict[str, Any]:
    request, ctx = parse_payload(FileRequest, payload), context()
    with session_lock(self, ctx, request.session_id, request.enqueued_at) as lock:
        receiver = workspace_files.receiver(ctx, _token(request.token), lock)
        with receiver.forgotten_on_error():
            return workspace_files.write(ctx, request, receiver, lock).model_dump(mode="json")


@app.task(name=names.FILES_REMOVE, **RETRYING)
def files_remove(self: Task[Any, Any], payload: dict[str, Any]) -> dict[str, Any]:
    request, ctx = parse_payload(FileRequest, payload), context()
    with session_lock(self, ctx, request.session_id, request.enqueued_at) as lock:
        return workspace_files.remove(ctx, request, lock).model_dump(mode="json")


@app.task(name=names.FILES_UPLOAD, **RETRYING)
def files_upload(self: Task[Any, Any], payload: dict[str, Any]) -> dict[str, Any]:
    request, ctx = parse_payload(TreeRequest, payload), context()
    with session_lock(self, ctx, request.session_id, request.enqueued_at) as lock:
        receiver = workspace_files.receiver(ctx, request.token, lock)
        with receiver.forgotten_on_error():
            return workspace_files.upload(ctx, request, receiver, lock).model_dump(mode="json")


@app.task(name=names.FILES_DOWNLOAD, **RETRYING)
def files_download(self: Task[Any, Any], payload: dict[str, Any]) -> dict[str, Any]:
    request, ctx = parse_payload(TreeRequest, payload), context()
    with session_lock(self, ctx, request.session_id, request.enqueued_at):
        sender = workspace_files.sender(ctx, request.token)
        with sender.forgotten_on_error():
            return workspace_files.download(ctx, request, sender).model_dump(mode="json")


def _token(token: str | None) -> str:
    if token is None:
        raise InvalidRequestError("a file transfer needs a token; send it with box.files")
    return token


# --- checkpoints, forks, archives, moves ------------------------------------------------------


@app.task(name=names.CHECKPOINT, **RETRYING)
def checkpoint(self: Task[Any, Any], payload: dict[str, Any]) -> dict[str, Any]:
    request, ctx = parse_payload(CheckpointRequest, payload), context()
    with session_lock(self, ctx, request.session_id, request.enqueued_at) as lock:
        return checkpoints.create(ctx, request, lock).model_dump(mode="json")


@app.task(name=names.RESTORE_CHECKPOINT, **RETRYING)
def restore_checkpoint(self: Task[Any, Any], payload: dict[str, Any]) -> dict[str, Any]:
    request, ctx = parse_payload(RestoreCheckpointRequest, payload), context()
    with session_lock(self, ctx, request.session_id, request.enqueued_at) as lock:
        return checkpoints.restore(ctx, request, lock).model_dump(mode="json")


@app.task(name=names.FORK, **RETRYING)
def fork(self: Task[Any, Any], payload: dict[str, Any]) -> dict[str, Any]:
    request, ctx = parse_payload(ForkRequest, payload), context()
    # The new session's lock first, as for a template (open_session): one order.
    with (
        session_lock(self, ctx, request.session_id, request.enqueued_at) as lock,
        session_lock(self, ctx, forks.other(request.source_session_id, lock), request.enqueued_at),
    ):
        return forks.fork(ctx, request, lock).model_dump(mode="json")


@app.task(name=names.RESTORE_ARCHIVE, **RETRYING)
def restore_archive(self: Task[Any, Any], payload: dict[str, Any]) -> dict[str, Any]:
    request, ctx = parse_payload(RestoreArchiveRequest, payload), context()
    contents = archive.inspect(ctx.settings, ctx.store, request.archive)
    # Before the lock is taken, so that its fencing number is above the archived one.
    raise_fence(ctx.redis, contents.session_id, contents.record.fence)
    with session_lock(self, ctx, contents.session_id, request.enqueued_at) as lock:
        return archive.restore(ctx, contents, lock).model_dump(mode="json")


@app.task(name=names.ADOPT, **RETRYING)
def adopt(self: Task[Any, Any], payload: dict[str, Any]) -> dict[str, Any]:
    request, ctx = parse_payload(AdoptRequest, payload), context()
    moves.refuse_if_not_here(ctx, request)
    # No node check: the registry still names the old node until this task rebinds it.
    with session_lock(self, ctx, request.session_id, request.enqueued_at, check_node=False) as lock:
        return moves.adopt(ctx, request, lock).model_dump(mode="json")


# --- the sessions root: reindex, disk usage, beat's sweeps ------------------------------------


@app.task(name=names.REINDEX, throws=(ClaudeBoxError,))
def reindex(payload: dict[str, Any] | None = None) -> dict[str, Any]:
    request, ctx = parse_payload(ReindexRequest, payload or {}), context()
    if request.every_node:
        fanout.to_other_nodes(ctx, names.REINDEX, payload or {})
    return registry.reindex(ctx.redis, ctx.store).model_dump(mode="json")


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
