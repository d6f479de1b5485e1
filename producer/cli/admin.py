"""The commands that check and run a pool: ``doctor``, ``install-cli``, ``health``, ``up``,
``down``."""

from __future__ import annotations

import shutil
import subprocess
import sys
from typing import Annotated

import typer
from rich.markup import escape

from claudebox_pool.producer import local_pool
from claudebox_pool.producer.cli.app import (
    EXIT_FAILED,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    cli,
    err,
    fail,
    guarded,
    out,
)
from claudebox_pool.producer.doctor import doctor_report, examine
from claudebox_pool.producer.health import check as pool_health
from claudebox_pool.tasks.settings import CLAUDE_CLI_VERSION, default_cli_dir


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
