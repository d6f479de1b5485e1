"""The commands that give the pool work: ``code``, ``submit``, ``cancel``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from claudebox_pool.producer import envvars, live, ops
from claudebox_pool.producer.batch import (
    DEFAULT_CONCURRENCY,
    all_succeeded,
    read_jobs,
    read_results,
    run_batch,
)
from claudebox_pool.producer.canvas import enqueue
from claudebox_pool.producer.cli.app import (
    EXIT_FAILED,
    EXIT_USAGE,
    cli,
    err,
    fail,
    guarded,
    out,
    run,
)
from claudebox_pool.producer.client import ClaudeBox
from claudebox_pool.producer.terminal import show_event
from claudebox_pool.tasks.errors import SessionNotFoundError
from claudebox_pool.tasks.models import validate_session_id
from claudebox_pool.tasks.settings import AgentName


@cli.command()
def code(
    session_id: Annotated[str, typer.Argument(help="Session id (created if it does not exist).")],
    prompt: Annotated[
        str, typer.Argument(help="What the agent should do; `-` reads it from stdin.")
    ],
    agent: Annotated[
        AgentName | None, typer.Option(help="The agent (default CLAUDEBOX_AGENT).")
    ] = None,
    max_turns: Annotated[int | None, typer.Option(help="Agent turns at most (claude).")] = None,
    timeout: Annotated[
        int | None, typer.Option(help="Seconds before the agent is stopped.")
    ] = None,
    env: Annotated[
        list[str] | None,
        typer.Option(
            "--env",
            "-e",
            metavar="KEY=VALUE",
            help="A variable for the agent (repeatable); values are never printed.",
        ),
    ] = None,
    env_file: Annotated[
        Path | None,
        typer.Option(help="Variables for the agent from a dotenv file; --env wins over it."),
    ] = None,
    detach: Annotated[
        bool,
        typer.Option(
            "--detach",
            "-d",
            help='Queue the run, print its task id (with --json: {"task_id": ...}) and '
            "return; the run goes on (follow it with `logs -f ID`, read it with `result ID`).",
        ),
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the whole result as JSON.")
    ] = False,
    stream: Annotated[
        bool,
        typer.Option(
            "--stream/--no-stream",
            help="Print the agent's output as it runs (default), or only its response at the end.",
        ),
    ] = True,
) -> None:
    """Run one prompt in a session, printing the agent's output as it runs (Ctrl-C cancels it).
    Its task id goes to stderr first (`task ID`)."""
    if prompt == "-":
        prompt = sys.stdin.read()
    variables = guarded(lambda: envvars.read(env or [], env_file))

    async def go() -> Any:
        validate_session_id(session_id)
        try:
            box = await ClaudeBox.reconnect(session_id)
        except SessionNotFoundError:
            box = ClaudeBox(session_id=session_id)
        async with box:
            if detach:
                return await box.start(
                    prompt, max_turns=max_turns, timeout_s=timeout, agent=agent, env=variables
                )
            return await box.code(
                prompt,
                max_turns=max_turns,
                timeout_s=timeout,
                agent=agent,
                env=variables,
                on_output=(lambda event: show_event(event, err)) if live_output else None,
                on_start=lambda task_id: err.print(f"task {task_id}", highlight=False),
            )

    live_output = stream and not as_json
    result = run(go())
    if detach:
        sys.stdout.write(json.dumps({"task_id": result}) + "\n" if as_json else f"{result}\n")
        return
    if as_json:
        out.print_json(result.model_dump_json())
    elif live_output:
        if not result.success:
            err.print(f"[red]failed:[/] {result.error}", highlight=False)
    else:
        sys.stdout.write(result.response)
        if result.response and not result.response.endswith("\n"):
            sys.stdout.write("\n")
        if not result.success:
            err.print(f"[red]failed:[/] {result.error}", highlight=False)
    raise typer.Exit(0 if result.success else EXIT_FAILED)


@cli.command()
def submit(
    jobs_file: Annotated[
        Path, typer.Argument(help="Jobs: one JSON object a line (.jsonl), or a YAML list.")
    ],
    results: Annotated[Path, typer.Option(help="Where to write one result a line.")] = Path(
        "results.jsonl"
    ),
    concurrency: Annotated[
        int | None, typer.Option(help=f"Sessions at work at once (default {DEFAULT_CONCURRENCY}).")
    ] = None,
    retry: Annotated[int, typer.Option(min=0, help="Runs more for a job that failed.")] = 0,
    resume: Annotated[
        Path | None, typer.Option(help="Skip the jobs this results file says succeeded.")
    ] = None,
    export: Annotated[
        Path | None,
        typer.Option(help="Write each job's trajectory to DIR/<job id>.jsonl (needs --wait)."),
    ] = None,
    download: Annotated[
        Path | None,
        typer.Option(
            help="After each session's last job, fetch the files its jobs created or changed "
            "into DIR/<session id>/ (needs --wait).",
        ),
    ] = None,
    wait: Annotated[
        bool,
        typer.Option(
            "--wait/--no-wait",
            help="Wait, with live progress and results (default); or queue the batch as Celery "
            "chains and print each job's task id.",
        ),
    ] = True,
) -> None:
    """Run a batch: jobs of one session in file order, sessions in parallel, live progress."""
    if not wait:
        if retry or concurrency is not None or export is not None or download is not None:
            fail(
                "--retry, --concurrency, --export and --download need --wait "
                "(without it Celery runs the batch)",
                EXIT_USAGE,
            )
        done = guarded(lambda: read_results(resume)) if resume is not None else {}
        queued = run(enqueue(guarded(lambda: read_jobs(jobs_file)), done=done))
        for job in queued:
            sys.stdout.write(job.model_dump_json() + "\n")
        err.print(
            f"queued {len(queued)} jobs; watch them in Flower, stop one with "
            "`claudebox-pool cancel TASK_ID`",
            highlight=False,
        )
        return
    outcome, not_downloaded = run(
        run_batch(
            jobs_file,
            results,
            concurrency=concurrency or DEFAULT_CONCURRENCY,
            retry=retry,
            resume=resume,
            export=export,
            download=download,
            console=out,
        )
    )
    for problem in not_downloaded:
        err.print(f"[bold red]error:[/] {escape(problem)}", highlight=False)
    raise typer.Exit(0 if all_succeeded(outcome) and not not_downloaded else EXIT_FAILED)


@cli.command()
def cancel(
    task_id: Annotated[
        str, typer.Argument(help="Id of a code task (from `code`, `tasks` or `status`).")
    ],
    as_json: Annotated[
        bool, typer.Option("--json", help='Print {"task_id", "cancelled"} as JSON.')
    ] = False,
) -> None:
    """Stop a queued or running code task inside its sandbox; its session stays usable."""
    guarded(lambda: ops.require_known(task_id))
    asked = run(live.cancel(task_id))
    if as_json:
        sys.stdout.write(json.dumps({"task_id": task_id, "cancelled": asked}) + "\n")
        raise typer.Exit(0 if asked else EXIT_FAILED)
    if not asked:
        fail(f"task {task_id} has already finished; there is nothing to cancel", EXIT_FAILED)
    out.print(f"asked task {task_id} to stop; its result will say 'cancelled'")
