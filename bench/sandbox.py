"""Sandbox start-up: running `true` in a fresh sandbox of each runtime this host can run,
beside a bare subprocess.

Run: .venv/bin/python -m bench.sandbox [--runs 20]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from bench.harness import describe, machine
from workers.runtimes.auto import runtime_class
from workers.runtimes.base import SandboxSpec

ENV = {"PATH": "/usr/bin:/bin", "HOME": "/root"}


def bare(runs: int) -> list[float]:
    timings = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(["true"], check=True)
        timings.append(time.perf_counter() - started)
    return timings


def in_runtime(name: str, runs: int, spec: SandboxSpec) -> list[float]:
    runtime = runtime_class(name)()
    timings = []
    for _ in range(runs):
        started = time.perf_counter()
        with runtime.open(spec) as sandbox:
            sandbox.exec(["true"], ENV, 30)
        timings.append(time.perf_counter() - started)
    runtime.close()
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="claudebox-bench-sandbox-"))
    (base / "ws").mkdir()
    (base / "home").mkdir()
    spec = SandboxSpec("bench", base / "ws", base / "home", cpus=1, memory_mib=512, disk_size_gb=1)
    print(f"machine: {machine()}")
    baseline = bare(args.runs)
    print(f"{'subprocess':>10}: {describe(baseline)}")
    for name in ("local", "bwrap", "boxlite"):
        probe = runtime_class(name).probe()
        if not probe.ok:
            print(f"{name:>10}: not runnable here ({probe.reason})")
            continue
        timings = in_runtime(name, args.runs, spec)
        ratio = statistics.median(timings) / statistics.median(baseline)
        print(f"{name:>10}: {describe(timings)}; {ratio:.1f}x a bare subprocess")


if __name__ == "__main__":
    main()
