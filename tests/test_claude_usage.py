"""Token usage, end to end: the pinned Claude Code CLI in a bwrap sandbox of a real worker
calls a scripted Messages API through the worker's gateway, and what the server reported, per
model, reaches the call's result, the session's totals, `sessions show`, and a batch's
results.jsonl and summary.

The scripted server answers some turns as another model than the CLI asked for (its
``message_start`` names it), which is how one session comes to use two models here.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis

from claudebox_pool import ClaudeBox, CodeResult, SessionNotFoundError
from claudebox_pool.tasks.settings import DEFAULT_MODEL_PRICES
from tests.conftest import CLAUDE_CLI, WorkerFactory
from tests.support.model_server import ModelServer, Reply, Text, ToolUse
from tests.support.processes import Worker, claudebox_pool

pytestmark = pytest.mark.skipif(
    not Path(CLAUDE_CLI).exists(),
    reason="needs the Claude Code CLI from the npm registry (scripts/setup installs it)",
)

OPUS = "claude-opus-4-5-20251101"
HAIKU = "claude-haiku-4-5-20251001"
WIDE = {"COLUMNS": "200"}
"""So that rich draws the CLI's tables without wrapping their cells."""


@pytest.fixture(scope="module")
def model() -> Iterator[ModelServer]:
    with ModelServer() as server:
        yield server


@pytest.fixture(scope="module")
def worker(start_workers: WorkerFactory, model: ModelServer) -> Worker:
    (started,) = start_workers(
        1,
        concurrency=1,
        CLAUDEBOX_MODEL_API_URL=model.url,
        CLAUDEBOX_ANTHROPIC_API_KEY="sk-ant-api03-usage-test",
    )
    return started


@pytest.fixture
def fresh(worker: Worker, model: ModelServer, clean_state: redis.Redis) -> redis.Redis:
    model.reset()
    return clean_state


def metered(replies: Sequence[Reply]) -> dict[str, dict[str, Any]]:
    """What the replies report, summed per model they name, priced at the list prices."""
    usage: dict[str, dict[str, Any]] = {}
    for reply in replies:
        assert reply.model is not None
        family = next(name for name in DEFAULT_MODEL_PRICES if name in reply.model)
        price = DEFAULT_MODEL_PRICES[family]
        counts = {
            "input_tokens": reply.input_tokens,
            "output_tokens": reply.output_tokens,
            "cache_creation_input_tokens": reply.cache_creation_input_tokens,
            "cache_read_input_tokens": reply.cache_read_input_tokens,
        }
        cost = (
            counts["input_tokens"] * price.input
            + counts["output_tokens"] * price.output
            + counts["cache_creation_input_tokens"] * price.cache_write
            + counts["cache_read_input_tokens"] * price.cache_read
        ) / 1e6
        seen = usage.setdefault(reply.model, {name: 0 for name in counts} | {"cost_usd": 0.0})
        for name, count in counts.items():
            seen[name] += count
        seen["cost_usd"] += cost
    return usage


def approx_usage(usage: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        name: {**used, "cost_usd": pytest.approx(used["cost_usd"])} for name, used in usage.items()
    }


def dumped(result: CodeResult) -> dict[str, dict[str, Any]]:
    return {name: used.model_dump() for name, used in result.usage.items()}


def code(session_id: str, prompt: str, idempotency_key: str | None = None) -> CodeResult:
    async def scenario() -> CodeResult:
        try:
            box = await ClaudeBox.reconnect(session_id)
        except SessionNotFoundError:
            box = ClaudeBox(session_id=session_id, agent="claude")
        async with box:
            return await box.code(prompt, agent="claude", idempotency_key=idempotency_key)

    return asyncio.run(scenario())


def table_rows(output: str) -> dict[str, list[str]]:
    """The cells of each table line of ``output``, keyed by its first cell."""
    rows = {}
    for line in output.splitlines():
        cells = [cell for cell in line.split() if cell.strip("│┃|")]
        if cells:
            rows[cells[0]] = cells[1:]
    return rows


def session_dir(session_id: str) -> Path:
    record = next(r for r in ClaudeBox.list_sessions() if r.session_id == session_id)
    return Path(record.workspace_path).parent


FIRST_CALL = [
    Reply(
        [ToolUse("Write", {"file_path": "/workspace/a.txt", "content": "a\n"})],
        input_tokens=1500,
        output_tokens=60,
        cache_creation_input_tokens=4000,
        model=OPUS,
    ),
    Reply(
        [ToolUse("Bash", {"command": "cat a.txt", "description": "read it"})],
        input_tokens=300,
        output_tokens=25,
        cache_read_input_tokens=900,
        model=HAIKU,
    ),
    Reply(
        [Text("written and read")],
        input_tokens=200,
        output_tokens=40,
        cache_read_input_tokens=5500,
        model=OPUS,
    ),
]
SECOND_CALL = [
    Reply(
        [Text("again")], input_tokens=700, output_tokens=15, cache_read_input_tokens=60, model=HAIKU
    ),
]


def test_a_calls_usage_per_model_and_the_sessions_totals_equal_what_the_server_reported(
    fresh: redis.Redis, model: ModelServer
) -> None:
    model.push(*FIRST_CALL, *SECOND_CALL)

    first = code("two-models", "write a.txt, then read it")
    second = code("two-models", "once more")

    assert first.success, first.error
    assert second.success, second.error
    assert len(model.message_requests()) == 4
    assert dumped(first) == approx_usage(metered(FIRST_CALL))
    assert dumped(second) == approx_usage(metered(SECOND_CALL))
    assert first.cost_usd == pytest.approx(sum(u["cost_usd"] for u in metered(FIRST_CALL).values()))
    session = metered([*FIRST_CALL, *SECOND_CALL])
    record = json.loads((session_dir("two-models") / ".claudebox" / "session.json").read_text())
    assert record["total_usage"] == approx_usage(session)
    totals = {
        name: sum(used[name] for used in session.values())
        for name in ("input_tokens", "output_tokens")
    }
    assert (record["total_input_tokens"], record["total_output_tokens"]) == (
        totals["input_tokens"],
        totals["output_tokens"],
    )
    assert record["total_cache_creation_input_tokens"] == 4000
    assert record["total_cache_read_input_tokens"] == 900 + 5500 + 60
    assert record["total_cost_usd"] == pytest.approx(first.cost_usd + second.cost_usd)
    assert record["total_model_requests"] == 4


def test_a_replayed_call_gives_back_the_usage_its_run_recorded(
    fresh: redis.Redis, model: ModelServer
) -> None:
    model.push(*SECOND_CALL)

    ran = code("replay", "once only", idempotency_key="job-1")
    replayed = code("replay", "once only", idempotency_key="job-1")

    assert replayed.replayed and not ran.replayed
    assert len(model.message_requests()) == 1
    assert dumped(replayed) == dumped(ran) == approx_usage(metered(SECOND_CALL))


def test_sessions_show_draws_the_sessions_usage_per_model(
    fresh: redis.Redis, model: ModelServer
) -> None:
    model.push(*FIRST_CALL)
    assert code("shown", "write a.txt, then read it").success

    shown = claudebox_pool("sessions", "show", "shown", env=WIDE)

    assert shown.returncode == 0, shown.stdout + shown.stderr
    rows = table_rows(shown.stdout)
    opus, haiku = metered(FIRST_CALL)[OPUS], metered(FIRST_CALL)[HAIKU]
    assert rows[OPUS] == ["1,700", "100", "4,000", "5,500", f"${opus['cost_usd']:.4f}"]
    assert rows[HAIKU] == ["300", "25", "0", "900", f"${haiku['cost_usd']:.4f}"]
    total = opus["cost_usd"] + haiku["cost_usd"]
    assert rows["total"] == ["2,000", "125", "4,000", "6,400", f"${total:.4f}"]


def test_submit_writes_each_jobs_usage_and_prints_the_batchs_tokens_and_cost(
    fresh: redis.Redis, model: ModelServer, tmp_path: Path
) -> None:
    # Both jobs share a session, so they run in file order and take the script's turns in turn.
    model.push(*FIRST_CALL, *SECOND_CALL)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(
        "".join(
            json.dumps(
                {"id": job_id, "session_id": "metered-batch", "prompt": prompt, "agent": "claude"}
            )
            + "\n"
            for job_id, prompt in (("write", "write a.txt, then read it"), ("again", "again"))
        )
    )
    results = tmp_path / "results.jsonl"

    done = claudebox_pool("submit", str(jobs), "--results", str(results), env=WIDE)

    assert done.returncode == 0, done.stdout + done.stderr
    lines = {line["id"]: line for line in map(json.loads, results.read_text().splitlines())}
    assert lines["write"]["usage"] == approx_usage(metered(FIRST_CALL))
    assert lines["again"]["usage"] == approx_usage(metered(SECOND_CALL))
    batch = metered([*FIRST_CALL, *SECOND_CALL])
    cost = sum(used["cost_usd"] for used in batch.values())
    assert lines["write"]["cost_usd"] + lines["again"]["cost_usd"] == pytest.approx(cost)
    rows = table_rows(done.stdout)
    assert rows["metered-batch"][-1] == f"${cost:.4f}"
    assert rows[OPUS][:4] == ["1,700", "100", "4,000", "5,500"]
    assert rows[HAIKU][:4] == ["1,000", "40", "0", "960"]
    assert rows["total"] == ["2,700", "140", "4,000", "6,460", f"${cost:.4f}"]
