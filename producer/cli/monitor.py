"""The commands that watch the pool and its tasks: ``status``, ``tasks``, ``result``, ``logs``."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from typing import Annotated

import typer
from rich.live import Live
from rich.markup import escape

from claudebox_pool.producer import live, ops, pool_logs, status_view
from claudebox_pool.producer.cli.app import (
    EXIT_FAILED,
    EXIT_SESSION_STATE,
    EXIT_USAGE,
    cli,
    err,
    exit_code_for,
    fail,
    guarded,
    out,
    run,
)
from claudebox_pool.producer.terminal import show_event
from claudebox_pool.tasks.errors import ClaudeBoxError
from claudebox_pool.tasks.settings import get_settings

WATCH_S = 2.0
"""How often `status --watch` reads the pool again."""


@cli.command()
def status(
    watch: Annotated[
        bool,
        typer.Option(
            "--watch",
            "-w",
            help="Redraw every 2 seconds until Ctrl-C (piped: print each time, with --json "
            "one document a line).",
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """Workers (alive or silent) and their busy slots, queues, running tasks, warm sandboxes."""

    def read() -> ops.PoolStatus:
        # Not `guarded`: there Ctrl-C is an interruption (130), here it is how watching ends.
        try:
            return ops.status()
        except ClaudeBoxError as exc:
            fail(str(exc), exit_code_for(type(exc)))

    def show(now: ops.PoolStatus) -> None:
        if as_json:
            sys.stdout.write(now.model_dump_json() + "\n")
            sys.stdout.flush()
        else:
            out.print(status_view.status(now))

    if not watch:
        show(read())
        return
    with contextlib.suppress(KeyboardInterrupt):
        if out.is_terminal and not as_json:
            with Live(status_view.status(read()), console=out, auto_refresh=False) as view:
                while True:
                    time.sleep(WATCH_S)
                    view.update(status_view.status(read()), refresh=True)
        else:
            while True:  # a pipe cannot be redrawn: one reading after another
                show(read())
                time.sleep(WATCH_S)


@cli.command()
def tasks(
    session: Annotated[str | None, typer.Option(help="Only this session's tasks.")] = None,
    state: Annotated[ops.TaskState | None, typer.Option(help="Only tasks in this state.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="Tasks at most.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object a line.")] = False,
) -> None:
    """Recent tasks, newest first: their state, session and agent."""
    found = guarded(lambda: ops.recent_tasks(session, state, limit))
    if as_json:
        for task in found:
            sys.stdout.write(task.model_dump_json() + "\n")
        return
    out.print(status_view.tasks(found))


@cli.command()
def result(
    task_id: Annotated[str, typer.Argument(help="A task's id.")],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the whole result as JSON.")
    ] = False,
) -> None:
    """A finished task's result: a code task's response (exit 1 if its agent failed).
    Exits 4 while the task is queued or running."""
    state, value = guarded(lambda: ops.finished_result(task_id))
    if state in ("queued", "running"):
        fail(
            f"task {task_id} is {state}: no result yet; follow it with "
            f"`claudebox-pool logs -f {task_id}`",
            EXIT_SESSION_STATE,
        )
    code_result = ops.as_code_result(value)
    if as_json or code_result is None:
        out.print_json(json.dumps(value))
    else:
        sys.stdout.write(code_result.response)
        if code_result.response and not code_result.response.endswith("\n"):
            sys.stdout.write("\n")
        if not code_result.success:
            err.print(f"[red]failed:[/] {escape(code_result.error or '')}", highlight=False)
    raise typer.Exit(EXIT_FAILED if code_result is not None and not code_result.success else 0)


@cli.command()
def logs(
    task_id: Annotated[
        str | None, typer.Argument(help="A code task's id (see `tasks` or `status`).")
    ] = None,
    follow: Annotated[
        bool,
        typer.Option("--follow", "-f", help="Keep printing output as it comes, until the end."),
    ] = False,
    worker: Annotated[
        str | None,
        typer.Option(help="Show this process's log of a local pool instead (worker-1, beat...)."),
    ] = None,
) -> None:
    """A code task's output so far (with -f, then as it comes until the task ends), or the log
    of a process of the pool `up --detach` started."""
    if worker is not None:
        if task_id is not None:
            fail("give a task id or --worker, not both", EXIT_USAGE)
        path = guarded(lambda: pool_logs.log_file(get_settings(), worker))
        with contextlib.suppress(KeyboardInterrupt):
            pool_logs.show(path, follow)
        return
    if task_id is None:
        fail("give a task id (see `claudebox-pool tasks`), or --worker NAME", EXIT_USAGE)
    guarded(lambda: ops.require_known(task_id))
    if follow:
        run(live.follow(task_id, lambda event: show_event(event, err)))
    else:
        for event in run(ops.output_so_far(task_id)):
            show_event(event, err)
