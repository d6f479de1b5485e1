"""Moving a session to another node: the destination adopts the copy of its files.

The files travel outside the pool (rsync, a restored backup, a re-attached volume): the pool
cannot copy between hosts that share no storage. `claudebox-pool sessions move ID --to NODE`
then sends ``claudebox.adopt`` to NODE's queue; the worker there checks the copy is on its disk,
and under the session's lock rebinds the session to its node, in session.json and the registry.
From then on every task of the session goes to NODE, and one still queued for the old node is
refused there (``workers.affinity``).
"""

from __future__ import annotations

from typing import Any

from celery import Task

from claudebox_pool.tasks import names
from claudebox_pool.tasks.app import app
from claudebox_pool.tasks.errors import InvalidRequestError, WrongNodeError
from claudebox_pool.tasks.models import AdoptRequest, HistoryEntry, parse_payload, utc_now
from claudebox_pool.workers import registry
from claudebox_pool.workers.context import context
from claudebox_pool.workers.jobs import RETRYING, session_lock


@app.task(name=names.ADOPT, **RETRYING)
def adopt(self: Task[Any, Any], payload: dict[str, Any]) -> dict[str, Any]:
    request = parse_payload(AdoptRequest, payload)
    ctx = context()
    if request.node != ctx.node:
        raise WrongNodeError(request.session_id, request.node, ctx.node)
    # No node check: the registry still names the old node until this task rebinds it.
    with session_lock(self, ctx, request.session_id, request.enqueued_at, check_node=False) as lock:
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
        ctx.store.append_history(
            request.session_id,
            HistoryEntry(
                action="session_moved",
                context={"from_node": request.previous_node, "to_node": ctx.node},
            ),
            lock.check,
        )
        ctx.store.save(record, lock.check)
        registry.put(ctx.redis, record)
    return record.model_dump(mode="json")
