"""Scale: list_sessions() and reindex-from-disk over 1,000 and 10,000 sessions.

Run: .venv/bin/python -m bench.scale [--sizes 1000 10000]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import redis

from bench.harness import machine
from claudebox_pool.tasks.models import SessionRecord, utc_now
from claudebox_pool.tasks.registry import read_all
from claudebox_pool.workers import registry
from claudebox_pool.workers.store import SessionStore
from tests.support.processes import RedisServer


def populate(store: SessionStore, count: int, start: int) -> None:
    now = utc_now()
    for index in range(start, count):
        session_id = f"scale-{index:05d}"
        store.create(
            SessionRecord(
                session_id=session_id,
                created_at=now,
                updated_at=now,
                last_accessed=now,
                workspace_path=str(store.paths(session_id).workspace),
            )
        )


def timed(action: str, call: object) -> float:
    started = time.perf_counter()
    call()  # type: ignore[operator]
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="claudebox-bench-scale-"))
    server = RedisServer(base / "redis")
    server.start()
    client = redis.Redis(port=server.port)
    store = SessionStore(base / "sessions")
    print(f"machine: {machine()}")
    try:
        made = 0
        for size in sorted(args.sizes):
            populate(store, size, made)
            made = size
            client.flushdb()
            reindex_s = timed("reindex", lambda: registry.reindex(client, store))
            list_s = min(timed("list", lambda: read_all(client)) for _ in range(5))
            print(
                f"{size:>6} sessions: reindex from disk {reindex_s:.2f} s "
                f"({reindex_s / size * 1e6:.0f} us/session); list_sessions {list_s * 1000:.1f} ms"
            )
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
