"""claudebox's Prometheus metrics: every one is named here, recorded where it happens and served
by each worker's main process on ``CLAUDEBOX_METRICS_PORT``.

Tasks run in Celery's prefork children, so prometheus_client runs in its multiprocess mode: each
process writes its values to files in ``PROMETHEUS_MULTIPROC_DIR`` (``<home>/run/metrics/<pid of
the worker>``, emptied when the worker starts) and the main process merges them at each scrape.
:func:`serve` sets it in the main process before the pool forks, and the metrics are made on
first use, after it. With
metrics off, recording is a no-op. What is read at scrape time (queues, sessions, disk, warm
sandboxes) is collected by :class:`PoolCollector`; label values come from short fixed lists,
agents, models, queues and nodes: never a session or task id.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

import redis
from celery.exceptions import Ignore, Retry
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    multiprocess,
    start_http_server,
    values,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from redis.exceptions import RedisError

from claudebox_pool.tasks import keys, names
from claudebox_pool.tasks.connections import text
from claudebox_pool.tasks.files import private_dir
from claudebox_pool.tasks.models import CodeResult, UsageByModel
from claudebox_pool.tasks.registry import read_all
from claudebox_pool.tasks.settings import Settings
from claudebox_pool.workers import disk
from claudebox_pool.workers.runtimes.process import alive

if TYPE_CHECKING:
    from claudebox_pool.workers.store import SessionStore

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
DURATION_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
START_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
LOCK_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5)
TOKEN_KINDS = ("input", "output", "cache_creation_input", "cache_read_input")
REFUSALS = ("budget_exceeded", "egress_denied", "model_request_denied", "model_route_denied")
"""The gateway's events (``Ledger.record``) that refuse something a sandbox asked for."""
DISK_SHARE = 0.01
"""Measuring the sessions root walks every session's files: a measure serves the scrapes that
follow it for 1/DISK_SHARE times as long as it took, so that walking takes at most this share
of a worker's time, up to DISK_MAX_AGE_S."""
DISK_MAX_AGE_S = 60.0


class Recorded:
    """The metrics pool processes record, made on first use in each process."""

    def __init__(self) -> None:
        # registry=None: the main process serves them from its multiprocess collector.
        self.runs: Counter = Counter(
            "claudebox_runs",
            "Code tasks ended, by agent and outcome (success, failure, cancelled, timeout, error).",
            ["agent", "outcome"],
            registry=None,
        )
        self.run_duration: Histogram = Histogram(
            "claudebox_run_duration_seconds",
            "How long the agent ran in its sandbox, by agent and outcome.",
            ["agent", "outcome"],
            buckets=DURATION_BUCKETS,
            registry=None,
        )
        self.lock_wait: Histogram = Histogram(
            "claudebox_lock_wait_seconds",
            "How long a task held its slot waiting for its session's lock; result busy: it "
            "gave the slot back to retry later.",
            ["result"],
            buckets=LOCK_BUCKETS,
            registry=None,
        )
        self.sandbox_start: Histogram = Histogram(
            "claudebox_sandbox_start_seconds",
            "How long a task waited for its sandbox from the worker's keeper; kind cold: one "
            "was started for it, warm: a kept one was reused.",
            ["kind"],
            buckets=START_BUCKETS,
            registry=None,
        )
        self.tokens: Counter = Counter(
            "claudebox_model_tokens",
            "Tokens the model gateway metered, by model and kind.",
            ["model", "kind"],
            registry=None,
        )
        self.cost: Counter = Counter(
            "claudebox_model_cost_usd",
            "Cost in USD of the metered tokens, at the gateway's prices, by model.",
            ["model"],
            registry=None,
        )
        self.refusals: Counter = Counter(
            "claudebox_gateway_refusals",
            "What the model gateway refused a sandbox, by kind (budget_exceeded, egress_denied, "
            "model_request_denied, model_route_denied).",
            ["kind"],
            registry=None,
        )


_on = False
_recorded: Recorded | None = None
_recorded_guard = threading.Lock()
_server: WSGIServer | None = None
_url: str | None = None


def _metrics() -> Recorded | None:
    global _recorded
    if not _on:
        return None
    with _recorded_guard:
        if _recorded is None:
            _recorded = Recorded()
        return _recorded


def outcome_of(result: CodeResult) -> str:
    if result.success:
        return "success"
    error = result.error or ""
    if error.startswith("cancelled"):
        return "cancelled"
    if error.startswith("timed out"):
        return "timeout"
    return "failure"


def record_run(agent: str, result: CodeResult) -> None:
    """A code task's run ended with ``result`` (one given back from history is no new run)."""
    if (m := _metrics()) is None or result.replayed:
        return
    outcome = outcome_of(result)
    m.runs.labels(agent, outcome).inc()
    m.run_duration.labels(agent, outcome).observe(result.duration_s or 0.0)


@contextmanager
def counting_errors(agent: str) -> Iterator[None]:
    """A code task that raises (a full disk, a broken sandbox, a busy session past its wait) is
    a run with outcome ``error``; a retry for a busy session, or a dropped delivery, is not."""
    try:
        yield
    except (Retry, Ignore):
        raise
    except Exception:
        if (m := _metrics()) is not None:
            m.runs.labels(agent, "error").inc()
        raise


def record_usage(usage: UsageByModel, events: Iterable[tuple[str, object]]) -> None:
    """What the gateway metered and refused during one run."""
    if (m := _metrics()) is None:
        return
    for model, used in usage.items():
        for kind in TOKEN_KINDS:
            m.tokens.labels(model, kind).inc(getattr(used, f"{kind}_tokens"))
        m.cost.labels(model).inc(used.cost_usd)
    for action, _ in events:
        if action in REFUSALS:
            m.refusals.labels(action).inc()


def record_lock_wait(seconds: float, acquired: bool) -> None:
    if (m := _metrics()) is not None:
        m.lock_wait.labels("acquired" if acquired else "busy").observe(seconds)


def record_sandbox_start(seconds: float, cold: bool) -> None:
    if (m := _metrics()) is not None:
        m.sandbox_start.labels("cold" if cold else "warm").observe(seconds)


WarmCounts = Callable[[], Mapping[str, int]]
"""This worker's warm sandboxes by state (``idle``, ``leased``)."""


class PoolCollector:
    """What is read when Prometheus scrapes: queue depths, sessions, disk, warm sandboxes.

    Queues and sessions are the pool's, so every worker reports the same values (the dashboard
    takes their ``max``); disk is this worker's node's sessions root.
    """

    def __init__(
        self, settings: Settings, client: redis.Redis, store: SessionStore, warm: WarmCounts
    ) -> None:
        self._settings = settings
        self._redis = client
        self._store = store
        self._warm = warm
        self._disk: tuple[float, int, int] | None = None
        """When the last measure is stale (monotonic), and what it found: occupied, free."""
        self._disk_guard = threading.Lock()

    def collect(self) -> Iterator[Metric]:
        try:
            depths = self._queue_depths()
            sessions = self._sessions()
        except RedisError as exc:
            log.warning("metrics: Redis unreachable, no queue or session figures: %s", exc)
        else:
            queue = GaugeMetricFamily(
                "claudebox_queue_depth", "Tasks waiting in each queue.", labels=["queue"]
            )
            for name, depth in sorted(depths.items()):
                queue.add_metric([name], depth)
            yield queue
            by_status = GaugeMetricFamily(
                "claudebox_sessions", "Sessions in the registry, by status.", labels=["status"]
            )
            for status, count in sorted(sessions.items()):
                by_status.add_metric([status], count)
            yield by_status
        occupied, free = self._disk_figures()
        node = self._settings.node
        used = GaugeMetricFamily(
            "claudebox_sessions_disk_bytes",
            f"Bytes the sessions of a node occupy (measured at most {DISK_MAX_AGE_S:.0f} s ago).",
            labels=["node"],
        )
        used.add_metric([node], occupied)
        yield used
        left = GaugeMetricFamily(
            "claudebox_disk_free_bytes",
            "Free bytes on the disk holding a node's sessions root.",
            labels=["node"],
        )
        left.add_metric([node], free)
        yield left
        warm = GaugeMetricFamily(
            "claudebox_warm_sandboxes",
            "Warm sandboxes this worker holds, by state (idle, leased to a task).",
            labels=["state"],
        )
        for state, count in sorted(self._warm().items()):
            warm.add_metric([state], count)
        yield warm

    def _queue_depths(self) -> dict[str, int]:
        """LLEN of the shared queue, of each live node's queue and of each worker's own."""
        queues = [names.QUEUE]
        nodes: list[bytes] = self._redis.zrange(keys.nodes(), 0, -1)  # type: ignore[assignment]
        queues += [names.node_queue(text(node)) for node in nodes]
        workers = self._redis.smembers(keys.worker_queues())
        queues += sorted(names.worker_queue(text(worker)) for worker in workers)
        pipe = self._redis.pipeline()
        for queue in queues:
            pipe.llen(queue)
        return dict(zip(queues, (int(n) for n in pipe.execute()), strict=True))

    def _sessions(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for record in read_all(self._redis):
            counts[record.status] = counts.get(record.status, 0) + 1
        return counts

    def _disk_figures(self) -> tuple[int, int]:
        with self._disk_guard:
            now = time.monotonic()
            if self._disk is None or now >= self._disk[0]:
                usage = disk.usage(self._settings, self._store)
                took = time.monotonic() - now
                stale_at = time.monotonic() + min(took / DISK_SHARE, DISK_MAX_AGE_S)
                self._disk = (stale_at, usage.total_bytes, usage.free_bytes)
            return self._disk[1], self._disk[2]


def serve(settings: Settings, client: redis.Redis, store: SessionStore, warm: WarmCounts) -> None:
    """In the worker's main process before its pool forks: set up the multiprocess directory
    and serve ``/metrics`` on ``CLAUDEBOX_METRICS_PORT``; nothing if that is unset or 0."""
    global _on, _server, _url
    if not settings.metrics_port:
        return
    directory = _fresh_directory(settings)
    os.environ[MULTIPROC_ENV] = str(directory)
    # prometheus_client picks its value class when first imported, and the celery command has
    # imported it by now (it loads Flower's `celery flower` plugin, which imports it): pick
    # again, by its own rule, now that the variable is set. Our metrics are made after this.
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    _on = True

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    registry.register(PoolCollector(settings, client, store, warm))
    try:
        _server, _ = start_http_server(
            settings.metrics_port, addr=settings.metrics_address, registry=registry
        )
    except OSError as exc:
        # A worker without its metrics still serves tasks; say why they are missing.
        log.error(
            "metrics not served on %s:%d (CLAUDEBOX_METRICS_PORT): %s",
            settings.metrics_address,
            settings.metrics_port,
            exc,
        )
        return
    _url = f"http://{settings.metrics_address}:{settings.metrics_port}/metrics"


def url() -> str | None:
    """Where this worker serves its metrics, once :func:`serve` started serving them."""
    return _url


def stop() -> None:
    """At the worker's shutdown: stop serving, remove this worker's directory."""
    global _server, _url
    _url = None
    if _server is not None:
        _server.shutdown()
        _server.server_close()
        _server = None
    directory = os.environ.get(MULTIPROC_ENV)
    if _on and directory:
        shutil.rmtree(directory, ignore_errors=True)


def process_exited(pid: int) -> None:
    """A pool child ended: drop its live gauges' files (prometheus_client's bookkeeping)."""
    if not _on:
        return
    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def _fresh_directory(settings: Settings) -> Path:
    """``<home>/run/metrics/<pid>``, empty; those of workers that died unstopped are removed."""
    root = private_dir(settings.home / "run" / "metrics")
    for left in root.iterdir():
        if not left.name.isdigit() or not alive(int(left.name)) or int(left.name) == os.getpid():
            shutil.rmtree(left, ignore_errors=True)
    return private_dir(root / str(os.getpid()))
