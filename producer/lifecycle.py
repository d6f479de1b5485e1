"""The producer's side of a session's lifecycle: checkpoints, forks, archives, disk usage.

``ClaudeBox.checkpoint``/``restore``/``checkpoints``/``fork`` and the CLI's ``sessions restore``
and ``sessions du`` call these. Each validates what it sends, then sends one task and waits as
long as a task may take: a lifecycle task can queue behind a whole ``code`` task for its
session's lock.
"""

from __future__ import annotations

from contextlib import closing
from typing import Any

from pydantic import BaseModel

from claudebox_pool.producer import pool
from claudebox_pool.tasks import names
from claudebox_pool.tasks.connections import sync_redis
from claudebox_pool.tasks.errors import InvalidRequestError, SessionNotFoundError
from claudebox_pool.tasks.lifecycle import (
    Checkpoint,
    CheckpointRequest,
    DiskUsage,
    ForkRequest,
    RestoreArchiveRequest,
    RestoreCheckpointRequest,
    RestoredArchive,
)
from claudebox_pool.tasks.models import (
    HistoryRequest,
    SessionRecord,
    SessionView,
    TrajectoryPage,
    TrajectoryRequest,
    TrajectoryTurn,
    validate_name,
    validate_session_id,
)
from claudebox_pool.tasks.registry import read_one


def template_of(session_id: str, template_session: str | None) -> str | None:
    """The validated template session of a new box ``session_id`` (None: none)."""
    if template_session is None:
        return None
    if validate_session_id(template_session) == session_id:
        raise InvalidRequestError(
            f"session '{session_id}' cannot be its own template; name another session"
        )
    return template_session


def validated_inputs(inputs: dict[str, str] | None) -> dict[str, str]:
    """``{input name: session id}``, each checked before anything is queued."""
    return {
        validate_name(name, "input name"): validate_session_id(source)
        for name, source in (inputs or {}).items()
    }


async def checkpoint(session_id: str, name: str, replace: bool = False) -> Checkpoint:
    request = CheckpointRequest(
        session_id=validate_session_id(session_id),
        name=validate_name(name, "checkpoint name"),
        replace=replace,
    )
    return Checkpoint.model_validate(await _call(names.CHECKPOINT, request))


async def restore(session_id: str, name: str) -> Checkpoint:
    request = RestoreCheckpointRequest(
        session_id=validate_session_id(session_id), name=validate_name(name, "checkpoint name")
    )
    return Checkpoint.model_validate(await _call(names.RESTORE_CHECKPOINT, request))


def registered(session_id: str) -> SessionRecord | None:
    """The session's registry entry, as any machine sees it (no disk is looked at)."""
    with closing(sync_redis(pool.settings())) as client, pool.map_redis_errors():
        return read_one(client, validate_session_id(session_id))


def checkpoints(session_id: str) -> list[str]:
    """The session's checkpoint names, oldest first, from the registry."""
    record = registered(session_id)
    if record is None:
        raise SessionNotFoundError(session_id)
    return list(record.checkpoints)


async def fork(source_session_id: str, new_session_id: str) -> SessionRecord:
    if validate_session_id(source_session_id) == validate_session_id(new_session_id):
        raise InvalidRequestError(
            f"cannot fork session '{source_session_id}' into itself; name a new session"
        )
    request = ForkRequest(source_session_id=source_session_id, session_id=new_session_id)
    return SessionRecord.model_validate(await _call(names.FORK, request))


async def restore_archive(archive: str) -> RestoredArchive:
    """``archive``: a file name in the archive directory, or a path to a file in it."""
    request = RestoreArchiveRequest(archive=archive)
    return RestoredArchive.model_validate(await _call(names.RESTORE_ARCHIVE, request))


async def trajectory(session_id: str) -> list[TrajectoryTurn]:
    """Every turn of the session's conversation, asked for one page at a time."""
    turns: list[TrajectoryTurn] = []
    offset: int | None = 0
    while offset is not None:
        request = TrajectoryRequest(session_id=validate_session_id(session_id), offset=offset)
        page = TrajectoryPage.model_validate(await _call(names.TRAJECTORY, request))
        turns.extend(page.turns)
        offset = page.next_offset
    return turns


async def view(session_id: str, limit: int | None = None) -> SessionView:
    """The session's record and last ``limit`` history entries (None: all), read on its node."""
    if limit is not None and limit < 0:
        raise InvalidRequestError(f"limit={limit} must be 0 or more")
    request = HistoryRequest(session_id=validate_session_id(session_id), limit=limit)
    return SessionView.model_validate(await _call(names.HISTORY, request))


async def disk_usage() -> DiskUsage:
    return DiskUsage.model_validate(await _call(names.DISK_USAGE, None))


async def _call(name: str, request: BaseModel | None) -> Any:
    await pool.ensure_workers()
    payload = request.model_dump(mode="json") if request is not None else {}
    # The visibility timeout bounds how long a message may wait and run: as long as we wait.
    return await pool.call(name, payload, timeout_s=pool.settings().visibility_timeout_s)
