"""Beat's scheduled work, sent on to every node: each sweeps and reindexes its own sessions root.

Beat sends each scheduled task once, to the common queue, where any worker of any node takes it.
Where nodes do not share one sessions root, that would sweep one node's sessions and never the
others'. So the worker that takes a message marked ``every_node`` sends a copy, unmarked, to the
queue of every other node that sent a heartbeat within ``CLAUDEBOX_NODE_GRACE_S``, then does its
own node's part. A node down at that moment misses that one run; the next interval reaches it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from claudebox_pool.tasks import keys, names
from claudebox_pool.tasks.app import app
from claudebox_pool.tasks.connections import text
from claudebox_pool.workers.context import WorkerContext

log = logging.getLogger(__name__)


def to_other_nodes(ctx: WorkerContext, name: str, payload: dict[str, Any]) -> list[str]:
    """Send task ``name`` with ``payload`` (made not to be sent on again) to every other live
    node's queue; the nodes it went to."""
    since = time.time() - ctx.settings.node_grace_s
    members: list[bytes] = ctx.redis.zrangebyscore(keys.nodes(), since, "+inf")  # type: ignore[assignment]
    others = sorted(node for node in map(text, members) if node != ctx.node)
    for node in others:
        app.send_task(name, args=[{**payload, "every_node": False}], queue=names.node_queue(node))
    if others:
        log.info("%s sent on to node(s) %s", name, ", ".join(others))
    return others
