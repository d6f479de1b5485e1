"""The errors a user of claudebox-pool can meet, one tree with one root.

::

    ClaudeBoxError
    ├── InvalidSessionIdError        a session id breaks the naming rules (also a ValueError)
    ├── InvalidRequestError          a prompt or option is refused before it is queued
    ├── InvalidSettingError          a CLAUDEBOX_* variable holds a value its setting refuses
    ├── SessionNotFoundError         no session by that id
    ├── SessionAlreadyExistsError    creating a session whose id is taken
    ├── SessionCorruptedError        session.json or the workspace is missing or unreadable
    ├── SessionBusyError             another task held the session past the wait deadline
    ├── CheckpointNotFoundError      no checkpoint by that name in the session
    ├── TaskNotFoundError            no task by that id was sent, or it is forgotten
    ├── DiskFullError                the sessions root is over its size limit or the disk is full
    ├── LockLostError                a task lost its session lock; its writes were refused
    ├── SandboxError                 the sandbox could not be started or run
    │   └── RuntimeUnavailableError  the configured runtime cannot run on this host
    ├── WrongNodeError               a task reached a node that does not hold its session
    ├── PoolUnavailableError         Redis cannot be reached, or no worker is running
    │   └── NodeUnavailableError     the node holding a session's files is gone
    ├── TaskFailedError              the worker failed the task for a reason of its own
    │   └── TaskAttemptsExceededError  the task was delivered too often (it kills workers)
    └── AgentRunFailedError          a code task's agent run failed; carries its CodeResult
                                     (the producer returns that result, never raises this)

Every error crosses the queue intact: a worker raises it, Celery stores its type, module and
constructor arguments, and the producer re-raises the same class. So each constructor takes
plain values only, and ``args`` holds exactly them.
"""

from __future__ import annotations

from typing import Any


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


class InvalidSettingError(ClaudeBoxError, ValueError):
    """A ``CLAUDEBOX_*`` variable (in the environment or ``.env``) holds a value its setting
    refuses; the message names each such variable, what is wrong and where it was read."""


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
            f"Session '{self.session_id}' is corrupted: {self.path} {self.problem}. Restore it "
            f"from a backup, or remove the session with "
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


class NodeUnavailableError(PoolUnavailableError):
    """``silent_s`` is how long the node has sent no heartbeat; None if it never sent one."""

    def __init__(self, session_id: str, node: str, silent_s: float | None) -> None:
        Exception.__init__(self, session_id, node, silent_s)
        self.session_id = session_id
        self.node = node
        self.silent_s = silent_s

    def __str__(self) -> str:
        silence = (
            "has no worker on record"
            if self.silent_s is None
            else f"has sent no heartbeat for {self.silent_s:.0f}s"
        )
        return (
            f"Session '{self.session_id}' lives on node '{self.node}', which {silence} "
            "(CLAUDEBOX_NODE_GRACE_S); its files are only there, so its tasks run nowhere else. "
            f"Start a worker with CLAUDEBOX_NODE_NAME={self.node}, or copy the session's "
            "directory to another node and run "
            f"`claudebox-pool sessions move {self.session_id} --to NODE`"
        )


class WrongNodeError(ClaudeBoxError):
    def __init__(self, session_id: str, node: str, here: str) -> None:
        Exception.__init__(self, session_id, node, here)
        self.session_id = session_id
        self.node = node
        self.here = here

    def __str__(self) -> str:
        return (
            f"Session '{self.session_id}' lives on node '{self.node}', but this task reached "
            f"node '{self.here}', which does not hold its files; the task was refused. Send "
            "tasks through ClaudeBox or claudebox-pool, which route them to the session's node "
            f"(or, if its files were copied here, `claudebox-pool sessions move "
            f"{self.session_id} --to {self.here}`)"
        )


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


class AgentRunFailedError(ClaudeBoxError):
    """How a ``code`` task whose agent run failed ends: as a failed task, so that monitors
    (Flower's Failed filter, its ``task-failed`` counts) see the failure. ``result`` is the
    run's CodeResult as JSON; the producer gives it back to the caller as the call's result.

    ``str`` and ``repr`` are the one-line ``summary``: they are what Flower and the worker's
    log show, and the result's output stays out of both."""

    def __init__(self, summary: str, result: dict[str, Any]) -> None:
        Exception.__init__(self, summary, result)
        self.summary = summary
        self.result = result

    def __str__(self) -> str:
        return self.summary

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.summary!r})"


class CheckpointNotFoundError(ClaudeBoxError):
    def __init__(self, session_id: str, name: str) -> None:
        Exception.__init__(self, session_id, name)
        self.session_id = session_id
        self.name = name

    def __str__(self) -> str:
        return (
            f"Checkpoint '{self.name}' not found in session '{self.session_id}'; list its "
            "checkpoints with box.checkpoints(), or make one with await box.checkpoint(name)"
        )


class TaskNotFoundError(ClaudeBoxError):
    def __init__(self, task_id: str) -> None:
        Exception.__init__(self, task_id)
        self.task_id = task_id

    def __str__(self) -> str:
        return (
            f"No task '{self.task_id}' is known: none was sent by that id, or it ended longer "
            "ago than CLAUDEBOX_RESULT_TTL_S; list recent ones with `claudebox-pool tasks`"
        )


class DiskFullError(ClaudeBoxError):
    """``largest`` maps the sessions using the most space to their size in bytes, largest first."""

    def __init__(self, problem: str, largest: dict[str, int]) -> None:
        Exception.__init__(self, problem, largest)
        self.problem = problem
        self.largest = largest

    def __str__(self) -> str:
        shown = ", ".join(f"{sid} ({size / 1e6:.1f} MB)" for sid, size in self.largest.items())
        return (
            f"{self.problem}. Largest sessions: {shown or 'none'}. Free space with "
            "`claudebox-pool sessions cleanup ID --yes` (`--archive` keeps a compressed copy; "
            "`claudebox-pool sessions du` lists them all), or raise CLAUDEBOX_MAX_SESSIONS_BYTES "
            "or lower CLAUDEBOX_MIN_FREE_BYTES"
        )
