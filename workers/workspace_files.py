"""The worker's side of the files API: read, write, list and remove workspace files, and move
whole trees as tar, for producers that do not see the workers' disk.

The workspace belongs to the sandbox, so any path in it may be a symbolic link planted to lead
the worker elsewhere: every path is opened, made and written through :mod:`workers.beneath`,
which never follows a link out. What a write creates belongs to the session's sandbox user
(:mod:`workers.identity`); each write, remove and upload is a line of the session's history.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tarfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import PurePosixPath

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
from claudebox_pool.workers import beneath, disk, identity, registry
from claudebox_pool.workers.context import WorkerContext
from claudebox_pool.workers.lock import SessionLock


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
    fd = os.open(ctx.store.check_workspace(session_id), beneath.DIR | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def _owner(ctx: WorkerContext, session_id: str) -> beneath.Owner:
    user = identity.of(ctx.store.load(session_id))
    return (user.uid, user.gid) if user is not None else None


COARSE_CLOCK_S = 0.01
"""File times come from the kernel's coarse clock, up to a tick (10 ms at HZ=100) behind the
clock history's ``started_at`` is read from."""
MAX_SKIPPED = 100
"""Names of left-out members a transfer reports; the count goes on."""


# --- one file ----------------------------------------------------------------------------------


def read(ctx: WorkerContext, request: FileRequest, sender: Sender) -> TransferResult:
    with (
        _workspace(ctx, request.session_id) as root,
        _request_errors(request.session_id, request.path),
    ):
        fd = beneath.open_beneath(root, request.path, os.O_RDONLY | os.O_NONBLOCK)
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
    parent, name = beneath.split(request.path)
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
        folder = beneath.make_dirs(root, parent, owner)
        try:
            size = beneath.place(
                folder,
                name,
                receiver,
                chunk_bytes=ctx.settings.transfer_chunk_bytes,
                owner=owner,
                check=lock.check,
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
        folder = beneath.open_beneath(root, path, beneath.DIR)
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
    parent, name = beneath.split(request.path)
    with (
        _workspace(ctx, request.session_id) as root,
        _request_errors(request.session_id, request.path),
    ):
        folder = beneath.open_beneath(root, parent, beneath.DIR)
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
        top = beneath.open_beneath(root, request.path, beneath.DIR)
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
        top = beneath.make_dirs(root, request.path, owner)
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
    owner: beneath.Owner,
    lock: SessionLock,
    chunk: int,
    done: TransferResult,
) -> None:
    name = str(PurePosixPath(member.name))
    if name == ".":
        return
    if member.isdir():
        os.close(beneath.make_dirs(top, name, owner))
        return
    parent, base = beneath.split(name)
    folder = beneath.make_dirs(top, parent, owner)
    try:
        if member.isreg():
            source = tar.extractfile(member)
            assert source is not None  # a regular member always has data
            mode = member.mode if member.mode is not None else 0o644
            done.bytes += beneath.place(
                folder,
                base,
                source,
                chunk_bytes=chunk,
                owner=owner,
                check=lock.check,
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
            source_fd = beneath.open_beneath(top, member.linkname, os.O_RDONLY | os.O_NONBLOCK)
            with os.fdopen(source_fd, "rb") as source:
                if stat.S_ISREG(os.fstat(source_fd).st_mode):
                    done.bytes += beneath.place(
                        folder,
                        base,
                        source,
                        chunk_bytes=chunk,
                        owner=owner,
                        check=lock.check,
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
