"""Telling the outside about a running code task: its output, line by line, to its Redis
stream, and a RUNNING event to monitors.

The sandbox's exec calls :meth:`OutputPublisher.on_line` from its pipe readers for every line
as it is printed. Sending each line in its own round trip would slow a chatty command down to
Redis's pace (the readers block, the pipes fill, the command waits), so lines are queued and a
thread of the publisher sends whatever has gathered in one pipeline, then the next batch. The
stream is trimmed to ``CLAUDEBOX_STREAM_MAX_EVENTS`` and expires ``CLAUDEBOX_STREAM_TTL_S``
after its last event. Publishing is best effort: a Redis error loses live lines, never the
task (its result keeps the output's tail).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from types import TracebackType
from typing import Any, Self

import redis
from redis.exceptions import RedisError

from tasks import keys, names
from tasks.models import CodeRequest, CodeResult
from tasks.settings import AgentName, Settings
from tasks.streaming import FIELD, StreamEvent, shorten
from workers.agents.stream import live_events

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 10.0


def announce_running(task: Any, request: CodeRequest) -> None:
    """Send the custom task event that makes Flower show the task as RUNNING in its session."""
    try:
        task.send_event(
            names.EVENT_RUNNING, retry=False, session_id=request.session_id, agent=request.agent
        )
    except Exception as exc:  # a monitoring event is never worth failing the task for
        log.warning("could not send %s: %s", names.EVENT_RUNNING, exc)


def line_events(agent: AgentName, stream: str, line: str) -> list[StreamEvent]:
    """The events one printed line becomes: claude's stream-json is read, anything else kept."""
    if agent == "claude" and stream == "stdout":
        shown = live_events(line)
        if shown is not None:
            return shown
    pipe = "stderr" if stream == "stderr" else "stdout"
    return [StreamEvent(kind="line", stream=pipe, text=shorten(line))]


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
        # Bounded like the stream itself: what would be trimmed there need not wait here.
        self._pending: deque[StreamEvent] = deque(maxlen=self._max_events)
        self._wake = threading.Condition()
        self._closing = False
        self._sender = threading.Thread(
            target=self._send_loop, name=f"output-{task_id}", daemon=True
        )

    def on_line(self, stream: str, line: str) -> None:
        events = line_events(self._agent, stream, line)
        with self._wake:
            self._pending.extend(events)
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
            self._pending.append(last)
            self._closing = True
            self._wake.notify()
        self._sender.join(CLOSE_TIMEOUT_S)

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
        self._sender.start()
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
