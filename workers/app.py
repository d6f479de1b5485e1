"""The worker's entry point: ``celery -A claudebox_pool.workers.app worker``.

``claudebox-pool worker`` runs it.

Importing this module registers every task on the shared app (``jobs``), has every worker
consume its node's own queue too (``affinity``), and adds two things to every worker: a
heartbeat in Redis (of the worker and of its node), so that producers can tell no worker is
running instead of waiting forever, and at which what a dead worker held (its unacked tasks,
its own queue) is handed back (``warm.rescue``); a reconciliation of the session
registry with the disk at start; the keeper of its warm sandboxes (``warm.setup``); and, with
``CLAUDEBOX_METRICS_PORT``, its Prometheus metrics (``metrics``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from celery import bootsteps, signals
from celery.worker import WorkController

from claudebox_pool.tasks import keys
from claudebox_pool.tasks.app import app
from claudebox_pool.tasks.files import private_dir
from claudebox_pool.tasks.models import WorkerInfo
from claudebox_pool.tasks.settings import Settings, find_cli, unknown_variables
from claudebox_pool.workers import affinity, broker, jobs, metrics, registry, shutdown  # noqa: F401
from claudebox_pool.workers.agents.claude import cli_version
from claudebox_pool.workers.context import context
from claudebox_pool.workers.runtimes import limits, seccomp
from claudebox_pool.workers.runtimes.auto import choose
from claudebox_pool.workers.warm import rescue
from claudebox_pool.workers.warm import setup as warm_setup

log = logging.getLogger(__name__)

broker.install()


class Heartbeat(bootsteps.StartStopStep):
    requires = {"celery.worker.components:Timer"}

    def __init__(self, worker: WorkController, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.tref: Any = None

    def start(self, worker: WorkController) -> None:
        interval = context().settings.worker_heartbeat_s
        self.tref = worker.timer.call_repeatedly(interval, self.beat, (worker,), priority=10)

    def stop(self, worker: WorkController) -> None:
        if self.tref is not None:
            self.tref.cancel()
        ctx = context()
        if ctx.redis.sismember(keys.worker_queues(), worker.hostname):
            # Known on as stopped: what reaches its own queue now is moved by its node's others.
            rescue.mark_stopped(ctx, worker.hostname)
        else:
            ctx.redis.zrem(keys.workers(), worker.hostname)
            ctx.redis.hdel(keys.worker_info(), worker.hostname)

    @staticmethod
    def beat(worker: WorkController) -> None:
        # Producers take the heartbeat as "tasks will be consumed": announce only once ready.
        if not _ready.is_set():
            return
        try:
            ctx, now = context(), time.time()
            pipe = ctx.redis.pipeline()
            pipe.zadd(keys.workers(), {worker.hostname: now})
            # A node lives while any of its workers does: tasks for its sessions wait for it.
            pipe.zadd(keys.nodes(), {ctx.node: now})
            pipe.execute()
            rescue.rescue(ctx, worker.hostname)
        except Exception as exc:  # a Redis outage must not stop the worker's timer
            log.warning("heartbeat failed: %s", exc)


app.steps["worker"].add(Heartbeat)
_ready = threading.Event()


def describe(hostname: str) -> WorkerInfo:
    ctx = context()
    choice = choose(ctx.settings.runtime)
    cli = find_cli(ctx.settings)
    return WorkerInfo(
        hostname=hostname,
        node=ctx.node,
        pid=os.getpid(),
        runtime=choice.runtime.name,
        runtime_reason=choice.reason,
        sessions_root=str(ctx.store.root),
        claude_cli=str(cli) if cli else None,
        claude_version=cli_version(cli) if cli else None,
        warm=warm_setup.describe(),
        containment=containment(choice.runtime.name, ctx.settings),
    )


def containment(runtime: str, settings: Settings) -> list[str]:
    if runtime == "bwrap":
        return [*limits.report(settings), seccomp.report(settings.seccomp)]
    if runtime == "boxlite":
        return ["a micro-VM per session: its memory, vCPUs and disk bound it"]
    return ["none: the local runtime runs commands as plain host processes"]


@signals.worker_init.connect
def serve_metrics(**_: Any) -> None:
    # In the main process before the pool forks: every child inherits the metrics directory.
    ctx = context()
    metrics.serve(ctx.settings, ctx.redis, ctx.store, _warm_held)


def _warm_held() -> dict[str, int]:
    keeper = warm_setup.keeper()
    return keeper.held() if keeper is not None else {}


@signals.worker_process_shutdown.connect
def forget_process_metrics(pid: int | None = None, **_: Any) -> None:
    metrics.process_exited(pid if pid is not None else os.getpid())


@signals.worker_shutdown.connect
def stop_metrics(**_: Any) -> None:
    metrics.stop()


@signals.worker_process_shutdown.connect
def stop_gateway(**_: Any) -> None:
    """Remove the gateway's sockets with the pool process that served them."""
    ctx = context()
    if "gateway" in ctx.__dict__:
        ctx.gateway.stop()


@signals.worker_ready.connect
def reconcile(sender: Any = None, **_: Any) -> None:
    ctx = context()
    private_dir(ctx.settings.home)
    private_dir(ctx.store.root)
    hostname = getattr(sender, "hostname", ctx.node)
    for warning in unknown_variables():
        log.warning("%s", warning)
    info = describe(hostname)
    log.info("runtime: %s", info.runtime_reason)
    log.info("claude CLI: %s (%s)", info.claude_cli or "not found", info.claude_version or "-")
    # Said here, not when the server starts: Celery's logging is set up after worker_init.
    log.info("metrics: %s", metrics.url() or "not served (CLAUDEBOX_METRICS_PORT)")
    ctx.redis.hset(keys.worker_info(), hostname, info.model_dump_json())
    try:
        result = registry.reindex(ctx.redis, ctx.store)
    except Exception:
        # The registry is only an index (`claudebox-pool sessions reindex` rebuilds it): a
        # worker that cannot rebuild it still serves, rather than never announcing itself.
        log.exception("registry not reconciled with %s; the worker serves anyway", ctx.store.root)
    else:
        log.info(
            "registry reconciled with %s: %d sessions, %d stale entries dropped, %d corrupted",
            ctx.store.root,
            result.indexed,
            result.dropped,
            len(result.corrupted),
        )
    _ready.set()
    if sender is not None:
        Heartbeat.beat(sender)
