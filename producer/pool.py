"""Talking to the pool from a producer: is it up, send a task, wait for its result.

Waiting subscribes to the result's Redis channel (Celery's Redis backend publishes every state
change there) instead of polling from a thread, so thousands of calls can wait at once inside
one event loop.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from celery import states
from celery.result import AsyncResult
from kombu.exceptions import OperationalError
from redis.exceptions import RedisError

from producer import routing
from producer.routing import Route
from tasks import keys, names
from tasks.app import app
from tasks.connections import async_redis, redacted
from tasks.errors import (
    ClaudeBoxError,
    NodeUnavailableError,
    PoolUnavailableError,
    TaskFailedError,
)
from tasks.settings import Settings, get_settings

START_HINT = (
    "start one with `claudebox-pool worker` (or a whole local pool with `claudebox-pool up`)"
)


def settings() -> Settings:
    return get_settings()


def unreachable(exc: BaseException) -> PoolUnavailableError:
    url = redacted(settings().broker_url)
    return PoolUnavailableError(
        f"cannot reach Redis at {url} ({exc}); is redis-server running? "
        "Set CLAUDEBOX_BROKER_URL and CLAUDEBOX_RESULT_BACKEND to your Redis"
    )


async def ensure_workers() -> None:
    """PoolUnavailableError unless some worker has announced itself recently."""
    current = settings()
    client = async_redis(current)
    try:
        since = time.time() - 3 * current.worker_heartbeat_s
        alive = await client.zcount(keys.workers(), since, "+inf")
    except (RedisError, OSError) as exc:
        raise unreachable(exc) from None
    finally:
        await client.aclose()
    if not alive:
        raise PoolUnavailableError(f"no claudebox worker is running; {START_HINT}")


def send(name: str, payload: dict[str, Any], shown: str, queue: str | None = None) -> str:
    """Queue task ``name`` (on ``queue``, else the common one); ``shown`` is what monitors
    (Flower) display instead of the payload."""
    try:
        result: AsyncResult[Any] = app.send_task(
            name, args=[payload], argsrepr=shown, kwargsrepr="{}", queue=queue
        )
    except OperationalError as exc:
        raise unreachable(exc) from None
    return str(result.id)


async def wait(task_id: str, timeout_s: float, route: Route = routing.ANYWHERE) -> Any:
    """The task's return value, or its error re-raised as the same ClaudeBoxError class.

    A task bound to a node fails with NodeUnavailableError once that node is silent past the
    grace period: it stays in the node's queue, and would run only there.
    """
    backend = app.backend
    key = backend.get_key_for_task(task_id)
    current = settings()
    client = async_redis(current)
    deadline = time.monotonic() + timeout_s
    next_node_check = time.monotonic() + current.worker_heartbeat_s
    try:
        async with client.pubsub() as channel:
            await channel.subscribe(key)
            while True:
                raw = await client.get(key)
                if raw is not None:
                    meta = backend.decode_result(raw)
                    if meta["status"] in states.READY_STATES:
                        return _outcome(task_id, meta)
                if route.node is not None and time.monotonic() >= next_node_check:
                    next_node_check = time.monotonic() + current.worker_heartbeat_s
                    silent_s = await routing.silent_for(client, route.node)
                    if silent_s is None or silent_s > current.node_grace_s:
                        if route.session_id is None:
                            raise PoolUnavailableError(
                                f"node '{route.node}' stopped sending heartbeats while task "
                                f"{task_id} waited for it; start a worker there again"
                            )
                        raise NodeUnavailableError(route.session_id, route.node, silent_s)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TaskFailedError(
                        f"no result for task {task_id} after {timeout_s:.0f}s; it may still be "
                        f"queued behind other work or no worker consumes the queue ({START_HINT})"
                    )
                await channel.get_message(
                    ignore_subscribe_messages=True, timeout=min(remaining, 1.0)
                )
    except (RedisError, OSError) as exc:
        raise unreachable(exc) from None
    finally:
        await client.aclose()


def _outcome(task_id: str, meta: dict[str, Any]) -> Any:
    if meta["status"] == states.SUCCESS:
        return meta["result"]
    if meta["status"] == states.REVOKED:
        raise TaskFailedError(f"task {task_id} was revoked before it finished")
    exc = app.backend.exception_to_python(meta["result"])
    if isinstance(exc, ClaudeBoxError):
        raise exc
    raise TaskFailedError(
        f"task {task_id} failed on the worker: {type(exc).__name__}: {exc} (see the worker's log)"
    )


async def call(name: str, payload: dict[str, Any], shown: str, timeout_s: float) -> Any:
    """Send a task where its session lives (``producer.routing``) and wait for its result."""
    client = async_redis(settings())
    try:
        route = await routing.route(payload, client)
    except (RedisError, OSError) as exc:
        raise unreachable(exc) from None
    finally:
        await client.aclose()
    task_id = send(name, payload, shown, route.queue)
    return await wait(task_id, timeout_s, route)


async def call_on_every_node(
    name: str, payload: dict[str, Any], shown: str, timeout_s: float
) -> list[Any]:
    """Run a task once on each live node (a reindex: each node sees only its own disk)."""
    client = async_redis(settings())
    try:
        nodes = await routing.alive_nodes(client)
    except (RedisError, OSError) as exc:
        raise unreachable(exc) from None
    finally:
        await client.aclose()
    if not nodes:
        raise PoolUnavailableError(f"no claudebox worker is running; {START_HINT}")
    routes = [Route(names.node_queue(node), node) for node in nodes]
    sent = [(send(name, payload, shown, r.queue), r) for r in routes]
    return list(await asyncio.gather(*(wait(task_id, timeout_s, r) for task_id, r in sent)))
