"""Can the pool take work: its Redis answers, and at least one worker is alive.

Flower's ``/healthcheck`` says only that Flower's process answers, with Redis down and every
worker gone. This check is what the deploy files probe instead: ``claudebox-pool health`` (an
exec probe; exit code 0 or 3) and ``/health``, served by ``claudebox-pool flower`` beside
Flower's own routes (200 or 503). A worker is alive while its heartbeat in Redis is younger
than three ``CLAUDEBOX_WORKER_HEARTBEAT_S``: the same test producers make before they send.
"""

from __future__ import annotations

import time
from contextlib import closing

import redis
from pydantic import BaseModel

from claudebox_pool.producer.pool import START_HINT, UNREACHABLE
from claudebox_pool.tasks import keys
from claudebox_pool.tasks.connections import redacted, redis_py_url
from claudebox_pool.tasks.settings import Settings, get_settings

TIMEOUT_S = 5.0
"""How long Redis may take to answer before the pool counts as unreachable."""


class HealthReport(BaseModel):
    """What :func:`check` found; ``problems`` says what is wrong and what to do, one a line."""

    healthy: bool
    redis: bool
    """Redis (the broker's and the results', if they differ) answered a PING."""
    workers_alive: int
    """Workers whose last heartbeat is recent; 0 when Redis could not be asked."""
    problems: list[str]


def check(settings: Settings | None = None, timeout_s: float = TIMEOUT_S) -> HealthReport:
    """Ask Redis whether it answers and which workers sent a heartbeat lately."""
    current = settings or get_settings()
    problems: list[str] = []
    alive = 0
    # The broker holds the queues, the results' Redis the heartbeats: usually one server.
    for url in dict.fromkeys((current.broker_url, current.result_backend)):
        with closing(_client(url, timeout_s)) as client:
            try:
                client.ping()
                if url == current.result_backend:
                    since = time.time() - current.worker_alive_s
                    alive = int(client.zcount(keys.workers(), since, "+inf"))
            except UNREACHABLE as exc:
                problems.append(
                    f"cannot reach Redis at {redacted(url)} ({exc}); is redis-server running?"
                )
    reached = not problems
    if reached and not alive:
        problems.append(
            f"no worker sent a heartbeat in the last {current.worker_alive_s}s; {START_HINT}"
        )
    return HealthReport(healthy=not problems, redis=reached, workers_alive=alive, problems=problems)


def _client(url: str, timeout_s: float) -> redis.Redis:
    # Timeouts on every read too: a Redis that accepts connections but never answers is down.
    return redis.Redis.from_url(
        redis_py_url(url), socket_connect_timeout=timeout_s, socket_timeout=timeout_s
    )
