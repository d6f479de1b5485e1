"""The ``claudebox-pool`` command.

Every command exits with the same codes, one per case a script handles differently (the README
lists them): 0 done; 1 the work ran and failed (an agent's non-zero exit, a failed job); 2 a
usage mistake; 3 the pool cannot be reached; 4 the session's state forbids it now (busy,
corrupted, disk full); 5 the pool failed the task; 130 interrupted. ``EXIT_CODES`` maps the error
tree onto them by base class, so an error added under a base gets its base's code. A user
mistake is one line on stderr, never a traceback.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

import claudebox_pool
from claudebox_pool.tasks.app import app as celery_app
from claudebox_pool.tasks.errors import (
    AgentRunFailedError,
    CheckpointNotFoundError,
    ClaudeBoxError,
    DiskFullError,
    InvalidRequestError,
    InvalidSessionIdError,
    InvalidSettingError,
    LockLostError,
    PoolUnavailableError,
    RuntimeUnavailableError,
    SandboxError,
    SessionAlreadyExistsError,
    SessionBusyError,
    SessionCorruptedError,
    SessionNotFoundError,
    TaskFailedError,
    TaskNotFoundError,
    WrongNodeError,
)
from claudebox_pool.tasks.settings import CLAUDE_CLI_VERSION, unknown_variables

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_SESSION_STATE = 4
EXIT_TASK_FAILED = 5
EXIT_INTERRUPTED = 130

EXIT_CODES: dict[type[ClaudeBoxError], int] = {
    # An error no entry below names (a new one straight under the root) is the pool's failure.
    ClaudeBoxError: EXIT_TASK_FAILED,
    InvalidSessionIdError: EXIT_USAGE,
    InvalidRequestError: EXIT_USAGE,
    InvalidSettingError: EXIT_USAGE,
    SessionNotFoundError: EXIT_USAGE,
    SessionAlreadyExistsError: EXIT_USAGE,
    CheckpointNotFoundError: EXIT_USAGE,
    TaskNotFoundError: EXIT_USAGE,
    PoolUnavailableError: EXIT_UNAVAILABLE,
    # A worker that cannot run its configured sandbox cannot serve anything.
    RuntimeUnavailableError: EXIT_UNAVAILABLE,
    SessionBusyError: EXIT_SESSION_STATE,
    SessionCorruptedError: EXIT_SESSION_STATE,
    DiskFullError: EXIT_SESSION_STATE,
    WrongNodeError: EXIT_SESSION_STATE,
    TaskFailedError: EXIT_TASK_FAILED,
    # Only met by raw Celery clients: the producer returns the run's result instead.
    AgentRunFailedError: EXIT_FAILED,
    LockLostError: EXIT_TASK_FAILED,
    SandboxError: EXIT_TASK_FAILED,
}
"""The exit code of each error: its own class's entry, else its nearest base's."""


def exit_code_for(kind: type[ClaudeBoxError]) -> int:
    return next(EXIT_CODES[base] for base in kind.__mro__ if base in EXIT_CODES)


cli = typer.Typer(
    name="claudebox-pool",
    help="ClaudeBox sessions served by a pool of Celery workers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Plain help (click's): rich's would label every flag `<bool>` as if it took a value.
    rich_markup_mode=None,
    # Sub-commands inherit these from the root's context.
    context_settings={"help_option_names": ["-h", "--help"]},
)
sessions_cli = typer.Typer(
    help="List, inspect, clean up and reindex sessions.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
cli.add_typer(sessions_cli, name="sessions")
files_cli = typer.Typer(
    help="Read, write, list and remove a session's workspace files from any machine.",
    no_args_is_help=True,
)
cli.add_typer(files_cli, name="files")

# Piped output (a log, a CI job) is not cut to 80 columns: tables keep their ids and paths.
out = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, soft_wrap=True)
T = TypeVar("T")


def fail(message: str, code: int) -> NoReturn:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(code)


def show_version(wanted: bool) -> None:
    if wanted:
        out.print(
            f"claudebox-pool {claudebox_pool.__version__} "
            f"(Claude Code CLI {CLAUDE_CLI_VERSION} pinned)",
            highlight=False,
        )
        raise typer.Exit()


@cli.callback()
def root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=show_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """ClaudeBox sessions served by a pool of Celery workers."""


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a producer call; turn its errors into a message and an exit code."""
    try:
        return asyncio.run(coroutine)
    except KeyboardInterrupt:
        # The calls waiting in the coroutine cancelled their tasks on the way out.
        fail("interrupted", EXIT_INTERRUPTED)
    except ClaudeBoxError as exc:
        fail(str(exc), exit_code_for(type(exc)))


def guarded(call: Callable[[], T]) -> T:
    try:
        return call()
    except KeyboardInterrupt:
        fail("interrupted", EXIT_INTERRUPTED)
    except ClaudeBoxError as exc:
        fail(str(exc), exit_code_for(type(exc)))


def exec_celery(
    arguments: list[str], env: dict[str, str] | None = None, *, drop: tuple[str, ...] = ()
) -> NoReturn:
    """Replace this process with ``python -m celery ...`` (signals then reach Celery directly),
    its environment this one's without ``drop``, plus ``env``."""
    # -P: the working directory is not put on sys.path, so a user's `celery.py` there does not
    # stand in for Celery.
    argv = [sys.executable, "-P", "-m", "celery", *arguments]
    kept = {name: value for name, value in os.environ.items() if name not in drop}
    os.execvpe(argv[0], argv, {**kept, **(env or {})})


def main() -> None:
    # `worker` turns into a Celery worker, which logs these itself once it starts.
    if sys.argv[1:2] != ["worker"]:
        for warning in unknown_variables():
            err.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
    celery_app.set_current()
    try:
        # Named, not taken from argv[0]: completion scripts and usage lines say the command.
        cli(prog_name="claudebox-pool")
    except InvalidSettingError as exc:
        # Settings are read on first use, wherever that is; commands that catch ClaudeBoxError
        # report it themselves with the same line and code.
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        sys.exit(exit_code_for(type(exc)))
