"""A throwaway pool for benchmarks: its own redis-server, HOME and worker processes."""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from claudebox_pool.tasks.app import configure
from claudebox_pool.tasks.settings import get_settings
from tests.support.processes import RedisServer, Worker


@dataclass
class BenchPool:
    base: Path
    redis: RedisServer
    env: dict[str, str]

    def workers(self, count: int, concurrency: int, **env: str) -> list[Worker]:
        started = [
            Worker({**self.env, **env}, self.base / "logs", concurrency=concurrency)
            for _ in range(count)
        ]
        for worker in started:
            worker.start()
        client = self.redis.client()
        for worker in started:
            worker.wait_ready(client)
        return started


@contextmanager
def bench_pool(**env: str) -> Iterator[BenchPool]:
    base = Path(tempfile.mkdtemp(prefix="claudebox-bench-"))
    redis = RedisServer(base / "redis")
    redis.start()
    pool_env = {
        "HOME": str(base / "home"),
        "CLAUDEBOX_HOME": str(base / "home" / ".claudebox"),
        "CLAUDEBOX_BROKER_URL": redis.url,
        "CLAUDEBOX_RESULT_BACKEND": redis.url,
        "CLAUDEBOX_RUNTIME": "bwrap",
        "CLAUDEBOX_AGENT": "shell",
        "CLAUDEBOX_WORKER_HEARTBEAT_S": "1",
        **env,
    }
    saved = dict(os.environ)
    os.environ.update(pool_env)
    get_settings.cache_clear()
    configure()
    try:
        yield BenchPool(base, redis, {**os.environ})
    finally:
        os.environ.clear()
        os.environ.update(saved)
        get_settings.cache_clear()
        configure()
        redis.stop()
        shutil.rmtree(base, ignore_errors=True)


def stop(workers: Sequence[Worker]) -> None:
    for worker in workers:
        worker.terminate()
    for worker in workers:
        worker.wait_stopped()


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def describe(values: Sequence[float], unit: str = "ms", scale: float = 1000.0) -> str:
    figures = {
        "min": min(values),
        "p50": statistics.median(values),
        "p99": percentile(values, 0.99),
        "max": max(values),
    }
    return ", ".join(f"{name} {value * scale:.1f} {unit}" for name, value in figures.items())


def machine() -> str:
    cores = os.cpu_count()
    python = platform.python_version()
    return f"{platform.node()} {platform.machine()}, {cores} cores, Python {python}"
