"""Each session's own unprivileged host identity, given by a worker that runs as root.

A root worker gives every session a uid, and the gid of the same number, from the range
``CLAUDEBOX_SANDBOX_UID_BASE`` + ``CLAUDEBOX_SANDBOX_UID_COUNT``: the session's sandboxes run as
it (:mod:`workers.runtimes.launch`) and its workspace and agent home belong to it, so that two
sessions cannot touch each other's files, even from outside a sandbox. The uid is recorded in
session.json; which session holds which uid is told by the disk, one link per uid in
``<sessions root>/.sandbox-uids/`` naming its session (``symlink`` fails when the name exists, so
two workers never take one uid). A link whose session is gone, or records another uid, is free.

A worker that is not root cannot switch users: its sessions get none and run as its own user.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import time
from collections.abc import Iterator
from pathlib import Path

from claudebox_pool.tasks.errors import SandboxError
from claudebox_pool.tasks.files import private_dir
from claudebox_pool.tasks.models import SessionRecord
from claudebox_pool.tasks.settings import Settings
from claudebox_pool.workers.runtimes.base import Identity
from claudebox_pool.workers.store import Guard, SessionPaths, SessionStore

CLAIMS_DIR = ".sandbox-uids"
CLAIM_ATTEMPTS = 3
CLAIM_SETTLE_S = 60
"""A claim younger than this is never taken for stale: its session may be being created."""


def enabled() -> bool:
    """Whether this worker gives sessions identities of their own (only root can switch)."""
    return os.geteuid() == 0


def of(record: SessionRecord) -> Identity | None:
    """The identity the session's sandboxes run as (None: the worker's own user)."""
    if record.sandbox_uid is None or not enabled():
        return None
    return Identity(record.sandbox_uid, record.sandbox_uid)


def claim(
    settings: Settings, store: SessionStore, session_id: str, wanted: int | None = None
) -> int:
    """A uid of the range for ``session_id``: ``wanted`` if it is free or already the
    session's, else the next free one after the highest taken; SandboxError if none is."""
    base, count = settings.sandbox_uid_base, settings.sandbox_uid_count
    for _ in range(CLAIM_ATTEMPTS):
        claims = private_dir(store.root / CLAIMS_DIR)
        try:
            preferred = [wanted] if wanted is not None and base <= wanted < base + count else []
            for uid in itertools.chain(preferred, _candidates(claims, base, count)):
                if _take(store, claims, uid, session_id):
                    return uid
        except FileNotFoundError:
            continue  # the directory was removed as it emptied (release): made again
        break
    raise SandboxError(
        f"session '{session_id}' cannot get a sandbox uid: all {count} uids from "
        f"CLAUDEBOX_SANDBOX_UID_BASE={base} are held by sessions; remove sessions "
        "(`claudebox-pool sessions cleanup`) or raise CLAUDEBOX_SANDBOX_UID_COUNT"
    )


def release(store: SessionStore, record: SessionRecord) -> None:
    """Give back the uid of a session whose files are gone (the claims' directory too, once
    empty: an emptied sessions root holds nothing)."""
    if record.sandbox_uid is None or _holder(store, record.sandbox_uid) != record.session_id:
        return
    claims = store.root / CLAIMS_DIR
    with contextlib.suppress(FileNotFoundError):
        (claims / str(record.sandbox_uid)).unlink()
    with contextlib.suppress(OSError):  # not empty, or gone already
        claims.rmdir()


def ensure(
    settings: Settings, store: SessionStore, record: SessionRecord, guard: Guard
) -> SessionRecord:
    """The session's record with a uid it holds on this sessions root. A session without one
    (session.json of an older version, an archive restored, files moved from another node)
    gets one, and its workspace and agent home are handed to it; session.json is saved."""
    if not enabled():
        return record
    if record.sandbox_uid is not None and _holder(store, record.sandbox_uid) == record.session_id:
        return record
    guard()
    uid = claim(settings, store, record.session_id, record.sandbox_uid)
    hand_over(store.paths(record.session_id), uid)
    record = record.model_copy(update={"sandbox_uid": uid})
    store.save(record, guard)
    return record


def hand_over(paths: SessionPaths, uid: int) -> None:
    """Give the workspace and agent home, and all they hold, to ``uid``; links are changed,
    never followed. A chown by root clears setuid and setgid bits."""
    for top in (paths.workspace, paths.agent_home):
        for path in _tree(top):
            os.chown(path, uid, uid, follow_symlinks=False)


def _tree(top: Path) -> Iterator[str]:
    if not top.exists() and not top.is_symlink():
        return
    yield str(top)
    for directory, dirs, files in os.walk(top):
        for name in itertools.chain(dirs, files):
            yield os.path.join(directory, name)


def _candidates(claims: Path, base: int, count: int) -> Iterator[int]:
    taken = [int(name) for name in os.listdir(claims) if name.isdigit()]
    start = max((uid + 1 for uid in taken if base <= uid < base + count), default=base)
    if start >= base + count:
        start = base
    return itertools.chain(range(start, base + count), range(base, start))


def _holder(store: SessionStore, uid: int) -> str | None:
    try:
        return os.readlink(store.root / CLAIMS_DIR / str(uid))
    except OSError:
        return None


def _take(store: SessionStore, claims: Path, uid: int, session_id: str) -> bool:
    link = claims / str(uid)
    try:
        os.symlink(session_id, link)
    except FileExistsError:
        pass
    else:
        return True
    holder = _holder(store, uid)
    if holder == session_id:
        return True
    if holder is None or not _stale(store, link, holder, uid):
        return False
    # Two workers may find the same stale claim: the directory's lock lets one replace it.
    fd = os.open(claims, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if _holder(store, uid) != holder:
            return False
        link.unlink()
        with contextlib.suppress(FileExistsError):
            os.symlink(session_id, link)
        return _holder(store, uid) == session_id
    finally:
        os.close(fd)


def _stale(store: SessionStore, link: Path, holder: str, uid: int) -> bool:
    try:
        if time.time() - link.lstat().st_mtime < CLAIM_SETTLE_S:
            return False
        paths = store.paths(holder)
    except (OSError, ValueError):
        return True
    if not paths.root.exists():
        return True
    try:
        recorded = SessionRecord.model_validate_json(paths.session_json.read_bytes()).sandbox_uid
    except (OSError, ValueError):
        return False  # being made, or corrupted: keep its uid until it is removed
    return recorded is not None and recorded != uid
