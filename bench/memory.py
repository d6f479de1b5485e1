"""Memory: a worker's resident memory idle, while 8 sandboxes run at once, and afterwards with
the 8 sandboxes kept warm (idle exec servers, held by the worker's main process).

Run: .venv/bin/python -m bench.memory
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from bench.harness import bench_pool, machine, stop
from claudebox_pool import ClaudeBox

SANDBOXES = 8


def tree_rss_mib(pid: int) -> float:
    """Resident memory of a process and all its descendants, in MiB."""
    total_kib = 0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total_kib += int(line.split()[1])
        pending.extend(int(child) for child in children)
    return total_kib / 1024


async def busy(worker_pid: int) -> float:
    boxes = [ClaudeBox(session_id=f"mem-{n}") for n in range(SANDBOXES)]
    for box in boxes:
        await box.__aenter__()
    running = [asyncio.ensure_future(box.code("sleep 3")) for box in boxes]
    await asyncio.sleep(1.5)
    peak = tree_rss_mib(worker_pid)
    await asyncio.gather(*running)
    return peak


def main() -> None:
    print(f"machine: {machine()}")
    with bench_pool() as pool:
        (worker,) = pool.workers(1, concurrency=SANDBOXES)
        assert worker.proc is not None
        idle = tree_rss_mib(worker.proc.pid)
        peak = asyncio.run(busy(worker.proc.pid))
        warm = tree_rss_mib(worker.proc.pid)
        stop([worker])
    print(f"worker with {SANDBOXES} slots, idle: {idle:.0f} MiB (main process and pool children)")
    print(f"while {SANDBOXES} bwrap sandboxes run `sleep 3`: {peak:.0f} MiB")
    print(f"per running sandbox: {(peak - idle) / SANDBOXES:.1f} MiB; cpus {os.cpu_count()}")
    print(f"afterwards, {SANDBOXES} warm sandboxes kept idle: {warm:.0f} MiB")
    print(f"per warm sandbox: {(warm - idle) / SANDBOXES:.1f} MiB")


if __name__ == "__main__":
    main()
