"""Paths under a directory that another party controls (a workspace the sandbox writes):
opened, made and written without ever following a symbolic link out of it.

Every path is opened from a descriptor of the root with openat2's ``RESOLVE_BENEATH``: links
that stay inside are followed, one that leads out (``..``, an absolute target, a magic link of
/proc) fails in the kernel, atomically, and is refused with InvalidRequestError. Where openat2
is missing (Linux before 5.6, a seccomp filter) each component is opened with O_NOFOLLOW
instead, and no link is followed at all. A file is built under a temporary name beside its
place and renamed over it, so a failed write leaves nothing half written, and a link at the
path is replaced, never written through.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import IO

from claudebox_pool.tasks.errors import InvalidRequestError
from claudebox_pool.tasks.transfer import Receiver

_SYS_OPENAT2 = 437  # the same number on every architecture (added after the tables merged)
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_BENEATH = 0x08
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
DIR = os.O_RDONLY | os.O_DIRECTORY

Owner = tuple[int, int] | None
Check = Callable[[], None]
"""Raises if the write must not land (the session's lock was lost)."""


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_openat2_works = True


def open_beneath(root: int, path: str, flags: int, mode: int = 0) -> int:
    """A descriptor of ``path`` under the directory ``root``; InvalidRequestError if resolving
    it leads out of ``root``."""
    global _openat2_works
    flags |= os.O_CLOEXEC
    if _openat2_works:
        how = _OpenHow(flags, mode, _RESOLVE_BENEATH | _RESOLVE_NO_MAGICLINKS)
        fd = _libc.syscall(
            _SYS_OPENAT2, root, os.fsencode(path), ctypes.byref(how), ctypes.sizeof(how)
        )
        if fd >= 0:
            return int(fd)
        code = ctypes.get_errno()
        if code == errno.EXDEV:
            raise _leads_out(path)
        if code not in (errno.ENOSYS, errno.EPERM):
            raise OSError(code, os.strerror(code), path)
        _openat2_works = False
    return _open_without_links(root, path, flags, mode)


def _open_without_links(root: int, path: str, flags: int, mode: int) -> int:
    parts = PurePosixPath(path).parts or (".",)
    current = os.dup(root)
    part = parts[0]
    try:
        for part in parts[:-1]:
            inner = os.open(part, DIR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=current)
            os.close(current)
            current = inner
        part = parts[-1]
        return os.open(part, flags | os.O_NOFOLLOW, mode, dir_fd=current)
    except OSError as exc:
        # A link met with O_NOFOLLOW fails with ELOOP, or ENOTDIR where a directory was due.
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and _is_link(current, part):
            raise InvalidRequestError(
                f"{path!r} goes through a symbolic link, and this host's kernel lacks openat2 "
                "to follow one safely; name the file itself"
            ) from None
        raise
    finally:
        os.close(current)


def _is_link(folder: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=folder, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _leads_out(path: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"{path!r} leads out of the session's workspace through a symbolic link; "
        "name the file inside the workspace instead"
    )


def split(path: str) -> tuple[str, str]:
    pure = PurePosixPath(path)
    if not pure.parts:
        raise InvalidRequestError("'.' is the workspace itself; name a file in it")
    return str(pure.parent), pure.name


def make_dirs(root: int, path: str, owner: Owner) -> int:
    """A descriptor of directory ``path`` under ``root``, made (with its parents) if missing."""
    current = os.dup(root)
    parts = PurePosixPath(path).parts
    try:
        for depth, part in enumerate(parts, 1):
            prefix = "/".join(parts[:depth])
            try:
                inner = open_beneath(root, prefix, DIR)
            except FileNotFoundError:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=current)
                    if owner is not None:
                        os.chown(part, *owner, dir_fd=current, follow_symlinks=False)
                inner = open_beneath(root, prefix, DIR)
            os.close(current)
            current = inner
    except BaseException:
        os.close(current)
        raise
    return current


def place(
    folder: int,
    name: str,
    source: IO[bytes] | Receiver,
    *,
    chunk_bytes: int,
    owner: Owner,
    check: Check,
    mode: int = 0o644,
    mtime: float | None = None,
) -> int:
    """Write ``source`` to ``name`` in ``folder`` (built aside, renamed in); its size."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISDIR(os.stat(name, dir_fd=folder, follow_symlinks=False).st_mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory", name)
    building = f".{name[:200]}.claudebox-{os.urandom(4).hex()}"
    fd = os.open(
        building, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=folder
    )
    size = 0
    try:
        with os.fdopen(fd, "wb", closefd=False) as out:
            # A Receiver checks the lock once a chunk (its ``alive``); ``check`` before the rename.
            while chunk := source.read(chunk_bytes):
                out.write(chunk)
                size += len(chunk)
        os.fchmod(fd, mode & 0o777)
        if owner is not None:
            os.fchown(fd, *owner)
        if mtime is not None:
            os.utime(fd, (mtime, mtime))
        check()
        os.rename(building, name, src_dir_fd=folder, dst_dir_fd=folder)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(building, dir_fd=folder)
        raise
    finally:
        os.close(fd)
    return size
