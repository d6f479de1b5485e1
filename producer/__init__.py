"""claudebox-pool for producers: ``from producer import ClaudeBox, SessionNotFoundError``.

Batches are ``await producer.submit(jobs)`` (or ``enqueue`` to send and not wait), parallel
work is ``SessionPool``, and ``box.stream(prompt)`` / ``box.cancel()`` watch and stop a call.
"""

from producer.batch import Job, JobResult, submit
from producer.canvas import QueuedJob, enqueue
from producer.client import ClaudeBox
from producer.live import CodeStream
from producer.sessionpool import SessionPool
from tasks.errors import (
    CheckpointNotFoundError,
    ClaudeBoxError,
    DiskFullError,
    InvalidRequestError,
    InvalidSessionIdError,
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
    WrongNodeError,
)
from tasks.lifecycle import Checkpoint
from tasks.models import CleanupResult, CodeResult, SessionRecord
from tasks.streaming import StreamEvent

__all__ = [
    "Checkpoint",
    "CheckpointNotFoundError",
    "ClaudeBox",
    "ClaudeBoxError",
    "CleanupResult",
    "CodeResult",
    "CodeStream",
    "DiskFullError",
    "InvalidRequestError",
    "InvalidSessionIdError",
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
    "WrongNodeError",
    "enqueue",
    "submit",
]
