"""Busy sessions, call order, and tasks that kill their worker."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from claudebox_pool import ClaudeBox, SessionBusyError, TaskAttemptsExceededError
from tests.conftest import WorkerFactory


@pytest.fixture(scope="module")
def short_waits(start_workers: WorkerFactory) -> None:
    # The local runtime lets a test task reach its worker process (`kill -9 $PPID`).
    start_workers(
        1,
        concurrency=2,
        CLAUDEBOX_RUNTIME="local",
        CLAUDEBOX_LOCK_TTL_S="2",
        CLAUDEBOX_LOCK_WAIT_S="6",
        CLAUDEBOX_MAX_ATTEMPTS="2",
    )


def test_calls_on_one_box_run_in_the_order_they_were_made(
    short_waits: None, clean_state: object
) -> None:
    async def scenario() -> str:
        async with ClaudeBox(session_id="ordered") as box:
            await asyncio.gather(*(box.code(f"echo {n} >> order.txt") for n in range(12)))
            return (await box.code("cat order.txt")).response

    assert asyncio.run(scenario()).split() == [str(n) for n in range(12)]


def test_a_busy_session_fails_after_the_wait_deadline_without_pinning_a_slot(
    short_waits: None, clean_state: object
) -> None:
    async def scenario() -> tuple[BaseException | None, float]:
        async with ClaudeBox(session_id="busy") as holder, ClaudeBox(session_id="other") as other:
            long_task = asyncio.ensure_future(holder.code("sleep 12"))
            await asyncio.sleep(0.5)  # let the long task take the lock first
            waiting = await ClaudeBox.reconnect("busy")
            blocked = asyncio.ensure_future(waiting.code("echo never"))
            # The waiting task retries off its slot, so the pool's second slot stays free.
            started = time.monotonic()
            assert (await other.code("echo free")).success
            other_s = time.monotonic() - started
            error = None
            try:
                await blocked
            except SessionBusyError as exc:
                error = exc
            await long_task
            return error, other_s

    error, other_s = asyncio.run(scenario())

    assert isinstance(error, SessionBusyError)
    assert "Session 'busy' stayed busy" in str(error)
    assert other_s < 5


def test_a_task_that_kills_its_worker_stops_after_the_attempt_limit(
    short_waits: None, clean_state: object
) -> None:
    async def scenario() -> BaseException | None:
        async with ClaudeBox(session_id="poison") as box:
            try:
                await box.code("kill -9 $PPID")
            except TaskAttemptsExceededError as exc:
                return exc
            return None

    error = asyncio.run(scenario())

    assert isinstance(error, TaskAttemptsExceededError)
    assert error.attempts == 2
    workspace = Path(ClaudeBox.list_sessions()[0].workspace_path)
    history = workspace.parent / ".claudebox" / "history.jsonl"
    assert '"attempt_interrupted"' in history.read_text()
