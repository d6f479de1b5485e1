"""The workers' Prometheus metrics, scraped over HTTP from a real worker with two prefork slots
after known runs: each test reads the metrics before and after what it does and asserts the
difference exactly, so that the tests hold in any order on one worker."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from claudebox_pool import ClaudeBox, CodeResult
from claudebox_pool.tasks import names
from claudebox_pool.tasks.app import app
from claudebox_pool.tasks.settings import AgentName, get_settings
from tests.conftest import CLAUDE_CLI, WorkerFactory
from tests.support.model_server import ModelServer, Reply, Text, ToolUse
from tests.support.processes import Worker, free_port, wait_for

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

OPUS = "claude-opus-4-5-20251101"
HAIKU = "claude-haiku-4-5-20251001"


@pytest.fixture(scope="module")
def model() -> Iterator[ModelServer]:
    with ModelServer() as server:
        yield server


@pytest.fixture(scope="module")
def worker(start_workers: WorkerFactory, model: ModelServer) -> Worker:
    (started,) = start_workers(
        1,
        concurrency=2,
        CLAUDEBOX_METRICS_PORT=str(free_port()),
        CLAUDEBOX_MODEL_API_URL=model.url,
        CLAUDEBOX_ANTHROPIC_API_KEY="sk-ant-api03-metrics-test",
    )
    return started


@pytest.fixture
def fresh(worker: Worker, model: ModelServer, clean_state: redis.Redis) -> redis.Redis:
    model.reset()
    return clean_state


def scrape(worker: Worker) -> Samples:
    port = worker.env["CLAUDEBOX_METRICS_PORT"]
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    response.raise_for_status()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def grew(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def run(session_id: str, prompts: list[str], agent: AgentName = "shell") -> list[CodeResult]:
    async def scenario() -> list[CodeResult]:
        async with ClaudeBox(session_id=session_id, agent=agent) as box:
            return [await box.code(prompt) for prompt in prompts]

    return asyncio.run(scenario())


def test_runs_by_outcome_durations_lock_waits_and_sandbox_starts_count_what_ran(
    fresh: redis.Redis, worker: Worker
) -> None:
    before = scrape(worker)

    results = run("metrics-runs", ["true", "echo two", "echo three", "exit 3"])

    assert [r.success for r in results] == [True, True, True, False]
    after = scrape(worker)
    assert grew(before, after, "claudebox_runs_total", agent="shell", outcome="success") == 3
    assert grew(before, after, "claudebox_runs_total", agent="shell", outcome="failure") == 1
    count = "claudebox_run_duration_seconds_count"
    assert grew(before, after, count, agent="shell", outcome="success") == 3
    assert grew(before, after, count, agent="shell", outcome="failure") == 1
    total = "claudebox_run_duration_seconds_sum"
    assert grew(before, after, total, agent="shell", outcome="success") == pytest.approx(
        sum(r.duration_s or 0 for r in results[:3]), abs=0.01
    )
    # The first run started the session's sandbox; the other three found it kept warm.
    starts = "claudebox_sandbox_start_seconds_count"
    assert grew(before, after, starts, kind="cold") == 1
    assert grew(before, after, starts, kind="warm") == 3
    # Creating the session and each run took its lock at once.
    assert grew(before, after, "claudebox_lock_wait_seconds_count", result="acquired") == 5
    assert grew(before, after, "claudebox_lock_wait_seconds_count", result="busy") == 0
    assert value(after, "claudebox_warm_sandboxes", state="idle") == 1
    assert value(after, "claudebox_warm_sandboxes", state="leased") == 0
    assert value(after, "claudebox_sessions", status="stopped") == 1
    port = worker.env["CLAUDEBOX_METRICS_PORT"]
    assert f"metrics: http://127.0.0.1:{port}/metrics" in worker.log()
    node = get_settings().node
    assert value(after, "claudebox_sessions_disk_bytes", node=node) > 0
    assert value(after, "claudebox_disk_free_bytes", node=node) > 0


def test_queue_depth_counts_the_tasks_waiting_with_no_consumer(
    fresh: redis.Redis, worker: Worker
) -> None:
    app.control.cancel_consumer(names.QUEUE, destination=[worker.hostname], reply=True)
    try:
        for _ in range(3):
            app.send_task(names.CODE, args=[{}], queue=names.QUEUE)
        wait_for(lambda: fresh.llen(names.QUEUE) == 3, 10, "three tasks queued")

        samples = scrape(worker)

        assert value(samples, "claudebox_queue_depth", queue=names.QUEUE) == 3
        assert (
            value(samples, "claudebox_queue_depth", queue=names.worker_queue(worker.hostname)) == 0
        )
    finally:
        fresh.delete(names.QUEUE)
        app.control.add_consumer(names.QUEUE, destination=[worker.hostname], reply=True)


@pytest.mark.skipif(
    not Path(CLAUDE_CLI).exists(),
    reason="needs the Claude Code CLI from the npm registry (scripts/setup installs it)",
)
def test_tokens_and_cost_by_model_are_what_the_gateway_metered(
    fresh: redis.Redis, worker: Worker, model: ModelServer
) -> None:
    model.push(
        Reply(
            [ToolUse("Write", {"file_path": "/workspace/a.txt", "content": "a\n"})],
            input_tokens=1500,
            output_tokens=60,
            cache_creation_input_tokens=4000,
            model=OPUS,
        ),
        Reply(
            [Text("done")],
            input_tokens=300,
            output_tokens=25,
            cache_read_input_tokens=900,
            model=HAIKU,
        ),
    )
    before = scrape(worker)

    (result,) = run("metrics-tokens", ["write a.txt"], agent="claude")

    assert result.success, result.error
    after = scrape(worker)
    tokens = "claudebox_model_tokens_total"
    assert grew(before, after, tokens, model=OPUS, kind="input") == 1500
    assert grew(before, after, tokens, model=OPUS, kind="output") == 60
    assert grew(before, after, tokens, model=OPUS, kind="cache_creation_input") == 4000
    assert grew(before, after, tokens, model=OPUS, kind="cache_read_input") == 0
    assert grew(before, after, tokens, model=HAIKU, kind="input") == 300
    assert grew(before, after, tokens, model=HAIKU, kind="output") == 25
    assert grew(before, after, tokens, model=HAIKU, kind="cache_read_input") == 900
    for name, used in result.usage.items():
        assert grew(before, after, "claudebox_model_cost_usd_total", model=name) == pytest.approx(
            used.cost_usd
        )
    assert grew(before, after, "claudebox_runs_total", agent="claude", outcome="success") == 1


@pytest.mark.skipif(
    not Path(CLAUDE_CLI).exists(),
    reason="needs the Claude Code CLI from the npm registry (scripts/setup installs it)",
)
def test_a_budget_refusal_and_an_egress_denial_are_counted_by_kind(
    fresh: redis.Redis, worker: Worker, model: ModelServer
) -> None:
    model.push([Text("first")], [Text("never sent")])
    # Nothing listens there: the proxy refuses the host before it would connect.
    fetch = f"env -u NO_PROXY -u no_proxy curl -sS -m 5 http://127.0.0.1:{free_port()}/ || true"
    before = scrape(worker)

    async def scenario() -> list[CodeResult]:
        # A shell run gets the egress proxy only where some host is allowed.
        allowed = ["allowed.example:443"]
        box = ClaudeBox(session_id="metrics-refusals", budget_usd=0.005, egress_allow=allowed)
        async with box:
            return [
                await box.code("spend", agent="claude"),
                await box.code("spend more", agent="claude"),
                await box.code(fetch, agent="shell"),
            ]

    spent, refused, fetched = asyncio.run(scenario())

    assert spent.success and not refused.success and fetched.success, fetched.response
    after = scrape(worker)
    refusals = "claudebox_gateway_refusals_total"
    assert grew(before, after, refusals, kind="budget_exceeded") == 1
    assert grew(before, after, refusals, kind="egress_denied") == 1
    assert grew(before, after, "claudebox_runs_total", agent="claude", outcome="failure") == 1
