"""Where a task goes: the common queue, or the queue of the node that holds its session.

Without shared storage a session's files live on one node (the workers that share one sessions
root, named by ``CLAUDEBOX_NODE_NAME``), and its registry entry names that node. A task that
needs a session's files goes to ``claudebox.node.<node>``, which only that node's workers
consume. A task that needs none (creating a new session, a reindex) goes to the common queue,
where any worker takes it; a new session is bound to the node of the worker that created it.

A node that has sent no heartbeat for ``CLAUDEBOX_NODE_GRACE_S`` is gone: a task for one of its
sessions fails with NodeUnavailableError rather than wait for a node that may never return, and
it never goes elsewhere. Within the grace period it waits in the node's queue.

Within its node, a session whose sandbox a worker keeps warm (``CLAUDEBOX_WARM_IDLE_S``)
has its tasks sent to that worker's own queue, ``claudebox.worker.<hostname>``, while the
worker is alive (``Settings.worker_alive_s``), so that the next task skips the sandbox
start; otherwise to the node's queue. A worker that dies with tasks in its queue has them
moved to the node's queue by the node's other workers (``workers.warm.rescue``). The node
stays the hard constraint, the worker a preference.

The whole choice is :func:`route`, from a payload to a :class:`Route`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio

from claudebox_pool.tasks import keys, names
from claudebox_pool.tasks.connections import text
from claudebox_pool.tasks.errors import InvalidRequestError, NodeUnavailableError
from claudebox_pool.tasks.registry import parse
from claudebox_pool.tasks.settings import get_settings

SESSION_FIELDS = ("session_id", "template_session", "source_session_id")
"""Payload fields naming a session whose files a task needs; ``inputs`` maps names to more."""


@dataclass(frozen=True)
class Route:
    queue: str
    node: str | None = None
    """The node whose files the task needs; None: any worker may take it."""
    session_id: str | None = None
    """The session that binds the task to ``node``, for error messages."""


ANYWHERE = Route(names.QUEUE)


def sessions_of(payload: Mapping[str, Any]) -> list[str]:
    """The sessions whose files a task with this payload reads or writes."""
    found = [payload.get(field) for field in SESSION_FIELDS]
    inputs = payload.get("inputs")
    if isinstance(inputs, Mapping):
        found.extend(inputs.values())
    return [session_id for session_id in found if isinstance(session_id, str)]


async def route(payload: Mapping[str, Any], client: redis.asyncio.Redis) -> Route:
    """The queue for a task with ``payload``; NodeUnavailableError if its node is gone."""
    session_ids = sessions_of(payload)
    if not session_ids:
        return ANYWHERE
    main = payload.get("session_id")
    warm_of = main if isinstance(main, str) else None
    pipe = client.pipeline(transaction=False)
    pipe.hmget(keys.registry(), session_ids)
    if warm_of is not None:
        pipe.get(keys.warm(warm_of))
    raws, *warm = await pipe.execute()
    bound: dict[str, str] = {}
    for session_id, raw in zip(session_ids, raws, strict=True):
        record = parse(raw)
        if record is not None and record.node:
            bound.setdefault(record.node, session_id)
    if not bound:
        # Unknown sessions: a new one is created by whichever worker takes it, and a missing
        # one is reported by the store of the worker that looks for it.
        return ANYWHERE
    if len(bound) > 1:
        shown = ", ".join(f"'{sid}' on node '{node}'" for node, sid in sorted(bound.items()))
        raise InvalidRequestError(
            f"this task needs the files of sessions on different nodes ({shown}), and a task "
            "runs on one node; move them to one node first (`claudebox-pool sessions move`)"
        )
    node, session_id = next(iter(bound.items()))
    owner = text(warm[0]) if warm and warm[0] is not None else None
    pipe = client.pipeline(transaction=False)
    pipe.zscore(keys.nodes(), node)
    if owner is not None:
        pipe.zscore(keys.workers(), owner)
    node_seen, *owner_seen = await pipe.execute()
    silent_s = None if node_seen is None else max(0.0, time.time() - node_seen)
    settings = get_settings()
    if silent_s is None or silent_s > settings.node_grace_s:
        raise NodeUnavailableError(session_id, node, silent_s)
    alive_s = settings.worker_alive_s
    if owner is not None and owner_seen[0] is not None and time.time() - owner_seen[0] <= alive_s:
        return Route(names.worker_queue(owner), node, session_id)
    return Route(names.node_queue(node), node, session_id)


async def silent_for(client: redis.asyncio.Redis, node: str) -> float | None:
    """Seconds since any worker of ``node`` sent a heartbeat; None if none ever did."""
    seen = await client.zscore(keys.nodes(), node)
    return None if seen is None else max(0.0, time.time() - seen)


async def alive_nodes(client: redis.asyncio.Redis) -> list[str]:
    """Nodes that sent a heartbeat within the grace period."""
    since = time.time() - get_settings().node_grace_s
    members: list[bytes] = await client.zrangebyscore(keys.nodes(), since, "+inf")  # type: ignore[assignment]
    return sorted(text(member) for member in members)
