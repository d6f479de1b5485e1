"""The worker's side of the files API: read, write, list and remove workspace files, and move
whole trees as tar, for producers that do not see the workers' disk.

The workspace belongs to the sandbox, so any path in it may be a symbolic link planted to lead
the worker elsewhere. Every path is opened from a descriptor of the workspace with openat2's
``RESOLVE_BENEATH``: links that stay inside are followed, one that leads out (``..``, an
absolute target, a magic link of /proc) fails in the kernel, atomically, and is refused with
InvalidRequestError. Where openat2 is missing (Linux before 5.6, a seccomp filter) each
component is opened with O_NOFOLLOW instead, and no link is followed at all.

A written file is built under a temporary name beside its place and renamed over it, so a
failed transfer leaves nothing half written, and a link at the path is replaced, never written
through. What a write creates belongs to the session's sandbox user (:mod:`workers.identity`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import stat
import tarfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import IO

from claudebox_pool.tasks.errors import InvalidRequestError
from claudebox_pool.tasks.models import HistoryEntry, iso_to_epoch, utc_now
from claudebox_pool.tasks.settings import Settings
from claudebox_pool.tasks.transfer import Receiver, Sender
from claudebox_pool.tasks.workspace_files import (
    FileInfo,
    FileListing,
    FileRequest,
    TransferResult,
    TreeRequest,
)
from claudebox_pool.workers import disk, identity, registry
from claudebox_pool.workers.context import WorkerContext
from claudebox_pool.workers.lock import SessionLock

_SYS_OPENAT2 = 437  # the same number on every architecture (added after the tables merged)
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_BENEATH = 0x08
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_DIR = os.O_RDONLY | os.O_DIRECTORY
COARSE_CLOCK_S = 0.1
"""File times come from the kernel's coarse clock, a tick behind the one history reads."""
MAX_SKIPPED = 100
"""Names of left-out members a transfer reports; the count goes on."""

Owner = tuple[int, int] | None


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
    parts = PurePosixPath(path).parts
    current = os.dup(root)
    try:
        for part in parts[:-1]:
            inner = os.open(part, _DIR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=current)
            os.close(current)
            current = inner
        return os.open(parts[-1] if parts else ".", flags | os.O_NOFOLLOW, mode, dir_fd=current)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _leads_out(path) from None
        raise
    finally:
        os.close(current)


def _leads_out(path: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"{path!r} leads out of the session's workspace through a symbolic link; "
        "name the file inside the workspace instead"
    )


@contextlib.contextmanager
def _request_errors(session_id: str, path: str) -> Iterator[None]:
    """What a wrong path gives (a missing file, a file where a directory is due), as a user's
    mistake; every other OSError (a full disk included) goes on as it is."""
    try:
        yield
    except FileNotFoundError:
        raise InvalidRequestError(
            f"no {path!r} in the workspace of session '{session_id}'; list it with "
            "`claudebox-pool files ls`"
        ) from None
    except (NotADirectoryError, IsADirectoryError) as exc:
        raise InvalidRequestError(
            f"{path!r} in the workspace of session '{session_id}': {exc.strerror}"
        ) from None


@contextlib.contextmanager
def _workspace(ctx: WorkerContext, session_id: str) -> Iterator[int]:
    ctx.store.load(session_id)  # SessionNotFoundError, SessionCorruptedError
    fd = os.open(ctx.store.check_workspace(session_id), _DIR | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def _owner(ctx: WorkerContext, session_id: str) -> Owner:
    user = identity.of(ctx.store.load(session_id))
    return (user.uid, user.gid) if user is not None else None


def _split(path: str) -> tuple[str, str]:
    pure = PurePosixPath(path)
    if not pure.parts:
        raise InvalidRequestError("'.' is the workspace itself; name a file in it")
    return str(pure.parent), pure.name


def _make_dirs(root: int, path: str, owner: Owner) -> int:
    """A descriptor of directory ``path`` under ``root``, made (with its parents) if missing."""
    current = os.dup(root)
    parts = PurePosixPath(path).parts
    try:
        for depth, part in enumerate(parts, 1):
            prefix = "/".join(parts[:depth])
            try:
                inner = open_beneath(root, prefix, _DIR)
            except FileNotFoundError:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=current)
                    if owner is not None:
                        os.chown(part, *owner, dir_fd=current, follow_symlinks=False)
                inner = open_beneath(root, prefix, _DIR)
            os.close(current)
            current = inner
    except BaseException:
        os.close(current)
        raise
    return current


def _place(
    folder: int,
    name: str,
    source: IO[bytes] | Receiver,
    *,
    chunk_bytes: int,
    owner: Owner,
    lock: SessionLock,
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
            # A Receiver checks the lock once a chunk (its ``alive``).
            while chunk := source.read(chunk_bytes):
                out.write(chunk)
                size += len(chunk)
        os.fchmod(fd, mode & 0o777)
        if owner is not None:
            os.fchown(fd, *owner)
        if mtime is not None:
            os.utime(fd, (mtime, mtime))
        lock.check()
        os.rename(building, name, src_dir_fd=folder, dst_dir_fd=folder)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(building, dir_fd=folder)
        raise
    finally:
        os.close(fd)
    return size


# --- one file ----------------------------------------------------------------------------------


def read(ctx: WorkerContext, request: FileRequest, sender: Sender) -> TransferResult:
    with (
        _workspace(ctx, request.session_id) as root,
        _request_errors(request.session_id, request.path),
    ):
        fd = open_beneath(root, request.path, os.O_RDONLY | os.O_NONBLOCK)
    size = 0
    with os.fdopen(fd, "rb") as source:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InvalidRequestError(
                f"{request.path!r} is not a regular file; only files can be read "
                "(download a directory with `claudebox-pool download`)"
            )
        while chunk := source.read(ctx.settings.transfer_chunk_bytes):
            sender.write(chunk)
            size += len(chunk)
    sender.finish()
    return TransferResult(files=1, bytes=size)


def write(
    ctx: WorkerContext, request: FileRequest, receiver: Receiver, lock: SessionLock
) -> TransferResult:
    parent, name = _split(request.path)
    disk.guard(
        ctx.settings,
        ctx.store,
        f"session '{request.session_id}' cannot write {request.path!r}",
        adding=request.size or 0,
    )
    owner = _owner(ctx, request.session_id)
    with (
        _workspace(ctx, request.session_id) as root,
        _request_errors(request.session_id, request.path),
    ):
        folder = _make_dirs(root, parent, owner)
        try:
            size = _place(
                folder,
                name,
                receiver,
                chunk_bytes=ctx.settings.transfer_chunk_bytes,
                owner=owner,
                lock=lock,
            )
        finally:
            os.close(folder)
    done = TransferResult(files=1, bytes=size)
    _note(ctx, request.session_id, lock, "file_written", request.path, done)
    return done


def listing(ctx: WorkerContext, request: FileRequest) -> FileListing:
    path, cap = request.path, ctx.settings.max_list_entries
    entries: list[FileInfo] = []
    with _workspace(ctx, request.session_id) as root, _request_errors(request.session_id, path):
        folder = open_beneath(root, path, _DIR)
        try:
            with os.scandir(folder) as found:
                for entry in found:
                    if len(entries) == cap:
                        raise InvalidRequestError(
                            f"{path!r} holds more than {cap} entries (CLAUDEBOX_MAX_LIST_ENTRIES);"
                            " list a subdirectory, or download it"
                        )
                    info = entry.stat(follow_symlinks=False)
                    entries.append(
                        FileInfo(
                            name=entry.name,
                            path=entry.name if path == "." else f"{path}/{entry.name}",
                            is_dir=stat.S_ISDIR(info.st_mode),
                            size=info.st_size,
                            modified=_iso(info.st_mtime),
                            is_symlink=stat.S_ISLNK(info.st_mode),
                        )
                    )
        finally:
            os.close(folder)
    return FileListing(entries=sorted(entries, key=lambda each: each.name))


def remove(ctx: WorkerContext, request: FileRequest, lock: SessionLock) -> TransferResult:
    parent, name = _split(request.path)
    with (
        _workspace(ctx, request.session_id) as root,
        _request_errors(request.session_id, request.path),
    ):
        folder = open_beneath(root, parent, _DIR)
        try:
            lock.check()
            if stat.S_ISDIR(os.stat(name, dir_fd=folder, follow_symlinks=False).st_mode):
                # rmtree with dir_fd opens every level with O_NOFOLLOW: links are removed, never
                # followed.
                shutil.rmtree(name, dir_fd=folder)
            else:
                os.unlink(name, dir_fd=folder)
        finally:
            os.close(folder)
    done = TransferResult(files=1)
    _note(ctx, request.session_id, lock, "file_removed", request.path, done)
    return done


def _note(
    ctx: WorkerContext,
    session_id: str,
    lock: SessionLock,
    action: str,
    path: str,
    done: TransferResult,
) -> None:
    """Record a change made through the files API in the session's history; ``updated_at``
    moves too, so that the age sweep does not take a session fed this way for idle."""
    now = utc_now()
    record = ctx.store.load(session_id).model_copy(
        update={"updated_at": now, "last_accessed": now, "fence": lock.fence}
    )
    context = {"path": path, "files": done.files, "bytes": done.bytes}
    if done.skipped:
        context["skipped"] = len(done.skipped)
    ctx.store.commit(record, [HistoryEntry(action=action, context=context)], lock.check)
    registry.put(ctx.redis, record)


def _iso(epoch: float) -> str:
    return (
        datetime.fromtimestamp(epoch, UTC).replace(tzinfo=None).isoformat(timespec="microseconds")
    )


# --- whole trees, as tar -----------------------------------------------------------------------


def download(ctx: WorkerContext, request: TreeRequest, sender: Sender) -> TransferResult:
    """Tar ``request.path`` (only files modified since ``modified_since`` if given) into
    ``sender``; links whose target leads out of the tree are left out."""
    done = TransferResult()
    if request.since_task is not None:
        request = request.model_copy(update={"modified_since": _started(ctx, request)})
    with (
        _workspace(ctx, request.session_id) as root,
        _request_errors(request.session_id, request.path),
    ):
        top = open_beneath(root, request.path, _DIR)
    try:
        # format=PAX: names and link targets of any length, mtimes to the microsecond.
        with tarfile.open(fileobj=sender, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
            for folder, names, files, dir_fd in os.fwalk(".", dir_fd=top):
                for name in sorted(names + files):
                    _add(
                        tar,
                        dir_fd,
                        os.path.normpath(os.path.join(folder, name)),
                        name,
                        request,
                        done,
                    )
    finally:
        os.close(top)
    sender.finish()
    return done


def _started(ctx: WorkerContext, request: TreeRequest) -> float:
    """When the run of ``request.since_task`` started, less the filesystem clock's grain."""
    for entry in ctx.store.history(request.session_id):
        started = entry.context.get("started_at")
        if entry.context.get("task_id") == request.since_task and isinstance(started, str):
            return iso_to_epoch(started) - COARSE_CLOCK_S
    raise InvalidRequestError(
        f"session '{request.session_id}' has no run of task {request.since_task} in its history"
    )


def _add(
    tar: tarfile.TarFile,
    dir_fd: int,
    member: str,
    name: str,
    request: TreeRequest,
    done: TransferResult,
) -> None:
    info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    entry = tarfile.TarInfo(member)
    entry.mtime, entry.mode = info.st_mtime, stat.S_IMODE(info.st_mode) & 0o777
    since = request.modified_since
    if stat.S_ISDIR(info.st_mode):
        if since is None:
            entry.type = tarfile.DIRTYPE
            tar.addfile(entry)
    elif stat.S_ISLNK(info.st_mode):
        target = os.readlink(name, dir_fd=dir_fd)
        inside = os.path.normpath(os.path.join(os.path.dirname(member), target))
        if os.path.isabs(target) or inside == ".." or inside.startswith("../"):
            _skip(done, member)
        elif since is None or info.st_mtime >= since:
            entry.type, entry.linkname = tarfile.SYMTYPE, target
            tar.addfile(entry)
    elif stat.S_ISREG(info.st_mode) and (since is None or info.st_mtime >= since):
        fd = os.open(
            name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd
        )
        with os.fdopen(fd, "rb") as source:
            entry.size = os.fstat(fd).st_size
            tar.addfile(entry, source)
        done.files += 1
        done.bytes += entry.size
    elif not stat.S_ISREG(info.st_mode):
        _skip(done, member)  # a fifo, socket or device: nothing a producer can use


def upload(
    ctx: WorkerContext, request: TreeRequest, receiver: Receiver, lock: SessionLock
) -> TransferResult:
    """Unpack the tar stream of ``receiver`` into directory ``request.path``.

    tarfile's ``data`` filter judges each member (no absolute names, no ``..``, no link leading
    out, no device, no setuid bit); one it refuses is left out and reported. What it lets
    through is created from descriptors of the workspace (:func:`open_beneath`), so a link
    already in the workspace cannot carry a member out either.
    """
    disk.guard(ctx.settings, ctx.store, f"session '{request.session_id}' cannot take an upload")
    owner, chunk = _owner(ctx, request.session_id), ctx.settings.transfer_chunk_bytes
    done = TransferResult()
    with (
        _workspace(ctx, request.session_id) as root,
        _request_errors(request.session_id, request.path),
    ):
        top = _make_dirs(root, request.path, owner)
        destination = f"/proc/self/fd/{top}"
        try:
            with tarfile.open(fileobj=receiver, mode="r|") as tar:  # type: ignore[call-overload]
                for member in tar:
                    try:
                        # The filter would strip a leading "/" and unpack the member inside;
                        # an absolute name is refused like the other ways out.
                        if member.name.startswith("/"):
                            raise tarfile.AbsolutePathError(member)
                        safe = tarfile.data_filter(member, destination)
                    except tarfile.FilterError:
                        _skip(done, member.name)
                        continue
                    _unpack(tar, top, safe, owner, lock, chunk, done)
            # The end marker may follow the tar's own end blocks: read to it.
            receiver.read()
        finally:
            os.close(top)
    _note(ctx, request.session_id, lock, "files_uploaded", request.path, done)
    return done


def _unpack(
    tar: tarfile.TarFile,
    top: int,
    member: tarfile.TarInfo,
    owner: Owner,
    lock: SessionLock,
    chunk: int,
    done: TransferResult,
) -> None:
    name = str(PurePosixPath(member.name))
    if name == ".":
        return
    if member.isdir():
        os.close(_make_dirs(top, name, owner))
        return
    parent, base = _split(name)
    folder = _make_dirs(top, parent, owner)
    try:
        if member.isreg():
            source = tar.extractfile(member)
            assert source is not None  # a regular member always has data
            mode = member.mode if member.mode is not None else 0o644
            done.bytes += _place(
                folder,
                base,
                source,
                chunk_bytes=chunk,
                owner=owner,
                lock=lock,
                mode=mode,
                mtime=member.mtime,
            )
            done.files += 1
        elif member.issym():
            building = f".{base[:200]}.claudebox-{os.urandom(4).hex()}"
            os.symlink(member.linkname, building, dir_fd=folder)
            if owner is not None:
                os.chown(building, *owner, dir_fd=folder, follow_symlinks=False)
            lock.check()
            os.rename(building, base, src_dir_fd=folder, dst_dir_fd=folder)
        elif member.islnk():
            # A second name of a file already unpacked: copied (a hard link would tie two
            # names the agent may expect to be separate files).
            source_fd = open_beneath(top, member.linkname, os.O_RDONLY | os.O_NONBLOCK)
            with os.fdopen(source_fd, "rb") as source:
                if stat.S_ISREG(os.fstat(source_fd).st_mode):
                    done.bytes += _place(
                        folder,
                        base,
                        source,
                        chunk_bytes=chunk,
                        owner=owner,
                        lock=lock,
                        mode=member.mode if member.mode is not None else 0o644,
                    )
                    done.files += 1
        else:
            _skip(done, name)
    finally:
        os.close(folder)


def _skip(done: TransferResult, name: str) -> None:
    if len(done.skipped) < MAX_SKIPPED:
        done.skipped.append(name)


def sender(ctx: WorkerContext, token: str) -> Sender:
    current: Settings = ctx.settings
    return Sender(
        ctx.redis,
        token,
        chunk_bytes=current.transfer_chunk_bytes,
        window=current.transfer_window_chunks,
        idle_s=current.transfer_idle_s,
        alive=lambda: None,
    )


def receiver(ctx: WorkerContext, token: str, lock: SessionLock) -> Receiver:
    return Receiver(ctx.redis, token, idle_s=ctx.settings.transfer_idle_s, alive=lock.check)
