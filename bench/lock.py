"""Session lock: acquire/renew/release cost, and 8 producers contending for one session.

Run: .venv/bin/python -m bench.lock [--rounds 2000]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

from bench.harness import describe, machine
from claudebox_pool.workers.lock import SessionLock
from tests.support.processes import RedisServer

CONTENDERS = 8


def solo(client_port: int, rounds: int) -> dict[str, list[float]]:
    import redis

    client = redis.Redis(port=client_port)
    timings: dict[str, list[float]] = {"acquire": [], "renew": [], "release": []}
    for _ in range(rounds):
        lock = SessionLock(client, "solo", ttl_s=30)
        started = time.perf_counter()
        lock.acquire(1)
        timings["acquire"].append(time.perf_counter() - started)
        started = time.perf_counter()
        lock._lock.reacquire()
        timings["renew"].append(time.perf_counter() - started)
        started = time.perf_counter()
        lock.release()
        timings["release"].append(time.perf_counter() - started)
    return timings


def contention(client_port: int, per_contender: int) -> tuple[float, list[float]]:
    """Eight threads take turns on one session; returns total seconds and hand-over waits."""
    import redis

    waits: list[float] = []
    guard = threading.Lock()

    def contender() -> None:
        client = redis.Redis(port=client_port)
        for _ in range(per_contender):
            lock = SessionLock(client, "contended", ttl_s=30)
            started = time.perf_counter()
            while not lock.acquire(5):
                pass
            waited = time.perf_counter() - started
            lock.release()
            with guard:
                waits.append(waited)

    threads = [threading.Thread(target=contender) for _ in range(CONTENDERS)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started, waits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=2000)
    args = parser.parse_args()
    server = RedisServer(Path(tempfile.mkdtemp(prefix="claudebox-bench-lock-")))
    server.start()
    try:
        print(f"machine: {machine()}")
        for step, values in solo(server.port, args.rounds).items():
            print(f"{step:>8}: {describe(values)}")
        per = args.rounds // CONTENDERS // 4
        total, waits = contention(server.port, per)
        count = per * CONTENDERS
        print(
            f"contention: {CONTENDERS} contenders x {per} turns on one session: "
            f"{count / total:.0f} hand-overs/s; wait {describe(waits)}"
        )
    finally:
        server.stop()


if __name__ == "__main__":
    main()
