"""Files in and out of a session's workspace, from a producer that does not see the workers'
disk: ``box.files`` (read, write, list, remove one file) and whole trees as tar (upload,
download).

Each operation is one task on the session's node (routed as ``code`` is); its bytes travel
through Redis in bounded chunks (:mod:`tasks.transfer`), so a file of any size passes with a
chunk or two in memory on either side. The producer's end of a transfer runs in a thread
(tarfile and file objects are synchronous) with a Redis client of its own; while it waits it
checks that the task has not failed, so a refused path or a busy session is raised at once.
"""

from __future__ import annotations

import asyncio
import io
import os
import stat
import tarfile
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import IO, Any, TypeVar, cast

import redis

from claudebox_pool.producer import pool
from claudebox_pool.tasks import names
from claudebox_pool.tasks.app import app
from claudebox_pool.tasks.connections import sync_redis
from claudebox_pool.tasks.errors import ClaudeBoxError, InvalidRequestError
from claudebox_pool.tasks.models import validate_session_id
from claudebox_pool.tasks.transfer import Receiver, Sender
from claudebox_pool.tasks.workspace_files import (
    FileInfo,
    FileListing,
    FileRequest,
    TransferResult,
    TreeRequest,
    workspace_path,
)

T = TypeVar("T")
WAIT_MARGIN_S = 120
PEEK_EVERY_S = 1.0
"""How often a transfer that keeps flowing still reads its task's state."""
LocalFile = str | Path | IO[bytes]


class Files:
    """``box.files``: one session's workspace files, by paths relative to the workspace.

    Calls made through one box run one at a time, in order with its ``code`` calls. A path
    that leaves the workspace (``..``, absolute, a symbolic link out) raises
    InvalidRequestError before anything is touched.
    """

    def __init__(self, session_id: str, order: asyncio.Lock | None = None) -> None:
        self._session_id = validate_session_id(session_id)
        self._order = order or asyncio.Lock()

    async def read(self, path: str) -> bytes:
        """The file's bytes (whole, in memory: use :meth:`read_to` for a large one)."""
        into = io.BytesIO()
        await self.read_to(path, into)
        return into.getvalue()

    async def read_to(self, path: str, local: LocalFile) -> int:
        """Stream the file into ``local`` (a path, made or replaced, or a binary file object);
        the number of bytes."""
        request = FileRequest(
            session_id=self._session_id, path=workspace_path(path), token=_token()
        )
        if not isinstance(local, str | Path):
            return await self._read(request, local)
        # Opened before anything is sent: a local mistake costs the pool nothing.
        target = Path(local).expanduser()
        building = target.with_name(f".{target.name}.part-{os.getpid()}")
        try:
            out = building.open("wb")
        except OSError as exc:
            raise InvalidRequestError(
                f"cannot write {str(local)!r} on this machine: {exc.strerror}"
            ) from None
        try:
            with out:
                size = await self._read(request, out)
            building.replace(target)
        finally:
            building.unlink(missing_ok=True)
        return size

    async def _read(self, request: FileRequest, out: IO[bytes]) -> int:
        async with self._order:
            _, done = await _receive(names.FILES_READ, request, lambda got: _pump(got, out))
        return done.bytes

    async def write(self, path: str, data: bytes | str) -> None:
        """Write ``data`` (str as UTF-8) to the file, its parent directories made if missing."""
        if not isinstance(data, bytes | bytearray | str):
            raise InvalidRequestError(f"files.write takes bytes or str, not {type(data).__name__}")
        raw = data.encode() if isinstance(data, str) else bytes(data)
        await self.write_from(io.BytesIO(raw), path)

    async def write_from(self, local: LocalFile, path: str) -> int:
        """Stream ``local`` (a path or a binary file object) into the workspace file ``path``;
        the number of bytes."""
        checked = workspace_path(path)
        if not isinstance(local, str | Path):
            return await self._write(checked, local)
        try:
            source = Path(local).expanduser().open("rb")
        except OSError as exc:
            raise InvalidRequestError(
                f"cannot read {str(local)!r} on this machine: {exc.strerror}"
            ) from None
        with source:
            return await self._write(checked, source)

    async def _write(self, path: str, source: IO[bytes]) -> int:
        request = FileRequest(
            session_id=self._session_id, path=path, token=_token(), size=_size_of(source)
        )
        async with self._order:
            done = await _send(names.FILES_WRITE, request, lambda out: _pump(source, out))
        return done.bytes

    async def list(self, path: str = ".") -> list[FileInfo]:
        """The entries of directory ``path``, by name; a link is listed as itself."""
        request = FileRequest(session_id=self._session_id, path=workspace_path(path))
        async with self._order:
            raw = await _call(names.FILES_LIST, request)
        return FileListing.model_validate(raw).entries

    async def remove(self, path: str) -> None:
        """Remove the file, link or directory tree at ``path``."""
        request = FileRequest(session_id=self._session_id, path=workspace_path(path))
        async with self._order:
            await _call(names.FILES_REMOVE, request)

    async def upload(self, local_dir: str | Path, to: str = ".") -> TransferResult:
        """Copy the local directory's tree into workspace directory ``to``; links that lead out
        of the tree, and what is neither file, directory nor link, are left out (``skipped``)."""
        source = Path(local_dir).expanduser()
        if not source.is_dir():
            raise InvalidRequestError(f"{str(local_dir)!r} is not a directory on this machine")
        request = TreeRequest(session_id=self._session_id, path=workspace_path(to), token=_token())
        skipped: list[str] = []
        async with self._order:
            done = await _send(names.FILES_UPLOAD, request, lambda out: _tar(source, out, skipped))
        return done.model_copy(update={"skipped": skipped + done.skipped})

    async def download(
        self,
        to: str | Path,
        path: str = ".",
        *,
        modified_since: float | None = None,
        since_task: str | None = None,
    ) -> TransferResult:
        """Copy workspace directory ``path`` into the local directory ``to`` (made if missing).
        With ``modified_since`` (epoch seconds, the worker's clock) only files modified since
        then; with ``since_task`` (a code task's id) since that run started."""
        target = Path(to).expanduser()
        try:
            target.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InvalidRequestError(
                f"cannot make directory {str(to)!r} on this machine: {exc.strerror}"
            ) from None
        request = TreeRequest(
            session_id=self._session_id,
            path=workspace_path(path),
            token=_token(),
            modified_since=modified_since,
            since_task=since_task,
        )
        async with self._order:
            _, done = await _receive(names.FILES_DOWNLOAD, request, lambda got: _untar(got, target))
        return done


def _size_of(source: IO[bytes]) -> int | None:
    """The bytes left to read in ``source``, where it is a regular file (else unknown)."""
    if isinstance(source, io.BytesIO):
        return len(source.getbuffer()) - source.tell()
    try:
        info = os.fstat(source.fileno())
        position = source.tell()
    except (OSError, ValueError, io.UnsupportedOperation):  # a pipe, or no descriptor
        return None
    return max(0, info.st_size - position) if stat.S_ISREG(info.st_mode) else None


def _token() -> str:
    return uuid.uuid4().hex


# --- the producer's end of a transfer --------------------------------------------------------


def _wait_s() -> float:
    current = pool.settings()
    return current.task_time_limit_s + current.lock_wait_s + WAIT_MARGIN_S


async def _call(name: str, request: FileRequest | TreeRequest) -> Any:
    await pool.ensure_workers()
    return await pool.call(name, request.model_dump(mode="json"), timeout_s=_wait_s())


async def _send(
    name: str, request: FileRequest | TreeRequest, produce: Callable[[Sender], None]
) -> TransferResult:
    """Run task ``name`` and feed it what ``produce`` writes to the sender."""

    def run(client: redis.Redis, token: str, alive: Callable[[], None]) -> None:
        current = pool.settings()
        sender = Sender(
            client,
            token,
            chunk_bytes=current.transfer_chunk_bytes,
            window=current.transfer_window_chunks,
            idle_s=_wait_s(),
            alive=alive,
        )
        try:
            produce(sender)
            sender.finish()
        except ClaudeBoxError:
            # The task failed: nobody reads on, and this side pushed last.
            with pool.map_redis_errors():
                sender.forget()
            raise
        except BaseException as exc:
            with pool.map_redis_errors():
                sender.abort(f"{type(exc).__name__} on the producer's side")
            raise

    _, done = await _transfer(name, request, run)
    return done


async def _receive(
    name: str, request: FileRequest | TreeRequest, consume: Callable[[Receiver], T]
) -> tuple[T, TransferResult]:
    """Run task ``name`` and hand what it sends to ``consume``."""

    def run(client: redis.Redis, token: str, alive: Callable[[], None]) -> T:
        receiver = Receiver(client, token, idle_s=_wait_s(), alive=alive)
        try:
            return consume(receiver)
        except ClaudeBoxError:
            with pool.map_redis_errors():
                receiver.forget()
            raise
        except BaseException as exc:
            # This side failed (a local disk, Ctrl-C): the worker stops at its next credit.
            with pool.map_redis_errors():
                receiver.abort(f"{type(exc).__name__} on the producer's side")
            raise

    return await _transfer(name, request, run)


async def _transfer(
    name: str,
    request: FileRequest | TreeRequest,
    run: Callable[[redis.Redis, str, Callable[[], None]], T],
) -> tuple[T, TransferResult]:
    assert request.token is not None
    token = request.token
    await pool.ensure_workers()
    task_id, route = await pool.send_routed(name, request.model_dump(mode="json"))
    stop = threading.Event()
    result_key = app.backend.get_key_for_task(task_id)

    def in_thread() -> T:
        with closing(sync_redis(pool.settings())) as client, pool.map_redis_errors():
            peeked_at = 0.0

            def alive() -> None:
                nonlocal peeked_at
                if stop.is_set():
                    raise asyncio.CancelledError()
                if time.monotonic() - peeked_at >= PEEK_EVERY_S:
                    peeked_at = time.monotonic()
                    pool.raise_if_failed(task_id, cast(bytes | None, client.get(result_key)))

            return run(client, token, alive)

    try:
        outcome = await asyncio.to_thread(in_thread)
    except BaseException:
        stop.set()  # the thread stops at its next chunk or wait
        raise
    done = TransferResult.model_validate(await pool.wait(task_id, _wait_s(), route))
    return outcome, done


# --- what flows: a file, a tar of a directory -------------------------------------------------


def _pump(source: IO[bytes] | Receiver, out: IO[bytes] | Sender) -> None:
    chunk = pool.settings().transfer_chunk_bytes
    while data := source.read(chunk):
        out.write(data)


def _tar(source: Path, out: Sender, skipped: list[str]) -> None:
    """Tar ``source``'s tree into ``out``: links kept as links when their target stays in
    the tree, never followed."""
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
        for folder, dirs, files in os.walk(source):
            dirs.sort()
            for name in sorted(dirs + files):
                full = Path(folder) / name
                member = full.relative_to(source).as_posix()
                if full.is_symlink():
                    target = os.readlink(full)
                    inside = os.path.normpath(os.path.join(os.path.dirname(member), target))
                    if os.path.isabs(target) or inside == ".." or inside.startswith("../"):
                        skipped.append(member)
                        continue
                elif not (full.is_dir() or full.is_file()):
                    skipped.append(member)
                    continue
                tar.add(full, arcname=member, recursive=False, filter=_anonymous)


def _anonymous(member: tarfile.TarInfo) -> tarfile.TarInfo:
    # The worker gives what it unpacks to the session's own user; this machine's do not travel.
    member.uid = member.gid = 0
    member.uname = member.gname = ""
    return member


def _untar(source: Receiver, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=source, mode="r|") as tar:  # type: ignore[call-overload]
        tar.extractall(target, filter="data")
    source.read()  # past the tar's end blocks, to the end of the stream
