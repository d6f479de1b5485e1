"""Session archives: one compressed file holding a whole session, written before a cleanup
(``cleanup_session(id, remove_workspace=True, archive=True)``, the age sweep) and brought back
by ``claudebox-pool sessions restore ARCHIVE``.

::

    <archive dir>/<session_id>-<UTC stamp>.tar.gz
        <session_id>/workspace/...       the files
        <session_id>/.claudebox/...      session.json, history.jsonl, agent home, checkpoints

Nothing outside the session gets in or out:

- writing, links are stored as links, never followed; a link leading out of its area (the
  workspace for a link in it, else the session; an absolute target always) is left out and
  logged, as are fifos and devices;
- restoring, the archive must lie in the archive directory and hold one session id's tree,
  extracted with tarfile's ``data`` filter (no absolute names, no ``..``, no links leading out,
  no devices, no setuid bits) into a staging directory that is renamed into place only whole.

A restore gives back the session byte for byte: files, session.json and history.jsonl as they
were archived (session.json is rewritten only if the sessions root has moved since, or the
session's sandbox uid went to another session meanwhile); the files belong to the session's uid.
"""

from __future__ import annotations

import logging
import os
import posixpath
import shutil
import tarfile
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from claudebox_pool.tasks.errors import InvalidRequestError, SessionAlreadyExistsError
from claudebox_pool.tasks.files import private_dir
from claudebox_pool.tasks.lifecycle import RestoredArchive
from claudebox_pool.tasks.models import SESSION_ID_PATTERN, SessionRecord, utc_now
from claudebox_pool.tasks.settings import Settings
from claudebox_pool.workers import disk, identity, registry
from claudebox_pool.workers.context import WorkerContext
from claudebox_pool.workers.lock import SessionLock
from claudebox_pool.workers.store import SessionStore

log = logging.getLogger(__name__)

SUFFIX = ".tar.gz"
COMPRESS_LEVEL = 6
"""gzip's own default: nearly the size of 9 at a fraction of the time."""


def write(settings: Settings, store: SessionStore, session_id: str) -> Path:
    """Archive the session into the archive directory; return the archive's path."""
    root = private_dir(settings.archives_root)
    stamp = utc_now().translate(str.maketrans("", "", "-:."))
    final = root / f"{session_id}-{stamp}{SUFFIX}"
    partial = root / f".{final.name}.partial"
    left_out: list[str] = []

    def keep(member: tarfile.TarInfo) -> tarfile.TarInfo | None:
        if member.isreg() or member.isdir() or member.islnk():
            return member
        if member.issym() and _stays_inside(session_id, member):
            return member
        left_out.append(member.name)
        return None

    try:
        with tarfile.open(partial, "w:gz", compresslevel=COMPRESS_LEVEL) as tar:
            tar.add(store.paths(session_id).root, arcname=session_id, filter=keep)
        with partial.open("rb") as handle:
            os.fsync(handle.fileno())
        os.rename(partial, final)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    if left_out:
        log.warning(
            "archive of %s leaves out links leading outside it and special files: %s",
            session_id,
            ", ".join(left_out),
        )
    log.info("archived session %s to %s", session_id, final)
    return final


@dataclass(frozen=True)
class Contents:
    """What an archive holds, read before anything is extracted."""

    path: Path
    session_id: str
    record: SessionRecord
    files: int
    bytes: int


def inspect(settings: Settings, store: SessionStore, archive: str) -> Contents:
    """Find ``archive`` in the archive directory and read what it holds; InvalidRequestError
    if it is not there or is not a session archive."""
    path = locate(settings, archive)
    try:
        with tarfile.open(path, "r:gz") as tar:
            members = tar.getmembers()
            tops = {member.name.split("/", 1)[0] for member in members}
            session_id = tops.pop() if len(tops) == 1 else ""
            if not SESSION_ID_PATTERN.fullmatch(session_id):
                raise _not_an_archive(path, "it does not hold exactly one session directory")
            metadata = store.paths(session_id).session_json.relative_to(store.root)
            try:
                handle = tar.extractfile(str(metadata))
            except KeyError:
                handle = None
            if handle is None:
                raise _not_an_archive(path, f"it has no {metadata}")
            record = SessionRecord.model_validate_json(handle.read())
    except (tarfile.TarError, OSError, EOFError, zlib.error, ValidationError) as exc:
        raise _not_an_archive(path, f"{type(exc).__name__}: {exc}") from None
    if record.session_id != session_id:
        raise _not_an_archive(path, f"its session.json is session '{record.session_id}'")
    files = [member for member in members if member.isreg()]
    return Contents(path, session_id, record, len(files), sum(each.size for each in files))


def locate(settings: Settings, archive: str) -> Path:
    root = settings.archives_root.resolve()
    candidate = Path(archive).expanduser() if "/" in archive else root / archive
    path = candidate.resolve()
    if not path.is_relative_to(root):
        raise InvalidRequestError(
            f"archive {archive} is not in the archive directory {root}; copy it there first "
            "(or point CLAUDEBOX_ARCHIVE_DIR at its directory)"
        )
    if not path.is_file():
        raise InvalidRequestError(f"no archive {path.name} in {root}; list them with `ls {root}`")
    return path


def restore(ctx: WorkerContext, contents: Contents, lock: SessionLock) -> RestoredArchive:
    """Bring the archived session back; the caller holds its lock."""
    store, session_id = ctx.store, contents.session_id
    paths = store.paths(session_id)
    if paths.root.exists():
        raise SessionAlreadyExistsError(session_id)
    disk.guard(
        ctx.settings,
        store,
        f"session '{session_id}' cannot be restored from {contents.path.name}",
        adding=contents.bytes,
    )
    private_dir(store.root)
    # A dotted name is never a session id: listings and sweeps pass it by.
    staging = store.root / f".restore-{session_id}-{uuid.uuid4().hex[:8]}"
    try:
        staging.mkdir()
        with tarfile.open(contents.path, "r:gz") as tar:
            tar.extractall(staging, filter="data")
        lock.check()
        # tarfile's data filter leaves directory modes out: the private ones get theirs back.
        for private in (paths.meta, paths.agent_home):
            restored = staging / private.relative_to(store.root)
            if restored.is_dir():
                restored.chmod(0o700)
        os.rename(staging / session_id, paths.root)
    except tarfile.FilterError as exc:
        raise _not_an_archive(contents.path, f"it holds an unsafe member ({exc})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    record = contents.record
    update: dict[str, object] = {}
    if record.workspace_path != str(paths.workspace):
        update["workspace_path"] = str(paths.workspace)
    if identity.enabled():
        # Extracted as the worker's own files: handed back to the session's uid (its old one
        # when no other session took it meanwhile).
        uid = identity.claim(ctx.settings, store, session_id, record.sandbox_uid)
        identity.hand_over(paths, uid)
        if uid != record.sandbox_uid:
            update["sandbox_uid"] = uid
    if update:
        record = record.model_copy(update={**update, "fence": lock.fence})
        store.save(record, lock.check)
    registry.put(ctx.redis, record)
    log.info("restored session %s from %s", session_id, contents.path)
    return RestoredArchive(
        session_id=session_id,
        archive=str(contents.path),
        files=contents.files,
        bytes=contents.bytes,
    )


def _stays_inside(session_id: str, member: tarfile.TarInfo) -> bool:
    """Whether a link's target, read from where the link is, stays in the link's area."""
    if posixpath.isabs(member.linkname):
        return False
    workspace = f"{session_id}/workspace"
    area = workspace if member.name.startswith(workspace + "/") else session_id
    target = posixpath.normpath(posixpath.join(posixpath.dirname(member.name), member.linkname))
    return target == area or target.startswith(area + "/")


def _not_an_archive(path: Path, why: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"{path} is not a claudebox session archive: {why}. Archives are written by "
        "`claudebox-pool sessions cleanup ID --archive`"
    )
