"""Beat's sweeps against a real pool: two `celery beat` processes, one worker, one-second
intervals. Old sessions go exactly once (archived), a session in use is never touched, and the
ephemeral session of a producer that was killed is collected while a live producer's is kept."""

from __future__ import annotations

import asyncio
import json
import select
import shutil
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis

from claudebox_pool import ClaudeBox, CodeResult
from claudebox_pool.tasks import keys, names
from claudebox_pool.tasks.lifecycle import SweepReport
from claudebox_pool.tasks.schedule import beat_schedule
from claudebox_pool.tasks.settings import Settings, get_settings
from claudebox_pool.workers.sweeps import LOG_NAME, age_limit
from tests.conftest import WorkerFactory
from tests.support.beat import Beat
from tests.support.processes import REPO, Worker, wait_for

EVERY_S = 1
SWEEPING = {
    "CLAUDEBOX_SWEEP_AGE_EVERY_S": str(EVERY_S),
    "CLAUDEBOX_SWEEP_LEAKS_EVERY_S": str(EVERY_S),
    "CLAUDEBOX_SWEEP_AGE_RULES": '{"temp-": 1}',
    "CLAUDEBOX_LEASE_TTL_S": "2",
}
PRODUCER = """
import asyncio
from claudebox_pool import ClaudeBox

async def main():
    async with ClaudeBox() as box:
        print(box.session_id, flush=True)
        await asyncio.sleep(3600)

asyncio.run(main())
"""


@pytest.fixture(scope="module")
def sweeping_pool(start_workers: WorkerFactory) -> list[Worker]:
    return start_workers(1, concurrency=3, **SWEEPING)


@pytest.fixture
def records() -> Iterator[Path]:
    """Where the sweeps record their runs, and the archives; empty before and after."""
    settings = get_settings()
    log = settings.home / LOG_NAME

    def wipe() -> None:
        log.unlink(missing_ok=True)
        shutil.rmtree(settings.archives_root, ignore_errors=True)

    wipe()
    yield log
    wipe()


def session_dir(session_id: str) -> Path:
    return get_settings().sessions_root / session_id


def backdate(session_id: str, days: float) -> None:
    """Make a session look idle for ``days`` on disk, the sweeps' source of truth."""
    path = session_dir(session_id) / ".claudebox" / "session.json"
    record = json.loads(path.read_text())
    then = datetime.now(UTC).replace(tzinfo=None) - timedelta(days=days)
    record["updated_at"] = then.isoformat(timespec="microseconds")
    path.write_text(json.dumps(record))


def start_producer(env: dict[str, str]) -> subprocess.Popen[str]:
    """A producer process that opens an ephemeral box, prints its session id and waits."""
    return subprocess.Popen(
        [sys.executable, "-c", PRODUCER],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )


def opened_box(producer: subprocess.Popen[str]) -> str:
    """The session id of the box ``producer`` holds open, once it is open."""
    assert producer.stdout is not None
    ready, _, _ = select.select([producer.stdout], [], [], 60)
    assert ready, "the producer never opened its box"
    return producer.stdout.readline().strip()


def read_reports(log: Path) -> list[SweepReport]:
    if not log.exists():
        return []
    return [SweepReport.model_validate_json(line) for line in log.read_text().splitlines()]


@pytest.mark.timeout(120)
@pytest.mark.usefixtures("sweeping_pool")
def test_two_beats_sweep_old_and_leaked_sessions_once_and_never_one_in_use(
    records: Path, tmp_path: Path, pool_env: dict[str, str], clean_state: redis.Redis
) -> None:
    env = {**pool_env, **SWEEPING}

    async def create(*session_ids: str) -> None:
        for session_id in session_ids:
            async with ClaudeBox(session_id=session_id) as box:
                await box.code(f"echo {session_id} > id.txt")

    asyncio.run(create("temp-old-1", "temp-old-2", "temp-busy", "temp-new", "keep-old"))
    for session_id in ("temp-old-1", "temp-old-2", "temp-busy", "keep-old"):
        backdate(session_id, days=2)
    busy_result: list[CodeResult] = []

    async def keep_busy() -> None:
        async with ClaudeBox.reconnect("temp-busy") as box:
            busy_result.append(await box.code("sleep 6; echo done > done.txt"))

    busy = threading.Thread(target=lambda: asyncio.run(keep_busy()))
    busy.start()
    wait_for(lambda: clean_state.exists(keys.session_lock("temp-busy")), 30, "the busy lock")
    beats = [Beat(env, tmp_path / "beats"), Beat(env, tmp_path / "beats")]
    leaky, live = start_producer(env), start_producer(env)
    try:
        for beat in beats:
            beat.start()
        leaked_id, live_id = opened_box(leaky), opened_box(live)
        leaky.send_signal(signal.SIGKILL)
        gone = ("temp-old-1", "temp-old-2", leaked_id)
        wait_for(lambda: not any(session_dir(s).exists() for s in gone), 30, "the sweeps")
        busy.join(30)
        runs_before = len(read_reports(records))
        wait_for(lambda: len(read_reports(records)) >= runs_before + 4, 15, "more sweeps")
    finally:
        for beat in beats:
            beat.stop()
        live.kill()
        live.wait(10)
        leaky.wait(10)

    reports = read_reports(records)
    removed = Counter(each.session_id for report in reports for each in report.removed)
    assert removed == {"temp-old-1": 1, "temp-old-2": 1, leaked_id: 1}
    reasons = {each.session_id: each for report in reports for each in report.removed}
    assert "over the 1-day limit of rule 'temp-'" in reasons["temp-old-1"].reason
    assert "ephemeral with no producer holding it open" in reasons[leaked_id].reason
    archives = sorted(p.name.rsplit("-", 1)[0] for p in get_settings().archives_root.iterdir())
    assert archives == ["temp-old-1", "temp-old-2"]
    assert reasons[leaked_id].archive is None

    skipped = {(each.session_id, each.reason) for report in reports for each in report.skipped}
    assert ("temp-busy", "a task holds its lock") in skipped
    assert (live_id, "a producer holds it open") in skipped
    assert busy_result and busy_result[0].success
    busy_history = (session_dir("temp-busy") / ".claudebox" / "history.jsonl").read_text()
    assert "cleanup" not in busy_history
    for kept in ("temp-busy", "temp-new", "keep-old", live_id):
        assert session_dir(kept).exists(), kept

    for sweep in ("age", "leaks"):
        runs = sum(report.sweep == sweep for report in reports)
        sent = [beat.sent(f"sweep-{sweep}") for beat in beats]
        assert min(sent) >= 2, f"both beats fire the {sweep} sweep: {sent}"
        # Each firing of one beat ran it (+1: the beats' phases), the other beat's added none.
        assert 3 <= runs <= max(sent) + 1 < sum(sent), (sweep, runs, sent)


def test_the_longest_matching_prefix_sets_the_age_limit() -> None:
    settings = Settings(sweep_age_rules={"temp-": 7, "temp-ci-": 1}, sweep_max_age_days=30)

    assert age_limit(settings, "temp-ci-42") == (1, "rule 'temp-ci-'")
    assert age_limit(settings, "temp-x") == (7, "rule 'temp-'")
    assert age_limit(settings, "project") == (30, "CLAUDEBOX_SWEEP_MAX_AGE_DAYS")
    assert age_limit(Settings(), "project") is None


def test_beat_fires_each_sweep_at_its_interval_and_tells_the_sweep() -> None:
    schedule = beat_schedule(Settings(sweep_age_every_s=3600, sweep_leaks_every_s=300))

    assert schedule["sweep-age"]["task"] == names.SWEEP_AGE
    assert schedule["sweep-age"]["schedule"] == 3600
    assert schedule["sweep-leaks"]["args"] == ({"every_s": 300, "every_node": True},)
    assert schedule["reindex-registry"]["args"] == ({"every_node": True},)


@pytest.mark.usefixtures("sweeping_pool")
def test_a_producer_holds_a_lease_on_its_open_box_until_it_exits(
    clean_state: redis.Redis,
) -> None:
    client = clean_state

    async def scenario() -> tuple[bool, int]:
        async with ClaudeBox() as box:
            key = keys.session_lease(box.session_id)
            return bool(client.exists(key)), int(client.ttl(key))

    held, ttl = asyncio.run(scenario())

    assert held
    assert 0 < ttl <= get_settings().lease_ttl_s
    assert not list(client.scan_iter(keys.session_lease("*")))
