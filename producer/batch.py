"""Batch submission: many jobs, one session's jobs in file order, sessions side by side.

A jobs file holds one JSON object a line::

    {"id": "j1", "session_id": "exp-1", "prompt": "pytest -q", "agent": "shell", "timeout": 600}

``session_id`` may be left out (the job gets an ephemeral session of its own). Results are
appended to the results file as each job ends, so an interrupted batch keeps what it did.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from producer.client import ClaudeBox
from producer.pool import ensure_workers
from tasks.errors import ClaudeBoxError, InvalidRequestError, SessionNotFoundError
from tasks.models import SessionId
from tasks.settings import AgentName


class Job(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = ""
    session_id: SessionId | None = None
    prompt: str = Field(min_length=1)
    agent: AgentName | None = None
    timeout: int | None = Field(default=None, gt=0)
    env: dict[str, str] = Field(default_factory=dict)


class JobResult(BaseModel):
    id: str
    session_id: str
    success: bool
    exit_code: int | None
    duration_s: float
    response: str = ""
    error: str | None = None


@dataclass
class BatchOutcome:
    results: list[JobResult] = field(default_factory=list)

    @property
    def all_succeeded(self) -> bool:
        return all(result.success for result in self.results)


def read_jobs(path: Path) -> list[Job]:
    """Parse a jobs file; InvalidRequestError naming the line of the first bad job."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise InvalidRequestError(f"cannot read jobs file {path}: {exc.strerror}") from None
    jobs = []
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            job = Job.model_validate(json.loads(line))
        except (ValueError, ValidationError) as exc:
            detail = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
            raise InvalidRequestError(f"{path}:{number}: not a valid job: {detail}") from None
        jobs.append(job if job.id else job.model_copy(update={"id": f"line-{number}"}))
    if not jobs:
        raise InvalidRequestError(f"{path} holds no jobs")
    return jobs


async def run_batch(
    jobs_file: Path, results_file: Path, concurrency: int, out: Console
) -> BatchOutcome:
    jobs = read_jobs(jobs_file)
    await ensure_workers()
    groups: dict[str, list[Job]] = defaultdict(list)
    for job in jobs:
        groups[job.session_id or f"ephemeral:{job.id}"].append(job)
    outcome = BatchOutcome()
    gate = asyncio.Semaphore(max(1, concurrency))
    results_file.write_text("")

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("[green]{task.fields[ok]} ok[/] [red]{task.fields[failed]} failed[/]"),
        TimeElapsedColumn(),
        console=out,
    ) as progress:
        bar = progress.add_task(f"{len(groups)} sessions", total=len(jobs), ok=0, failed=0)

        def record(result: JobResult) -> None:
            outcome.results.append(result)
            with results_file.open("a", encoding="utf-8") as handle:
                handle.write(result.model_dump_json() + "\n")
            ok = sum(r.success for r in outcome.results)
            progress.update(bar, advance=1, ok=ok, failed=len(outcome.results) - ok)

        async def run_group(session_jobs: list[Job]) -> None:
            async with gate:
                await _run_session(session_jobs, record)

        await asyncio.gather(*(run_group(group) for group in groups.values()))

    out.print(summary(outcome))
    out.print(f"results written to {results_file}")
    return outcome


async def _run_session(jobs: list[Job], record: Callable[[JobResult], None]) -> None:
    """Run one session's jobs in order; if the session itself fails, fail what is left."""
    session_id = jobs[0].session_id
    finished: set[str] = set()
    try:
        if session_id is None:
            box = ClaudeBox()
        else:
            try:
                box = await ClaudeBox.reconnect(session_id)
            except SessionNotFoundError:
                box = ClaudeBox(session_id=session_id)
        async with box:
            for job in jobs:
                record(await _run_job(box, job))
                finished.add(job.id)
    except ClaudeBoxError as exc:
        for job in jobs:
            if job.id not in finished:
                record(_failed(job, session_id or "", str(exc)))


async def _run_job(box: ClaudeBox, job: Job) -> JobResult:
    try:
        result = await box.code(job.prompt, timeout_s=job.timeout, agent=job.agent)
    except ClaudeBoxError as exc:
        return _failed(job, box.session_id, str(exc))
    return JobResult(
        id=job.id,
        session_id=box.session_id,
        success=result.success,
        exit_code=result.exit_code,
        duration_s=result.duration_s,
        response=result.response,
        error=result.error,
    )


def _failed(job: Job, session_id: str, error: str) -> JobResult:
    return JobResult(
        id=job.id, session_id=session_id, success=False, exit_code=None, duration_s=0, error=error
    )


def summary(outcome: BatchOutcome) -> Table:
    per_session: dict[str, list[JobResult]] = defaultdict(list)
    for result in outcome.results:
        per_session[result.session_id].append(result)
    table = Table("session", "jobs", "ok", "failed", "seconds", title="batch summary")
    for session_id, results in sorted(per_session.items()):
        ok = sum(r.success for r in results)
        table.add_row(
            session_id,
            str(len(results)),
            str(ok),
            str(len(results) - ok),
            f"{sum(r.duration_s for r in results):.2f}",
        )
    return table
