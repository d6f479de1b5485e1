"""What the sessions take on disk, and the guard that stops a task before it fills the disk.

Sizes are what the files occupy (allocated blocks, as ``du`` counts), each inode once, so that
a checkpoint's hard links to the one before it are not counted twice. The free-space floor is
one ``statvfs``; the size limit walks the sessions root, so it is only checked when set.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from claudebox_pool.tasks.errors import DiskFullError
from claudebox_pool.tasks.lifecycle import DiskUsage, SessionUsage, megabytes
from claudebox_pool.tasks.settings import Settings

if TYPE_CHECKING:  # the store names the largest sessions through this module when it fills
    from claudebox_pool.workers.store import SessionStore

LARGEST_NAMED = 5
"""Sessions a DiskFullError names, largest first."""
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def tree_size(root: Path, seen: set[tuple[int, int]]) -> tuple[int, int]:
    """Bytes occupied and files below ``root``, skipping inodes already in ``seen``."""
    occupied, files = 0, 0
    pending = [root]
    while pending:
        try:
            entries = list(os.scandir(pending.pop()))
        except OSError:
            continue  # removed while we walk: a session being cleaned up
        for entry in entries:
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(info.st_mode):
                pending.append(Path(entry.path))
            if (info.st_dev, info.st_ino) in seen:
                continue
            seen.add((info.st_dev, info.st_ino))
            occupied += info.st_blocks * 512
            files += not stat.S_ISDIR(info.st_mode)
    return occupied, files


def free_bytes(root: Path) -> int:
    """Free space of the disk that holds ``root`` (or would, if it does not exist yet)."""
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return shutil.disk_usage(existing).free


def sessions_by_size(store: SessionStore) -> list[SessionUsage]:
    """Every session's size, largest first."""
    seen: set[tuple[int, int]] = set()
    sessions = [
        SessionUsage(session_id=session_id, bytes=size, files=files)
        for session_id in store.ids()
        for size, files in [tree_size(store.paths(session_id).root, seen)]
    ]
    sessions.sort(key=lambda each: (-each.bytes, each.session_id))
    return sessions


def usage(settings: Settings, store: SessionStore) -> DiskUsage:
    sessions = sessions_by_size(store)
    return DiskUsage(
        root=str(store.root),
        total_bytes=sum(each.bytes for each in sessions),
        free_bytes=free_bytes(store.root),
        max_sessions_bytes=settings.max_sessions_bytes,
        min_free_bytes=settings.min_free_bytes,
        sessions=sessions,
    )


def guard(settings: Settings, store: SessionStore, doing: str, adding: int = 0) -> None:
    """DiskFullError if writing ``adding`` more bytes would break the free-space floor or the
    size limit; ``doing`` says what was refused ("session 'x' cannot run a task")."""
    free = free_bytes(store.root)
    needs = f" and {megabytes(adding)} more are needed" if adding else ""
    if settings.min_free_bytes and free - adding < settings.min_free_bytes:
        raise DiskFullError(
            f"{doing}: the disk holding {store.root} has {megabytes(free)} free{needs}, below "
            f"the floor of {megabytes(settings.min_free_bytes)} (CLAUDEBOX_MIN_FREE_BYTES)",
            largest(usage(settings, store)),
        )
    limit = settings.max_sessions_bytes
    if limit is None:
        return
    current = usage(settings, store)
    if current.total_bytes + adding > limit:
        raise DiskFullError(
            f"{doing}: the sessions in {store.root} take {megabytes(current.total_bytes)}{needs}, "
            f"over the limit of {megabytes(limit)} (CLAUDEBOX_MAX_SESSIONS_BYTES)",
            largest(current),
        )


def largest(current: DiskUsage) -> dict[str, int]:
    return {each.session_id: each.bytes for each in current.sessions[:LARGEST_NAMED]}


def largest_in(store: SessionStore) -> dict[str, int]:
    """The sessions a DiskFullError names, for a disk found full while writing."""
    return {each.session_id: each.bytes for each in sessions_by_size(store)[:LARGEST_NAMED]}


@contextmanager
def full_as_error(store: SessionStore, doing: str) -> Iterator[None]:
    """A full disk (ENOSPC, EDQUOT) met in the body, as a DiskFullError saying what failed
    (``doing``: "session 'x' could not write session.json") and naming the largest sessions."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in FULL_ERRNOS:
            raise
        where = exc.filename or store.root
        raise DiskFullError(
            f"{doing}: the disk holding {where} is full ({exc.strerror})", largest_in(store)
        ) from None
