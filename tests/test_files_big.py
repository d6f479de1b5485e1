"""A 1 GiB file round-trips through box.files with the producer and the worker each under
200 MiB of resident memory: the bytes travel through Redis in bounded chunks, never whole."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from claudebox_pool import ClaudeBox, DiskFullError
from claudebox_pool.tasks import keys
from tests.conftest import WorkerFactory
from tests.support.processes import REPO, Worker

GIB = 1 << 30
LIMIT_MIB = 200
LIMIT_BYTES = GIB + (256 << 20)
"""The sessions root's size limit: the round trip fits, a 2 GiB write does not."""

PRODUCER = """
import asyncio, json, sys, time
from pathlib import Path
from claudebox_pool import ClaudeBox

async def main() -> None:
    async with ClaudeBox(session_id="big-file") as box:
        started = time.monotonic()
        sent = await box.files.write_from(sys.argv[1], "data/big.bin")
        written = time.monotonic()
        got = await box.files.read_to("data/big.bin", sys.argv[2])
        read = time.monotonic()
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so it would report the RSS of
    # the test process this one was forked from.
    status = Path("/proc/self/status").read_text().splitlines()
    peak_kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    print(json.dumps({"sent": sent, "got": got, "write_s": written - started,
                      "read_s": read - written, "peak_mib": peak_kib / 1024}))

asyncio.run(main())
"""


@pytest.fixture(scope="module")
def worker(start_workers: WorkerFactory) -> Worker:
    # One slot: its one child process runs both transfers, and its peak memory tells.
    return start_workers(1, concurrency=1, CLAUDEBOX_MAX_SESSIONS_BYTES=str(LIMIT_BYTES))[0]


def peak_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for {pid}")


def children(pid: int) -> list[int]:
    return [int(each) for each in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def digest(path: Path) -> str:
    hashed = hashlib.sha256()
    with path.open("rb") as source:
        while block := source.read(1 << 20):
            hashed.update(block)
    return hashed.hexdigest()


@pytest.mark.usefixtures("clean_state")
def test_a_gibibyte_round_trips_within_the_memory_bound(
    worker: Worker, pool_env: dict[str, str], tmp_path: Path
) -> None:
    original, copy = tmp_path / "big.bin", tmp_path / "copy.bin"
    block = os.urandom(1 << 20)
    with original.open("wb") as out:
        for number in range(GIB >> 20):
            # Each MiB differs from the others, so a chunk out of order changes the digest.
            out.write(number.to_bytes(8, "big") + block[8:])
    assert worker.proc is not None

    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", PRODUCER, str(original), str(copy)],
        capture_output=True,
        text=True,
        env=pool_env,
        cwd=REPO,
        timeout=900,
        check=False,
    )
    elapsed = time.monotonic() - started

    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    worker_peaks = {pid: peak_mib(pid) for pid in [worker.proc.pid, *children(worker.proc.pid)]}
    print(f"\n1 GiB round trip in {elapsed:.1f}s: {report}; worker peaks (MiB) {worker_peaks}")
    assert report["sent"] == report["got"] == GIB
    assert report["peak_mib"] < LIMIT_MIB
    assert max(worker_peaks.values()) < LIMIT_MIB
    assert digest(copy) == digest(original)


@pytest.mark.usefixtures("worker")
def test_a_write_over_the_disk_limit_is_refused_before_it_is_written(
    clean_state: redis.Redis, tmp_path: Path
) -> None:
    sparse = tmp_path / "sparse.bin"
    with sparse.open("wb") as out:
        out.truncate(2 * GIB)

    async def run() -> list[str]:
        async with ClaudeBox(session_id="too-big") as box:
            with pytest.raises(DiskFullError, match="CLAUDEBOX_MAX_SESSIONS_BYTES"):
                await box.files.write_from(sparse, "too-big.bin")
            return [info.name for info in await box.files.list()]

    assert asyncio.run(run()) == []
    assert not list(clean_state.scan_iter(f"{keys.PREFIX}transfer:*"))
