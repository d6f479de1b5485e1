"""Checkpoints: named snapshots of a session's workspace, taken and put back under its lock.

::

    .claudebox/checkpoints/<name>/workspace/        the workspace as it was
    .claudebox/checkpoints/<name>/checkpoint.json   a Checkpoint: when, how many files, how stored

A checkpoint is built beside its place and renamed into it, and a restore builds the new
workspace beside the old one and swaps the two, so a crash never leaves half of either. Each
checkpoint hard-links the files unchanged since the one before (checkpoints are never written
again); the workspace never shares an inode with a checkpoint (see :mod:`workers.copying`).
The sandbox sees only the workspace, so an agent cannot touch its session's checkpoints.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path

from pydantic import ValidationError

from claudebox_pool.tasks.errors import CheckpointNotFoundError, InvalidRequestError
from claudebox_pool.tasks.lifecycle import Checkpoint, CheckpointRequest, RestoreCheckpointRequest
from claudebox_pool.tasks.models import SESSION_ID_PATTERN, HistoryEntry, SessionRecord, utc_now
from claudebox_pool.workers import disk, identity, registry
from claudebox_pool.workers.context import WorkerContext
from claudebox_pool.workers.copying import copy_tree, replace_dir
from claudebox_pool.workers.lock import SessionLock

CHECKPOINT_JSON = "checkpoint.json"


def listing(checkpoints_dir: Path) -> list[Checkpoint]:
    """The complete checkpoints in ``checkpoints_dir``, oldest first."""
    found = []
    with contextlib.suppress(FileNotFoundError), os.scandir(checkpoints_dir) as entries:
        for entry in entries:
            # Names are validated on the way in; anything else is a build left by a crash.
            if SESSION_ID_PATTERN.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False):
                checkpoint = _read(Path(entry.path))
                if checkpoint is not None:
                    found.append(checkpoint)
    return sorted(found, key=lambda each: (each.created_at, each.name))


def create(ctx: WorkerContext, request: CheckpointRequest, lock: SessionLock) -> Checkpoint:
    store, guard = ctx.store, lock.check
    record = store.load(request.session_id)
    paths = store.paths(request.session_id)
    target = paths.checkpoints / request.name
    if target.exists() and not request.replace:
        raise InvalidRequestError(
            f"checkpoint '{request.name}' already exists in session '{request.session_id}'; "
            "pick another name, or pass replace=True to overwrite it"
        )
    size, _ = disk.tree_size(paths.workspace, set())
    disk.guard(
        ctx.settings,
        store,
        f"session '{request.session_id}' cannot take checkpoint '{request.name}'",
        adding=size,
    )
    earlier = [each for each in listing(paths.checkpoints) if each.name != request.name]
    link_dest = paths.checkpoints / earlier[-1].name / "workspace" if earlier else None
    guard()
    paths.checkpoints.mkdir(exist_ok=True)
    building = paths.checkpoints / f".building-{request.name}-{uuid.uuid4().hex[:8]}"
    try:
        building.mkdir()
        stats = copy_tree(paths.workspace, building / "workspace", link_dest)
        checkpoint = Checkpoint(
            name=request.name,
            created_at=utc_now(),
            files=stats.files,
            bytes=stats.bytes,
            linked=stats.linked,
            cloned=stats.cloned,
            copied=stats.copied,
            skipped=stats.skipped,
        )
        (building / CHECKPOINT_JSON).write_text(checkpoint.model_dump_json(indent=2))
        guard()
        if target.exists():
            replace_dir(target, building)
        else:
            os.rename(building, target)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    _record(ctx, record, lock, "checkpoint_created", checkpoint)
    return checkpoint


def restore(ctx: WorkerContext, request: RestoreCheckpointRequest, lock: SessionLock) -> Checkpoint:
    store, guard = ctx.store, lock.check
    record = store.load(request.session_id)
    paths = store.paths(request.session_id)
    source = paths.checkpoints / request.name
    checkpoint = _read(source)
    if checkpoint is None:
        raise CheckpointNotFoundError(request.session_id, request.name)
    disk.guard(
        ctx.settings,
        store,
        f"session '{request.session_id}' cannot restore checkpoint '{request.name}'",
        adding=checkpoint.bytes,
    )
    guard()
    # Beside the workspace, on its filesystem, so that the swap is two renames.
    staging = paths.root / f".restoring-{uuid.uuid4().hex[:8]}"
    uid = record.sandbox_uid if identity.enabled() else None
    try:
        # The copy is the session's own again (checkpoints themselves are the worker's).
        copy_tree(source / "workspace", staging, owner=(uid, uid) if uid is not None else None)
        guard()
        replace_dir(paths.workspace, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _record(ctx, record, lock, "checkpoint_restored", checkpoint)
    return checkpoint


def _record(
    ctx: WorkerContext, record: SessionRecord, lock: SessionLock, action: str, made: Checkpoint
) -> None:
    paths = ctx.store.paths(record.session_id)
    now = utc_now()
    record = record.model_copy(
        update={
            "checkpoints": [each.name for each in listing(paths.checkpoints)],
            "updated_at": now,
            "last_accessed": now,
            "fence": lock.fence,
        }
    )
    context = made.model_dump(include={"name", "files", "bytes", "linked", "cloned", "copied"})
    ctx.store.commit(record, [HistoryEntry(action=action, context=context)], lock.check)
    registry.put(ctx.redis, record)


def _read(directory: Path) -> Checkpoint | None:
    try:
        return Checkpoint.model_validate_json((directory / CHECKPOINT_JSON).read_bytes())
    except (OSError, ValidationError):
        return None
