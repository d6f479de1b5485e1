"""The log files of a local pool (``claudebox-pool up --detach`` writes them), by process name:
``claudebox-pool logs --worker NAME``.

A process's log is ``<home>/run/logs/<name>.log``: ``worker-1``, ``beat``, ``flower``,
``redis``, ``up``. A worker may be named by its Celery hostname too (``w1@host`` is
``worker-1``), as ``status`` lists it.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

from claudebox_pool.producer.local_pool import logs_dir
from claudebox_pool.tasks.errors import InvalidRequestError
from claudebox_pool.tasks.settings import Settings

HOSTNAME = re.compile(r"w(\d+)@.+")
"""The hostnames ``up`` gives its workers (``local_pool._start``)."""
FOLLOW_POLL_S = 0.5
"""How often a followed log is read for new lines."""


def log_file(settings: Settings, name: str) -> Path:
    """The log of process ``name``; InvalidRequestError naming the ones there are."""
    directory = logs_dir(settings)
    named = HOSTNAME.fullmatch(name)
    stem = f"worker-{named.group(1)}" if named else name
    path = directory / f"{stem}.log"
    if "/" not in stem and path.is_file():
        return path
    there = sorted(p.stem for p in directory.glob("*.log")) if directory.is_dir() else []
    listed = (
        ", ".join(there) if there else "none (they are written by `claudebox-pool up --detach`)"
    )
    raise InvalidRequestError(f"no log named {name!r} in {directory}; there are: {listed}")


def show(path: Path, follow: bool) -> None:
    """Copy the log to stdout; with ``follow``, then its new lines as they come, until Ctrl-C,
    from the start of a new file when it is rotated (replaced or cut)."""
    position = _copy(path, 0)
    while follow:
        time.sleep(FOLLOW_POLL_S)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            continue  # between a rotation's rename and the new file
        position = _copy(path, 0 if size < position else position)


def _copy(path: Path, start: int) -> int:
    with path.open("rb") as log:
        log.seek(start)
        while chunk := log.read(1 << 16):
            sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()
        return log.tell()
