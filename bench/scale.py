"""Scale: listing and reindexing sessions on disk, and paging a registry of a million.

For each of ``--sizes`` (sessions created on disk): the reindex from disk, the sync
``list_sessions()`` read (the whole hash, parsed and sorted) and ``alist_sessions()`` without a
limit (every record, paged through the index by Redis). Then, with ``--registry N``, a registry
of N entries written straight to Redis (no disk) and the time of single pages of 100 at its
start, middle and end, with each filter, and the Python memory a page allocates.

Run: .venv/bin/python -m bench.scale [--sizes 1000 10000] [--registry 1000000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
import tracemalloc
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import redis
import redis.asyncio

from bench.harness import machine
from claudebox_pool.tasks import registry as reader
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


FILL_BATCH = 5000
OLD_EVERY = 1000
"""One registry entry in this many was last updated 30 days ago (a sparse ``older_than``)."""


def fill_registry(client: redis.Redis, count: int) -> None:
    """``count`` entries ``big-0000000``..., statuses in turn, through the workers' writer."""
    now = datetime.now(UTC).replace(tzinfo=None)
    fresh, old = (
        stamp.isoformat(timespec="microseconds") for stamp in (now, now - timedelta(days=30))
    )
    base = SessionRecord(
        session_id="big-0",
        created_at=fresh,
        updated_at=fresh,
        last_accessed=fresh,
        workspace_path="/sessions/big-0/workspace",
        runtime="bwrap",
        node="node-1",
    )
    statuses = ("created", "running", "stopped")
    pipe = client.pipeline(transaction=False)
    for index in range(count):
        session_id = f"big-{index:07d}"
        when = old if index % OLD_EVERY == OLD_EVERY - 1 else fresh
        record = base.model_copy(
            update={
                "session_id": session_id,
                "workspace_path": f"/sessions/{session_id}/workspace",
                "status": statuses[index % len(statuses)],
                "updated_at": when,
            }
        )
        registry.stage(pipe, record)
        if index % FILL_BATCH == FILL_BATCH - 1:
            pipe.execute()
    pipe.execute()


Timing = tuple[float, float, list[SessionRecord]]


def timed_pages(port: int, runs: int, **filters: Any) -> Timing:
    """The fastest of ``runs`` ``alist_sessions`` calls with ``filters``: wall-clock seconds,
    this process's CPU seconds (which other work on a shared machine inflates less), and what
    the last call returned; on one event loop whose client is connected already, as a
    producer's is after its first call."""

    async def listing() -> Timing:
        client = redis.asyncio.Redis(port=port)
        try:
            await client.ping()
            wall, cpu, found = float("inf"), float("inf"), []
            for _ in range(runs):
                started, used = time.perf_counter(), time.process_time()
                found = await reader.page(client, **filters)
                wall = min(wall, time.perf_counter() - started)
                cpu = min(cpu, time.process_time() - used)
            return wall, cpu, found
        finally:
            await client.aclose()

    return asyncio.run(listing())


def page_figures(port: int, count: int) -> None:
    middle = f"big-{count // 2:07d}"
    cases: list[tuple[str, dict[str, Any]]] = [
        ("first page", {}),
        ("page after the middle id", {"after": middle}),
        ("page after the last id", {"after": f"big-{count - 1:07d}"}),
        ("prefix page", {"prefix": f"big-{count // 2:07d}"[:-2]}),
        ("status page (1 in 3 match)", {"status": "stopped", "after": middle}),
        (f"older_than page (1 in {OLD_EVERY} match)", {"older_than_s": 7 * 86400}),
    ]
    for label, filters in cases:
        wall, cpu, found = timed_pages(port, 5, limit=100, **filters)
        print(
            f"  {label:<34} {wall * 1000:7.1f} ms (CPU {cpu * 1000:.1f} ms), {len(found)} records"
        )
    tracemalloc.start()
    timed_pages(port, 1, limit=100, after=middle)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(f"  Python memory one page of 100 allocates at its peak: {peak / 1e6:.1f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--registry", type=int, default=0, help="entries of the paged registry")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="claudebox-bench-scale-"))
    server = RedisServer(base / "redis")
    server.start()
    client = redis.Redis(port=server.port)
    store = SessionStore(base / "sessions")
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.1f}")
    try:
        made = 0
        for size in sorted(args.sizes):
            populate(store, size, made)
            made = size
            client.flushdb()
            reindex_s = timed("reindex", lambda: registry.reindex(client, store))
            list_s = min(timed("list", lambda: read_all(client)) for _ in range(5))
            alist_s, alist_cpu, listed = timed_pages(server.port, 5)
            assert len(listed) == size
            print(
                f"{size:>6} sessions: reindex from disk {reindex_s:.2f} s "
                f"({reindex_s / size * 1e6:.0f} us/session); list_sessions {list_s * 1000:.1f} ms"
                f"; alist_sessions {alist_s * 1000:.1f} ms (CPU {alist_cpu * 1000:.1f} ms)"
            )
        if args.registry:
            client.flushdb()
            started = time.perf_counter()
            fill_registry(client, args.registry)
            filled_s = time.perf_counter() - started
            used = client.info("memory")["used_memory"]
            print(
                f"registry of {args.registry:,} entries: written in {filled_s:.0f} s, "
                f"Redis holds {used / 2**20:.0f} MiB"
            )
            page_figures(server.port, args.registry)
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
