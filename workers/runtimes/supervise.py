"""Driving asynchronous commands from the synchronous task bodies.

An SDK whose API is async (boxlite) runs on a private event loop in a daemon thread; a command
started there sends its output back as whole lines to the calling thread, which enforces the
deadline and the cancel event exactly as :func:`workers.runtimes.process.run_process` does.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import signal
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from claudebox_pool.workers.runtimes.base import ExecResult, LineSink
from claudebox_pool.workers.runtimes.output import OutputLimits, StreamReader

T = TypeVar("T")

POLL_S = 0.1
KILL_GRACE_S = 10.0
BACKLOG_POLL_S = 0.01
"""How long a killed command may take to report its end before it is given up on."""


class LoopThread:
    """A private asyncio loop in a daemon thread, where every boxlite call is made."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="boxlite-loop", daemon=True
        )
        self._thread.start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
        future = self.submit(coro)
        try:
            return future.result(timeout_s)
        except TimeoutError:
            future.cancel()
            raise

    def call_soon(self, callback: Callable[[], object]) -> None:
        self._loop.call_soon_threadsafe(callback)

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()


class Output:
    """Where a running command's output goes: capped lines, queued for the supervising thread.

    The queue cannot block its writer (the private loop, which every command of the runtime
    shares), so a reader of the command's streams awaits :meth:`room` between chunks instead:
    the queue then holds at most about ``CLAUDEBOX_MAX_OUTPUT_BYTES`` however slowly the
    supervising thread takes it.
    """

    def __init__(self, limits: OutputLimits) -> None:
        self.events: queue.SimpleQueue[tuple[str, str] | None] = queue.SimpleQueue()
        self.readers = {name: StreamReader(name, limits) for name in ("stdout", "stderr")}
        self._backlog_limit = limits.tail_bytes
        self._backlog = 0
        self._counting = threading.Lock()
        self._abandoned = False

    def put(self, stream: str, chunk: str | bytes) -> None:
        self._queue(stream, self.readers[stream].feed(chunk))

    def end(self, stream: str) -> None:
        self._queue(stream, self.readers[stream].end())

    async def room(self) -> None:
        """Return once the supervising thread has taken enough of the queue."""
        while self._backlog > self._backlog_limit and not self._abandoned:
            await asyncio.sleep(BACKLOG_POLL_S)

    def abandon(self) -> None:
        """The supervising thread reads no more: drop what comes, and never make a reader wait."""
        self._abandoned = True

    def taken(self, line: str) -> None:
        with self._counting:
            self._backlog -= len(line)

    def _queue(self, stream: str, lines: list[str]) -> None:
        if self._abandoned:
            return
        with self._counting:
            self._backlog += sum(len(line) for line in lines)
        for line in lines:
            self.events.put((stream, line))


Command = Callable[[Output, asyncio.Event], Coroutine[Any, Any, int]]
"""Runs one command on the private loop: writes to the Output, kills the command once the
event is set, and returns its exit code."""


def supervise(
    loop: LoopThread,
    command: Command,
    timeout_s: float,
    on_line: LineSink | None = None,
    cancel: threading.Event | None = None,
    limits: OutputLimits | None = None,
) -> ExecResult:
    """Run ``command`` on ``loop``, deliver its lines here, stop it at the deadline or cancel."""
    started = time.monotonic()
    output = Output(limits or OutputLimits.of())
    stop = asyncio.Event()
    future = loop.submit(command(output, stop))
    future.add_done_callback(lambda _: output.events.put(None))
    deadline = started + timeout_s
    timed_out = cancelled = False
    give_up_at: float | None = None
    while True:
        now = time.monotonic()
        if give_up_at is None:
            if cancel is not None and cancel.is_set():
                cancelled = True
            elif now >= deadline:
                timed_out = True
            if cancelled or timed_out:
                loop.call_soon(stop.set)
                give_up_at = now + 2 * KILL_GRACE_S
        elif now >= give_up_at:
            # The command ignored the kill (a hung guest): stop waiting for it.
            future.cancel()
            break
        wait_s = POLL_S if give_up_at is not None else min(POLL_S, max(deadline - now, 0.0))
        try:
            item = output.events.get(timeout=wait_s)
        except queue.Empty:
            continue
        if item is None:
            break
        stream, line = item
        output.taken(line)
        if on_line is not None:
            on_line(stream, line.rstrip("\n"))
    output.abandon()
    try:
        exit_code = future.result(timeout=0)
    except (concurrent.futures.CancelledError, TimeoutError):
        exit_code = -signal.SIGKILL
    return ExecResult(
        exit_code=exit_code,
        stdout=output.readers["stdout"].tail.text(),
        stderr=output.readers["stderr"].tail.text(),
        duration_s=time.monotonic() - started,
        timed_out=timed_out,
        cancelled=cancelled,
    )
