"""New sessions made from existing ones: from a template (its workspace) or a fork (all of it).

The caller holds the locks of both sessions, the new one's first, so that the copy never sees
a task of the source half-way through its writes. Either copy is built beside its place, on
the same filesystem, and renamed in: a crash leaves no half-made session under the new id.
"""

from __future__ import annotations

import os
import shutil
import uuid

from claudebox_pool.tasks.errors import (
    InvalidRequestError,
    SessionAlreadyExistsError,
    SessionNotFoundError,
)
from claudebox_pool.tasks.files import private_dir
from claudebox_pool.tasks.lifecycle import ForkRequest
from claudebox_pool.tasks.models import HistoryEntry, OpenRequest, SessionRecord, utc_now
from claudebox_pool.workers import disk, identity, registry, sessions
from claudebox_pool.workers.context import WorkerContext
from claudebox_pool.workers.copying import copy_tree, replace_dir
from claudebox_pool.workers.lock import SessionLock
from claudebox_pool.workers.store import META_DIR


def other(source_session_id: str | None, lock: SessionLock) -> str:
    """The source session, which must not be the new one (``lock`` is the new one's): its
    lock would be waited for until the task's deadline."""
    if source_session_id is None or source_session_id == lock.session_id:
        raise InvalidRequestError(
            f"session '{lock.session_id}' cannot be made from itself; name another session"
        )
    return source_session_id


def from_template(ctx: WorkerContext, request: OpenRequest, lock: SessionLock) -> SessionRecord:
    """Create ``request.session_id`` starting with a copy of its template session's workspace."""
    store, template = ctx.store, other(request.template_session, lock)
    source = store.paths(template)
    if not source.meta.exists():
        raise SessionNotFoundError(template)
    paths = store.paths(request.session_id)
    if paths.meta.exists():
        raise SessionAlreadyExistsError(request.session_id)
    size, _ = disk.tree_size(source.workspace, set())
    disk.guard(
        ctx.settings,
        store,
        f"session '{request.session_id}' cannot be created from template '{template}'",
        adding=size,
    )
    lock.check()
    paths.root.mkdir(parents=True, exist_ok=True)
    staging = paths.root / f".template-{uuid.uuid4().hex[:8]}"
    try:
        stats = copy_tree(source.workspace, staging)
        if paths.workspace.exists():
            replace_dir(paths.workspace, staging)
        else:
            os.rename(staging, paths.workspace)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    # The store adopts a directory that has files but no metadata yet: the guide's pattern.
    record = sessions.create_session(ctx, request, lock)
    store.append_history(
        request.session_id,
        HistoryEntry(
            action="template_applied", context={"template": template, "files": stats.files}
        ),
        lock.check,
    )
    return record


def fork(ctx: WorkerContext, request: ForkRequest, lock: SessionLock) -> SessionRecord:
    """Copy the source session (workspace, agent home, history) into a new session.

    The fork continues the source's agent conversation (same agent home, same
    ``claude_session_id``) and keeps its counters; checkpoints stay with the source.
    """
    store = ctx.store
    original = store.load(request.source_session_id)
    source = store.paths(request.source_session_id)
    paths = store.paths(request.session_id)
    if paths.root.exists():
        raise SessionAlreadyExistsError(request.session_id)
    size = disk.tree_size(source.workspace, set())[0] + disk.tree_size(source.agent_home, set())[0]
    disk.guard(
        ctx.settings,
        store,
        f"session '{request.source_session_id}' cannot be forked into '{request.session_id}'",
        adding=size,
    )
    lock.check()
    private_dir(store.root)
    # The copy is the new session's, never the source's: its own uid (workers.identity).
    uid = identity.claim(ctx.settings, store, request.session_id) if identity.enabled() else None
    owner = (uid, uid) if uid is not None else None
    # A dotted name is never a session id: listings and sweeps pass it by.
    staging = store.root / f".fork-{request.session_id}-{uuid.uuid4().hex[:8]}"
    try:
        staging.mkdir()
        copy_tree(source.workspace, staging / "workspace", owner=owner)
        (staging / META_DIR).mkdir(mode=0o700)
        copy_tree(source.agent_home, staging / META_DIR / source.agent_home.name, owner=owner)
        if source.history.exists():
            shutil.copy2(source.history, staging / META_DIR / source.history.name)
        lock.check()
        os.rename(staging, paths.root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    now = utc_now()
    record = original.model_copy(
        update={
            "session_id": request.session_id,
            "box_id": None,
            "created_at": now,
            "updated_at": now,
            "last_accessed": now,
            "workspace_path": str(paths.workspace),
            "status": "stopped",
            "ephemeral": False,
            "checkpoints": [],
            "node": ctx.node,
            "fence": lock.fence,
            "sandbox_uid": uid,
        }
    )
    forked = HistoryEntry(action="session_forked", context={"source": request.source_session_id})
    store.commit(record, [forked], lock.check)
    registry.put(ctx.redis, record)
    return record
