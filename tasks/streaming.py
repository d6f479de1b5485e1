"""What a running ``code`` task tells while it runs: the events of its live output stream.

The worker appends them to the Redis stream ``keys.task_output(task_id)`` as the agent prints;
producers read that stream from its first entry, so a consumer that attaches late, even after
the task ended (within ``CLAUDEBOX_STREAM_TTL_S``), still sees everything that was kept.
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

StreamKind = Literal["line", "partial", "text", "tool_use", "tool_result", "end"]

FIELD = "e"
"""The one field of each stream entry; its value is the event as JSON."""
MAX_TEXT_CHARS = 16_000
"""A line or block longer than this is shortened: the stream is for watching, the result for
keeping (``raw_output``)."""


class StreamEvent(BaseModel):
    """One event of a code task's live output.

    - ``line``: a line the agent printed, from pipe ``stream``. For the ``claude`` agent, whose
      stdout is stream-json, only lines that are not stream-json (stderr, a crash message).
    - ``partial``: a piece of answer text as it is generated (``claude`` with
      ``include_partial_messages``); the whole block follows as ``text``.
    - ``text``: a text block of the agent's answer (``claude``).
    - ``tool_use``: the agent calls ``tool``; ``text`` holds its input as JSON, shortened.
    - ``tool_result``: a tool's answer came back; ``text`` holds its start, ``is_error`` whether
      the tool failed.
    - ``end``: the last event of a run: its ``success``, ``exit_code`` and ``error``
      (``"cancelled"`` when it was cancelled).
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    kind: StreamKind
    stream: Literal["stdout", "stderr"] | None = None
    text: str = ""
    tool: str | None = None
    tool_use_id: str | None = None
    is_error: bool | None = None
    success: bool | None = None
    exit_code: int | None = None
    error: str | None = None
    at: float = Field(default_factory=time.time, description="Worker clock, epoch seconds.")


def shorten(text: str, limit: int = MAX_TEXT_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
