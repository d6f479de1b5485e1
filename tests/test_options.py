"""The options of a code call are declared once (``producer.options``) and reach the worker."""

from __future__ import annotations

import asyncio
import inspect
from pathlib import Path
from typing import Any

import pytest
import redis

from claudebox_pool.producer import canvas
from claudebox_pool.producer.batch import read_jobs
from claudebox_pool.producer.client import ClaudeBox
from claudebox_pool.producer.options import CallOptions, ClaudeOptions, CodeOptions, OptionFields
from claudebox_pool.tasks import env_travel, keys, names
from claudebox_pool.tasks.app import app
from claudebox_pool.tasks.errors import InvalidRequestError
from claudebox_pool.tasks.models import BoxDefaults, CodeRequest
from tests.conftest import WorkerFactory

LIMITS = ["max_turns", "allowed_tools", "disallowed_tools"]
"""The options ``ClaudeBox.code`` also takes positionally, in the seed's order."""


def test_every_option_is_a_job_field_and_travels_in_the_code_request() -> None:
    options = CodeOptions.__optional_keys__

    assert options == set(OptionFields.model_fields)
    assert options <= set(CodeRequest.model_fields)
    assert options - CallOptions.__optional_keys__ == set(LIMITS)


def test_code_takes_the_agent_limits_positionally_after_the_prompt() -> None:
    parameters = list(inspect.signature(ClaudeBox.code).parameters.values())

    assert [p.name for p in parameters[1:5]] == ["prompt", *LIMITS]
    assert all(p.kind is p.POSITIONAL_OR_KEYWORD for p in parameters[1:5])
    assert parameters[-1].kind is inspect.Parameter.VAR_KEYWORD


def test_a_jobs_options_reach_the_task_it_sends(
    tmp_path: Path, pool_env: dict[str, str], clean_state: redis.Redis
) -> None:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(
        '{"id": "a", "prompt": "fix it", "agent": "claude", "timeout": 60, "max_turns": 3, '
        '"allowed_tools": ["Read"], "disallowed_tools": ["Bash"], "env": {"CI": "1"}}\n'
    )
    [job] = read_jobs(jobs)

    step = asyncio.run(canvas._code_step(job, "s-1", "task-1", "claudebox"))

    sent = CodeRequest.model_validate(step.args[0])
    assert (sent.agent, sent.timeout_s, sent.max_turns) == ("claude", 60, 3)
    assert (sent.allowed_tools, sent.disallowed_tools) == (("Read",), ("Bash",))
    # env values travel beside the message (tasks.env_travel), never in it
    assert sent.env == {}
    assert env_travel.bring_back(clean_state, sent).env == {"CI": "1"}


@pytest.fixture(scope="module")
def worker(start_workers: WorkerFactory) -> None:
    # The prompt limit is lowered so an over-limit message stays small on a shared machine.
    start_workers(1, concurrency=1, CLAUDEBOX_MAX_PROMPT_BYTES="1000")


def test_a_bad_schema_or_a_host_dir_is_refused_before_queueing(
    worker: None, clean_state: redis.Redis
) -> None:

    async def call(**options: Any) -> None:
        async with ClaudeBox(agent="shell") as box:
            await box.code("hi", **options)

    with pytest.raises(InvalidRequestError, match="json_schema must be a JSON Schema of an obj"):
        asyncio.run(call(json_schema={"type": "string"}))
    with pytest.raises(InvalidRequestError, match="inside the sandbox"):
        asyncio.run(call(add_dirs=["/workspace/../etc"]))
    with pytest.raises(InvalidRequestError, match="effort"):
        asyncio.run(call(effort="extreme"))
    assert clean_state.llen(names.QUEUE) == 0


def test_a_misspelt_option_in_a_job_is_refused(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"id": "a", "prompt": "fix it", "modle": "claude-sonnet-4-5"}\n')

    with pytest.raises(InvalidRequestError, match="modle"):
        read_jobs(jobs)


def test_a_raw_message_over_the_prompt_limit_is_refused_by_the_worker(
    worker: None, clean_state: redis.Redis
) -> None:

    async def scenario() -> None:
        async with ClaudeBox(session_id="raw-big", agent="shell") as box:
            await box.code("true")
        payload = {"session_id": "raw-big", "prompt": "echo " + "x" * 2000, "agent": "shell"}
        result = app.send_task(names.CODE, args=[payload], queue=names.QUEUE)
        with pytest.raises(InvalidRequestError, match="over the limit of 1000"):
            await asyncio.to_thread(result.get, timeout=60)

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("name", "text"),
    [
        (
            "jobs.jsonl",
            '{"id": "a", "prompt": "p", "mcp_servers": {"fs": {"command": "x", "argz": []}}}\n',
        ),
        ("jobs.yaml", "- id: a\n  prompt: p\n  mcp_servers:\n    web: {type: http, url: 7}\n"),
    ],
)
def test_a_misspelt_or_mistyped_mcp_server_in_a_jobs_file_is_refused(
    tmp_path: Path, name: str, text: str
) -> None:
    jobs = tmp_path / name
    jobs.write_text(text)

    with pytest.raises(InvalidRequestError, match="mcp_servers"):
        read_jobs(jobs)


def test_a_jobs_mcp_servers_travel_beside_the_message(
    tmp_path: Path, pool_env: dict[str, str], clean_state: redis.Redis
) -> None:
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text(
        "- id: a\n  prompt: p\n  mcp_servers:\n"
        "    fs: {command: node, args: [server.js], env: {TOKEN: OTTER}}\n"
    )
    [job] = read_jobs(jobs)

    step = asyncio.run(canvas._code_step(job, "s-1", "task-1", "claudebox"))

    sent = CodeRequest.model_validate(step.args[0])
    assert "OTTER" not in str(step.args)
    (server,) = (env_travel.bring_back(clean_state, sent).mcp_servers or {}).values()
    assert server.model_dump() == {
        "type": "stdio",
        "command": "node",
        "args": ("server.js",),
        "env": {"TOKEN": "OTTER"},
    }


def test_a_batch_with_an_mcp_server_off_the_egress_list_is_refused_before_anything_is_queued(
    pool_env: dict[str, str], clean_state: redis.Redis
) -> None:
    far = {"far": {"type": "sse", "url": "https://mcp.example.net:8443/sse"}}
    jobs: list[dict[str, Any]] = [
        {"id": "a", "prompt": "p"},
        {"id": "b", "prompt": "p", "mcp_servers": far},
    ]

    with pytest.raises(InvalidRequestError, match=r"'far' is at mcp\.example\.net:8443"):
        asyncio.run(canvas.enqueue(jobs))
    assert ClaudeBox.list_sessions() == []
    assert clean_state.llen(names.QUEUE) == 0
    assert list(clean_state.scan_iter(keys.task_env("*"))) == []


def test_a_boxs_claude_options_but_its_mcp_servers_are_kept_for_a_reconnecting_producer() -> None:
    kept = ClaudeOptions.__optional_keys__ - {"mcp_servers"}

    assert kept | {"agent"} == set(BoxDefaults.model_fields)
