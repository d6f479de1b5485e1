"""A task delivered twice under one task id (a producer's resend, a broker's redelivery after
the visibility timeout) runs once: history gains no second entry, and both get its result."""

from __future__ import annotations

import uuid

import pytest
import redis

from tests.conftest import WorkerFactory
from tests.faults.conftest import entries_of, open_session, result_of, send_code
from tests.support.processes import Worker

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def one_slot(start_workers: WorkerFactory) -> list[Worker]:
    # One slot: tasks run in the order they were queued, so the last one ends after the others.
    return start_workers(1, concurrency=1, CLAUDEBOX_RUNTIME="local")


def test_the_same_task_delivered_twice_runs_once(
    one_slot: list[Worker], clean_state: redis.Redis
) -> None:
    workspace = open_session("twice")
    task_id = f"dup-{uuid.uuid4().hex}"
    prompt = "echo run >> runs.txt; echo answer"

    first = result_of(send_code("twice", prompt, task_id=task_id), 30)
    send_code("twice", prompt, task_id=task_id)
    result_of(send_code("twice", "true"), 30)  # queued after the duplicate: it has run
    again = result_of(task_id, 10)  # the duplicate's result, stored over the first one

    assert (workspace / "runs.txt").read_text() == "run\n"
    assert len(entries_of("twice", "code_execution", task_id)) == 1
    assert first.success and first.response.strip() == "answer"
    assert again.success and again.response == first.response
    assert again.exit_code == first.exit_code
