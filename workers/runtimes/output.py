"""Reading a command's output in bounded memory and linear time, whatever it prints.

Every runtime's reader (a host process's pipes, a warm sandbox's pipes, a VM's output chunks)
feeds the chunks it reads to a :class:`LineSplitter`, which splits lines itself and keeps at
most ``CLAUDEBOX_MAX_LINE_BYTES`` of each, so that a 200 MB line never sits in worker memory
(``readline`` and ``partial + chunk`` both held it whole, and re-copied it per chunk). Lines
then go to an :class:`OutputTail`, which keeps the last ``CLAUDEBOX_MAX_OUTPUT_BYTES``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from claudebox_pool.tasks.settings import Settings, get_settings

READ_BYTES = 1 << 16
"""One read from a pipe: the bound on what a reader holds beyond its line and tail."""


def cut_marker(cut_bytes: int, setting: str) -> str:
    """What stands where ``cut_bytes`` were cut because of ``setting`` (a Settings field)."""
    return f"[... {cut_bytes:,} bytes cut by CLAUDEBOX_{setting.upper()} ...]"


LINE_CUT = "max_line_bytes"


@dataclass(frozen=True)
class OutputLimits:
    line_bytes: int
    tail_bytes: int

    @classmethod
    def of(cls, settings: Settings | None = None) -> OutputLimits:
        chosen = settings or get_settings()
        return cls(line_bytes=chosen.max_line_bytes, tail_bytes=chosen.max_output_bytes)


class LineSplitter:
    """Turns chunks (bytes or str, cut anywhere) into lines of at most ``limit`` bytes.

    A longer line keeps its first ``limit`` bytes and ends with a marker saying how many were
    cut. Lines come back with their newline; :meth:`flush` gives the last, unterminated one.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._parts: list[bytes] = []
        self._held = 0
        self._cut = 0

    def feed(self, chunk: bytes | str) -> list[str]:
        data = chunk.encode() if isinstance(chunk, str) else chunk
        *whole, rest = data.split(b"\n")
        lines: list[str] = []
        for piece in whole:
            if not self._held and not self._cut and len(piece) <= self._limit:
                # The common case, a short line within one chunk: no buffering at all.
                lines.append(piece.decode("utf-8", errors="replace") + "\n")
                continue
            self._take(piece)
            lines.append(self._line() + "\n")
        self._take(rest)
        return lines

    def flush(self) -> str:
        return self._line() if self._held or self._cut else ""

    def _take(self, piece: bytes) -> None:
        kept = min(self._limit - self._held, len(piece))
        if kept:
            self._parts.append(piece[:kept])
            self._held += kept
        self._cut += len(piece) - kept

    def _line(self) -> str:
        # "ignore" for a cut line: the cut may split a character, whose remains mean nothing.
        text = b"".join(self._parts).decode("utf-8", errors="ignore" if self._cut else "replace")
        if self._cut:
            text += cut_marker(self._cut, LINE_CUT)
        self._parts, self._held, self._cut = [], 0, 0
        return text


TAIL_CUT = "max_output_bytes"


class OutputTail:
    """Keeps the last ``limit`` characters of a stream's lines, and counts what it dropped."""

    def __init__(self, limit: int) -> None:
        self.lines: deque[str] = deque()
        self.size = 0
        self.limit = limit
        self.cut_bytes = 0

    def add(self, line: str) -> None:
        self.lines.append(line)
        self.size += len(line)
        while self.size > self.limit and len(self.lines) > 1:
            dropped = self.lines.popleft()
            self.size -= len(dropped)
            self.cut_bytes += len(dropped.encode())
        if self.size > self.limit:  # one line longer than the whole tail: keep its end
            first = self.lines[0]
            self.lines[0] = first[len(first) - self.limit :]
            self.cut_bytes += len(first[: len(first) - self.limit].encode())
            self.size = len(self.lines[0])

    def text(self) -> str:
        """The kept lines, after a marker line if the stream's start was dropped."""
        kept = "".join(self.lines)
        return f"{cut_marker(self.cut_bytes, TAIL_CUT)}\n{kept}" if self.cut_bytes else kept


class StreamReader:
    """One output stream of a command: its line splitter and its tail together."""

    def __init__(self, name: str, limits: OutputLimits) -> None:
        self.name = name
        self.tail = OutputTail(limits.tail_bytes)
        self._splitter = LineSplitter(limits.line_bytes)

    def feed(self, chunk: bytes | str) -> list[str]:
        """The lines ``chunk`` completes, already kept in the tail."""
        lines = self._splitter.feed(chunk)
        for line in lines:
            self.tail.add(line)
        return lines

    def end(self) -> list[str]:
        """The last, unterminated line if any, kept in the tail."""
        rest = self._splitter.flush()
        if not rest:
            return []
        self.tail.add(rest)
        return [rest]
