"""A scripted Anthropic Messages API on loopback, to drive the real Claude Code CLI in tests.

The paid remote model is the one thing tests replace. This server speaks the API's wire format
(server-sent events, error bodies) closely enough for the CLI to run whole agent loops against
it, answers each ``POST /v1/messages`` with the next turn of a script, and records every request
so a test can assert what the CLI (or the gateway in front of it) sent.

::

    with ModelServer([[ToolUse("Write", {...})], [Text("done")]]) as model:
        run_cli(ANTHROPIC_BASE_URL=model.url)
        assert model.message_requests()[1].body["messages"][-1]...

A turn is a list of blocks (:class:`Text`, :class:`ToolUse`), a :class:`Reply` (blocks plus the
usage to report), a :class:`Fail` (an HTTP error with the API's JSON body), a :class:`Cut` (a
reply whose stream stops mid-way) or a :class:`Hold` (one that waits mid-way). A request past
the end of the script gets a 400 whose message says so, a status the CLI does not retry, so a
short script fails fast.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self, cast
from uuid import uuid4

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class ToolUse:
    name: str
    input: dict[str, Any]
    id: str = field(default_factory=lambda: f"toolu_{uuid4().hex[:24]}")


Block = Text | ToolUse


@dataclass(frozen=True)
class Reply:
    """One assistant message; ``stop_reason`` is ``tool_use`` when a block calls a tool."""

    blocks: Sequence[Block]
    input_tokens: int = 1200
    output_tokens: int = 80
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    model: str | None = None
    """The model ``message_start`` names; None: the one the request asked for."""

    @property
    def stop_reason(self) -> str:
        return "tool_use" if any(isinstance(b, ToolUse) for b in self.blocks) else "end_turn"


@dataclass(frozen=True)
class Fail:
    """An HTTP error with the API's body ``{"type":"error","error":{"type","message"}}``.

    ``should_retry`` sets the ``x-should-retry`` header the API's clients obey, so a test of a
    429 or 529 need not sit through the CLI's backoff.
    """

    status: int
    message: str = "scripted failure"
    should_retry: bool | None = None

    @property
    def error_type(self) -> str:
        return _ERROR_TYPES.get(self.status, "api_error")


@dataclass(frozen=True)
class Cut:
    """Stream ``reply`` but drop the connection after ``after_events`` events, unterminated."""

    reply: Reply
    after_events: int = 2


@dataclass(frozen=True)
class Hold:
    """Stream ``reply`` but stop after ``after_events`` events until ``resume`` is set.

    Lets a test see what reached the client while the reply is still being written.
    """

    reply: Reply
    after_events: int
    resume: threading.Event


Turn = Sequence[Block] | Reply | Fail | Cut | Hold


@dataclass(frozen=True)
class Recorded:
    """One request as the server received it; header names are lower-case."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any


def sse_events(reply: Reply, model: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """The (event, data) pairs of a streamed reply, in the order the real API sends them."""
    usage = {
        "input_tokens": reply.input_tokens,
        "output_tokens": 1,
        "cache_creation_input_tokens": reply.cache_creation_input_tokens,
        "cache_read_input_tokens": reply.cache_read_input_tokens,
    }
    message: dict[str, Any] = {
        "id": f"msg_{uuid4().hex[:24]}",
        "type": "message",
        "role": "assistant",
        "model": reply.model or model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": usage,
    }
    yield "message_start", {"type": "message_start", "message": message}
    for index, block in enumerate(reply.blocks):
        if isinstance(block, Text):
            start: dict[str, Any] = {"type": "text", "text": ""}
            delta: dict[str, Any] = {"type": "text_delta", "text": block.text}
        else:
            start = {"type": "tool_use", "id": block.id, "name": block.name, "input": {}}
            delta = {"type": "input_json_delta", "partial_json": json.dumps(block.input)}
        opening = {"type": "content_block_start", "index": index, "content_block": start}
        yield "content_block_start", opening
        yield "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}
        yield "content_block_stop", {"type": "content_block_stop", "index": index}
    yield (
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": reply.stop_reason, "stop_sequence": None},
            "usage": {"output_tokens": reply.output_tokens},
        },
    )
    yield "message_stop", {"type": "message_stop"}


class ModelServer:
    """The scripted API on ``127.0.0.1:<free port>``, served from a background thread."""

    def __init__(self, script: Sequence[Turn] = ()) -> None:
        self._turns: list[Turn] = list(script)
        self._requests: list[Recorded] = []
        self._lock = threading.Lock()
        self._httpd = _Httpd(self)
        # A short poll interval keeps stop() quick: shutdown waits for the next poll.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.05,), name="model-server", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def reset(self) -> None:
        """Forget the script and the recorded requests (a module-scoped server between tests)."""
        with self._lock:
            self._turns.clear()
            self._requests.clear()

    def push(self, *turns: Turn) -> None:
        """Append turns to the script."""
        with self._lock:
            self._turns.extend(turns)

    @property
    def requests(self) -> list[Recorded]:
        with self._lock:
            return list(self._requests)

    def message_requests(self) -> list[Recorded]:
        """The ``POST /v1/messages`` calls (any query string), token counting excluded."""
        return [
            r
            for r in self.requests
            if r.method == "POST" and r.path.split("?")[0] == "/v1/messages"
        ]

    def record(self, request: Recorded) -> None:
        with self._lock:
            self._requests.append(request)

    def next_turn(self) -> Turn | None:
        with self._lock:
            return self._turns.pop(0) if self._turns else None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class _Httpd(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, model: ModelServer) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.model = model


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 for keep-alive and chunked streaming, as the real API serves.
    protocol_version = "HTTP/1.1"

    @property
    def model(self) -> ModelServer:
        return cast(_Httpd, self.server).model

    def setup(self) -> None:
        super().setup()
        # Each SSE event is its own small write; with Nagle's algorithm every reply would wait
        # out the client's delayed ACK (~40 ms), which the real API does not make clients do.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._record(None)
        self._send_json(200, {"ok": True})

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", "0"))
        raw = self.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        self._record(body)
        path = self.path.split("?")[0]
        if path == "/v1/messages/count_tokens":
            self._send_json(200, {"input_tokens": max(1, len(raw) // 4)})
        elif path == "/v1/messages":
            self._answer(body if isinstance(body, dict) else {})
        else:
            self._send_error(Fail(404, f"no route {path}"))

    def _record(self, body: Any) -> None:
        headers = {name.lower(): value for name, value in self.headers.items()}
        self.model.record(Recorded(self.command, self.path, headers, body))

    def _answer(self, body: dict[str, Any]) -> None:
        turn = self.model.next_turn()
        model = str(body.get("model", "claude-sonnet-4-5"))
        if turn is None:
            self._send_error(Fail(400, "model_server: the script has no turn left"))
        elif isinstance(turn, Fail):
            self._send_error(turn)
        elif isinstance(turn, Cut):
            self._stream(turn.reply, model, cut_after=turn.after_events)
        elif isinstance(turn, Hold):
            self._stream(turn.reply, model, hold=turn)
        elif isinstance(turn, Reply):
            self._stream(turn, model)
        else:
            self._stream(Reply(turn), model)

    def _stream(
        self, reply: Reply, model: str, cut_after: int | None = None, hold: Hold | None = None
    ) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream; charset=utf-8")
        self.send_header("cache-control", "no-cache")
        self.send_header("request-id", f"req_{uuid4().hex[:24]}")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for sent, (event, data) in enumerate(sse_events(reply, model)):
            if cut_after is not None and sent >= cut_after:
                # No terminating chunk: the client sees the body end early, as when the API's
                # connection drops mid-stream.
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if hold is not None and sent == hold.after_events:
                hold.resume.wait(timeout=30)
            self._chunk(f"event: {event}\ndata: {json.dumps(data)}\n\n".encode())
        self.wfile.write(b"0\r\n\r\n")

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")

    def _send_error(self, fail: Fail) -> None:
        body = {"type": "error", "error": {"type": fail.error_type, "message": fail.message}}
        headers = {}
        if fail.should_retry is not None:
            headers["x-should-retry"] = "true" if fail.should_retry else "false"
        self._send_json(fail.status, body, headers)

    def _send_json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.send_header("request-id", f"req_{uuid4().hex[:24]}")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)
