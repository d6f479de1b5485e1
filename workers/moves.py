"""Moving a session to another node: the destination adopts the copy of its files.

The files travel outside the pool (rsync, a restored backup, a re-attached volume): the pool
cannot copy between hosts that share no storage. `claudebox-pool sessions move ID --to NODE`
then sends ``claudebox.adopt`` to NODE's queue; the worker there checks the copy is on its disk,
and under the session's lock rebinds the session to its node, in session.json and the registry.
From then on every task of the session goes to NODE, and one still queued for the old node is
refused there (``workers.affinity``).
"""

from __future__ import annotations

from claudebox_pool.tasks.errors import InvalidRequestError, WrongNodeError
from claudebox_pool.tasks.models import AdoptRequest, HistoryEntry, SessionRecord, utc_now
from claudebox_pool.workers import registry
from claudebox_pool.workers.context import WorkerContext
from claudebox_pool.workers.lock import SessionLock


def refuse_if_not_here(ctx: WorkerContext, request: AdoptRequest) -> None:
    """WrongNodeError unless this worker is on the node the session moves to."""
    if request.node != ctx.node:
        raise WrongNodeError(request.session_id, request.node, ctx.node)


def adopt(ctx: WorkerContext, request: AdoptRequest, lock: SessionLock) -> SessionRecord:
    """Bind the session, whose files were copied onto this node, to it."""
    if not ctx.store.exists(request.session_id):
        where = ctx.store.paths(request.session_id).root
        raise InvalidRequestError(
            f"session '{request.session_id}' has no files on node '{ctx.node}' (looked for "
            f"{where}); copy its directory there from node '{request.previous_node}' first, "
            f"e.g. rsync -a OLD_HOST:<its sessions root>/{request.session_id}/ {where}/"
        )
    record = ctx.store.load(request.session_id).model_copy(
        update={"fence": lock.fence, "updated_at": utc_now(), "status": "stopped"}
    )
    moved = HistoryEntry(
        action="session_moved", context={"from_node": request.previous_node, "to_node": ctx.node}
    )
    ctx.store.commit(record, [moved], lock.check)
    registry.put(ctx.redis, record)
    return record
