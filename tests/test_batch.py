"""Batch submission against a real pool: order, parallelism, dependencies, retry, resume.

Jobs that need timing print when they started and ended (``date +%s.%N`` inside the sandbox,
the worker's clock), so order and overlap are read from the jobs themselves, not guessed from
the producer's side.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Sequence
from pathlib import Path

import pytest
from celery.result import AsyncResult

from claudebox_pool import ClaudeBox, CodeResult, JobResult, enqueue, submit
from claudebox_pool.producer import live
from claudebox_pool.producer.batch import read_jobs
from claudebox_pool.tasks.app import app
from claudebox_pool.tasks.errors import InvalidRequestError
from claudebox_pool.tasks.settings import get_settings
from tests.conftest import WorkerFactory
from tests.support.processes import REPO, claudebox_pool, wait_for

TIMED = 's=$(date +%s.%N); sleep {pause}; e=$(date +%s.%N); echo "$s $e"'
"""A job that prints its start and end on the worker's clock."""


@pytest.fixture(scope="module")
def wide_pool(start_workers: WorkerFactory) -> None:
    """Four task slots, so that several sessions can run at once."""
    start_workers(1, concurrency=4)


pytestmark = pytest.mark.usefixtures("wide_pool", "clean_state")


def span(result: JobResult | CodeResult) -> tuple[float, float]:
    start, end = result.response.split()
    return float(start), float(end)


def timed(
    job_id: str, session_id: str | None, pause: float = 0.3, **extra: object
) -> dict[str, object]:
    return {"id": job_id, "session_id": session_id, "prompt": TIMED.format(pause=pause), **extra}


def workspace(session_id: str) -> Path:
    return get_settings().sessions_root / session_id / "workspace"


def results_of(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_example_batch_runs_50_jobs_over_10_sessions_and_exits_0(tmp_path: Path) -> None:
    results = tmp_path / "results.jsonl"

    done = claudebox_pool(
        "submit", str(REPO / "examples" / "batch.jsonl"), "--results", str(results)
    )

    assert done.returncode == 0, done.stdout + done.stderr
    written = results_of(results)
    assert len(written) == 50
    assert [r["id"] for r in written if not r["success"]] == []
    assert len({r["session_id"] for r in written}) == 10
    assert "batch summary" in done.stdout


def test_jobs_of_a_session_keep_file_order_while_sessions_overlap() -> None:
    jobs = [timed(f"{s}-{n}", s) for n in range(3) for s in ("ord-a", "ord-b", "ord-c")]

    results = asyncio.run(submit(jobs))

    by_session: dict[str, list[tuple[float, float]]] = {}
    for result in results:
        assert result.success, result.error
        by_session.setdefault(result.session_id, []).append(span(result))
    for spans in by_session.values():
        assert all(prev_end <= start for (_, prev_end), (start, _) in itertools.pairwise(spans))
    firsts = [spans[0] for spans in by_session.values()]
    assert max(start for start, _ in firsts) < min(end for _, end in firsts), "no overlap"


def test_depends_on_waits_for_a_job_of_another_session_and_skips_after_a_failure() -> None:
    jobs: list[dict[str, object]] = [
        timed("first", "dep-a"),
        timed("after-first", "dep-b", pause=0, depends_on="first"),
        {"id": "broken", "session_id": "dep-c", "prompt": "exit 3"},
        {"id": "needs-broken", "session_id": "dep-d", "prompt": "true", "depends_on": ["broken"]},
        {"id": "independent", "session_id": "dep-d", "prompt": "echo fine"},
    ]

    results = {r.id: r for r in asyncio.run(submit(jobs))}

    assert span(results["after-first"])[0] >= span(results["first"])[1]
    assert results["broken"].exit_code == 3
    assert results["needs-broken"].error == "skipped: dependency 'broken' failed"
    assert results["independent"].response == "fine\n"


def test_retry_runs_a_failed_job_again_before_its_sessions_next_job() -> None:
    flaky = "if [ -f tried ]; then echo second; else touch tried; exit 1; fi"
    jobs = [
        {"id": "flaky", "session_id": "retried", "prompt": flaky},
        {"id": "next", "session_id": "retried", "prompt": "echo next >> log; cat log"},
    ]

    results = asyncio.run(submit(jobs, retry=1))

    assert [(r.id, r.success, r.attempts) for r in results] == [
        ("flaky", True, 2),
        ("next", True, 1),
    ]


def test_resume_runs_only_the_jobs_that_did_not_succeed(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.jsonl"
    lines = [
        {"id": "once", "session_id": "resumed", "prompt": "echo ran >> runs.txt"},
        {"id": "later", "session_id": "resumed", "prompt": "test -f ready"},
    ]
    jobs.write_text("".join(json.dumps(line) + "\n" for line in lines))
    results = tmp_path / "results.jsonl"

    first = claudebox_pool("submit", str(jobs), "--results", str(results))
    (workspace("resumed") / "ready").touch()
    second = claudebox_pool(
        "submit", str(jobs), "--results", str(results), "--resume", str(results)
    )

    assert (first.returncode, second.returncode) == (1, 0)
    assert (workspace("resumed") / "runs.txt").read_text() == "ran\n"
    assert [(r["id"], r["success"]) for r in results_of(results)] == [
        ("once", True),
        ("later", True),
    ]


def test_a_key_the_session_completed_gives_back_its_outcome_and_runs_nothing() -> None:
    async def scenario() -> list[CodeResult]:
        async with ClaudeBox(session_id="keyed") as box:
            once = await box.code("echo ran >> runs.txt; echo first", idempotency_key="k-1")
            again = await box.code("echo ran >> runs.txt; echo other", idempotency_key="k-1")
            fresh = await box.code("echo ran >> runs.txt; echo fresh", idempotency_key="k-2")
            return [once, again, fresh]

    once, again, fresh = asyncio.run(scenario())

    assert (once.replayed, once.response) == (False, "first\n")
    assert (again.replayed, again.response, again.task_id) == (True, "first\n", once.task_id)
    assert (fresh.replayed, fresh.response) == (False, "fresh\n")
    assert (workspace("keyed") / "runs.txt").read_text() == "ran\nran\n"


def test_no_wait_queues_chains_that_keep_order_and_cross_session_dependencies(
    tmp_path: Path,
) -> None:
    jobs = [
        timed("nw-a1", "nw-a"),
        timed("nw-a2", "nw-a"),
        timed("nw-b1", "nw-b", depends_on="nw-a2"),
        timed("nw-c1", None, pause=0),
    ]

    async def scenario() -> tuple[list[str], list[CodeResult]]:
        queued = await enqueue(jobs)
        results = [CodeResult.model_validate(await live.wait(job.task_id, 60)) for job in queued]
        return [job.id for job in queued], results

    ids, results = asyncio.run(scenario())

    assert ids == ["nw-a1", "nw-a2", "nw-b1", "nw-c1"]
    a1, a2, b1, c1 = (span(result) for result in results)
    assert a1[1] <= a2[0] <= a2[1] <= b1[0]
    assert c1[0] < a1[1], "the unrelated job's chain runs beside the others"
    ephemeral = get_settings().sessions_root / results[3].session_id
    wait_for(lambda: not ephemeral.exists(), 30, "the ephemeral session's cleanup step")


def test_a_no_wait_chain_goes_on_after_a_job_whose_run_failed_and_failed_its_task() -> None:
    jobs = [
        {"id": "nf-1", "session_id": "nw-fail", "prompt": "echo no; exit 3"},
        {"id": "nf-2", "session_id": "nw-fail", "prompt": "echo yes"},
    ]

    async def scenario() -> tuple[list[str], list[CodeResult]]:
        queued = await enqueue(jobs)
        results = [CodeResult.model_validate(await live.wait(job.task_id, 60)) for job in queued]
        return [job.task_id for job in queued], results

    task_ids, (failed, after) = asyncio.run(scenario())

    assert (failed.success, failed.exit_code, failed.response) == (False, 3, "no\n")
    assert (after.success, after.response, after.task_id) == (True, "yes\n", task_ids[1])
    # Monitors see the failed run as a failed task, and only that one.
    assert [AsyncResult(task_id, app=app).state for task_id in task_ids] == ["FAILURE", "SUCCESS"]


def test_submit_no_wait_prints_one_task_id_a_job(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text("jobs:\n  - {id: one, session_id: nw-cli, prompt: 'echo 1'}\n")

    done = claudebox_pool("submit", str(jobs), "--no-wait")

    assert done.returncode == 0, done.stderr
    [queued] = [json.loads(line) for line in done.stdout.splitlines()]
    assert (queued["id"], queued["session_id"]) == ("one", "nw-cli")
    assert asyncio.run(live.wait(queued["task_id"], 60))["response"] == "1\n"


def test_a_yaml_jobs_file_reads_like_jsonl(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.yml"
    jobs.write_text(
        "- session_id: y-1\n  prompt: make build\n"
        "- session_id: y-1\n  prompt: make test\n  depends_on: job-1\n  env: {CI: '1'}\n"
    )

    read = read_jobs(jobs)

    assert [(job.id, job.depends_on, job.env) for job in read] == [
        ("job-1", [], {}),
        ("job-2", ["job-1"], {"CI": "1"}),
    ]


@pytest.mark.parametrize(
    ("jobs", "named"),
    [
        ([{"id": "a", "prompt": "x", "depends_on": ["ghost"]}], "unknown jobs ['ghost']"),
        ([{"id": "a", "prompt": "x"}, {"id": "a", "prompt": "y"}], "more than once: ['a']"),
        (
            [
                {"id": "a", "session_id": "s", "prompt": "x", "depends_on": ["b"]},
                {"id": "b", "session_id": "s", "prompt": "y"},
            ],
            "jobs ['a', 'b'] wait for each other in a cycle",
        ),
    ],
    ids=["unknown-dependency", "duplicate-id", "cycle-through-file-order"],
)
def test_a_batch_that_cannot_run_is_refused_naming_the_jobs(
    jobs: Sequence[dict[str, object]], named: str
) -> None:
    with pytest.raises(InvalidRequestError, match=named.replace("[", r"\[").replace("]", r"\]")):
        asyncio.run(submit(jobs))
