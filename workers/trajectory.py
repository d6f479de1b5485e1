"""A session's trajectory: its conversation read from the CLI's transcript, turn by turn.

The CLI appends every message to ``~/.claude/projects/<cwd-slug>/<session>.jsonl`` in the
session's agent home; ``--resume`` keeps appending to the same file. A line over
``CLAUDEBOX_MAX_LINE_BYTES`` is skipped. Assistant messages are
written one content block a line (same ``message.id``); they are joined into one turn. Each
turn is tied to the ``code`` call whose run (history's ``started_at`` to its end) covers its
timestamp. The agent home is writable by the sandbox, so every line read is bounded.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from claudebox_pool.tasks.models import TrajectoryPage, TrajectoryRequest, TrajectoryTurn
from claudebox_pool.workers.context import WorkerContext

TRANSCRIPTS = Path(".claude") / "projects" / "-workspace"
"""Where the CLI keeps the transcripts of runs from cwd /workspace (the slug of the cwd)."""


def page(ctx: WorkerContext, request: TrajectoryRequest) -> TrajectoryPage:
    """The turns from ``request.offset`` on, as many as fit the page cap."""
    session_id = request.session_id
    ctx.store.load(session_id)  # SessionNotFoundError for a session that is not here
    cap = ctx.settings.max_trajectory_page_bytes
    calls = _calls(ctx, session_id)
    turns: list[TrajectoryTurn] = []
    used = 0
    # A transcript line is one message: bounded as the CLI's output lines are.
    home, longest = ctx.store.paths(session_id).agent_home, ctx.settings.max_line_bytes
    for number, turn in enumerate(_turns(home, longest, calls)):
        if number < request.offset:
            continue
        turn = turn.model_copy(update={"session_id": session_id, "index": number})
        size = len(turn.model_dump_json())
        if size > cap:
            turn = turn.model_copy(update={"content": [], "cut": True})
            size = len(turn.model_dump_json())
        if turns and used + size > cap:
            return TrajectoryPage(session_id=session_id, turns=turns, next_offset=number)
        turns.append(turn)
        used += size
    return TrajectoryPage(session_id=session_id, turns=turns, next_offset=None)


_Call = tuple[float, float, str]
"""A code call's run: start and end (epoch seconds) and its task id."""


def _calls(ctx: WorkerContext, session_id: str) -> list[_Call]:
    calls = []
    for entry in ctx.store.history(session_id):
        started = entry.context.get("started_at")
        task_id = entry.context.get("task_id")
        if entry.action == "code_execution" and isinstance(started, str) and task_id:
            calls.append((_epoch(started), _epoch(entry.timestamp), str(task_id)))
    return calls


def _epoch(stamp: str) -> float:
    moment = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def _entries(agent_home: Path, max_line: int) -> list[dict[str, Any]]:
    """The transcript's user and assistant lines, each once, in time order."""
    seen: dict[str, dict[str, Any]] = {}
    for raw in _transcript_lines(agent_home, max_line):
        try:
            entry = json.loads(raw)
        except ValueError:
            continue
        if (
            isinstance(entry, dict)
            and entry.get("type") in ("user", "assistant")
            and isinstance(entry.get("message"), dict)
            and isinstance(entry.get("timestamp"), str)
            and not entry.get("isMeta")
            and not entry.get("isSidechain")
        ):
            seen.setdefault(str(entry.get("uuid")), entry)
    return sorted(seen.values(), key=lambda entry: str(entry["timestamp"]))


def _transcript_lines(agent_home: Path, max_line: int) -> Iterator[bytes]:
    """Every line of the transcripts no longer than ``max_line``.

    The sandbox owns the agent home: a symlink it plants (``projects/-workspace`` pointing at
    another session's transcripts) would resolve on the worker's side. Each step is opened
    with O_NOFOLLOW from the one before, so nothing outside the agent home is ever read.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        folder = os.open(agent_home, flags | os.O_DIRECTORY)
    except OSError:
        return
    try:
        for part in TRANSCRIPTS.parts:
            try:
                inner = os.open(part, flags | os.O_DIRECTORY, dir_fd=folder)
            except OSError:
                return
            os.close(folder)
            folder = inner
        for name in sorted(os.listdir(folder)):
            if not name.endswith(".jsonl"):
                continue
            try:
                fd = os.open(name, flags | os.O_NONBLOCK, dir_fd=folder)
            except OSError:
                continue
            with os.fdopen(fd, "rb") as handle:
                if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                    continue  # a fifo or device planted to hang or feed the worker
                yield from _bounded_lines(handle, max_line)
    finally:
        os.close(folder)


def _bounded_lines(handle: BinaryIO, max_line: int) -> Iterator[bytes]:
    """The lines of at most ``max_line`` bytes; a longer one is skipped without holding it."""
    while raw := handle.readline(max_line + 1):
        if len(raw) <= max_line:
            yield raw
            continue
        while raw and not raw.endswith(b"\n"):
            raw = handle.readline(max_line + 1)


def _turns(agent_home: Path, max_line: int, calls: list[_Call]) -> Iterator[TrajectoryTurn]:
    pending: TrajectoryTurn | None = None
    pending_id: object = None
    previous: dict[str | None, float] = {}
    for entry in _entries(agent_home, max_line):
        message = entry["message"]
        at = _epoch(entry["timestamp"])
        task_id = next((task for start, end, task in calls if start <= at <= end), None)
        content = message.get("content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(blocks, list):
            continue
        role = "assistant" if entry["type"] == "assistant" else "user"
        if role == "assistant" and pending is not None and message.get("id") == pending_id:
            pending.content.extend(blocks)
            continue
        if pending is not None:
            yield pending
        since = previous.get(task_id)
        if since is None:
            since = next((start for start, _end, task in calls if task == task_id), None)
        previous[task_id] = at
        usage = message.get("usage")
        pending = TrajectoryTurn(
            session_id="",
            index=0,
            task_id=task_id,
            role=role,
            timestamp=entry["timestamp"],
            duration_ms=None if since is None else max(0, round((at - since) * 1000)),
            content=[block for block in blocks if isinstance(block, dict)],
            model=message.get("model") if isinstance(message.get("model"), str) else None,
            stop_reason=message.get("stop_reason")
            if isinstance(message.get("stop_reason"), str)
            else None,
            usage=usage if isinstance(usage, dict) else None,
        )
        pending_id = message.get("id") if role == "assistant" else None
    if pending is not None:
        yield pending
