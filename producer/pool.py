"""Talking to the pool from a producer: is it up, send a task, wait for its result.

Waiting subscribes to the result's Redis channel (Celery's Redis backend publishes every state
change there, the encoded result with it) instead of polling from a thread, so thousands of
calls can wait at once inside one event loop.

Each event loop keeps its Redis connections from call to call (:func:`redis_client`): opening
one costs over ten times the round trip it carries, and a call needs three (routing, reading
the result, the subscription). A pub/sub connection whose wait ended cleanly is kept too,
unsubscribed, for the next wait.

A failure to reach Redis becomes PoolUnavailableError in one place, :func:`map_redis_errors`;
sending and waiting first ride out a blip (:func:`riding_out`): a Redis restart should cost a
batch a pause, not every job it was waiting for.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis.asyncio
from celery import states
from celery.result import AsyncResult
from kombu.exceptions import OperationalError
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from claudebox_pool.producer import routing
from claudebox_pool.producer.routing import Route
from claudebox_pool.tasks import keys, names
from claudebox_pool.tasks.app import app
from claudebox_pool.tasks.connections import async_redis, redacted
from claudebox_pool.tasks.errors import (
    AgentRunFailedError,
    ClaudeBoxError,
    NodeUnavailableError,
    PoolUnavailableError,
    TaskFailedError,
)
from claudebox_pool.tasks.settings import Settings, get_settings

START_HINT = (
    "start one with `claudebox-pool worker` (or a whole local pool with `claudebox-pool up`)"
)
POLL_S = 1.0
"""How often a wait also reads the result itself, in case a message was lost (a reconnection)."""
SUBSCRIBED_WITHIN_S = 10.0
"""How long a wait waits for Redis to confirm its subscription before reading the result."""
IDLE_CHANNELS = 64
"""Unsubscribed pub/sub connections an event loop keeps for its next waits."""
MAX_CONNECTIONS = 1 << 20
"""Connections an event loop may open to Redis: as many as it has calls waiting at once."""


def settings() -> Settings:
    return get_settings()


UNREACHABLE = (RedisError, OSError, OperationalError)
"""What a failure to reach the pool's Redis raises: redis-py's errors, a socket's, and kombu's
when it sends a task."""


OUTAGE_FIRST_PAUSE_S = 0.2
OUTAGE_MAX_PAUSE_S = 5.0
"""Backoff between tries while Redis is away: doubling from the first pause up to this."""

T = TypeVar("T")


def unreachable(exc: Exception) -> PoolUnavailableError:
    url = redacted(settings().broker_url)
    return PoolUnavailableError(
        f"cannot reach Redis at {url} ({exc}); is redis-server running? "
        "Set CLAUDEBOX_BROKER_URL and CLAUDEBOX_RESULT_BACKEND to your Redis"
    )


@contextmanager
def map_redis_errors() -> Iterator[None]:
    """Raise a failure to reach Redis inside the block as PoolUnavailableError, which says
    what to check; in sync and async code alike (``with map_redis_errors(): await ...``)."""
    try:
        yield
    except UNREACHABLE as exc:
        # from None: the redis-py traceback says nothing the message does not.
        raise unreachable(exc) from None


_reached: set[str] = set()
"""The Redis URLs this process has reached: only an outage of one of those is ridden out."""


async def riding_out(attempt: Callable[[], Awaitable[T]]) -> T:
    """``attempt()``, tried again with backoff while Redis cannot be reached, for up to
    ``CLAUDEBOX_REDIS_OUTAGE_S`` since the first failure; then PoolUnavailableError. A Redis
    this process never reached fails at once: a wrong URL is not a blip.

    Only for attempts that are safe to repeat: a wait, or a send under a fixed task id (a
    second message of one task id is answered by the worker's duplicate check)."""
    give_up_at: float | None = None
    pause = OUTAGE_FIRST_PAUSE_S
    while True:
        url = settings().result_backend
        try:
            done = await attempt()
            _reached.add(url)
            return done
        except UNREACHABLE as exc:
            now = time.monotonic()
            if give_up_at is None:
                give_up_at = now + (settings().redis_outage_s if url in _reached else 0)
            if now >= give_up_at:
                raise unreachable(exc) from None
            wait_s = min(pause, give_up_at - now)
        await asyncio.sleep(wait_s)
        pause = min(pause * 2, OUTAGE_MAX_PAUSE_S)


@dataclass
class _Link:
    """One event loop's connections to the pool's Redis."""

    loop: asyncio.AbstractEventLoop
    url: str
    client: redis.asyncio.Redis
    idle: list[PubSub] = field(default_factory=list)

    async def close(self) -> None:
        for channel in self.idle:
            await channel.aclose()
        self.idle.clear()
        await self.client.aclose()


_links: dict[int, _Link] = {}


async def _link() -> _Link:
    loop = asyncio.get_running_loop()
    current = settings()
    link = _links.get(id(loop))
    if link is not None and link.loop is loop and link.url == current.result_backend:
        return link
    if link is not None and link.loop is loop:
        await link.close()  # configure() pointed the producer at another Redis
    for key, other in list(_links.items()):
        # A finished loop's connections cannot be closed any more; dropped, they close as
        # they are collected.
        if other.loop.is_closed():
            del _links[key]
    client = async_redis(current)
    # Every wait holds a connection of this pool for its subscription; redis-py's asyncio
    # pool refuses a 101st connection ("Too many connections") rather than wait for one.
    client.connection_pool.max_connections = MAX_CONNECTIONS
    link = _links[id(loop)] = _Link(loop, current.result_backend, client)
    return link


async def redis_client() -> redis.asyncio.Redis:
    """The running event loop's Redis client, kept for every call made in that loop: use it,
    never close it."""
    return (await _link()).client


class _Channel:
    """One result channel, subscribed on a pub/sub connection of its own."""

    def __init__(self, pubsub: PubSub, name: bytes) -> None:
        self._pubsub = pubsub
        self._name = name

    async def next(self, timeout_s: float, kind: str = "message") -> dict[str, Any] | None:
        """The next message of ``kind`` on this channel; None after ``timeout_s``.

        A reused connection may still deliver what an earlier wait subscribed to: skipped."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while (remaining := deadline - loop.time()) > 0:
            message: dict[str, Any] | None = await self._pubsub.get_message(timeout=remaining)
            if message and message["channel"] == self._name and message["type"] == kind:
                return message
        return None


@asynccontextmanager
async def _subscribed(link: _Link, name: bytes) -> AsyncIterator[_Channel]:
    """Subscribed to ``name`` once Redis confirmed it: what is published from then is seen."""
    pubsub = link.idle.pop() if link.idle else link.client.pubsub()
    channel = _Channel(pubsub, name)
    reusable = False
    try:
        await pubsub.subscribe(name)
        await channel.next(SUBSCRIBED_WITHIN_S, kind="subscribe")
        try:
            yield channel
        except ClaudeBoxError:
            reusable = True  # raised between reads: the connection is in a known state
            raise
        reusable = True
    finally:
        if reusable and len(link.idle) < IDLE_CHANNELS:
            # Its confirmation is left to read: the next user skips it with the rest.
            await pubsub.unsubscribe(name)
            link.idle.append(pubsub)
        else:
            await pubsub.aclose()


async def ensure_workers() -> None:
    """PoolUnavailableError unless some worker has announced itself recently."""
    current = settings()
    with map_redis_errors():
        client = await redis_client()
        since = time.time() - current.worker_alive_s
        alive = await client.zcount(keys.workers(), since, "+inf")
    _reached.add(current.result_backend)
    if not alive:
        raise PoolUnavailableError(f"no claudebox worker is running; {START_HINT}")


def send(name: str, payload: dict[str, Any], queue: str | None = None) -> str:
    """Queue task ``name`` (on ``queue``, else the common one). What monitors (Flower) show of
    its payload is written by the app's message factory (``tasks.monitoring``)."""
    with map_redis_errors():
        return publish(name, payload, queue, str(uuid.uuid4()))


def publish(name: str, payload: dict[str, Any], queue: str | None, task_id: str) -> str:
    """:func:`send` under a task id of the caller's, Redis errors left as they are."""
    result: AsyncResult[Any] = app.send_task(name, args=[payload], queue=queue, task_id=task_id)
    return str(result.id)


async def send_routed(name: str, payload: dict[str, Any]) -> tuple[str, Route]:
    """Queue a task where its session lives (``producer.routing``), riding out a Redis blip
    under one task id; its id and route."""
    task_id = str(uuid.uuid4())

    async def attempt() -> tuple[str, Route]:
        route = await routing.route(payload, await redis_client())
        return publish(name, payload, route.queue, task_id), route

    return await riding_out(attempt)


async def wait(task_id: str, timeout_s: float, route: Route = routing.ANYWHERE) -> Any:
    """The task's return value, or its error re-raised as the same ClaudeBoxError class.

    A task bound to a node fails with NodeUnavailableError once that node is silent past the
    grace period: it stays in the node's queue, and would run only there. While Redis is away
    the wait pauses (:func:`riding_out`), within its own deadline.
    """
    deadline = time.monotonic() + timeout_s
    return await riding_out(lambda: _wait(task_id, timeout_s, deadline, route))


async def _wait(task_id: str, timeout_s: float, deadline: float, route: Route) -> Any:
    backend = app.backend
    key = backend.get_key_for_task(task_id)
    current = settings()
    next_node_check = time.monotonic() + current.worker_heartbeat_s
    link = await _link()
    client = link.client
    async with _subscribed(link, key) as channel:
        raw = await client.get(key)
        _reached.add(current.result_backend)
        while True:
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
            # A message carries the state it announces; without one, read it anyway.
            message = await channel.next(min(remaining, POLL_S))
            raw = message["data"] if message else await client.get(key)


def raise_if_failed(task_id: str, raw: bytes | None) -> None:
    """Raise the task's error if ``raw``, its stored result, says it failed; else nothing."""
    if raw is not None:
        meta = app.backend.decode_result(raw)
        if meta["status"] in states.READY_STATES and meta["status"] != states.SUCCESS:
            _outcome(task_id, meta)


def _outcome(task_id: str, meta: dict[str, Any]) -> Any:
    if meta["status"] == states.SUCCESS:
        return meta["result"]
    if meta["status"] == states.REVOKED:
        raise TaskFailedError(f"task {task_id} was revoked before it finished")
    exc = app.backend.exception_to_python(meta["result"])
    if isinstance(exc, AgentRunFailedError):
        return exc.result  # a failed agent run is the call's result, not an error of the call
    if isinstance(exc, ClaudeBoxError):
        raise exc
    raise TaskFailedError(
        f"task {task_id} failed on the worker: {type(exc).__name__}: {exc} (see the worker's log)"
    )


async def call(name: str, payload: dict[str, Any], timeout_s: float) -> Any:
    """Send a task where its session lives (``producer.routing``) and wait for its result."""
    task_id, route = await send_routed(name, payload)
    return await wait(task_id, timeout_s, route)


async def call_on_every_node(name: str, payload: dict[str, Any], timeout_s: float) -> list[Any]:
    """Run a task once on each live node (a reindex: each node sees only its own disk)."""
    with map_redis_errors():
        nodes = await routing.alive_nodes(await redis_client())
    if not nodes:
        raise PoolUnavailableError(f"no claudebox worker is running; {START_HINT}")
    routes = [Route(names.node_queue(node), node) for node in nodes]
    sent = [(send(name, payload, r.queue), r) for r in routes]
    return list(await asyncio.gather(*(wait(task_id, timeout_s, r) for task_id, r in sent)))


def outcome(task_id: str, meta: dict[str, Any]) -> Any:
    """A finished task's return value from its result's metadata, or its error raised, as
    :func:`wait` gives them (``claudebox-pool result`` reads a result this way)."""
    return _outcome(task_id, meta)
