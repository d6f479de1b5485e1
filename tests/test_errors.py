"""The error tree: every error crosses the queue intact and tells the user what to do."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from claudebox_pool.tasks import errors as task_errors
from claudebox_pool.tasks.app import app
from claudebox_pool.tasks.errors import (
    AgentRunFailedError,
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

EXAMPLES: dict[type[ClaudeBoxError], ClaudeBoxError] = {
    ClaudeBoxError: ClaudeBoxError("something went wrong; see the worker's log"),
    InvalidSessionIdError: InvalidSessionIdError("my project"),
    InvalidRequestError: InvalidRequestError("the prompt is empty; say what the agent should do"),
    InvalidSettingError: InvalidSettingError(
        "CLAUDEBOX_LOCK_TTL_S='abc' (in the environment): Input should be a valid integer; "
        "correct or unset it"
    ),
    SessionNotFoundError: SessionNotFoundError("my-project"),
    SessionAlreadyExistsError: SessionAlreadyExistsError("my-project"),
    SessionCorruptedError: SessionCorruptedError(
        "my-project", "/home/u/.claudebox/sessions/my-project/.claudebox/session.json", "is missing"
    ),
    SessionBusyError: SessionBusyError("my-project", 600.25),
    LockLostError: LockLostError("my-project"),
    SandboxError: SandboxError("bwrap failed to start: no user namespaces"),
    RuntimeUnavailableError: RuntimeUnavailableError(
        "boxlite needs hardware virtualisation; use CLAUDEBOX_RUNTIME=bwrap"
    ),
    PoolUnavailableError: PoolUnavailableError(
        "no claudebox worker is running; start one with `claudebox-pool worker`"
    ),
    TaskFailedError: TaskFailedError("task 1 failed on the worker: KeyError: 'x'"),
    TaskAttemptsExceededError: TaskAttemptsExceededError("5f1c-task-id", 3),
    CheckpointNotFoundError: CheckpointNotFoundError("my-project", "phase1"),
    TaskNotFoundError: TaskNotFoundError("5f1c2a00-0000-0000-0000-000000000000"),
    DiskFullError: DiskFullError(
        "session 'my-project' cannot run a task: the sessions in /srv/sessions take 5000.0 MB, "
        "over the limit of 4000.0 MB (CLAUDEBOX_MAX_SESSIONS_BYTES)",
        {"big-data": 3_000_000_000, "my-project": 1_500_000_000},
    ),
    NodeUnavailableError: NodeUnavailableError("my-project", "host-b", 95.5),
    WrongNodeError: WrongNodeError("my-project", "host-b", "host-a"),
    AgentRunFailedError: AgentRunFailedError(
        "agent exited 1: exit code 1: boom",
        {"success": False, "exit_code": 1, "response": "partial\nanswer", "error": "boom"},
    ),
}

ADVICE: dict[type[ClaudeBoxError], list[str]] = {
    TaskNotFoundError: [
        "No task '5f1c2a00-0000-0000-0000-000000000000' is known",
        "`claudebox-pool tasks`",
    ],
    NodeUnavailableError: [
        "Session 'my-project' lives on node 'host-b'",
        "no heartbeat for 96s",
        "CLAUDEBOX_NODE_NAME=host-b",
        "claudebox-pool sessions move my-project --to NODE",
    ],
    WrongNodeError: [
        "Session 'my-project' lives on node 'host-b'",
        "reached node 'host-a'",
        "claudebox-pool sessions move my-project --to host-a",
    ],
    InvalidSessionIdError: ["'my project'", "a-z, A-Z, 0-9, '-' and '_'", "'web-api-server'"],
    SessionNotFoundError: [
        "Session 'my-project' not found",
        "ClaudeBox(session_id='my-project')",
        "claudebox-pool sessions list",
    ],
    SessionAlreadyExistsError: [
        "Session 'my-project' already exists",
        "ClaudeBox.reconnect('my-project')",
    ],
    SessionCorruptedError: [
        "/home/u/.claudebox/sessions/my-project/.claudebox/session.json is missing",
        "Restore it from a backup",
        "claudebox-pool sessions cleanup my-project --yes",
    ],
    SessionBusyError: ["Session 'my-project'", "600s", "CLAUDEBOX_LOCK_WAIT_S"],
    LockLostError: ["session 'my-project'", "CLAUDEBOX_LOCK_TTL_S", "Run it again"],
    TaskAttemptsExceededError: ["5f1c-task-id", "3 times", "CLAUDEBOX_MAX_ATTEMPTS"],
    CheckpointNotFoundError: ["Checkpoint 'phase1'", "session 'my-project'", "box.checkpoints()"],
    DiskFullError: [
        "session 'my-project' cannot run a task",
        "big-data (3000.0 MB), my-project (1500.0 MB)",
        "claudebox-pool sessions cleanup ID --yes",
        "claudebox-pool sessions du",
    ],
}
"""For errors that compose their own message: what it must name, and what it tells to do."""


def error_classes() -> set[type[BaseException]]:
    return {
        cls
        for _, cls in inspect.getmembers(task_errors, inspect.isclass)
        if issubclass(cls, BaseException) and cls.__module__ == task_errors.__name__
    }


def through_the_result_backend(exc: BaseException) -> Any:
    """What a producer gets back for ``exc`` raised in a task: stored as JSON, then rebuilt."""
    backend = app.backend
    stored = backend.encode(backend.prepare_exception(exc))
    return backend.exception_to_python(backend.decode(stored))


def test_every_error_class_has_an_example() -> None:
    assert error_classes() == set(EXAMPLES)


def test_every_error_descends_from_claudebox_error() -> None:
    assert all(issubclass(cls, ClaudeBoxError) for cls in error_classes())


def test_the_module_docstring_draws_every_error_in_the_tree() -> None:
    doc = task_errors.__doc__ or ""

    assert [cls.__name__ for cls in error_classes() if cls.__name__ not in doc] == []


def test_invalid_session_id_and_invalid_request_are_also_value_errors() -> None:
    assert issubclass(InvalidSessionIdError, ValueError)
    assert issubclass(InvalidRequestError, ValueError)


@pytest.mark.parametrize("exc", list(EXAMPLES.values()), ids=lambda e: type(e).__name__)
def test_error_round_trips_through_the_json_result_backend(exc: ClaudeBoxError) -> None:
    restored = through_the_result_backend(exc)

    assert type(restored) is type(exc)
    assert str(restored) == str(exc)
    assert restored.args == exc.args


@pytest.mark.parametrize("cls", list(ADVICE), ids=lambda c: c.__name__)
def test_error_message_names_the_subject_and_says_what_to_do(
    cls: type[ClaudeBoxError],
) -> None:
    message = str(through_the_result_backend(EXAMPLES[cls]))

    assert [part for part in ADVICE[cls] if part not in message] == []


def test_invalid_session_id_message_shortens_a_very_long_id() -> None:
    message = str(InvalidSessionIdError("x" * 10_000))

    assert len(message) < 300
    assert "x" * 57 + "..." in message


@pytest.mark.parametrize("exc", list(EXAMPLES.values()), ids=lambda e: type(e).__name__)
def test_error_keeps_its_fields_through_the_result_backend(exc: ClaudeBoxError) -> None:
    restored = through_the_result_backend(exc)

    assert vars(restored) == vars(exc)


def test_the_readme_shows_the_same_error_tree_as_the_module() -> None:
    import re
    from pathlib import Path

    from claudebox_pool.tasks import errors as task_errors

    doc = task_errors.__doc__ or ""
    found = re.search(r"::\n\n((?:    .*\n)+)", doc)
    assert found is not None
    tree = "\n".join(line[4:] for line in found.group(1).rstrip("\n").split("\n"))
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert f"```\n{tree}\n```" in readme


def test_a_failed_run_shows_monitors_only_its_one_line_summary() -> None:
    exc = AgentRunFailedError("agent exited 2: timed out after 5s", {"raw_output": "x" * 5000})

    assert repr(exc) == "AgentRunFailedError('agent exited 2: timed out after 5s')"
    assert str(exc) == "agent exited 2: timed out after 5s"
