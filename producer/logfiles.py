"""The log files of ``up --detach``: ``<name>.log``, rotated by size to ``<name>.log.1`` (the
newest) ... ``<name>.log.N``, the oldest dropped, like ``logging.handlers.RotatingFileHandler``.

The processes do not write the files themselves: a Celery worker's pool children share its
stdout, and a file renamed under many writers loses or splits lines. Their output comes to the
supervisor through a pipe instead, and one writer, :class:`RotatingLog`, rotates only between
whole lines.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

MAX_READ_BYTES = 1 << 20
"""A longer line is written in pieces, so that the supervisor's memory stays bounded."""


class RotatingLog:
    """Appends lines to ``path``; a line that would take it past ``max_bytes`` (0: never)
    first moves it to ``path.1``, keeping ``backups`` old files."""

    def __init__(self, path: Path, max_bytes: int, backups: int, json_lines: bool = False) -> None:
        self.path, self.max_bytes, self.backups = path, max_bytes, backups
        self.json_lines = json_lines
        """Wrap each line that is not a JSON object (Celery's shutdown notes, which it prints
        past logging, a crash's traceback) in one, so that every line of the file is JSON."""
        self._file = self._open()

    def _open(self) -> IO[bytes]:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        return os.fdopen(fd, "ab", buffering=0)

    def write(self, line: bytes) -> None:
        if self.json_lines and not line.startswith(b"{"):
            text = line.decode(errors="replace").strip()
            if not text:
                return
            line = json_record(text, self.path.stem)
        size = self._file.tell()
        if self.max_bytes and size and size + len(line) > self.max_bytes:
            self._rotate()
        self._file.write(line)

    def _rotate(self) -> None:
        self._file.close()
        for number in range(self.backups - 1, 0, -1):
            older = backup(self.path, number)
            if older.exists():
                older.replace(backup(self.path, number + 1))
        self.path.replace(backup(self.path, 1))
        self._file = self._open()

    def close(self) -> None:
        self._file.close()


def json_record(text: str, process: str) -> bytes:
    """A line a process printed past its logging, as a record like ``tasks.logs``'s JSON ones."""
    now = datetime.now(UTC).replace(tzinfo=None).isoformat(timespec="microseconds")
    entry = {"time": now, "level": "INFO", "logger": "output", "process": process, "message": text}
    return json.dumps(entry, ensure_ascii=False).encode() + b"\n"


def backup(path: Path, number: int) -> Path:
    """The ``number``-th newest rotated file of the log ``path``."""
    return path.with_name(f"{path.name}.{number}")


def copy_lines(stream: IO[bytes], log: RotatingLog) -> None:
    """Write what a process prints to its log until its output ends."""
    try:
        for line in iter(lambda: stream.readline(MAX_READ_BYTES), b""):
            log.write(line)
    finally:
        log.close()
