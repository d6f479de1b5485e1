"""The worker's entry point: ``celery -A workers.app worker`` (``claudebox-pool worker`` runs it).

Importing this module registers the task bodies on the shared app and adds two things to every
worker: a heartbeat in Redis, so that producers can tell no worker is running instead of
waiting forever, and a reconciliation of the session registry with the disk at start.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery import bootsteps, signals
from celery.worker import WorkController

import workers.jobs  # noqa: F401  (registers the task bodies)
from tasks import keys
from tasks.app import app
from workers import registry
from workers.context import context

log = logging.getLogger(__name__)


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
        context().redis.zrem(keys.workers(), worker.hostname)

    @staticmethod
    def beat(worker: WorkController) -> None:
        # Producers take the heartbeat as "tasks will be consumed": announce only once ready.
        if not _ready.is_set():
            return
        try:
            context().redis.zadd(keys.workers(), {worker.hostname: time.time()})
        except Exception as exc:  # a Redis outage must not stop the worker's timer
            log.warning("heartbeat failed: %s", exc)


app.steps["worker"].add(Heartbeat)
_ready = threading.Event()


@signals.worker_ready.connect
def reconcile(sender: Any = None, **_: Any) -> None:
    ctx = context()
    log.info("runtime: %s", ctx.runtime.name)
    result = registry.reindex(ctx.redis, ctx.store)
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
