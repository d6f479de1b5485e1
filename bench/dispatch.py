"""Dispatch: `code` calls per second with the shell agent running `true`, beside plain Celery.

Run: .venv/bin/python -m bench.dispatch [--calls 200]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time

from bench.harness import BenchPool, bench_pool, describe, machine, stop
from claudebox_pool import ClaudeBox
from tests.support.processes import REPO, Worker

SESSIONS = 8


async def pool_round_trips(calls: int, tag: str) -> list[float]:
    timings = []
    async with ClaudeBox(session_id=f"latency-{tag}") as box:
        await box.code("true")
        for _ in range(calls):
            started = time.perf_counter()
            await box.code("true")
            timings.append(time.perf_counter() - started)
    return timings


async def pool_throughput(calls: int, tag: str) -> float:
    boxes = [ClaudeBox(session_id=f"tp-{tag}-{n}") for n in range(SESSIONS)]
    for box in boxes:
        await box.__aenter__()

    async def lane(box: ClaudeBox, count: int) -> None:
        for _ in range(count):
            await box.code("true")

    started = time.perf_counter()
    await asyncio.gather(*(lane(box, calls // SESSIONS) for box in boxes))
    return (calls // SESSIONS * SESSIONS) / (time.perf_counter() - started)


def plain_worker(pool: BenchPool, concurrency: int) -> subprocess.Popen[bytes]:
    log = (pool.base / "plain.log").open("ab")
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "bench.plain_app",
            "worker",
            "-Q",
            "plain",
            "-c",
            str(concurrency),
            "--without-gossip",
            "--without-mingle",
            "--loglevel",
            "WARNING",
        ],
        cwd=REPO,
        env=pool.env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def plain_figures(calls: int) -> tuple[list[float], float]:
    from bench.plain_app import app, noop

    app.control.ping(timeout=5)
    noop.delay().get(timeout=60)
    timings = []
    for _ in range(calls):
        started = time.perf_counter()
        noop.delay().get(timeout=30)
        timings.append(time.perf_counter() - started)
    started = time.perf_counter()
    results = [noop.delay() for _ in range(calls)]
    for result in results:
        result.get(timeout=60)
    return timings, calls / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    with bench_pool() as pool:
        for processes in (1, 2):
            load = os.getloadavg()
            workers: list[Worker] = pool.workers(processes, concurrency=2)
            latencies = asyncio.run(pool_round_trips(args.calls // 2, str(processes)))
            rate = asyncio.run(pool_throughput(args.calls, str(processes)))
            stop(workers)
            plain = plain_worker(pool, concurrency=2 * processes)
            plain_latencies, plain_rate = plain_figures(args.calls)
            plain.terminate()
            plain.wait(30)
            print(f"{processes} worker process(es) x 2 slots (load average before: {load[0]:.2f}):")
            figures = describe(latencies)
            print(f"  claudebox code('true'): {rate:.1f} calls/s; round trip {figures}")
            baseline = describe(plain_latencies)
            print(f"  plain celery no-op:     {plain_rate:.1f} calls/s; round trip {baseline}")
            print(f"  ratio plain/claudebox throughput: {plain_rate / rate:.2f}x")


if __name__ == "__main__":
    main()
