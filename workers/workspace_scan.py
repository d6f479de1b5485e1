"""Which files a run created in a workspace, without listing the whole tree twice.

Before the run, :meth:`Snapshot.take` lists every directory once and notes its ctime and inode.
After it, :meth:`Snapshot.created` stats each directory and lists again only those whose ctime
or inode changed (adding, removing or renaming an entry changes its directory's ctime; writing
to a file does not) and those that are new. ctime, not mtime: a sandboxed process can set a
directory's mtime back with ``touch``, never its ctime. In a workspace of 200,000 unchanged
files the second pass is one ``lstat`` per directory. Names past the caller's cap are counted,
not kept. Paths are never followed through a link, as the sandbox may have left links behind.
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass, field

from claudebox_pool.workers.store import IGNORED_IN_WORKSPACE

RACY_NS = 1_000_000_000
"""A directory changed this close before the snapshot may change again within the same
timestamp tick (as git's "racy" index entries): such a directory is always listed again."""
ROOT = ""


@dataclass(frozen=True)
class _Dir:
    ctime_ns: int
    inode: int
    files: str
    """The names of its files joined by NUL (which no name holds): a seventh of the memory of a
    set of them, and only the few directories that changed are split again."""
    subdirs: tuple[str, ...]
    racy: bool


@dataclass
class Created:
    """New files, by relative path: the first ``listed`` of them, and how many in all."""

    listed: list[str] = field(default_factory=list)
    count: int = 0
    listed_bytes: int = 0


def _status(path: str, relative: str) -> os.stat_result | None:
    """The directory's status; None if it is gone or no longer a directory (a link now)."""
    try:
        # The root itself as the store gives it; below it, links are never followed.
        status = os.stat(path) if relative == ROOT else os.lstat(path)
    except OSError:
        return None
    return status if stat.S_ISDIR(status.st_mode) else None


def _list(path: str, relative: str) -> tuple[os.stat_result, list[str], list[str]] | None:
    status = _status(path, relative)
    if status is None:
        return None
    try:
        with os.scandir(path) as entries:
            files, subdirs = [], []
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    if entry.name not in IGNORED_IN_WORKSPACE:
                        subdirs.append(entry.name)
                else:
                    files.append(entry.name)
    except OSError:
        return None
    return status, files, subdirs


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


class Snapshot:
    def __init__(self, root: str, dirs: dict[str, _Dir]) -> None:
        self.root = root
        self._dirs = dirs

    @classmethod
    def take(cls, root: os.PathLike[str] | str, racy_ns: int = RACY_NS) -> Snapshot:
        base = os.fspath(root)
        racy_after = time.time_ns() - racy_ns
        dirs: dict[str, _Dir] = {}
        stack = [ROOT]
        while stack:
            relative = stack.pop()
            listed = _list(os.path.join(base, relative), relative)
            if listed is None:
                continue
            status, files, subdirs = listed
            dirs[relative] = _Dir(
                status.st_ctime_ns,
                status.st_ino,
                "\0".join(files),
                tuple(subdirs),
                status.st_ctime_ns >= racy_after,
            )
            stack.extend(_join(relative, name) for name in subdirs)
        return cls(base, dirs)

    def created(self, max_count: int, max_bytes: int) -> Created:
        """Files there now that the snapshot did not see; names kept up to either cap."""
        found = Created()
        stack = [ROOT]
        while stack:
            relative = stack.pop()
            path = os.path.join(self.root, relative)
            before = self._dirs.get(relative)
            if before is not None and not before.racy:
                status = _status(path, relative)
                if status is None:
                    continue
                if status.st_ctime_ns == before.ctime_ns and status.st_ino == before.inode:
                    stack.extend(_join(relative, name) for name in before.subdirs)
                    continue
            listed = _list(path, relative)
            if listed is None:
                continue
            _, files, subdirs = listed
            known = set(before.files.split("\0")) if before is not None else set()
            for name in files:
                if name not in known:
                    _add(found, _join(relative, name), max_count, max_bytes)
            stack.extend(_join(relative, name) for name in subdirs)
        found.listed.sort()
        return found


def _add(found: Created, name: str, max_count: int, max_bytes: int) -> None:
    found.count += 1
    size = len(name.encode(errors="surrogateescape"))
    if len(found.listed) < max_count and found.listed_bytes + size <= max_bytes:
        found.listed.append(name)
        found.listed_bytes += size
