"""How ``claudebox-pool code`` shows a running task's events on a terminal.

The agent's own output goes where it went in the sandbox (stdout lines to stdout, stderr lines
to stderr) and is flushed line by line, so a pipe sees each line as it is printed; the agent's
tool calls are noted on stderr, where they do not mix with output a script may capture.
"""

from __future__ import annotations

import sys

from rich.console import Console
from rich.markup import escape

from claudebox_pool.tasks.streaming import StreamEvent

TOOL_INPUT_CHARS = 120


def show_event(event: StreamEvent, notes: Console) -> None:
    if event.kind == "line" or event.kind == "text":
        target = sys.stderr if event.stream == "stderr" else sys.stdout
        target.write(event.text + "\n")
        target.flush()
    elif event.kind == "tool_use":
        shown = event.text if len(event.text) <= TOOL_INPUT_CHARS else event.text[:117] + "..."
        notes.print(f"[dim]→ {escape(event.tool or '?')} {escape(shown)}[/]", highlight=False)
    elif event.kind == "tool_result" and event.is_error:
        notes.print(f"[dim]← tool failed: {escape(event.text[:TOOL_INPUT_CHARS])}[/]")
