"""The commands that become one process of the pool: ``worker``, ``beat``, ``flower``."""

from __future__ import annotations

from typing import Annotated

import typer

from claudebox_pool.producer import flowerconfig, local_pool
from claudebox_pool.producer.cli.app import EXIT_USAGE, cli, err, exec_celery, fail, guarded
from claudebox_pool.tasks import names
from claudebox_pool.tasks.files import private_dir
from claudebox_pool.tasks.settings import get_settings


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
