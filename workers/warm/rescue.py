"""Tasks left in the queue of a worker that died, moved to its node's queue for any worker there.

A producer sends a session's task to the queue of the worker keeping its sandbox warm while
that worker's heartbeat is fresh (``producer.routing``). A worker that dies leaves behind what
was sent to it meanwhile, and what Redis hands back from its unacked set after the visibility
timeout; a worker stopped cleanly may leave what was sent to it as it stopped: nobody else
consumes its queue. So every worker, at its heartbeat, looks among the workers that ever had a
queue of their own (``claudebox:workers:queues``) for those of its node silent for three
heartbeats, or stopped, whose queue holds messages, and moves them to the node's queue with
Celery's own message mover (each is republished, then acked). The move runs on a
thread of its own, as the heartbeat runs on the worker's event loop.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery.contrib.migrate import move

from claudebox_pool.tasks import keys, names
from claudebox_pool.tasks.app import app
from claudebox_pool.tasks.connections import text
from claudebox_pool.tasks.models import WorkerInfo
from claudebox_pool.workers.context import WorkerContext

log = logging.getLogger(__name__)

MOVE_IDLE_S = 0.5
"""How long the mover waits for one more message before it stops."""

_moving = threading.Lock()


def mark_stopped(ctx: WorkerContext, hostname: str) -> None:
    """Record a worker's clean stop: silent from now on, yet known until it is forgotten, so
    that what reaches its queue as it stops is moved like a dead worker's."""
    stale = time.time() - ctx.settings.worker_alive_s - ctx.settings.worker_heartbeat_s
    ctx.redis.zadd(keys.workers(), {hostname: stale})


def stranded(ctx: WorkerContext) -> list[str]:
    """Queues of this node's silent or stopped workers that hold messages.

    A worker silent for longer than the visibility timeout, after which Redis hands back nothing
    more of what it had taken, is forgotten (its heartbeat, its info, its queue's membership)
    once its queue is empty.
    """
    hostnames = sorted(text(member) for member in ctx.redis.smembers(keys.worker_queues()))
    if not hostnames:
        return []
    pipe = ctx.redis.pipeline(transaction=False)
    for hostname in hostnames:
        pipe.zscore(keys.workers(), hostname)
        pipe.llen(names.worker_queue(hostname))
    replies = pipe.execute()
    now = time.time()
    holding, forgotten = [], []
    for index, hostname in enumerate(hostnames):
        seen, length = replies[2 * index : 2 * index + 2]
        if seen is None:
            continue  # starting: not ready to announce itself yet
        silent_s = now - float(seen)
        if silent_s <= ctx.settings.worker_alive_s:
            continue
        if length:
            holding.append(hostname)
        elif silent_s > ctx.settings.visibility_timeout_s:
            forgotten.append(hostname)
    found = []
    if holding:
        # Their node is read only for the rare worker found silent with messages left.
        for hostname, raw in zip(
            holding, ctx.redis.hmget(keys.worker_info(), holding), strict=True
        ):
            if raw and WorkerInfo.model_validate_json(raw).node == ctx.node:
                found.append(names.worker_queue(hostname))
    if forgotten:
        pipe = ctx.redis.pipeline(transaction=False)
        pipe.srem(keys.worker_queues(), *forgotten)
        pipe.zrem(keys.workers(), *forgotten)
        pipe.hdel(keys.worker_info(), *forgotten)
        pipe.execute()
    return found


def rescue(ctx: WorkerContext) -> None:
    """Start moving the messages of this node's dead workers' queues, unless a move runs."""
    queues = stranded(ctx)
    if queues and _moving.acquire(blocking=False):
        threading.Thread(target=_move, args=(ctx, queues), name="rescue", daemon=True).start()


def _move(ctx: WorkerContext, queues: list[str]) -> None:
    try:
        target = app.amqp.queues[names.node_queue(ctx.node)]

        def to_node(body: Any, message: Any) -> Any:
            task_id = (message.headers or {}).get("id")
            log.warning("task %s moved from a dead worker's queue to %s", task_id, target.name)
            return target

        with app.connection_for_write() as connection:
            move(to_node, connection=connection, source=queues, app=app, timeout=MOVE_IDLE_S)
    except Exception as exc:  # the next heartbeat tries again
        log.warning("could not move the tasks of a dead worker: %s", exc)
    finally:
        _moving.release()
