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


@dataclass
class StreamSummary:
    cli_session_id: str | None = None
    texts: list[str] = field(default_factory=list)
    tool_uses: list[dict[str, Any]] = field(default_factory=list)
    result: dict[str, Any] | None = None
    other_lines: list[str] = field(default_factory=list)

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
