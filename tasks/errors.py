"""The errors a user of claudebox-pool can meet, one tree with one root.

::

    ClaudeBoxError
    ├── InvalidSessionIdError        a session id breaks the naming rules (also a ValueError)
    ├── InvalidRequestError          a prompt or option is refused before it is queued
    ├── SessionNotFoundError         no session by that id
    ├── SessionAlreadyExistsError    creating a session whose id is taken
    ├── SessionCorruptedError        session.json is missing or unreadable
    ├── SessionBusyError             another task held the session past the wait deadline
    ├── LockLostError                a task lost its session lock; its writes were refused
    ├── SandboxError                 the sandbox could not be started or run
    │   └── RuntimeUnavailableError  the configured runtime cannot run on this host
    ├── PoolUnavailableError         Redis cannot be reached, or no worker is running
    └── TaskFailedError              the worker failed the task for a reason of its own
        └── TaskAttemptsExceededError  the task was delivered too often (it kills workers)

Every error crosses the queue intact: a worker raises it, Celery stores its type, module and
constructor arguments, and the producer re-raises the same class. So each constructor takes
plain values only, and ``args`` holds exactly them.
"""

from __future__ import annotations


class ClaudeBoxError(Exception):
    """Root of every claudebox-pool error. ``str(error)`` says what happened and what to do."""

    def __init__(self, message: str) -> None:
        super().__init__(message)

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else self.__class__.__name__


class InvalidSessionIdError(ClaudeBoxError, ValueError):
    def __init__(self, session_id: str) -> None:
        Exception.__init__(self, session_id)
        self.session_id = session_id

    def __str__(self) -> str:
        shown = self.session_id if len(self.session_id) <= 60 else self.session_id[:57] + "..."
        return (
            f"Invalid session id {shown!r}: use 1 to 255 characters from a-z, A-Z, 0-9, "
            "'-' and '_' (no spaces, dots or slashes), e.g. 'web-api-server'"
        )


class InvalidRequestError(ClaudeBoxError, ValueError):
    """A prompt or option was refused before anything was queued; the message says which."""


class SessionNotFoundError(ClaudeBoxError):
    def __init__(self, session_id: str) -> None:
        Exception.__init__(self, session_id)
        self.session_id = session_id

    def __str__(self) -> str:
        return (
            f"Session '{self.session_id}' not found. Create it with "
            f"ClaudeBox(session_id='{self.session_id}'), or list sessions with "
            "`claudebox-pool sessions list`"
        )


class SessionAlreadyExistsError(ClaudeBoxError):
    def __init__(self, session_id: str) -> None:
        Exception.__init__(self, session_id)
        self.session_id = session_id

    def __str__(self) -> str:
        return (
            f"Session '{self.session_id}' already exists; continue it with "
            f"ClaudeBox.reconnect('{self.session_id}')"
        )


class SessionCorruptedError(ClaudeBoxError):
    def __init__(self, session_id: str, path: str, problem: str) -> None:
        Exception.__init__(self, session_id, path, problem)
        self.session_id = session_id
        self.path = path
        self.problem = problem

    def __str__(self) -> str:
        return (
            f"Session '{self.session_id}' is corrupted: {self.path} {self.problem}. Restore the "
            f"file from a backup, or remove the session with "
            f"`claudebox-pool sessions cleanup {self.session_id} --yes`"
        )


class SessionBusyError(ClaudeBoxError):
    def __init__(self, session_id: str, waited_s: float) -> None:
        Exception.__init__(self, session_id, waited_s)
        self.session_id = session_id
        self.waited_s = waited_s

    def __str__(self) -> str:
        return (
            f"Session '{self.session_id}' stayed busy with another task for "
            f"{self.waited_s:.0f}s; try again later or raise CLAUDEBOX_LOCK_WAIT_S"
        )


class LockLostError(ClaudeBoxError):
    def __init__(self, session_id: str) -> None:
        Exception.__init__(self, session_id)
        self.session_id = session_id

    def __str__(self) -> str:
        return (
            f"The lock on session '{self.session_id}' was lost mid-task (the worker stalled "
            "past CLAUDEBOX_LOCK_TTL_S); this task's writes were refused. Run it again"
        )


class SandboxError(ClaudeBoxError):
    """The sandbox could not be started or run; the message names the runtime and cause."""


class RuntimeUnavailableError(SandboxError):
    """The configured runtime cannot run here; the message says why and what to install."""


class PoolUnavailableError(ClaudeBoxError):
    """Redis cannot be reached or no worker is running; the message says how to start one."""


class TaskFailedError(ClaudeBoxError):
    """The worker failed the task for a reason of its own (see the worker's log)."""


class TaskAttemptsExceededError(TaskFailedError):
    def __init__(self, task_id: str, attempts: int) -> None:
        Exception.__init__(self, task_id, attempts)
        self.task_id = task_id
        self.attempts = attempts

    def __str__(self) -> str:
        return (
            f"Task {self.task_id} was delivered {self.attempts} times and its worker died each "
            "time; it is failed instead of requeued again (CLAUDEBOX_MAX_ATTEMPTS)"
        )
