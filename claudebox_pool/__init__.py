"""claudebox-pool: ClaudeBox sessions served by a pool of Celery workers.

The public API is this package's names: ``from claudebox_pool import ClaudeBox,
SessionNotFoundError``. The contract both sides share is ``claudebox_pool.tasks``, what runs in a
worker ``claudebox_pool.workers``, what a user imports or types ``claudebox_pool.producer``.

Names are imported on first use, so that a worker, which imports ``claudebox_pool.workers``,
never loads the producer's modules.
"""

from __future__ import annotations

from importlib import import_module, metadata
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from claudebox_pool.producer.batch import Job, JobResult, submit
    from claudebox_pool.producer.canvas import QueuedJob, enqueue
    from claudebox_pool.producer.client import ClaudeBox
    from claudebox_pool.producer.live import CodeStream
    from claudebox_pool.producer.sessionpool import SessionPool
    from claudebox_pool.tasks.errors import (
        CheckpointNotFoundError,
        ClaudeBoxError,
        DiskFullError,
        InvalidRequestError,
        InvalidSessionIdError,
        InvalidSettingError,
        LockLostError,
        NodeUnavailableError,
        PoolUnavailableError,
        RuntimeUnavailableError,
        SandboxError,
        SessionAlreadyExistsError,
        SessionBusyError,
        SessionCorruptedError,
        SessionNotFoundError,
        TaskAttemptsExceededError,
        TaskFailedError,
        TaskNotFoundError,
        WrongNodeError,
    )
    from claudebox_pool.tasks.lifecycle import Checkpoint
    from claudebox_pool.tasks.models import (
        CleanupResult,
        CodeResult,
        HistoryEntry,
        SessionRecord,
        TokenUsage,
    )
    from claudebox_pool.tasks.streaming import StreamEvent
    from claudebox_pool.tasks.workspace_files import FileInfo, TransferResult

_ERRORS = "claudebox_pool.tasks.errors"
_HOMES: dict[str, str] = {
    "Job": "claudebox_pool.producer.batch",
    "JobResult": "claudebox_pool.producer.batch",
    "submit": "claudebox_pool.producer.batch",
    "QueuedJob": "claudebox_pool.producer.canvas",
    "enqueue": "claudebox_pool.producer.canvas",
    "ClaudeBox": "claudebox_pool.producer.client",
    "CodeStream": "claudebox_pool.producer.live",
    "SessionPool": "claudebox_pool.producer.sessionpool",
    "Checkpoint": "claudebox_pool.tasks.lifecycle",
    "CleanupResult": "claudebox_pool.tasks.models",
    "CodeResult": "claudebox_pool.tasks.models",
    "HistoryEntry": "claudebox_pool.tasks.models",
    "SessionRecord": "claudebox_pool.tasks.models",
    "TokenUsage": "claudebox_pool.tasks.models",
    "StreamEvent": "claudebox_pool.tasks.streaming",
    "FileInfo": "claudebox_pool.tasks.workspace_files",
    "TransferResult": "claudebox_pool.tasks.workspace_files",
    "CheckpointNotFoundError": _ERRORS,
    "ClaudeBoxError": _ERRORS,
    "DiskFullError": _ERRORS,
    "InvalidRequestError": _ERRORS,
    "InvalidSessionIdError": _ERRORS,
    "InvalidSettingError": _ERRORS,
    "LockLostError": _ERRORS,
    "NodeUnavailableError": _ERRORS,
    "PoolUnavailableError": _ERRORS,
    "RuntimeUnavailableError": _ERRORS,
    "SandboxError": _ERRORS,
    "SessionAlreadyExistsError": _ERRORS,
    "SessionBusyError": _ERRORS,
    "SessionCorruptedError": _ERRORS,
    "SessionNotFoundError": _ERRORS,
    "TaskAttemptsExceededError": _ERRORS,
    "TaskFailedError": _ERRORS,
    "TaskNotFoundError": _ERRORS,
    "WrongNodeError": _ERRORS,
}

__all__ = [
    "Checkpoint",
    "CheckpointNotFoundError",
    "ClaudeBox",
    "ClaudeBoxError",
    "CleanupResult",
    "CodeResult",
    "CodeStream",
    "DiskFullError",
    "FileInfo",
    "HistoryEntry",
    "InvalidRequestError",
    "InvalidSessionIdError",
    "InvalidSettingError",
    "Job",
    "JobResult",
    "LockLostError",
    "NodeUnavailableError",
    "PoolUnavailableError",
    "QueuedJob",
    "RuntimeUnavailableError",
    "SandboxError",
    "SessionAlreadyExistsError",
    "SessionBusyError",
    "SessionCorruptedError",
    "SessionNotFoundError",
    "SessionPool",
    "SessionRecord",
    "StreamEvent",
    "TaskAttemptsExceededError",
    "TaskFailedError",
    "TaskNotFoundError",
    "TokenUsage",
    "TransferResult",
    "WrongNodeError",
    "__version__",
    "enqueue",
    "submit",
]

try:
    __version__ = metadata.version("claudebox-pool")
except metadata.PackageNotFoundError:  # a checkout on sys.path without an install
    __version__ = "0+unknown"


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'claudebox_pool' has no attribute {name!r}")
    value = getattr(import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
