"""A caller's wait is for the run, not for the queue: a task queued behind other work longer
than the wait's budget still delivers its outcome to the caller."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis

from claudebox_pool.producer import live
from claudebox_pool.tasks.models import CodeResult
from tests.conftest import WorkerFactory
from tests.faults.conftest import open_session, send_code


@pytest.fixture(scope="module")
def one_slot(start_workers: WorkerFactory) -> None:
    start_workers(1, concurrency=1)


def test_a_task_queued_past_its_wait_budget_still_reaches_its_caller(
    one_slot: None, clean_state: redis.Redis
) -> None:
    open_session("busy")
    open_session("behind")
    ahead = send_code("busy", "sleep 6; echo done")
    queued = send_code("behind", "echo behind")
    started = time.monotonic()

    raw = asyncio.run(live.outlasting(queued, timeout_s=2))

    waited = time.monotonic() - started
    assert CodeResult.model_validate(raw).response == "behind\n"
    assert waited > 4  # it was queued behind `sleep 6`, well past the 2 s budget
    assert CodeResult.model_validate(asyncio.run(live.outlasting(ahead, 30))).success
