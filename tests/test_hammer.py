"""Many workers, many tasks, few sessions: the session lock must keep every session serial."""

from __future__ import annotations

import asyncio
import itertools
import json
from datetime import datetime
from pathlib import Path

import pytest

from claudebox_pool import ClaudeBox
from claudebox_pool.tasks.models import CodeRequest
from tests.conftest import WorkerFactory

SESSIONS = 5
TASKS = 200
# A read-modify-write with a pause in the middle: two tasks inside one session at once would
# both read the same count and one line would be lost.
APPEND = 'n=$(wc -l < log.txt); sleep 0.02; echo "line $((n + 1))" >> log.txt; echo "$n"'


@pytest.mark.slow
def test_two_hundred_tasks_on_four_workers_never_overlap_within_a_session(
    start_workers: WorkerFactory, clean_state: object
) -> None:
    start_workers(4, concurrency=1)

    async def scenario() -> list[bool]:
        boxes = [ClaudeBox(session_id=f"hammer-{index}") for index in range(SESSIONS)]
        for box in boxes:
            await box.__aenter__()
            await box.code("touch log.txt")

        # Each task through its own box, so that nothing orders them on the producer side:
        # only the worker's session lock stands between them.
        async def one(index: int) -> bool:
            box = await ClaudeBox.reconnect(f"hammer-{index % SESSIONS}")
            result = await box.code(APPEND)
            return result.success

        return await asyncio.gather(*(one(index) for index in range(TASKS)))

    outcomes = asyncio.run(scenario())

    assert all(outcomes)
    for index in range(SESSIONS):
        workspace = Path(ClaudeBox.list_sessions()[index].workspace_path)
        lines = (workspace / "log.txt").read_text().splitlines()
        assert lines == [f"line {n}" for n in range(1, TASKS // SESSIONS + 1)]
        history = workspace.parent / ".claudebox" / "history.jsonl"
        entries = [json.loads(line) for line in history.read_text().splitlines()]
        runs = [entry for entry in entries if entry["action"] == "code_execution"]
        assert len(runs) == TASKS // SESSIONS + 1
        spans = sorted(
            (
                datetime.fromisoformat(run["context"]["started_at"]),
                datetime.fromisoformat(run["timestamp"]),
            )
            for run in runs
        )
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert start >= end, "two tasks ran inside one session at the same time"


def test_code_request_refuses_bad_session_ids_before_queueing() -> None:
    with pytest.raises(ValueError):
        CodeRequest(session_id="../x", prompt="true", agent="shell")
