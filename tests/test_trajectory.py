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

# Fixtures shared with the claude pool tests: one scripted model server and one worker.
from tests.test_claude_pool import code, fresh, model, pytestmark, worker  # noqa: F401

SCHEMA = json.loads((Path(__file__).parents[1] / "docs" / "trajectory.schema.json").read_text())


def test_two_calls_with_a_tool_use_come_back_turn_by_turn(
    fresh: redis.Redis,  # noqa: F811
    model: ModelServer,  # noqa: F811
) -> None:
    write = ToolUse("Write", {"file_path": "/workspace/a.txt", "content": "A\n"})
    model.push([Text("sure"), write], [Text("written")], [Text("second answer")])
    first = code("traj", "write a.txt")
    second = code("traj", "and now?")

    async def read() -> list[dict[str, Any]]:
        async with ClaudeBox.reconnect("traj") as box:
            return [turn.model_dump(mode="json") for turn in await box.trajectory()]

    turns = asyncio.run(read())

    for turn in turns:
        jsonschema.validate(turn, SCHEMA)
    shape = [(t["role"], t["task_id"], [b["type"] for b in t["content"]]) for t in turns]
    assert shape == [
        ("user", first.task_id, ["text"]),
        ("assistant", first.task_id, ["text", "tool_use"]),
        ("user", first.task_id, ["tool_result"]),
        ("assistant", first.task_id, ["text"]),
        ("user", second.task_id, ["text"]),
        ("assistant", second.task_id, ["text"]),
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
    assert all(t["duration_ms"] is not None and t["duration_ms"] >= 0 for t in turns)
