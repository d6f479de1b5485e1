"""Trajectories: the real CLI's transcript, read back through a real worker, turn by turn."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]  # the lock has no stubs for it
import redis

from claudebox_pool import ClaudeBox
from tests.support.model_server import ModelServer, Text, ToolUse
from tests.support.processes import claudebox_pool

# Fixtures shared with the claude pool tests: one scripted model server and one worker.
from tests.test_claude_pool import code, fresh, model, pytestmark, worker  # noqa: F401

SCHEMA = json.loads((Path(__file__).parents[1] / "docs" / "trajectory.schema.json").read_text())


def test_two_calls_with_a_tool_use_come_back_turn_by_turn(
    fresh: redis.Redis,  # noqa: F811
    model: ModelServer,  # noqa: F811
) -> None:
    write = ToolUse("Write", {"file_path": "/workspace/a.txt", "content": "A\n"})
    model.push([Text("sure"), write], [Text("written")], [Text("second answer")])
    first_task = code("traj", "write a.txt").task_id
    second_task = code("traj", "and now?").task_id

    async def read() -> list[dict[str, Any]]:
        async with ClaudeBox.reconnect("traj") as box:
            return [turn.model_dump(mode="json") for turn in await box.trajectory()]

    turns = asyncio.run(read())
    exported = claudebox_pool("sessions", "export", "traj", "--format", "jsonl")

    assert exported.returncode == 0, exported.stderr
    assert [json.loads(line) for line in exported.stdout.splitlines()] == turns
    assert_scripted(turns, first_task, second_task, write)


def test_submit_export_writes_each_jobs_turns(
    fresh: redis.Redis,  # noqa: F811
    model: ModelServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    write = ToolUse("Write", {"file_path": "/workspace/a.txt", "content": "A\n"})
    model.push([Text("sure"), write], [Text("written")], [Text("second answer")])
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(
        "".join(
            json.dumps({"id": job_id, "session_id": "batch-traj", "agent": "claude", "prompt": p})
            + "\n"
            for job_id, p in (("one", "write a.txt"), ("two", "and now?"))
        )
    )
    results = tmp_path / "results.jsonl"

    done = claudebox_pool(
        "submit", str(jobs), "--results", str(results), "--export", str(tmp_path / "out")
    )

    assert done.returncode == 0, done.stdout + done.stderr
    task_ids = {r["id"]: r["task_id"] for r in map(json.loads, results.read_text().splitlines())}
    one, two = (
        [json.loads(line) for line in (tmp_path / "out" / f"{job}.jsonl").read_text().splitlines()]
        for job in ("one", "two")
    )
    assert_scripted(one + two, task_ids["one"], task_ids["two"], write)


def assert_scripted(
    turns: list[dict[str, Any]], first_task: str, second_task: str, write: ToolUse
) -> None:
    """The conversation the scripted model and the two prompts made, turn by turn."""
    for turn in turns:
        jsonschema.validate(turn, SCHEMA)
    shape = [(t["role"], t["task_id"], [b["type"] for b in t["content"]]) for t in turns]
    assert shape == [
        ("user", first_task, ["text"]),
        ("assistant", first_task, ["text", "tool_use"]),
        ("user", first_task, ["tool_result"]),
        ("assistant", first_task, ["text"]),
        ("user", second_task, ["text"]),
        ("assistant", second_task, ["text"]),
    ]
    assert turns[0]["content"][0]["text"] == "write a.txt"
    assert turns[1]["content"][1] == {
        "type": "tool_use",
        "id": write.id,
        "name": "Write",
        "input": write.input,
    }
    assert turns[2]["content"][0]["tool_use_id"] == write.id
    assert "a.txt" in json.dumps(turns[2]["content"][0]["content"])
    assert [t["content"][0]["text"] for t in turns if t["role"] == "assistant"][1:] == [
        "written",
        "second answer",
    ]
    assistant = [t for t in turns if t["role"] == "assistant"]
    assert all(t["usage"]["input_tokens"] == 1200 for t in assistant)
    assert all(t["usage"]["output_tokens"] == 80 for t in assistant)
    assert [t["index"] for t in turns] == list(range(6))
    assert {t["session_id"] for t in turns} == {turns[0]["session_id"]}
    assert all(t["duration_ms"] is not None and t["duration_ms"] >= 0 for t in turns)
