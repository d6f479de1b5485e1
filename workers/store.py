"""Sessions on disk, the source of truth: the seed's layout, atomic metadata, append-only history.

::

    <root>/<session_id>/workspace/                 the files the agent works on
    <root>/<session_id>/.claudebox/session.json    SessionRecord, replaced atomically
    <root>/<session_id>/.claudebox/history.jsonl   one HistoryEntry a line, appended
    <root>/<session_id>/.claudebox/agent-home/     the agent's $HOME (Claude Code's ~/.claude)
    <root>/<session_id>/.claudebox/checkpoints/<name>/   a checkpoint (workers.checkpoints)
    <root>/.sandbox-uids/<uid>                     link naming the session with that uid (identity)

History lines are written whole or not at all: a write the disk cuts short is undone, and a
torn last line (a crash mid-write) is repaired when the file is next opened for writing;
readers skip one. session.json is written before the history lines of the same change
(:meth:`SessionStore.commit`), so that a crash or a full disk between them leaves session.json
ahead of history, never behind it. A full disk (ENOSPC, EDQUOT) is a DiskFullError.

Every write takes a ``guard``: a callable that raises LockLostError when the caller no longer
holds the session's lock. session.json also carries the fencing number of the lock holder that
wrote it, so that a writer whose lock expired while it stalled cannot overwrite a newer holder's
record even if it slipped past the guard.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from claudebox_pool.tasks.errors import (
    LockLostError,
    SessionAlreadyExistsError,
    SessionCorruptedError,
    SessionNotFoundError,
)
from claudebox_pool.tasks.files import private_dir
from claudebox_pool.tasks.models import (
    HistoryEntry,
    SessionRecord,
    read_session_json,
    validate_session_id,
)
from claudebox_pool.workers import disk

log = logging.getLogger(__name__)

Guard = Callable[[], None]
"""Raises LockLostError when the caller's session lock is gone; called before every write."""

META_DIR = ".claudebox"
IGNORED_IN_WORKSPACE = frozenset({".git"})
TAIL_CHUNK = 64 * 1024


def unguarded() -> None:
    """For writes made where no lock exists yet or none is needed (tests, reindex)."""


@dataclass(frozen=True)
class SessionPaths:
    root: Path
    workspace: Path
    meta: Path
    session_json: Path
    history: Path
    agent_home: Path
    checkpoints: Path


class SessionStore:
    def __init__(self, root: Path, node: str = "") -> None:
        """``node``: the node this root belongs to (a worker's store; tests may leave it out)."""
        self.root = root
        self.node = node

    def paths(self, session_id: str) -> SessionPaths:
        return _paths(self.root, validate_session_id(session_id))

    def exists(self, session_id: str) -> bool:
        return self.paths(session_id).root.is_dir()

    def ids(self) -> Iterator[str]:
        """Ids of every session directory under the root, valid names only."""
        if not self.root.is_dir():
            return
        for entry in os.scandir(self.root):
            if entry.is_dir(follow_symlinks=False):
                try:
                    yield validate_session_id(entry.name)
                except ValueError:
                    continue

    def create(self, record: SessionRecord) -> SessionRecord:
        """Lay out a new session; SessionAlreadyExistsError if one is there already.

        A directory without metadata is adopted with its files: that is how the guide's
        template pattern seeds a workspace before the session is first opened.
        """
        paths = self.paths(record.session_id)
        private_dir(self.root)
        self.refuse_taken(record.session_id)
        with self._disk_full(record.session_id, "its directories"):
            paths.root.mkdir(exist_ok=True)
            paths.workspace.mkdir(exist_ok=True)
            # The metadata is the worker's alone; the agent home the session's (workers.identity).
            paths.meta.mkdir(mode=0o700)
            paths.agent_home.mkdir(mode=0o700)
        self.commit(
            record,
            [HistoryEntry(action="session_created", context={"session_id": record.session_id})],
            unguarded,
        )
        return record

    def refuse_taken(self, session_id: str) -> None:
        """SessionAlreadyExistsError if the session has metadata; SessionCorruptedError if it
        cannot be read (a create then says what a reconnect would)."""
        if self.paths(session_id).meta.exists():
            self.load(session_id)
            raise SessionAlreadyExistsError(session_id)

    def load(self, session_id: str) -> SessionRecord:
        paths = self.paths(session_id)
        if not paths.root.is_dir():
            raise SessionNotFoundError(session_id)
        try:
            record = read_session_json(session_id, paths.session_json)
        except PermissionError as exc:
            raise SessionCorruptedError(
                session_id, str(paths.session_json), f"cannot be read ({exc.strerror})"
            ) from None
        if not self.node:
            return record
        # Files copied here from another node (`claudebox-pool sessions move`) still name that
        # node and its path: wherever a record is read from, that is where the session lives.
        return record.model_copy(update={"node": self.node, "workspace_path": str(paths.workspace)})

    def save(self, record: SessionRecord, guard: Guard) -> None:
        """Replace session.json atomically (temp file, fsync, rename) after the guard's check."""
        paths = self.paths(record.session_id)
        guard()
        on_disk = _fence_on_disk(paths.session_json)
        if on_disk > record.fence:
            raise LockLostError(record.session_id)
        data = record.model_dump_json(indent=2).encode()
        with self._disk_full(record.session_id, "session.json (the one before it stays)"):
            fd, tmp = tempfile.mkstemp(dir=paths.meta, prefix=".session.", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp, paths.session_json)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise

    def commit(self, record: SessionRecord, entries: list[HistoryEntry], guard: Guard) -> None:
        """Save a change to the session: session.json, then the history lines that tell it."""
        self.save(record, guard)
        self.append_history_many(record.session_id, entries, guard)

    def append_history(self, session_id: str, entry: HistoryEntry, guard: Guard) -> None:
        self.append_history_many(session_id, [entry], guard)

    def append_history_many(
        self, session_id: str, entries: list[HistoryEntry], guard: Guard
    ) -> None:
        """Append whole lines, or nothing: what a failed write (a full disk cuts a write short,
        then refuses the rest) put in the file is cut off again before the error is raised."""
        if not entries:
            return
        paths = self.paths(session_id)
        guard()
        data = "".join(entry.model_dump_json() + "\n" for entry in entries).encode()
        with self._disk_full(session_id, "history.jsonl (no part of the lines was kept)"):
            fd = os.open(paths.history, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                _repair_tail(fd, paths.history)
                start = os.fstat(fd).st_size
                try:
                    _write_all(fd, data)
                    os.fsync(fd)
                except OSError:
                    os.ftruncate(fd, start)
                    raise
            finally:
                os.close(fd)

    def _disk_full(self, session_id: str, what: str) -> AbstractContextManager[None]:
        return disk.full_as_error(self, f"session '{session_id}' could not write {what}")

    def history(self, session_id: str) -> list[HistoryEntry]:
        paths = self.paths(session_id)
        entries = []
        try:
            with paths.history.open(encoding="utf-8") as handle:
                for number, line in enumerate(handle, start=1):
                    if not line.strip():
                        continue
                    try:
                        entries.append(HistoryEntry.model_validate_json(line))
                    except ValidationError:
                        if not line.endswith("\n"):
                            break  # torn by a crash mid-write: the next append repairs it
                        raise SessionCorruptedError(
                            session_id, str(paths.history), f"has an unreadable line {number}"
                        ) from None
        except FileNotFoundError:
            return []
        return entries

    def recent_history(
        self, session_id: str, max_bytes: int, containing: str | None = None
    ) -> list[HistoryEntry]:
        """The entries in the last ``max_bytes`` of history.jsonl, without reading the rest
        (for checks on the per-task path, where a long history must not cost a full read).

        With ``containing`` (a task id), only the lines holding that text are parsed: looking
        for one task's entries then costs a scan of bytes, not a parse of every entry."""
        path = self.paths(session_id).history
        try:
            with path.open("rb") as handle:
                size = handle.seek(0, os.SEEK_END)
                handle.seek(max(0, size - max_bytes))
                tail = handle.read()
        except FileNotFoundError:
            return []
        needle = _as_in_json(containing) if containing is not None else b""
        if needle not in tail:
            return []
        lines = tail.splitlines()
        if size > max_bytes:
            lines = lines[1:]  # the first line of a cut tail is partial
        torn_at = len(lines) - 1 if not tail.endswith(b"\n") else None
        entries = []
        for index, line in enumerate(lines):
            if not line.strip() or needle not in line:
                continue
            try:
                entries.append(HistoryEntry.model_validate_json(line))
            except ValidationError:
                if index == torn_at:
                    break  # torn by a crash mid-write: the next append repairs it
                raise SessionCorruptedError(
                    session_id, str(path), "has an unreadable line near its end"
                ) from None
        return entries

    def check_workspace(self, session_id: str) -> Path:
        """The session's workspace, once the worker can list it (a link to a directory counts
        as one); SessionCorruptedError saying what is wrong with it otherwise."""
        workspace = self.paths(session_id).workspace
        try:
            with os.scandir(workspace):
                return workspace
        except FileNotFoundError:
            problem = "is a link to nothing" if workspace.is_symlink() else "is missing"
        except NotADirectoryError:
            problem = "is not a directory"
        except OSError as exc:  # PermissionError where the worker's user is not root
            problem = f"cannot be read by the worker's user ({exc.strerror})"
        raise SessionCorruptedError(session_id, str(workspace), problem)

    def remove(self, session_id: str, guard: Guard) -> None:
        """Delete the session directory; links inside it are removed, never followed."""
        paths = self.paths(session_id)
        guard()
        shutil.rmtree(paths.root, ignore_errors=False)


@functools.lru_cache(maxsize=1024)
def _paths(root: Path, session_id: str) -> SessionPaths:
    # Cached: a task asks for its session's paths a dozen times, and each asking built seven
    # Path objects.
    base = root / session_id
    meta = base / META_DIR
    return SessionPaths(
        root=base,
        workspace=base / "workspace",
        meta=meta,
        session_json=meta / "session.json",
        history=meta / "history.jsonl",
        agent_home=meta / "agent-home",
        checkpoints=meta / "checkpoints",
    )


def _as_in_json(text: str) -> bytes:
    """``text`` as it appears inside a JSON string of a history line, or b"" (which every line
    contains) for text that JSON would escape."""
    plain = text.isprintable() and '"' not in text and "\\" not in text
    return text.encode() if plain else b""


def _fence_on_disk(path: Path) -> int:
    try:
        value = json.loads(path.read_bytes()).get("fence", 0)
    except (OSError, ValueError, AttributeError):
        return 0
    return value if isinstance(value, int) else 0


def _write_all(fd: int, data: bytes) -> None:
    """``os.write`` until all of ``data`` is written: a write may take only part of it."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _repair_tail(fd: int, path: Path) -> None:
    """End the file after its last whole line: a last line without its newline is kept (with
    one added) if it is a whole entry, else cut off as torn."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return
    end = size
    while end > 0:
        start = max(0, end - TAIL_CHUNK)
        found = os.pread(fd, end - start, start).rfind(b"\n")
        if found >= 0:
            end = start + found + 1
            break
        end = start
    torn = os.pread(fd, size - end, end)
    try:
        HistoryEntry.model_validate_json(torn)
    except ValidationError:
        os.ftruncate(fd, end)
        log.warning("%s: cut a torn last line of %d bytes (a write cut short)", path, len(torn))
    else:
        _write_all(fd, b"\n")
