"""claudebox-pool for producers: ``from producer import ClaudeBox, SessionNotFoundError``."""

from producer.client import ClaudeBox
from tasks.errors import (
    ClaudeBoxError,
    InvalidRequestError,
    InvalidSessionIdError,
    LockLostError,
    PoolUnavailableError,
    RuntimeUnavailableError,
    SandboxError,
    SessionAlreadyExistsError,
    SessionBusyError,
    SessionCorruptedError,
    SessionNotFoundError,
    TaskAttemptsExceededError,
    TaskFailedError,
)
from tasks.models import CleanupResult, CodeResult, SessionRecord

__all__ = [
    "ClaudeBox",
    "ClaudeBoxError",
    "CleanupResult",
    "CodeResult",
    "InvalidRequestError",
    "InvalidSessionIdError",
    "LockLostError",
    "PoolUnavailableError",
    "RuntimeUnavailableError",
    "SandboxError",
    "SessionAlreadyExistsError",
    "SessionBusyError",
    "SessionCorruptedError",
    "SessionNotFoundError",
    "SessionRecord",
    "TaskAttemptsExceededError",
    "TaskFailedError",
]
