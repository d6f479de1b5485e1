"""`claudebox-pool sessions move`: bind a session to another node, for operators.

The pool cannot copy files between hosts that share no storage, so a move is two steps: the
operator copies the session's directory to the new node's sessions root (rsync, a backup, a
re-attached disk), then this tells a worker of that node to adopt the copy
(``workers.moves``). The old node's copy must then be removed: it is no longer the session.
"""

from __future__ import annotations

from claudebox_pool.producer import pool, routing
from claudebox_pool.producer.client import WAIT_MARGIN_S
from claudebox_pool.tasks import keys, names
from claudebox_pool.tasks.errors import (
    InvalidRequestError,
    PoolUnavailableError,
    SessionNotFoundError,
)
from claudebox_pool.tasks.models import AdoptRequest, SessionRecord, validate_session_id
from claudebox_pool.tasks.registry import parse


async def move_session(session_id: str, node: str, *, force: bool = False) -> SessionRecord:
    """Bind ``session_id`` to ``node``, whose sessions root must already hold its files.

    Refused while the session's current node is alive, unless ``force``: that node runs its
    tasks, on files that the copy would silently fork from.
    """
    validate_session_id(session_id)
    current = pool.settings()
    with pool.map_redis_errors():
        client = await pool.redis_client()
        record = parse(await client.hget(keys.registry(), session_id))
        target_silent_s = await routing.silent_for(client, node)
        source_silent_s = (
            await routing.silent_for(client, record.node) if record and record.node else None
        )
    if record is None:
        raise SessionNotFoundError(session_id)
    if record.node == node:
        raise InvalidRequestError(f"session '{session_id}' is already on node '{node}'")
    grace_s = current.node_grace_s
    if target_silent_s is None or target_silent_s > grace_s:
        raise PoolUnavailableError(
            f"node '{node}' has no live worker; start one there (CLAUDEBOX_NODE_NAME={node}), "
            "then move the session again"
        )
    if source_silent_s is not None and source_silent_s <= grace_s and not force:
        raise InvalidRequestError(
            f"session '{session_id}' is on node '{record.node}', which is alive and runs its "
            f"tasks. If you copied its files to node '{node}' on purpose, stop using the old "
            "copy and pass --force"
        )
    request = AdoptRequest(session_id=session_id, node=node, previous_node=record.node)
    target = routing.Route(names.node_queue(node), node, session_id)
    task_id = pool.send(names.ADOPT, request.model_dump(mode="json"), target.queue)
    raw = await pool.wait(task_id, current.lock_wait_s + WAIT_MARGIN_S, target)
    return SessionRecord.model_validate(raw)
