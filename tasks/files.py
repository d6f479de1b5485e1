"""Directories only the pool's own user may enter: CLAUDEBOX_HOME, the sessions root, the run
directory. Everything a session or the pool keeps lives below one of them, so that no other
host user reaches a workspace, a secret or a file a sandbox left behind (a setuid one
included), whatever the modes below."""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)

PRIVATE_MODE = 0o700


def private_dir(path: Path) -> Path:
    """``path``, made if missing (its missing parents too) and 0700 if this user owns it."""
    missing = [parent for parent in (path, *path.parents) if not parent.exists()]
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):  # made meanwhile by another process
            directory.mkdir(mode=PRIVATE_MODE)
    info = path.stat()
    if stat.S_IMODE(info.st_mode) & ~PRIVATE_MODE & 0o777:
        if info.st_uid == os.geteuid():
            path.chmod(stat.S_IMODE(info.st_mode) & PRIVATE_MODE)
        else:
            log.warning("%s is open to other users and not ours to close (chmod 700 it)", path)
    return path
