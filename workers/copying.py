"""Copying a directory tree cheaply and safely: for checkpoints, restores, templates and forks.

- Links are copied as links, never followed; fifos, sockets and devices are left out (and
  named in the result): a copy never reads anything outside the tree it copies.
- A regular file is cloned (copy-on-write, the ``FICLONE`` ioctl: btrfs, XFS, bcachefs, ...)
  where the filesystem can, else copied. Modes and times are kept.
- Setuid and setgid bits are dropped: a copy made by a root worker of a file a sandbox marked
  setuid would otherwise be a setuid-root file. With ``owner`` (a session's uid and gid, see
  :mod:`workers.identity`) every entry made belongs to it.
- With ``link_dest`` (rsync's ``--link-dest``), a file unchanged since that earlier tree (same
  size, mode and modification time) is hard-linked to it instead. Only ever between two trees
  that nothing writes to again, as checkpoints are: a hard link into a workspace would let the
  agent change a checkpoint by writing a file in place (``echo x > f`` keeps the inode).
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import stat
import uuid
from dataclasses import dataclass, field
from pathlib import Path

FICLONE = 0x40049409
"""``_IOW(0x94, 9, int)`` from linux/fs.h: share the source's extents, copy-on-write."""
_PRIVILEGE_BITS = stat.S_ISUID | stat.S_ISGID
_CANNOT_CLONE = {errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.EXDEV, errno.ENOSYS}


@dataclass
class CopyStats:
    files: int = 0
    bytes: int = 0
    linked: int = 0
    cloned: int = 0
    copied: int = 0
    skipped: list[str] = field(default_factory=list)


def copy_tree(
    source: Path,
    target: Path,
    link_dest: Path | None = None,
    owner: tuple[int, int] | None = None,
) -> CopyStats:
    """Copy the tree at ``source`` to ``target``, which must not exist yet."""
    stats = CopyStats()
    made: list[Path] = [target]
    cloner = _Cloner()
    target.mkdir()
    directories = [(source, target)]
    pending = [(source, target)]
    while pending:
        source_dir, target_dir = pending.pop()
        with os.scandir(source_dir) as entries:
            for entry in entries:
                src, dst = Path(entry.path), target_dir / entry.name
                relative = src.relative_to(source)
                info = entry.stat(follow_symlinks=False)
                if stat.S_ISLNK(info.st_mode):
                    os.symlink(os.readlink(src), dst)
                    os.utime(dst, ns=(info.st_atime_ns, info.st_mtime_ns), follow_symlinks=False)
                elif stat.S_ISDIR(info.st_mode):
                    dst.mkdir()
                    directories.append((src, dst))
                    pending.append((src, dst))
                elif stat.S_ISREG(info.st_mode):
                    previous = link_dest / relative if link_dest is not None else None
                    how = _copy_file(src, dst, info, previous, cloner)
                    setattr(stats, how, getattr(stats, how) + 1)
                    stats.files += 1
                    stats.bytes += info.st_size
                else:
                    stats.skipped.append(str(relative))
                    continue
                made.append(dst)
    # Directory modes and times last: filling a directory changes its mtime, and a read-only
    # one could not be filled.
    for source_dir, target_dir in reversed(directories):
        shutil.copystat(source_dir, target_dir, follow_symlinks=False)
    if owner is not None:
        for path in made:
            os.chown(path, *owner, follow_symlinks=False)
    return stats


def replace_dir(current: Path, replacement: Path) -> None:
    """Put ``replacement`` where ``current`` is, by two renames on the same filesystem.

    A crash between them leaves the old tree beside, named ``.replaced-*``, never half a tree.
    """
    retired = current.with_name(f".replaced-{current.name}-{uuid.uuid4().hex[:8]}")
    os.rename(current, retired)
    os.rename(replacement, current)
    shutil.rmtree(retired)


def _copy_file(
    src: Path, dst: Path, info: os.stat_result, previous: Path | None, cloner: _Cloner
) -> str:
    if previous is not None and _unchanged(previous, info):
        try:
            os.link(previous, dst)
            return "linked"
        except OSError:
            pass  # another filesystem, or too many links to one inode: store it anew
    how = "cloned" if cloner.clone(src, dst) else "copied"
    if how == "copied":
        shutil.copyfile(src, dst, follow_symlinks=False)
    shutil.copystat(src, dst, follow_symlinks=False)
    if info.st_mode & _PRIVILEGE_BITS:
        os.chmod(dst, stat.S_IMODE(info.st_mode) & ~_PRIVILEGE_BITS)
    return how


def _unchanged(previous: Path, info: os.stat_result) -> bool:
    try:
        before = previous.lstat()
    except OSError:
        return False
    return (
        stat.S_ISREG(before.st_mode)
        and before.st_mode == info.st_mode
        and before.st_size == info.st_size
        and before.st_mtime_ns == info.st_mtime_ns
    )


class _Cloner:
    """Clones files while the filesystem allows it; after its first refusal, stops trying."""

    def __init__(self) -> None:
        self.works = True

    def clone(self, src: Path, dst: Path) -> bool:
        """Create ``dst`` as a clone of ``src``; False (``dst`` left empty) if it cannot be."""
        if not self.works:
            return False
        with src.open("rb") as reader, dst.open("xb") as writer:
            try:
                fcntl.ioctl(writer.fileno(), FICLONE, reader.fileno())
            except OSError as exc:
                if exc.errno not in _CANNOT_CLONE:
                    raise
                self.works = False
                return False
        return True
