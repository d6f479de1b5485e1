"""What crosses the queue for a session's lifecycle: checkpoints, forks, archives, sweeps, disk.

Kept apart from :mod:`tasks.models` (the payloads of every ``code`` call) because none of this
is on the hot path; the same rules hold: validated on both sides, plain JSON.
"""

from __future__ import annotations

import time

from pydantic import BaseModel, ConfigDict, Field

from claudebox_pool.tasks.models import CheckpointName, SessionId


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Result(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CheckpointRequest(_Message):
    """Snapshot the workspace as ``name``; with ``replace`` an existing one of that name goes."""

    session_id: SessionId
    name: CheckpointName
    replace: bool = False
    enqueued_at: float = Field(default_factory=time.time)


class RestoreCheckpointRequest(_Message):
    session_id: SessionId
    name: CheckpointName
    enqueued_at: float = Field(default_factory=time.time)


class Checkpoint(_Result):
    """One checkpoint of a session, and how its files were stored.

    ``linked`` files share their data with the previous checkpoint (unchanged since), ``cloned``
    ones with the workspace through a copy-on-write clone; ``copied`` ones were written anew.
    """

    name: str
    created_at: str
    files: int
    bytes: int
    linked: int = 0
    cloned: int = 0
    copied: int = 0
    skipped: list[str] = Field(default_factory=list)


class ForkRequest(_Message):
    source_session_id: SessionId
    session_id: SessionId
    enqueued_at: float = Field(default_factory=time.time)


class RestoreArchiveRequest(_Message):
    """``archive``: a file name in the archive directory, or a path to a file in it."""

    archive: str = Field(min_length=1, max_length=4096)
    enqueued_at: float = Field(default_factory=time.time)


class RestoredArchive(_Result):
    session_id: str
    archive: str
    files: int
    bytes: int


class SweepRequest(_Message):
    """What beat sends: the interval it fires the sweep at."""

    every_s: float = Field(gt=0)
    every_node: bool = False
    """Also send it on to every other live node, each of which sweeps its own sessions root."""


class ReindexRequest(_Message):
    """A registry rebuild: this node's sessions root, or every node's (``every_node``)."""

    every_node: bool = False


class SweptSession(_Result):
    session_id: str
    reason: str
    archive: str | None = None


class SweepReport(_Result):
    """One run of a sweep: what it removed and why, and what it left alone and why."""

    sweep: str
    started_at: str
    finished_at: str = ""
    removed: list[SweptSession] = Field(default_factory=list)
    skipped: list[SweptSession] = Field(default_factory=list)
    sandboxes_removed: list[str] = Field(default_factory=list)


class SessionUsage(_Result):
    session_id: str
    bytes: int
    files: int


def megabytes(size: int) -> str:
    """Sizes as DiskFullError and `claudebox-pool sessions du` show them (decimal MB)."""
    return f"{size / 1e6:.1f} MB"


class DiskUsage(_Result):
    """The sessions root: sessions largest first, the disk's free space and the limits."""

    root: str
    total_bytes: int
    free_bytes: int
    max_sessions_bytes: int | None
    min_free_bytes: int
    sessions: list[SessionUsage]
