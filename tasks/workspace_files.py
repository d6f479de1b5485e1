"""The files API's payloads and results: paths relative to a session's workspace.

A path is checked here twice over: lexically on both sides (absolute, or with ``..``: refused
before anything is queued), and by the worker as it resolves it on disk, where a symbolic link
that leads out of the workspace is refused too (:mod:`workers.workspace_files`).
"""

from __future__ import annotations

import time
from pathlib import PurePosixPath
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from claudebox_pool.tasks.errors import InvalidRequestError
from claudebox_pool.tasks.models import IsoTime, SessionId

MAX_PATH_CHARS = 4096


def workspace_path(path: object) -> str:
    """``path`` in its plain form ("." for the workspace itself), if it names something inside
    the workspace; else InvalidRequestError."""
    if not isinstance(path, str) or not path or "\0" in path or len(path) > MAX_PATH_CHARS:
        raise InvalidRequestError(
            f"{str(path)[:80]!r} is not a workspace path: give a path relative to the "
            "workspace, e.g. 'src/app.py' or '.'"
        )
    pure = PurePosixPath(path)
    if pure.is_absolute() or ".." in pure.parts:
        raise InvalidRequestError(
            f"{path[:200]!r} leaves the session's workspace: give a path relative to the "
            "workspace, without '..' (e.g. 'src/app.py')"
        )
    return str(pure)


WorkspacePath = Annotated[str, AfterValidator(workspace_path)]
TransferToken = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileRequest(_Message):
    """Read, write, list or remove ``path``; a read or write streams through ``token``."""

    session_id: SessionId
    path: WorkspacePath
    token: TransferToken | None = None
    size: int | None = Field(
        default=None,
        ge=0,
        description="Bytes a write brings, where the producer knows: checked against the "
        "disk's limits before anything is written.",
    )
    enqueued_at: float = Field(default_factory=time.time)


class TreeRequest(_Message):
    """Upload a tar stream into directory ``path``, or download ``path`` as one."""

    session_id: SessionId
    path: WorkspacePath = "."
    token: TransferToken
    modified_since: float | None = Field(
        default=None,
        description="Download only files modified at or after this time (epoch seconds, "
        "the worker's clock).",
    )
    since_task: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="Download only files modified since the run of this code task started "
        "(read from the session's history, so on the clock that stamped the files).",
    )
    enqueued_at: float = Field(default_factory=time.time)


class FileInfo(BaseModel):
    """One entry of a workspace directory; a symbolic link is listed as itself."""

    model_config = ConfigDict(frozen=True)

    name: str
    path: str = Field(description="Relative to the workspace.")
    is_dir: bool
    size: int
    modified: IsoTime = Field(description="Last modification, UTC.")
    is_symlink: bool = False


class FileListing(BaseModel):
    entries: list[FileInfo]


class TransferResult(BaseModel):
    """What a transfer task reports once its side is done."""

    files: int = 0
    bytes: int = 0
    skipped: list[str] = Field(
        default_factory=list, description="Members left out: links or paths leading out."
    )
