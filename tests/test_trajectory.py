"""Trajectories: the real CLI's transcript, read back through a real worker, turn by turn."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]  # the lock has no stubs for it
import redis

from claudebox_pool import ClaudeBox
from claudebox_pool.tasks.models import TrajectoryRequest, TrajectoryTurn
from claudebox_pool.tasks.settings import get_settings
from claudebox_pool.workers import trajectory
from claudebox_pool.workers.context import WorkerContext
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


def test_pages_stay_under_the_cap_and_a_turn_over_it_keeps_only_its_usage(
    fresh: redis.Redis,  # noqa: F811
    model: ModelServer,  # noqa: F811
) -> None:
    model.push([Text("x" * 5000)], [Text("short")])
    code("paged", "long answer please")
    code("paged", "and a short one")
    cap = 1100  # a turn with its usage is some 700 bytes as JSON: two turns at most a page
    ctx = WorkerContext(get_settings().model_copy(update={"max_trajectory_page_bytes": cap}))

    pages = [trajectory.page(ctx, TrajectoryRequest(session_id="paged"))]
    while pages[-1].next_offset is not None:
        offset = pages[-1].next_offset
        pages.append(trajectory.page(ctx, TrajectoryRequest(session_id="paged", offset=offset)))

    turns = [turn for page in pages for turn in page.turns]
    assert [len(page.turns) for page in pages] == [2, 2]
    assert all(sum(len(t.model_dump_json()) for t in page.turns) <= cap for page in pages)
    assert [turn.index for turn in turns] == [0, 1, 2, 3]
    assert [(turn.role, turn.cut) for turn in turns] == [
        ("user", False),
        ("assistant", True),
        ("user", False),
        ("assistant", False),
    ]
    assert turns[1].content == [] and turns[1].usage and turns[1].usage["output_tokens"] == 80
    assert turns[3].content == [{"type": "text", "text": "short"}]


def test_a_symlink_planted_in_the_agent_home_reads_nothing_of_another_session(
    fresh: redis.Redis,  # noqa: F811
    model: ModelServer,  # noqa: F811
) -> None:
    model.push([Text("the victim's secret answer")])
    code("victim", "my secret prompt")
    # From the sandbox's /root/.claude/projects, five steps up is the host's sessions root.
    plant = (
        "mkdir -p ~/.claude/projects && ln -s "
        "../../../../../victim/.claudebox/agent-home/.claude/projects/-workspace "
        "~/.claude/projects/-workspace && ls ~/.claude/projects"
    )

    async def attack() -> list[TrajectoryTurn]:
        async with ClaudeBox(session_id="attacker", agent="shell") as box:
            planted = await box.code(plant)
            assert planted.success, planted.error
            return await box.trajectory()

    stolen = asyncio.run(attack())

    link = get_settings().sessions_root / "attacker/.claudebox/agent-home/.claude/projects"
    assert (link / "-workspace").is_symlink()
    assert (link / "-workspace").resolve().is_dir()  # the link does reach the victim's files
    assert stolen == []
