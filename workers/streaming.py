"""Telling the outside about a running code task: its output, line by line, to its Redis
stream. (Monitors see it run from Celery's own ``task-started`` event: Flower shows STARTED.)

The sandbox's exec calls :meth:`OutputPublisher.on_line` from its pipe readers for every line
as it is printed. Sending each line in its own round trip would slow a chatty command down to
Redis's pace (the readers block, the pipes fill, the command waits), so lines are queued and a
thread of the publisher sends whatever has gathered in one pipeline, then the next batch. That
thread starts with the first line: a run that prints nothing sends its end event itself. The
stream is trimmed to ``CLAUDEBOX_STREAM_MAX_EVENTS`` and expires ``CLAUDEBOX_STREAM_TTL_S``
after its last event. A task puts at most ``CLAUDEBOX_STREAM_MAX_BYTES`` of text in it: past
that, one event says the stream stops, lines are only counted, and a marker before the end
event says how many bytes were cut, so that a flood costs Redis a bounded amount. Publishing
is best effort: a Redis error loses live lines, never the task (its result keeps the output's
tail).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from types import TracebackType
from typing import Self

import redis
from redis.exceptions import RedisError

from claudebox_pool.tasks import keys
from claudebox_pool.tasks.models import CodeResult
from claudebox_pool.tasks.settings import AgentName, Settings
from claudebox_pool.tasks.streaming import FIELD, StreamEvent, shorten
from claudebox_pool.workers.agents.stream import live_events
from claudebox_pool.workers.runtimes.output import cut_marker

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 10.0
EVENT_OVERHEAD_BYTES = 64
"""What an event costs in the stream beyond its text (its JSON keys, the entry id)."""
STREAM_CUT = "stream_max_bytes"


def line_events(agent: AgentName, stream: str, line: str) -> list[StreamEvent]:
    """The events one printed line becomes: claude's stream-json is read, anything else kept."""
    if agent == "claude" and stream == "stdout":
        shown = live_events(line)
        if shown is not None:
            return shown
    pipe = "stderr" if stream == "stderr" else "stdout"
    return [StreamEvent(kind="line", stream=pipe, text=shorten(line))]


def _stopping_event() -> StreamEvent:
    return StreamEvent(
        kind="line",
        stream="stdout",
        text="[... live output stops here: over CLAUDEBOX_STREAM_MAX_BYTES; the task runs on "
        "and its result keeps the output's tail ...]",
    )


class OutputPublisher:
    """A task's live output stream: ``on_line`` is the sandbox exec's line sink."""

    def __init__(
        self, client: redis.Redis, task_id: str, agent: AgentName, settings: Settings
    ) -> None:
        self._client = client
        self._key = keys.task_output(task_id)
        self._agent = agent
        self._ttl_s = settings.stream_ttl_s
        self._max_events = settings.stream_max_events
        self._max_bytes = settings.stream_max_bytes
        self._sent_bytes = 0
        self._cut_bytes = 0
        # Bounded like the stream itself: what would be trimmed there need not wait here.
        self._pending: deque[StreamEvent] = deque(maxlen=self._max_events)
        self._wake = threading.Condition()
        self._closing = False
        self._thread_name = f"output-{task_id}"
        self._sender: threading.Thread | None = None

    def on_line(self, stream: str, line: str) -> None:
        with self._wake:
            if self._closing:
                return
            if self._cut_bytes:
                self._cut_bytes += len(line.encode()) + 1
                return
        events = line_events(self._agent, stream, line)
        size = sum(len(event.text) + EVENT_OVERHEAD_BYTES for event in events)
        with self._wake:
            if self._closing:
                return
            if self._cut_bytes or self._sent_bytes + size > self._max_bytes:
                first_cut = not self._cut_bytes
                self._cut_bytes += len(line.encode()) + 1
                if not first_cut:
                    return
                events = [_stopping_event()]
            self._sent_bytes += size  # past the cap after a cut: nothing more is sent
            self._pending.extend(events)
            if self._sender is None:
                self._sender = threading.Thread(
                    target=self._send_loop, name=self._thread_name, daemon=True
                )
                self._sender.start()
            self._wake.notify()

    def end(self, result: CodeResult) -> None:
        """Publish the run's last event, then stop sending."""
        self._close(
            StreamEvent(
                kind="end", success=result.success, exit_code=result.exit_code, error=result.error
            )
        )

    def _close(self, last: StreamEvent) -> None:
        with self._wake:
            if self._closing:
                return
            self._closing = True
            sender = self._sender
            closing = [last]
            if self._cut_bytes:
                text = cut_marker(self._cut_bytes, STREAM_CUT)
                closing.insert(0, StreamEvent(kind="line", stream="stdout", text=text))
            if sender is not None:
                self._pending.extend(closing)
                self._wake.notify()
        if sender is None:
            self._send(closing)
        else:
            sender.join(CLOSE_TIMEOUT_S)

    def _send_loop(self) -> None:
        while True:
            with self._wake:
                while not self._pending and not self._closing:
                    self._wake.wait()
                batch = list(self._pending)
                self._pending.clear()
                closing = self._closing
            if batch:
                self._send(batch)
            if closing:
                return

    def _send(self, batch: list[StreamEvent]) -> None:
        pipe = self._client.pipeline(transaction=False)
        for event in batch:
            pipe.xadd(
                self._key,
                {FIELD: event.model_dump_json(exclude_defaults=True)},
                maxlen=self._max_events,
                approximate=True,
            )
        pipe.expire(self._key, self._ttl_s)
        try:
            pipe.execute()
        except RedisError as exc:
            log.warning("live output of %s lost %d events: %s", self._key, len(batch), exc)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # After end() this does nothing; when the task body raised, watchers learn why.
        error = f"{exc_type.__name__}: {exc}" if exc_type is not None else "ended without a result"
        self._close(StreamEvent(kind="end", success=False, error=error))
