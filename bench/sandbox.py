"""Sandboxes: running `true` in a cold sandbox (started for the command) and in a warm one
(kept by a keeper, as a worker keeps a session's), for each runtime this host can run, beside
a bare subprocess; then a whole `code("true")` call through a real pool (queue, lock, sandbox,
history), with warm sandboxes on and off.

Run: .venv/bin/python -m bench.sandbox [--runs 20]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.harness import bench_pool, describe, machine, stop
from claudebox_pool import ClaudeBox
from claudebox_pool.tasks.settings import Settings
from claudebox_pool.workers.runtimes.auto import runtime_class
from claudebox_pool.workers.runtimes.base import Runtime, SandboxSpec
from claudebox_pool.workers.warm import client as warm_client
from claudebox_pool.workers.warm.keeper import Keeper
from tests.support.processes import RedisServer
from tests.support.sandboxes import owned

ENV = {"PATH": "/usr/bin:/bin", "HOME": "/root"}


def bare(runs: int) -> list[float]:
    timings = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(["true"], check=True)
        timings.append(time.perf_counter() - started)
    return timings


def in_runtime(runtime: Runtime, runs: int, spec: SandboxSpec) -> list[float]:
    timings = []
    for _ in range(runs):
        started = time.perf_counter()
        with runtime.open(spec) as sandbox:
            sandbox.exec(["true"], ENV, 30)
        timings.append(time.perf_counter() - started)
    return timings


def warm(name: str, runs: int, spec: SandboxSpec, base: Path) -> list[float] | None:
    """Timings of `true` in a warm sandbox (the first, which starts it, left out)."""
    command = runtime_class(name).warm_command()
    if command is None:
        return None
    redis = RedisServer(base / "redis")
    redis.start()
    keeper = Keeper(
        Settings(warm_idle_s=600),
        "bench@local",
        redis.client(),
        lambda hostname, session_id: True,
        lambda hostname: None,
        command=command,
    ).start()
    warm_client.set_address(keeper.address)
    try:
        runtime = runtime_class(name)()
        in_runtime(runtime, 1, spec)
        timings = in_runtime(runtime, runs, spec)
        assert keeper.created == 1, "the warm sandbox was not reused"
        return timings
    finally:
        warm_client.set_address(None)
        keeper.close()
        redis.stop()


def code_calls(runs: int, warm_idle_s: int) -> list[float]:
    """Round trips of `code("true")` in one session through a pool of one worker."""
    with bench_pool(CLAUDEBOX_WARM_IDLE_S=str(warm_idle_s)) as pool:
        workers = pool.workers(1, concurrency=2)
        try:

            async def scenario() -> list[float]:
                timings = []
                async with ClaudeBox(session_id="bench") as box:
                    await box.code("true")
                    for _ in range(runs):
                        started = time.perf_counter()
                        result = await box.code("true")
                        timings.append(time.perf_counter() - started)
                        assert result.success, result.error
                return timings

            return asyncio.run(scenario())
        finally:
            stop(workers)


def line(name: str, timings: list[float], baseline: list[float]) -> str:
    ratio = statistics.median(timings) / statistics.median(baseline)
    return f"{name:>14}: {describe(timings)}; {ratio:.1f}x a bare subprocess"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="claudebox-bench-sandbox-"))
    (base / "ws").mkdir()
    (base / "home").mkdir()
    # As a root worker makes it for a session: run as an identity of its own.
    spec = owned(SandboxSpec("bench", base / "ws", base / "home", 1, 512, 1))
    print(f"machine: {machine()}; {args.runs} runs each")
    baseline = bare(args.runs)
    print(f"{'subprocess':>14}: {describe(baseline)}")
    for name in ("local", "bwrap", "boxlite"):
        probe = runtime_class(name).probe()
        if not probe.ok:
            print(f"{name:>14}: not runnable here ({probe.reason})")
            continue
        print(line(f"{name} cold", in_runtime(runtime_class(name)(), args.runs, spec), baseline))
        timings = warm(name, args.runs, spec, base)
        if timings is not None:
            print(line(f"{name} warm", timings, baseline))
    calls: dict[str, Callable[[], list[float]]] = {
        "code() cold": lambda: code_calls(args.runs, 0),
        "code() warm": lambda: code_calls(args.runs, 600),
    }
    for name, measure in calls.items():
        print(line(name, measure(), baseline))


if __name__ == "__main__":
    main()
