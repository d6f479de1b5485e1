"""A batch interrupted by a crash, of its producer (SIGKILL) or of Redis (SIGKILL, restarted
from its append-only file), then resumed: every job's command runs exactly once.

Each job appends its id to a file in its session's workspace, so the lines prove how often
each command ran. This module runs its own Redis, home and worker, so that killing Redis
hurts no other test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from claudebox_pool.producer.batch import latest_results
from claudebox_pool.producer.journal import read as read_journal
from claudebox_pool.tasks.settings import get_settings
from tests.faults.conftest import history, pool_of_its_own
from tests.support.processes import REPO, RedisServer, claudebox_pool, wait_for

SESSIONS = 8
JOBS_PER_SESSION = 5
RUNS_FILE = "runs.txt"
OUTAGE_S = 4
LONG_OUTAGE_S = 14
"""Past the lock's TTL (CLAUDEBOX_LOCK_TTL_S=10 in the tests' pool)."""

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def batch_redis(
    pool_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RedisServer]:
    base = tmp_path_factory.mktemp("batch-resume")
    env = {"CLAUDEBOX_AGENT": "shell", "CLAUDEBOX_LOCK_WAIT_S": "60"}
    with pool_of_its_own(pool_env, base, **env) as (server, _):
        yield server


def write_jobs(path: Path, prefix: str) -> list[str]:
    """40 jobs over 8 sessions; each appends its id to runs.txt in its session's workspace."""
    ids = []
    with path.open("w") as handle:
        for n in range(SESSIONS * JOBS_PER_SESSION):
            job_id = f"{prefix}-{n}"
            ids.append(job_id)
            job = {
                "id": job_id,
                "session_id": f"{prefix}-s{n % SESSIONS}",
                "prompt": f"echo {job_id} >> {RUNS_FILE}; sleep 0.3",
            }
            handle.write(json.dumps(job) + "\n")
    return ids


def runs(prefix: str) -> Counter[str]:
    """How often each job's command ran, from the lines in every workspace."""
    counted: Counter[str] = Counter()
    for n in range(SESSIONS):
        path = get_settings().sessions_root / f"{prefix}-s{n}" / "workspace" / RUNS_FILE
        if path.exists():
            counted.update(path.read_text().split())
    return counted


def recorded(prefix: str) -> list[int]:
    """How many runs each session's history records."""
    return [
        sum(entry.action == "code_execution" for entry in history(f"{prefix}-s{n}"))
        for n in range(SESSIONS)
    ]


def start_submit(jobs: Path, results: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            *(sys.executable, "-m", "claudebox_pool.producer.cli", "submit", str(jobs)),
            *("--results", str(results), "--concurrency", str(SESSIONS)),
        ],
        cwd=REPO,
        env=dict(os.environ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    )


def resume(jobs: Path, results: Path) -> subprocess.CompletedProcess[str]:
    return claudebox_pool(
        "submit", str(jobs), "--results", str(results), "--resume", str(results), timeout_s=240
    )


def test_a_producer_killed_mid_batch_then_resumed_runs_every_command_once(
    batch_redis: RedisServer, tmp_path: Path
) -> None:
    jobs, results = tmp_path / "jobs.jsonl", tmp_path / "results.jsonl"
    ids = write_jobs(jobs, "pk")
    producer = start_submit(jobs, results)
    try:
        wait_for(lambda: sum(runs("pk").values()) >= 12, 120, "a third of the batch to run")
    finally:
        producer.send_signal(signal.SIGKILL)
        producer.wait(10)
    unanswered = {sent.job_id for sent in read_journal(results)} - set(latest_results(results))

    resumed = resume(jobs, results)

    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert runs("pk") == Counter(ids), runs("pk")
    assert recorded("pk") == [JOBS_PER_SESSION] * SESSIONS
    final = latest_results(results)
    assert all(final[job_id].success for job_id in ids)
    # Sent but never answered when the producer died: asked again by key, and said so.
    assert unanswered, "the kill came between two answers: nothing was in flight"
    assert all(final[job_id].resent for job_id in unanswered)
    assert "without a known outcome" in resumed.stdout


def crash_redis_under_a_batch(
    server: RedisServer, jobs: Path, results: Path, prefix: str, outage_s: float
) -> subprocess.CompletedProcess[str]:
    """Run the batch, kill Redis a third of the way through, restart it ``outage_s`` later
    from its AOF; the producer's exit."""
    producer = start_submit(jobs, results)
    try:
        wait_for(lambda: sum(runs(prefix).values()) >= 12, 120, "a third of the batch to run")
        assert server.proc is not None
        server.proc.kill()
        server.proc.wait(10)
        time.sleep(outage_s)  # the fault's length, not a wait for anything
        server.start()  # same port, same directory: the AOF is replayed
        output, _ = producer.communicate(timeout=240)
    finally:
        if producer.poll() is None:
            producer.kill()
    return subprocess.CompletedProcess(producer.args, producer.returncode, output, "")


def test_a_redis_crash_mid_batch_then_resume_runs_every_command_once(
    batch_redis: RedisServer, tmp_path: Path
) -> None:
    jobs, results = tmp_path / "jobs.jsonl", tmp_path / "results.jsonl"
    ids = write_jobs(jobs, "rk")

    first = crash_redis_under_a_batch(batch_redis, jobs, results, "rk", OUTAGE_S)

    # The producer rode the restart out: no job failed for want of Redis, none needs a resume.
    assert first.returncode == 0, first.stdout
    assert runs("rk") == Counter(ids), (runs("rk"), first.stdout)
    # Runs that ended while Redis was away were recorded once it was back.
    assert recorded("rk") == [JOBS_PER_SESSION] * SESSIONS
    assert all(result.success for result in latest_results(results).values())


def test_a_redis_outage_past_the_lock_ttl_reruns_only_what_history_says_it_reruns(
    batch_redis: RedisServer, tmp_path: Path
) -> None:
    jobs, results = tmp_path / "jobs.jsonl", tmp_path / "results.jsonl"
    ids = write_jobs(jobs, "lk")
    crash_redis_under_a_batch(batch_redis, jobs, results, "lk", LONG_OUTAGE_S)

    resumed = resume(jobs, results)

    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert all(latest_results(results)[job_id].success for job_id in ids)
    reruns: Counter[str] = Counter(
        str(entry.context["idempotency_key"]).split("/")[1]
        for n in range(SESSIONS)
        for entry in history(f"lk-s{n}")
        if entry.action == "rerun"
    )
    # A run whose lock expired while Redis was away could not record its outcome: it ran
    # again, and history says so for each extra run; every other command ran once.
    assert reruns, "no run lost its lock: the outage was not past the lock's TTL"
    assert runs("lk") == Counter(ids) + reruns, (runs("lk"), reruns)
    assert recorded("lk") == [JOBS_PER_SESSION] * SESSIONS
