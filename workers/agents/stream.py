"""Reading Claude Code's ``--output-format stream-json`` output.

One JSON object a line: ``system``/``init`` (the CLI's session id), ``assistant`` and ``user``
messages whose content blocks are ``text``, ``tool_use`` and ``tool_result``, and finally one
``result`` with ``is_error``, ``result``, ``total_cost_usd``, ``num_turns``, ``session_id`` and
``permission_denials``. Lines that are not JSON (a crash message) are kept as text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from claudebox_pool.tasks.streaming import StreamEvent, shorten
from claudebox_pool.workers.runtimes.output import LINE_CUT, cut_marker

LINE_CUT_END = cut_marker(0, LINE_CUT).split(" bytes", 1)[1]
"""How a line cut as it was read ends (after its count of cut bytes)."""


@dataclass
class StreamSummary:
    cli_session_id: str | None = None
    texts: list[str] = field(default_factory=list)
    tool_uses: list[dict[str, Any]] = field(default_factory=list)
    result: dict[str, Any] | None = None
    other_lines: list[str] = field(default_factory=list)
    cut_lines: int = 0
    """Lines cut at ``CLAUDEBOX_MAX_LINE_BYTES`` as they were read (no longer JSON)."""

    @property
    def structured_output(self) -> Any:
        """With ``--json-schema``: the object the CLI validated against it."""
        return None if self.result is None else self.result.get("structured_output")

    @property
    def response(self) -> str:
        if self.result is not None and isinstance(self.result.get("result"), str):
            return str(self.result["result"])
        return "\n".join(self.texts)


def parse_line(summary: StreamSummary, line: str) -> None:
    line = line.strip()
    if not line:
        return
    try:
        event = json.loads(line)
    except ValueError:
        summary.other_lines.append(line)
        summary.cut_lines += line.endswith(LINE_CUT_END)
        return
    if not isinstance(event, dict):
        summary.other_lines.append(line)
        return
    kind = event.get("type")
    if isinstance(event.get("session_id"), str):
        summary.cli_session_id = event["session_id"]
    if kind == "assistant":
        for block in _content(event):
            if block.get("type") == "text" and isinstance(block.get("text"), str):
                summary.texts.append(block["text"])
            elif block.get("type") == "tool_use":
                summary.tool_uses.append({"name": block.get("name"), "id": block.get("id")})
    elif kind == "result":
        summary.result = event


def parse(stdout: str) -> StreamSummary:
    summary = StreamSummary()
    for line in stdout.splitlines():
        parse_line(summary, line)
    return summary


def _content(event: dict[str, Any]) -> list[dict[str, Any]]:
    message = event.get("message")
    content = message.get("content") if isinstance(message, dict) else None
    return [block for block in content or [] if isinstance(block, dict)]


def live_events(line: str) -> list[StreamEvent] | None:
    """What a stream-json line shows a watcher: answer text and tool calls and results.

    None when the line is not stream-json (it is then shown as a plain line); an empty list for
    stream-json that shows nothing (the init message, the final result).
    """
    try:
        event = json.loads(line)
    except ValueError:
        return None
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        return None
    shown: list[StreamEvent] = []
    delta = event.get("event", {}).get("delta") if event["type"] == "stream_event" else None
    if isinstance(delta, dict) and delta.get("type") == "text_delta":
        shown.append(StreamEvent(kind="partial", text=str(delta.get("text", ""))))
    for block in _content(event) if event["type"] in ("assistant", "user") else []:
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            shown.append(StreamEvent(kind="text", text=shorten(block["text"])))
        elif kind == "tool_use":
            shown.append(
                StreamEvent(
                    kind="tool_use",
                    tool=str(block.get("name")),
                    tool_use_id=str(block.get("id")),
                    text=shorten(json.dumps(block.get("input"), ensure_ascii=False), 2000),
                )
            )
        elif kind == "tool_result":
            shown.append(
                StreamEvent(
                    kind="tool_result",
                    tool_use_id=str(block.get("tool_use_id")),
                    is_error=bool(block.get("is_error")),
                    text=shorten(_result_text(block.get("content")), 2000),
                )
            )
    return shown


def _result_text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""
