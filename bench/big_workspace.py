"""A session with a big workspace: `code("true")` before and after 200,000 files are in it.

Each task finds the files it created (`files_created`); this shows what that costs as the
workspace grows. Run: .venv/bin/python -m bench.big_workspace [--files 200000] [--calls 20]
"""

from __future__ import annotations

import argparse
import asyncio
import time

from bench.harness import bench_pool, describe, machine, stop
from claudebox_pool import ClaudeBox
from claudebox_pool.tasks.settings import get_settings

PER_DIRECTORY = 1000


async def round_trips(box: ClaudeBox, calls: int) -> list[float]:
    timings = []
    for _ in range(calls):
        started = time.perf_counter()
        result = await box.code("true")
        timings.append(time.perf_counter() - started)
        assert result.success, result.error
    return timings


def fill(session_id: str, files: int) -> None:
    workspace = get_settings().sessions_root / session_id / "workspace"
    for index in range(files):
        directory = workspace / f"d{index // PER_DIRECTORY:04d}"
        if index % PER_DIRECTORY == 0:
            directory.mkdir()
        (directory / f"f{index:07d}.txt").touch()


async def scenario(files: int, calls: int) -> tuple[list[float], list[float]]:
    async with ClaudeBox(session_id="big") as box:
        await box.code("true")
        empty = await round_trips(box, calls)
        fill("big", files)
        await box.code("true")  # the first listing after the fill warms the page cache
        full = await round_trips(box, calls)
    return empty, full


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=200_000)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()
    with bench_pool() as pool:
        workers = pool.workers(1, concurrency=1)
        try:
            empty, full = asyncio.run(scenario(args.files, args.calls))
        finally:
            stop(workers)
    print(machine())
    print(f"code('true'), empty workspace: {describe(empty)}")
    print(f"code('true'), {args.files:,} files: {describe(full)}")


if __name__ == "__main__":
    main()
