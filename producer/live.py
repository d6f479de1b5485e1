"""Watching and stopping a running code task, by its task id.

- :func:`events` reads the task's live output stream (see ``tasks.streaming``) from its first
  entry, so a consumer that attaches late, even after the task ended, misses nothing that was
  kept; it ends with the task's ``end`` event, or when the task is over without one (it failed
  before its agent started).
- :func:`cancel` sets the task's cancel flag; the worker watching it stops the agent inside
  its sandbox and ends the task normally (``workers.cancel``).
- :class:`CodeStream` is what ``ClaudeBox.stream`` returns: the events while the task runs,
  then its result.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

import redis.asyncio
from celery import states

from claudebox_pool.producer import pool, routing
from claudebox_pool.producer.routing import Route
from claudebox_pool.tasks import keys
from claudebox_pool.tasks.app import app
from claudebox_pool.tasks.errors import (
    ClaudeBoxError,
    InvalidRequestError,
    NodeUnavailableError,
    TaskFailedError,
)
from claudebox_pool.tasks.models import CodeResult
from claudebox_pool.tasks.streaming import FIELD, StreamEvent

OutputCallback = Callable[[StreamEvent], object]
"""Called with each event as it arrives; may be a coroutine function."""

BLOCK_MS = 1000
"""How long one read of the stream waits for news before checking whether the task ended."""
BATCH = 500
DRAIN_S = 10.0
"""After a task's result arrived, how long its last events may take to be read."""


async def finished(client: redis.asyncio.Redis, task_id: str) -> bool:
    """Whether the task has a final result (succeeded, failed or revoked)."""
    raw = await client.get(app.backend.get_key_for_task(task_id))
    if raw is None:
        return False
    return bool(app.backend.decode_result(raw)["status"] in states.READY_STATES)


async def events(task_id: str) -> AsyncGenerator[StreamEvent, None]:
    """Every event of a code task's live output, from the first, as the task prints them."""
    key = keys.task_output(task_id)
    last = "0-0"
    over = False
    with pool.map_redis_errors():
        client = await pool.redis_client()
        while True:
            # One stream asked, so a reply is [[key, [(entry id, {field: value}), ...]]].
            read = functools.partial(
                client.xread, {key: last}, count=BATCH, block=None if over else BLOCK_MS
            )
            reply: Any = await pool.riding_out(read)
            if not reply:
                if over:
                    return
                # Checked after an empty read: the end event is written before the result,
                # so one more read finds it if the task ended in between.
                over = await pool.riding_out(functools.partial(finished, client, task_id))
                continue
            for entry_id, fields in reply[0][1]:
                last = entry_id.decode()
                event = StreamEvent.model_validate_json(fields[FIELD.encode()])
                yield event
                if event.kind == "end":
                    return


async def follow(task_id: str, on_output: OutputCallback) -> None:
    """Call ``on_output`` with each event of the task until its end."""
    async for event in events(task_id):
        outcome = on_output(event)
        if inspect.isawaitable(outcome):
            await outcome


async def send(name: str, payload: dict[str, Any]) -> tuple[str, Route]:
    """Queue a task where its session lives (``producer.routing``), riding out a Redis blip
    (``pool.riding_out``); its id and route."""
    return await pool.send_routed(name, payload)


async def outlasting(task_id: str, timeout_s: float, route: Route = routing.ANYWHERE) -> Any:
    """``pool.wait``, whose ``timeout_s`` starts again each time the task is delivered again.

    A task whose worker died is handed back to the queue and runs again from its start
    (``workers.warm.rescue``): the caller waits for that run's outcome too, rather than giving
    up at a budget sized for one run. The worker counts each delivery of a task in Redis and
    keeps the count until the task ends, so it is read once per slice of the wait.
    """
    current = pool.settings()
    deadline = time.monotonic() + timeout_s
    # A message lost outright (never delivered) is the one thing that waits this long: any
    # unacknowledged one comes back within the visibility timeout.
    queued_until = deadline + current.visibility_timeout_s
    seen = 0
    while True:
        slice_ends = min(deadline, time.monotonic() + current.worker_alive_s)
        try:
            return await pool.wait(task_id, max(slice_ends - time.monotonic(), 0.0), route)
        except TaskFailedError:
            if time.monotonic() < slice_ends:
                raise  # the task's own failure, not the end of a slice
        with pool.map_redis_errors():
            client = await pool.redis_client()
            deliveries = int(await client.get(keys.task_attempts(task_id)) or 0)
        if deliveries > seen:
            seen, deadline = deliveries, time.monotonic() + timeout_s
        elif deliveries == 0 and seen == 0 and time.monotonic() < queued_until:
            # Still queued behind other work: the budget is for the run, so it starts when a
            # worker takes the task, as long as workers that may take it are alive.
            await _consumers_alive(client, route)
            deadline = max(deadline, min(queued_until, time.monotonic() + current.worker_alive_s))
        elif time.monotonic() >= deadline:
            raise TaskFailedError(
                f"no result for task {task_id} after {timeout_s:.0f}s since it was last "
                f"delivered; it may still be queued behind other work or no worker consumes "
                f"the queue ({pool.START_HINT})"
            )


async def _consumers_alive(client: redis.asyncio.Redis, route: Route) -> None:
    """NodeUnavailableError or PoolUnavailableError once nothing would take a queued task."""
    if route.node is None:
        await pool.ensure_workers()
        return
    with pool.map_redis_errors():
        silent = await routing.silent_for(client, route.node)
    if silent is None or silent > pool.settings().node_grace_s:
        raise NodeUnavailableError(route.session_id or "", route.node, silent)


async def wait(
    task_id: str,
    timeout_s: float,
    on_output: OutputCallback | None = None,
    route: Route = routing.ANYWHERE,
) -> Any:
    """The task's result, as :func:`outlasting`; with ``on_output``, its events go there
    meanwhile.

    Every event is delivered before this returns (the worker writes the last one before the
    result), unless delivery takes longer than :data:`DRAIN_S` after the result. When the wait
    is abandoned (the caller is cancelled, Ctrl-C, ``on_output`` raised), the task is cancelled
    too: nobody is left to take its result, and it would hold its session until it ended.
    """
    waiter = asyncio.ensure_future(outlasting(task_id, timeout_s, route))
    follower = asyncio.ensure_future(follow(task_id, on_output)) if on_output else None
    watched = {waiter} if follower is None else {waiter, follower}
    try:
        await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
        if follower is not None and follower.done() and not waiter.done():
            follower.result()  # on_output raised: that ends the wait
        raw = await waiter
        if follower is not None:
            await asyncio.wait({follower}, timeout=DRAIN_S)
            if follower.done():
                follower.result()
        return raw
    except ClaudeBoxError:
        raise  # the task failed, or the pool is gone: nothing is left to stop
    except BaseException:
        with contextlib.suppress(ClaudeBoxError):
            await asyncio.shield(cancel(task_id))
        raise
    finally:
        for pending in watched:
            if not pending.done():
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pending


async def cancel(task_id: str) -> bool:
    """Ask a queued or running task to stop; False if it had already finished.

    The agent is stopped inside its sandbox within a second or so; the task then ends with
    ``success=False`` and ``error="cancelled"``, its session's history records ``cancelled``,
    and the session takes its next task. A task still queued stops as soon as it starts.
    """
    if not task_id or any(c.isspace() for c in task_id) or len(task_id) > 255:
        raise InvalidRequestError(f"{task_id!r} is not a task id (a UUID like 5f1c2a...)")
    current = pool.settings()
    with pool.map_redis_errors():
        client = await pool.redis_client()
        if await finished(client, task_id):
            return False
        await client.set(keys.task_cancel(task_id), "1", ex=current.visibility_timeout_s)
        return True


class CodeStream:
    """``async for event in box.stream(prompt)``: the run's events, then its :attr:`result`.

    The task is sent when iteration starts. Leaving the loop early (``break``, an exception)
    cancels the task, as nobody is left to take its result.
    """

    def __init__(self, run: Callable[[OutputCallback], Awaitable[CodeResult]]) -> None:
        self._run = run
        self.result: CodeResult | None = None
        """The run's result, once the loop has ended."""

    async def __aiter__(self) -> AsyncIterator[StreamEvent]:
        queue: asyncio.Queue[StreamEvent] = asyncio.Queue()
        call = asyncio.ensure_future(self._run(queue.put_nowait))
        try:
            while not call.done():
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, call}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                else:
                    getter.cancel()
            while not queue.empty():
                yield queue.get_nowait()
            self.result = call.result()
        finally:
            if not call.done():
                call.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await call
