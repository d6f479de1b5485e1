"""Token usage read off Messages API responses as they stream past, and a lease's running total.

A streamed reply reports usage twice: ``message_start`` carries the input side (and a first
output count), ``message_delta`` the cumulative totals at the end. Each later value replaces
the earlier one, so a stream cut short still yields what had been reported by then.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from claudebox_pool.tasks.models import TokenUsage, UsageByModel, merged_usage

_ERROR_TEXT_BYTES = 500
UNKNOWN_MODEL = "unknown"
"""The model a reply that names none (a malformed ``message_start``) is metered under."""
# Only these events carry usage, the model or an outcome; the many content deltas are skipped
# without decoding their JSON.
_METERED_EVENTS = {b"message_start", b"message_delta", b"message_stop", b"error"}


@dataclass
class Tokens:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0

    def update(self, usage: Any) -> None:
        if not isinstance(usage, Mapping):
            return
        for f in fields(self):
            value = usage.get(f.name)
            if isinstance(value, int):
                setattr(self, f.name, value)


class Usage(BaseModel):
    """What one lease (one sandbox run) consumed: the totals, and ``by_model`` their split by
    the model each reply named; ``requests`` counts Messages API calls."""

    model_config = ConfigDict(frozen=True)

    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    cost_usd: float = 0.0
    by_model: UsageByModel = Field(default_factory=dict)

    def plus(self, model: str | None, tokens: Tokens, cost_usd: float) -> Usage:
        call = TokenUsage(**asdict(tokens), cost_usd=cost_usd)
        if call == TokenUsage():
            # A call that reported nothing (refused, cut before message_start) names no model
            # worth listing.
            return self
        total = TokenUsage.model_validate(self.model_dump(include=set(TokenUsage.model_fields)))
        return Usage(
            requests=self.requests,
            **(total + call).model_dump(),
            by_model=merged_usage(self.by_model, {model or UNKNOWN_MODEL: call}),
        )


class StreamMeter:
    """Fed a streamed reply chunk by chunk: its model, its usage so far and how it ended."""

    def __init__(self) -> None:
        self.tokens = Tokens()
        self.model: str | None = None
        self.complete = False
        self.error: Mapping[str, Any] | None = None
        self._buffer = bytearray()

    def feed(self, chunk: bytes) -> None:
        self._buffer += chunk
        if b"\r" in self._buffer:
            self._buffer = bytearray(self._buffer.replace(b"\r\n", b"\n"))
        while (end := self._buffer.find(b"\n\n")) >= 0:
            block = bytes(self._buffer[:end])
            del self._buffer[: end + 2]
            self._event(block)

    def _event(self, block: bytes) -> None:
        name = b""
        data: list[bytes] = []
        for line in block.split(b"\n"):
            if line.startswith(b"event:"):
                name = line[6:].strip()
            elif line.startswith(b"data:"):
                data.append(line[5:].strip())
        if name and name not in _METERED_EVENTS:
            return
        event = _json(b"\n".join(data))
        if not isinstance(event, Mapping):
            return
        kind = event.get("type")
        if kind == "message_start" and isinstance(event.get("message"), Mapping):
            self.model = _model(event["message"])
            self.tokens.update(event["message"].get("usage"))
        elif kind == "message_delta":
            self.tokens.update(event.get("usage"))
        elif kind == "message_stop":
            self.complete = True
        elif kind == "error" and isinstance(event.get("error"), Mapping):
            self.error = event["error"]


def read_message(body: bytes) -> tuple[str | None, Tokens]:
    """The model and usage of a whole (not streamed) JSON reply."""
    message = _json(body)
    tokens = Tokens()
    if not isinstance(message, Mapping):
        return None, tokens
    tokens.update(message.get("usage"))
    return _model(message), tokens


def read_error(body: bytes) -> Mapping[str, Any]:
    """What an error response says: the API's ``error`` object, else the start of the body."""
    parsed = _json(body)
    error = parsed.get("error") if isinstance(parsed, Mapping) else None
    if isinstance(error, Mapping):
        return error
    return {"message": body[:_ERROR_TEXT_BYTES].decode("utf-8", errors="replace")}


def _model(message: Mapping[str, Any]) -> str | None:
    model = message.get("model")
    return model if isinstance(model, str) else None


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None
