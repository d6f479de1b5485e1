"""Session affinity on the worker side: each node's own queue, and refusing misrouted tasks.

A node is the place one sessions root lives (``CLAUDEBOX_NODE_NAME``, by default the hostname).
Every worker consumes the common queue and its node's queue, ``claudebox.node.<node>``;
producers send a session's tasks to the queue of the node its registry entry names
(``producer.routing``). The check here catches what still reaches the wrong node (a producer
that routes nothing, a task queued before its session moved), so that no task runs on a node
that lacks its session's files.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import signals

from claudebox_pool.tasks import names
from claudebox_pool.tasks.errors import WrongNodeError
from claudebox_pool.tasks.registry import read_one
from claudebox_pool.tasks.settings import get_settings
from claudebox_pool.workers.context import WorkerContext

log = logging.getLogger(__name__)


def consume_node_queue(sender: str, instance: Any, **_: Any) -> None:
    # Added here rather than on the command line, so that every way of starting a worker
    # (`claudebox-pool worker`, `celery -A claudebox_pool.workers.app worker`, the tests)
    # consumes it.
    queue = names.node_queue(get_settings().node)
    instance.app.amqp.queues.select_add(queue)
    log.info("%s also consumes %s", sender, queue)


signals.celeryd_after_setup.connect(consume_node_queue)


def refuse_if_elsewhere(ctx: WorkerContext, session_id: str) -> None:
    """WrongNodeError if the registry binds the session to another node.

    A session the registry does not know (or knows without a node) is left to the store, which
    finds it on this disk or raises SessionNotFoundError.
    """
    record = read_one(ctx.redis, session_id)
    if record is not None and record.node and record.node != ctx.node:
        raise WrongNodeError(session_id, record.node, ctx.node)
