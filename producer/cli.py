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
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, BinaryIO, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

import claudebox_pool
from claudebox_pool.producer import (
    envvars,
    flowerconfig,
    lifecycle,
    live,
    local_pool,
    ops,
    pool_logs,
    status_view,
)
from claudebox_pool.producer.batch import (
    DEFAULT_CONCURRENCY,
    all_succeeded,
    read_jobs,
    read_results,
    run_batch,
)
from claudebox_pool.producer.canvas import enqueue
from claudebox_pool.producer.client import ClaudeBox
from claudebox_pool.producer.doctor import doctor_report, examine
from claudebox_pool.producer.files import Files
from claudebox_pool.producer.health import check as pool_health
from claudebox_pool.producer.moves import move_session
from claudebox_pool.producer.progress import usage_table
from claudebox_pool.producer.terminal import show_event
from claudebox_pool.tasks import names
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
from claudebox_pool.tasks.files import private_dir
from claudebox_pool.tasks.lifecycle import megabytes
from claudebox_pool.tasks.models import (
    ReindexResult,
    SessionStatus,
    SessionView,
    validate_session_id,
)
from claudebox_pool.tasks.settings import (
    CLAUDE_CLI_VERSION,
    AgentName,
    default_cli_dir,
    get_settings,
    unknown_variables,
)

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


def _banner_off_in_json() -> list[str]:
    """Celery's --quiet where logs are JSON lines: its start banner is not one."""
    return ["--quiet"] if get_settings().log_format == "json" else []


@cli.command()
def worker(
    concurrency: Annotated[
        int | None, typer.Option("--concurrency", "-c", help="Task slots (default: CPUs).")
    ] = None,
    hostname: Annotated[str | None, typer.Option(help="Worker name, e.g. w1@%h.")] = None,
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
    autoscale: Annotated[
        str | None,
        typer.Option(help="MAX,MIN task slots, grown and shrunk with the load (Celery's)."),
    ] = None,
) -> None:
    """Start a worker of the pool (a Celery worker with claudebox's app and options)."""
    from claudebox_pool.workers.runtimes.auto import (
        choose,  # a verb that starts a worker may look at workers
    )

    choice = guarded(lambda: choose(get_settings().runtime))
    if get_settings().log_format == "text":  # the worker logs it too; JSON logs hold only JSON
        err.print(f"runtime: {choice.reason}", highlight=False)
    arguments = [
        *_banner_off_in_json(),
        "-A",
        "claudebox_pool.workers.app",
        "worker",
        "--queues",
        names.QUEUE,
        "--loglevel",
        loglevel,
    ]
    arguments += ["--without-gossip", "--without-mingle"]
    if concurrency is not None:
        arguments += ["--concurrency", str(concurrency)]
    if hostname is not None:
        arguments += ["--hostname", hostname]
    if autoscale is not None:
        arguments += ["--autoscale", autoscale]
    exec_celery(arguments)


@cli.command()
def beat(loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO") -> None:
    """Start the scheduler (run exactly one per pool)."""
    settings = get_settings()
    private_dir(settings.home)
    schedule = private_dir(settings.home / "run") / "celerybeat-schedule"
    exec_celery(
        [
            *_banner_off_in_json(),
            "-A",
            "claudebox_pool.tasks.app",
            "beat",
            "--loglevel",
            loglevel,
            "--schedule",
            str(schedule),
        ],
        drop=local_pool.WORKER_ONLY_ENV + local_pool.FLOWER_ONLY_ENV,
    )


@cli.command()
def flower(
    port: Annotated[int, typer.Option(help="HTTP port.")] = 5555,
    address: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    insecure_dev: Annotated[
        bool, typer.Option("--insecure-dev", help="Allow no authentication (development only).")
    ] = False,
) -> None:
    """Start Flower on the pool, with basic auth (CLAUDEBOX_FLOWER_BASIC_AUTH=user:password)."""
    auth = get_settings().flower_basic_auth
    env: dict[str, str] = {}
    if auth is not None:
        if (problem := flowerconfig.basic_auth_problem(auth.get_secret_value())) is not None:
            fail(problem, EXIT_USAGE)
        # Through the environment, not argv, where any local user could read it.
        env["FLOWER_BASIC_AUTH"] = auth.get_secret_value()
    elif not insecure_dev:
        fail(
            "Flower needs credentials: set CLAUDEBOX_FLOWER_BASIC_AUTH=user:password "
            "(or pass --insecure-dev on a machine only you can reach)",
            EXIT_USAGE,
        )
    conf = f"--conf={flowerconfig.__file__}"
    exec_celery(
        [
            "-A",
            "claudebox_pool.tasks.app",
            "flower",
            f"--port={port}",
            f"--address={address}",
            conf,
        ],
        env,
        drop=local_pool.WORKER_ONLY_ENV,
    )


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


@cli.command()
def doctor(
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Check Redis, workers, the sandbox runtime and the Claude Code CLI."""
    if as_json:
        report = examine()
        out.print_json(report.model_dump_json())
        raise typer.Exit(0 if report.ok else EXIT_UNAVAILABLE)
    ok = doctor_report(out)
    raise typer.Exit(0 if ok else EXIT_UNAVAILABLE)


@cli.command("install-cli")
def install_cli() -> None:
    """Install the pinned Claude Code CLI from the npm registry (for the claude agent)."""
    npm = shutil.which("npm")
    if npm is None:
        fail("npm is not installed (apt-get install npm, or install Node.js 18+)", EXIT_USAGE)
    target = default_cli_dir()
    package = f"@anthropic-ai/claude-code@{CLAUDE_CLI_VERSION}"
    if (target / "node_modules" / ".bin" / "claude").exists():
        out.print(f"{package} is already installed in {target}")
        return
    target.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [npm, "install", "--prefix", str(target), "--no-audit", "--no-fund", package],
        check=False,
    )
    if done.returncode != 0:
        fail(f"npm could not install {package}", EXIT_FAILED)
    out.print(f"installed {package} in {target}")


@cli.command()
def health(
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Exit 0 if the pool can take work (Redis answers, a worker is alive), else 3: for probes."""
    report = pool_health()
    if as_json:
        sys.stdout.write(report.model_dump_json() + "\n")
    elif report.healthy:
        out.print(f"healthy: Redis answers, {report.workers_alive} worker(s) alive")
    else:
        for problem in report.problems:
            err.print(f"[bold red]unhealthy:[/] {escape(problem)}", highlight=False)
    raise typer.Exit(0 if report.healthy else EXIT_UNAVAILABLE)


@cli.command()
def up(
    workers: Annotated[int, typer.Option(help="Worker processes.")] = 1,
    concurrency: Annotated[int, typer.Option(help="Task slots per worker.")] = 4,
    detach: Annotated[bool, typer.Option(help="Start in the background and return.")] = False,
    flower: Annotated[
        bool, typer.Option(help="Start Flower too (needs CLAUDEBOX_FLOWER_BASIC_AUTH).")
    ] = False,
    flower_port: Annotated[int, typer.Option(help="Flower's port on 127.0.0.1.")] = 5555,
    supervise: Annotated[
        bool, typer.Option(hidden=True, help="Be the supervisor that `up --detach` starts.")
    ] = False,
) -> None:
    """Start a local pool: redis-server (if none answers), workers and beat, restarted when they
    crash. Ctrl-C stops it."""
    port = flower_port if flower else None
    if detach and not supervise:
        raise typer.Exit(
            guarded(lambda: local_pool.start_detached(workers, concurrency, flower_port=port))
        )
    guarded(lambda: local_pool.up(workers, concurrency, supervise, out, flower_port=port))


@cli.command()
def down(
    timeout: Annotated[
        float,
        typer.Option(help="Seconds running tasks may take to finish; then they are requeued."),
    ] = local_pool.DOWN_TIMEOUT_S,
) -> None:
    """Stop the local pool started by `up` (running tasks finish first)."""
    guarded(lambda: local_pool.down(out, timeout))


@sessions_cli.command("list")
def sessions_list(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object a line.")] = False,
    prefix: Annotated[str | None, typer.Option(help="Only ids starting with this.")] = None,
    status: Annotated[
        SessionStatus | None, typer.Option(help="Only sessions of this status.")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="At most this many (a page).")] = None,
    after: Annotated[
        str | None, typer.Option(help="Start after this id: the last one of the previous page.")
    ] = None,
) -> None:
    """List every session of the pool, oldest first; with a filter or a page option, those
    matching, in id order, filtered and paged by Redis."""
    if prefix is None and status is None and limit is None and after is None:
        records = guarded(ClaudeBox.list_sessions)
    else:
        records = run(ClaudeBox.alist_sessions(prefix, status, None, limit, after))
    if as_json:
        for record in records:
            sys.stdout.write(record.model_dump_json() + "\n")
        return
    table = Table(
        "session", "status", "kind", "commands", "created", "updated", "node", "workspace"
    )
    for record in records:
        table.add_row(
            record.session_id,
            record.status,
            "ephemeral" if record.ephemeral else "persistent",
            str(record.total_commands),
            record.created_at[:19],
            record.updated_at[:19],
            record.node,
            record.workspace_path,
        )
    out.print(table)


SHOWN_HISTORY = 20
"""History entries `sessions show` prints (its --json gives them all)."""


@sessions_cli.command("show")
def sessions_show(
    session_id: Annotated[str, typer.Argument(help="Session id.")],
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON document: the record and the whole history.")
    ] = False,
) -> None:
    """Show a session's metadata and history, from any machine (read on the session's node)."""
    record = guarded(lambda: lifecycle.registered(session_id))
    if record is None:
        fail(str(SessionNotFoundError(session_id)), exit_code_for(SessionNotFoundError))
    if record.corruption is not None:
        # Its node cannot read it either: show what the registry knows, and what is wrong.
        if as_json:
            sys.stdout.write(SessionView(record=record, history=[]).model_dump_json() + "\n")
        else:
            out.print_json(record.model_dump_json())
        fail(str(record.corruption.error(session_id)), EXIT_FAILED)
    view = run(lifecycle.view(session_id, None if as_json else SHOWN_HISTORY))
    if as_json:
        sys.stdout.write(view.model_dump_json() + "\n")
        return
    out.print_json(view.record.model_dump_json())
    if view.record.total_usage:
        out.print(usage_table(view.record.total_usage, "model usage"))
    out.print(f"[bold]history[/] (the last {SHOWN_HISTORY} entries; --json has all)")
    for entry in view.history:
        out.print(entry.model_dump_json(), highlight=False, markup=False)


@sessions_cli.command("cleanup")
def sessions_cleanup(
    session_id: Annotated[str, typer.Argument(help="Session id.")],
    keep_workspace: Annotated[
        bool, typer.Option("--keep-workspace", help="Remove the sandbox only; keep the files.")
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask before deleting.")] = False,
    archive: Annotated[
        bool, typer.Option("--archive", help="Write the whole session to an archive first.")
    ] = False,
) -> None:
    """Remove a session (asks before deleting its files unless --yes)."""
    guarded(lambda: validate_session_id(session_id))
    if not keep_workspace and not yes:
        if not sys.stdin.isatty():
            fail("refusing to delete files without a terminal to confirm on; add --yes", EXIT_USAGE)
        if not typer.confirm(f"Delete session '{session_id}' and all its workspace files?"):
            out.print("cancelled")
            raise typer.Exit(EXIT_FAILED)
    result = run(
        ClaudeBox.cleanup_session(session_id, remove_workspace=not keep_workspace, archive=archive)
    )
    what = "session and workspace" if result.removed_workspace else "sandbox (files kept)"
    out.print(f"cleaned up {session_id}: {what} removed")
    if result.archive_path:
        out.print(f"archived to {result.archive_path}", highlight=False)


@sessions_cli.command("restore")
def sessions_restore(
    archive: Annotated[
        str, typer.Argument(help="An archive's file name in CLAUDEBOX_ARCHIVE_DIR, or its path.")
    ],
) -> None:
    """Bring back a session from the archive its cleanup wrote."""
    if Path(archive).exists():
        archive = str(Path(archive).resolve())  # the workers resolve a relative path elsewhere
    restored = run(lifecycle.restore_archive(archive))
    out.print(
        f"restored session {restored.session_id} ({restored.files} files) from {restored.archive}",
        highlight=False,
    )


@sessions_cli.command("export")
def sessions_export(
    session_id: Annotated[str, typer.Argument(help="Session id.")],
    format: Annotated[
        str,
        typer.Option(
            "--format", help="Only `jsonl`: one turn a line (docs/trajectory.schema.json)."
        ),
    ] = "jsonl",
) -> None:
    """The session's conversation from the CLI's transcript, one turn a line."""
    if format != "jsonl":
        fail(f"unknown export format {format!r}; use --format jsonl", 2)
    for turn in run(lifecycle.trajectory(session_id)):
        sys.stdout.write(turn.model_dump_json() + "\n")


@sessions_cli.command("du")
def sessions_du(
    as_json: Annotated[bool, typer.Option("--json", help="The whole report as JSON.")] = False,
) -> None:
    """Disk used by each session, largest first, with the disk's free space and the limits."""
    usage = run(lifecycle.disk_usage())
    if as_json:
        out.print_json(usage.model_dump_json())
        return
    table = Table("session", "size", "files", title=f"sessions in {usage.root}")
    for each in usage.sessions:
        table.add_row(each.session_id, megabytes(each.bytes), str(each.files))
    out.print(table)
    limit = megabytes(usage.max_sessions_bytes) if usage.max_sessions_bytes else "none"
    out.print(
        f"total {megabytes(usage.total_bytes)} (limit {limit}); "
        f"{megabytes(usage.free_bytes)} free on the disk (floor {megabytes(usage.min_free_bytes)})",
        highlight=False,
    )


@sessions_cli.command("reindex")
def sessions_reindex() -> None:
    """Rebuild the Redis registry from the sessions on the workers' disk."""

    async def go() -> ReindexResult:
        from claudebox_pool.producer import pool

        await pool.ensure_workers()
        # Each node reindexes its own disk.
        raws = await pool.call_on_every_node(names.REINDEX, {}, 600)
        results = [ReindexResult.model_validate(raw) for raw in raws]
        return ReindexResult(
            indexed=sum(r.indexed for r in results),
            dropped=sum(r.dropped for r in results),
            corrupted=[sid for r in results for sid in r.corrupted],
            elsewhere=[sid for r in results for sid in r.elsewhere],
        )

    result = run(go())
    out.print(f"indexed {result.indexed} sessions, dropped {result.dropped} stale entries")
    for session_id in result.corrupted:
        err.print(f"[yellow]corrupted:[/] {session_id} (see `claudebox-pool sessions show`)")
    for session_id in result.elsewhere:
        err.print(
            f"[yellow]left alone:[/] {session_id} is on a node's disk but bound to another "
            "node (a copy left by `sessions move`: remove it)"
        )


@sessions_cli.command("move")
def sessions_move(
    session_id: Annotated[str, typer.Argument(help="Session id.")],
    to: Annotated[str, typer.Option("--to", help="The node that now holds the session's files.")],
    force: Annotated[
        bool, typer.Option(help="Move even though the current node is alive.")
    ] = False,
) -> None:
    """Bind a session to another node, after copying its directory there (see the README)."""
    record = run(move_session(session_id, to, force=force))
    out.print(
        f"session {session_id} is now on node {record.node} ({record.workspace_path}); "
        "remove the copy on its old node",
        highlight=False,
    )


# --- files in and out, from any machine ---------------------------------------------------------

SessionArg = Annotated[str, typer.Argument(help="Session id.")]
WorkspacePathArg = Annotated[str, typer.Argument(help="Path relative to the workspace.")]


@files_cli.command("get")
def files_get(
    session_id: SessionArg,
    path: WorkspacePathArg,
    local: Annotated[
        str, typer.Argument(help="Local file to write ('-': stdout; default: its name here).")
    ] = "",
) -> None:
    """Copy a workspace file to this machine, streamed."""
    files = guarded(lambda: Files(session_id))
    target = local or PurePosixPath(path).name
    if not target:
        fail(f"{path!r} names no file; give the workspace file to copy", EXIT_USAGE)
    if target == "-":
        run(files.read_to(path, sys.stdout.buffer))
        sys.stdout.flush()
        return
    size = run(files.read_to(path, Path(target)))
    err.print(f"{path} -> {target} ({size} bytes)", highlight=False)


@files_cli.command("put")
def files_put(
    session_id: SessionArg,
    local: Annotated[str, typer.Argument(help="Local file to send ('-': stdin).")],
    path: WorkspacePathArg,
) -> None:
    """Copy a file of this machine into the workspace (parent directories made), streamed."""
    files = guarded(lambda: Files(session_id))
    source: str | BinaryIO = sys.stdin.buffer if local == "-" else local
    size = run(files.write_from(source, path))
    err.print(f"{local} -> {path} ({size} bytes)", highlight=False)


@files_cli.command("ls")
def files_ls(
    session_id: SessionArg,
    path: Annotated[str, typer.Argument(help="Directory relative to the workspace.")] = ".",
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object a line.")] = False,
) -> None:
    """List a workspace directory."""
    files = guarded(lambda: Files(session_id))
    entries = run(files.list(path))
    if as_json:
        for entry in entries:
            sys.stdout.write(entry.model_dump_json() + "\n")
        return
    table = Table("name", "size", "modified")
    for entry in entries:
        shown = entry.name + ("/" if entry.is_dir else "") + (" @" if entry.is_symlink else "")
        table.add_row(shown, str(entry.size), entry.modified[:19])
    out.print(table)


@files_cli.command("rm")
def files_rm(session_id: SessionArg, path: WorkspacePathArg) -> None:
    """Remove a workspace file, link or directory tree."""
    files = guarded(lambda: Files(session_id))
    run(files.remove(path))


@cli.command()
def download(
    session_id: SessionArg,
    directory: Annotated[Path, typer.Argument(help="Local directory to write into (made).")],
    path: Annotated[str, typer.Option(help="Workspace directory to download.")] = ".",
) -> None:
    """Copy a session's workspace (or a directory of it) to this machine, streamed as tar."""
    files = guarded(lambda: Files(session_id))
    done = run(files.download(directory, path))
    err.print(f"{done.files} files ({done.bytes} bytes) -> {directory}", highlight=False)
    for name in done.skipped:
        err.print(f"left out {name} (a link leading out of the workspace, or not a file)")


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


if __name__ == "__main__":
    main()
