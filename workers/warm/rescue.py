"""What a dead worker held, handed back within a bound set by the heartbeat.

Two things outlive a worker whose main process died (SIGKILL, a lost host): the messages it had
taken and not acked, which kombu keeps in its ``unacked`` hash until the visibility timeout
(over an hour by default), and the messages sent to its own queue (``producer.routing``), which
nobody else consumes. So each worker records the delivery tag of every message it takes
(``claudebox:deliveries:<hostname>``), and every worker, at its heartbeat, looks for workers
silent for three heartbeats: their unacked messages go back to the queue they came from, and
what was routed to the dead worker's own queue goes to its node's queue instead, where any
worker of that node takes it. A rescued task runs again once its session's lock lapses; its
delivery count says it was interrupted.

A worker that was only frozen (SIGSTOP) or cut off meets the same fate: its session lock lapses,
and the watchdog of its sandbox stops what it ran (``runtimes.exec_server``), so that the rerun
is the only run. The moves run on a thread of their own, as the heartbeat runs on the worker's
event loop.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

import redis
from celery import signals
from celery.contrib.migrate import move

from claudebox_pool.tasks import keys, names
from claudebox_pool.tasks.app import app
from claudebox_pool.tasks.connections import text
from claudebox_pool.tasks.models import WorkerInfo
from claudebox_pool.workers.context import WorkerContext, context

log = logging.getLogger(__name__)

MOVE_IDLE_S = 0.5
"""How long the mover waits for one more message before it stops."""

_moving = threading.Lock()
_last_beat = 0.0
"""When this worker last reached Redis at its heartbeat (monotonic clock)."""

_PRUNE = """
-- KEYS[1] a worker's deliveries (keys.worker_deliveries), KEYS[2] kombu's unacked hash
-- Forgets the delivery tags that are no longer unacked: acked, rejected or handed back.
for _, tag in ipairs(redis.call('HKEYS', KEYS[1])) do
  if redis.call('HEXISTS', KEYS[2], tag) == 0 then redis.call('HDEL', KEYS[1], tag) end
end
"""


def record_delivery(request: Any = None, **_: Any) -> None:
    """Remember which worker took which message, in the main process as it takes it."""
    tag = getattr(getattr(request, "message", None), "delivery_tag", None)
    if tag is None:
        return
    ctx = context()
    key = keys.worker_deliveries(request.hostname)
    try:
        pipe = ctx.redis.pipeline(transaction=False)
        pipe.hset(key, str(tag), str(request.id))
        pipe.expire(key, ctx.settings.visibility_timeout_s * 2)
        pipe.execute()
    except redis.RedisError as exc:  # the visibility timeout still hands it back
        log.warning("could not record the delivery of task %s: %s", request.id, exc)


signals.task_received.connect(record_delivery)


def handed_back(ctx: WorkerContext, hostname: str, task_id: str) -> bool:
    """Whether the delivery of ``task_id`` that worker ``hostname`` is running was handed back
    to the queue (its record is gone): the worker was taken for dead meanwhile."""
    held: list[bytes] = ctx.redis.hvals(keys.worker_deliveries(hostname))  # type: ignore[assignment]
    return task_id.encode() not in held


def mark_stopped(ctx: WorkerContext, hostname: str) -> None:
    """Record a worker's clean stop: silent from now on, yet known until it is forgotten, so
    that what reaches its queue as it stops is moved like a dead worker's."""
    stale = time.time() - ctx.settings.worker_alive_s - ctx.settings.worker_heartbeat_s
    ctx.redis.zadd(keys.workers(), {hostname: stale})


def prune(ctx: WorkerContext, hostname: str) -> None:
    """Forget this worker's deliveries that ended, so that its record stays small."""
    ctx.redis.eval(_PRUNE, 2, keys.worker_deliveries(hostname), keys.broker_unacked())


def dead_holders(ctx: WorkerContext) -> list[str]:
    """Silent workers that still hold unacked messages by their record."""
    since = time.time() - ctx.settings.worker_alive_s
    members: list[bytes] = ctx.redis.zrangebyscore(keys.workers(), "-inf", since)  # type: ignore[assignment]
    silent = [text(host) for host in members]
    if not silent:
        return []
    pipe = ctx.redis.pipeline(transaction=False)
    for hostname in silent:
        pipe.hlen(keys.worker_deliveries(hostname))
    return [host for host, held in zip(silent, pipe.execute(), strict=True) if held]


def stranded(ctx: WorkerContext) -> list[str]:
    """Queues of this node's silent or stopped workers that hold messages.

    A worker silent for twice the visibility timeout, after which Redis hands back nothing more
    of what it had taken, is forgotten (its heartbeat, its info, its queue's membership) once
    its queue is empty and it holds nothing unacked.
    """
    hostnames = sorted(text(member) for member in ctx.redis.smembers(keys.worker_queues()))
    if not hostnames:
        return []
    pipe = ctx.redis.pipeline(transaction=False)
    for hostname in hostnames:
        pipe.zscore(keys.workers(), hostname)
        pipe.llen(names.worker_queue(hostname))
        pipe.exists(keys.worker_deliveries(hostname))
    replies = pipe.execute()
    now = time.time()
    holding, forgotten = [], []
    for index, hostname in enumerate(hostnames):
        seen, length, delivered = replies[3 * index : 3 * index + 3]
        if seen is None:
            continue  # starting: not ready to announce itself yet
        silent_s = now - float(seen)
        if silent_s <= ctx.settings.worker_alive_s:
            continue
        if length:
            holding.append(hostname)
        elif not delivered and silent_s > 2 * ctx.settings.visibility_timeout_s:
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


def rescue(ctx: WorkerContext, hostname: str) -> None:
    """Start handing back what dead workers held, unless a move runs.

    Not on the first beat after this worker could not reach Redis itself: every worker was
    silent through the outage, the others are alive, and they beat again within a heartbeat.
    """
    global _last_beat
    now, last = time.monotonic(), _last_beat
    _last_beat = now
    prune(ctx, hostname)
    if now - last > 2 * ctx.settings.worker_heartbeat_s:
        return
    holders = dead_holders(ctx)
    queues = stranded(ctx)
    if (holders or queues) and _moving.acquire(blocking=False):
        threading.Thread(
            target=_move, args=(ctx, holders, queues), name="rescue", daemon=True
        ).start()


def _move(ctx: WorkerContext, holders: list[str], queues: list[str]) -> None:
    try:
        for holder in holders:
            reclaim(ctx, holder)
        if queues:
            _move_queued(ctx, queues)
    except Exception as exc:  # the next heartbeat tries again
        log.warning("could not move the tasks of a dead worker: %s", exc)
    finally:
        _moving.release()


def reclaim(ctx: WorkerContext, holder: str) -> int:
    """Put the dead ``holder``'s unacked messages back in their queues; how many moved."""
    raw_info = ctx.redis.hget(keys.worker_info(), holder)
    node = WorkerInfo.model_validate_json(raw_info).node if raw_info else ctx.node
    own_queue, node_queue = names.worker_queue(holder), names.node_queue(node)
    deliveries = keys.worker_deliveries(holder)
    moved = 0
    for tag_raw, task_id in ctx.redis.hgetall(deliveries).items():
        tag, sent_to = text(tag_raw), list[str]()

        def hand_back(
            pipe: redis.client.Pipeline, tag: str = tag, sent_to: list[str] = sent_to
        ) -> None:
            raw = pipe.hget(keys.broker_unacked(), tag)
            pipe.multi()
            pipe.hdel(deliveries, tag)
            if raw is None:
                return  # acked, or handed back already
            message, _exchange, routing_key = json.loads(text(raw))
            # What kombu's own restore marks; our queues are named by their routing key, and a
            # dead worker's own queue has no consumer left.
            message["headers"]["redelivered"] = True
            message["properties"]["delivery_info"]["redelivered"] = True
            queue = node_queue if routing_key == own_queue else str(routing_key)
            pipe.hdel(keys.broker_unacked(), tag)
            pipe.zrem(keys.broker_unacked_index(), tag)
            pipe.rpush(queue, json.dumps(message))  # the consuming end: it runs next
            sent_to[:] = [queue]  # a retried transaction decides again

        ctx.redis.transaction(hand_back, keys.broker_unacked(), deliveries)
        if sent_to:
            moved += 1
            log.warning(
                "task %s handed back from dead worker %s to %s", text(task_id), holder, sent_to[0]
            )
    return moved


def _move_queued(ctx: WorkerContext, queues: list[str]) -> None:
    target = app.amqp.queues[names.node_queue(ctx.node)]

    def to_node(body: Any, message: Any) -> Any:
        task_id = (message.headers or {}).get("id")
        log.warning("task %s moved from a dead worker's queue to %s", task_id, target.name)
        return target

    with app.connection_for_write() as connection:
        move(to_node, connection=connection, source=queues, app=app, timeout=MOVE_IDLE_S)
