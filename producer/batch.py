"""Batch submission: many jobs, one session's jobs in file order, sessions side by side.

A jobs file is JSON Lines (``.jsonl``, one job a line) or YAML (``.yaml``/``.yml``: a list of
jobs, or a mapping whose ``jobs`` key holds one)::

    {"id": "test", "session_id": "exp-1", "prompt": "pytest -q", "agent": "shell",
     "timeout": 600, "env": {"CI": "1"}, "depends_on": ["build"]}

Only ``prompt`` is required; a job without ``session_id`` gets an ephemeral session of its own.
A job takes every option of a code call (``producer.options``), ``timeout`` for ``timeout_s``.
Jobs of one session run in file order; a job also waits for the jobs named in ``depends_on``
(in any session) and is skipped when one of them failed. Sessions run side by side, at most
``concurrency`` at a time, and a failed job is run again up to ``retry`` times before its
session moves on.

Why the producer orders the jobs here, not a Celery canvas
-----------------------------------------------------------
Waiting for a batch (``submit``, ``claudebox-pool submit --wait``, the default) keeps the
producer up anyway: it shows the progress and writes each result as it comes. Ordering the
jobs in that same event loop does what chains and groups cannot:

- a dependency is exact: a job waits for the jobs it names and nothing else, where a canvas
  must join whole chains (a chord) or run dependent sessions in one chain;
- a job whose dependency *failed* is skipped: an agent's failure is a result, not an exception,
  and a chain goes on after a step that returned one;
- ``--retry`` runs a failed job again in its place, before its session's next job;
- ``--concurrency`` bounds the sessions in flight, where a group queues every first step at once;
- each task is sent when it can start, so its wait for a busy session
  (``CLAUDEBOX_LOCK_WAIT_S``) counts from then, not from when the batch was sent;
- Ctrl-C cancels the running tasks and sends nothing more, and ``--resume`` picks up from the
  results file; a canvas would run on with nobody collecting its results.

Every code task carries an idempotency key (batch id, job id, round), written to the
sent-journal before it is sent (:mod:`producer.journal`): ``--resume`` after a crash sends the
jobs with an unknown outcome again under their key, and a session that already ran one gives
back its recorded outcome (``replayed``) instead of running it twice.

``--no-wait`` has nobody to order anything, so there the order is handed to Celery as chains
(:mod:`producer.canvas`), with the differences its docstring lists.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, Protocol

import yaml
from pydantic import AliasChoices, BaseModel, Field, ValidationError, field_validator
from rich.console import Console

from claudebox_pool.producer import journal, pool
from claudebox_pool.producer.client import ClaudeBox
from claudebox_pool.producer.journal import Sent, Start
from claudebox_pool.producer.options import OptionFields
from claudebox_pool.producer.progress import BatchProgress, summary
from claudebox_pool.tasks.errors import (
    ClaudeBoxError,
    InvalidRequestError,
    SessionAlreadyExistsError,
    SessionNotFoundError,
)
from claudebox_pool.tasks.models import SessionId, UsageByModel
from claudebox_pool.tasks.workspace_files import TransferResult

DEFAULT_CONCURRENCY = 16
YAML_SUFFIXES = (".yaml", ".yml")


class Job(OptionFields):
    """One job of a batch: a prompt, where it runs, and the options of its code call."""

    id: str = ""
    session_id: SessionId | None = None
    prompt: str = Field(min_length=1)
    depends_on: list[str] = Field(default_factory=list)
    timeout_s: int | None = Field(
        default=None, gt=0, validation_alias=AliasChoices("timeout", "timeout_s")
    )
    """A jobs file names it ``timeout``."""

    @field_validator("depends_on", mode="before")
    @classmethod
    def _one_id_is_a_list(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @property
    def session_key(self) -> str:
        """Which jobs share a session: its id, or the job's own for an ephemeral one."""
        return self.session_id or f"ephemeral:{self.id}"


class JobResult(BaseModel):
    """One line of results.jsonl."""

    id: str
    session_id: str
    success: bool
    exit_code: int | None
    duration_s: float
    response: str = ""
    error: str | None = None
    attempts: int = 1
    task_id: str = ""
    key: str = ""
    """The idempotency key of the send this outcome answers; empty when the outcome is not
    the worker's (the producer never heard back), so that ``--resume`` asks again by key."""
    replayed: bool = False
    """The session had already run this key: its recorded outcome, nothing ran again."""
    resent: bool = False
    """An interrupted run had sent this job without learning its outcome; this run asked the
    session again under the same key."""
    cost_usd: float = 0.0
    usage: UsageByModel = Field(default_factory=dict)
    """The job's model tokens and cost per model, as its CodeResult gave them."""


class BatchObserver(Protocol):
    """What a batch tells while it runs (the CLI's live display is one)."""

    def session_state(self, session: str, state: str, job_id: str | None = None) -> None: ...

    def job_done(self, result: JobResult) -> None: ...


class _Unobserved:
    def session_state(self, session: str, state: str, job_id: str | None = None) -> None:
        pass

    def job_done(self, result: JobResult) -> None:
        pass


# --- reading and checking ---------------------------------------------------------------------


def read_jobs(path: Path) -> list[Job]:
    """Parse a jobs file; InvalidRequestError naming the line (or item) of the first bad job."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidRequestError(f"cannot read jobs file {path}: {exc.strerror}") from None
    jobs = _yaml_jobs(path, text) if path.suffix in YAML_SUFFIXES else _jsonl_jobs(path, text)
    if not jobs:
        raise InvalidRequestError(f"{path} holds no jobs")
    return jobs


def _jsonl_jobs(path: Path, text: str) -> list[Job]:
    jobs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            job = Job.model_validate(json.loads(line))
        except (ValueError, ValidationError) as exc:
            raise InvalidRequestError(f"{path}:{number}: not a valid job: {_why(exc)}") from None
        jobs.append(job if job.id else job.model_copy(update={"id": f"line-{number}"}))
    return jobs


def _yaml_jobs(path: Path, text: str) -> list[Job]:
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InvalidRequestError(f"{path}: not valid YAML: {exc}") from None
    if isinstance(document, dict):
        document = document.get("jobs")
    if document is None:
        return []
    if not isinstance(document, list):
        raise InvalidRequestError(f"{path}: expected a list of jobs (or a `jobs:` list)")
    jobs = []
    for number, item in enumerate(document, start=1):
        try:
            job = Job.model_validate(item)
        except ValidationError as exc:
            why = _why(exc)
            raise InvalidRequestError(f"{path}: job {number}: not a valid job: {why}") from None
        jobs.append(job if job.id else job.model_copy(update={"id": f"job-{number}"}))
    return jobs


def _why(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        return f"{where}: {error['msg']}" if where else str(error["msg"])
    return str(exc)


def read_results(path: Path) -> dict[str, JobResult]:
    """The jobs a results file says succeeded (the last line of a job wins), for ``--resume``."""
    return {job_id: result for job_id, result in latest_results(path).items() if result.success}


def latest_results(path: Path) -> dict[str, JobResult]:
    """The last result line of each job of a results file."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise InvalidRequestError(f"cannot read results file {path}: {exc.strerror}") from None
    latest: dict[str, JobResult] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            result = JobResult.model_validate_json(line)
        except ValidationError:
            raise InvalidRequestError(f"{path}:{number}: not a result line") from None
        latest[result.id] = result
    return latest


def plan(jobs: Sequence[Job | Mapping[str, Any]]) -> list[Job]:
    """Validate a batch: unique ids, known dependencies, no cycle, prompts within the limit.

    Jobs without an id get ``job-<n>``. InvalidRequestError names the job at fault.
    """
    checked: list[Job] = []
    for number, raw in enumerate(jobs, start=1):
        try:
            job = raw if isinstance(raw, Job) else Job.model_validate(raw)
        except ValidationError as exc:
            raise InvalidRequestError(f"job {number}: not a valid job: {_why(exc)}") from None
        checked.append(job if job.id else job.model_copy(update={"id": f"job-{number}"}))
    if not checked:
        raise InvalidRequestError("the batch holds no jobs")
    ids = [job.id for job in checked]
    twice = sorted({job_id for job_id in ids if ids.count(job_id) > 1})
    if twice:
        raise InvalidRequestError(f"job ids must be unique; used more than once: {twice}")
    limit = pool.settings().max_prompt_bytes
    for job in checked:
        unknown = [name for name in job.depends_on if name not in ids]
        if unknown:
            raise InvalidRequestError(f"job {job.id!r} depends on unknown jobs {unknown}")
        if len(job.prompt.encode()) > limit:
            raise InvalidRequestError(
                f"job {job.id!r}: the prompt is over {limit} bytes (CLAUDEBOX_MAX_PROMPT_BYTES)"
            )
    _refuse_cycles(checked)
    return checked


def _refuse_cycles(jobs: list[Job]) -> None:
    """A job may not wait, through depends_on and its sessions' order, for itself."""
    before: dict[str, set[str]] = {job.id: set(job.depends_on) for job in jobs}
    previous: dict[str, str] = {}
    for job in jobs:
        if job.session_key in previous:
            before[job.id].add(previous[job.session_key])
        previous[job.session_key] = job.id
    ready = [job_id for job_id, needs in before.items() if not needs]
    waiting = {job_id: set(needs) for job_id, needs in before.items() if needs}
    while ready:
        finished = ready.pop()
        for job_id in list(waiting):
            waiting[job_id].discard(finished)
            if not waiting[job_id]:
                del waiting[job_id]
                ready.append(job_id)
    if waiting:
        raise InvalidRequestError(
            f"jobs {sorted(waiting)} wait for each other in a cycle (through depends_on and "
            "the file order of their sessions); a job can only depend on jobs that can run first"
        )


def by_session(jobs: Sequence[Job]) -> dict[str, list[Job]]:
    """Each session's jobs in file order, sessions in order of first appearance."""
    groups: dict[str, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.session_key, []).append(job)
    return groups


# --- running, and waiting ---------------------------------------------------------------------


async def submit(
    jobs: Sequence[Job | Mapping[str, Any]],
    *,
    concurrency: int = DEFAULT_CONCURRENCY,
    retry: int = 0,
    done: Mapping[str, JobResult] | None = None,
    observer: BatchObserver | None = None,
    starts: Mapping[str, Start] | None = None,
    record_send: Callable[[Sent], None] | None = None,
    export: Path | None = None,
    download: Path | None = None,
    on_download: Callable[[str, TransferResult | ClaudeBoxError], None] | None = None,
) -> list[JobResult]:
    """Run a batch and return one result per job, in the jobs' order.

    ``jobs`` are :class:`Job` or dicts of the same fields. ``done`` holds results of an earlier
    run (``read_results``); those jobs are not run again and keep their result. ``starts``
    (``journal.starts``) gives the key each job is first sent under (else a new batch id's),
    and ``record_send`` is called with each send before it goes out (``journal.Journal``).
    ``export`` is a directory that gets ``<job id>.jsonl``, the trajectory of each job that ran
    (its turns of the session's conversation, docs/trajectory.schema.json). ``download`` is
    a directory that gets ``<session id>/``: after a session's last job, the files its jobs
    created or changed (modified since its first job of the batch started, by the worker's
    clock); ``on_download`` is told of each session's download, or of why it failed.
    """
    checked = plan(jobs)
    if retry < 0 or concurrency < 1:
        raise InvalidRequestError("retry must be 0 or more and concurrency 1 or more")
    await pool.ensure_workers()
    batch_id = journal.new_batch_id()
    first = {
        job.id: Start(Sent(batch_id=batch_id, job_id=job.id), unknown=False) for job in checked
    }
    return await _Batch(
        checked,
        concurrency,
        retry,
        done or {},
        observer or _Unobserved(),
        {**first, **(starts or {})},
        record_send or (lambda sent: None),
        export,
        download,
        on_download or (lambda session_id, outcome: None),
    ).run()


class _Batch:
    def __init__(
        self,
        jobs: list[Job],
        concurrency: int,
        retry: int,
        done: Mapping[str, JobResult],
        observer: BatchObserver,
        starts: Mapping[str, Start],
        record_send: Callable[[Sent], None],
        export: Path | None = None,
        download: Path | None = None,
        on_download: Callable[[str, TransferResult | ClaudeBoxError], None] = (
            lambda session_id, outcome: None
        ),
    ) -> None:
        self.jobs = jobs
        self.export = export
        self.download = download
        self.on_download = on_download
        self.first_task: dict[str, str] = {}
        """Each session's first task of this batch (its key to the session), for downloads."""
        self.retry = retry
        self.observer = observer
        self.starts = starts
        self.record_send = record_send
        self.gate = asyncio.Semaphore(concurrency)
        loop = asyncio.get_running_loop()
        self.results: dict[str, asyncio.Future[JobResult]] = {
            job.id: loop.create_future() for job in jobs
        }
        for job_id, result in done.items():
            if job_id in self.results:
                self.results[job_id].set_result(result)

    async def run(self) -> list[JobResult]:
        await asyncio.gather(
            *(self._session(key, jobs) for key, jobs in by_session(self.jobs).items())
        )
        return [self.results[job.id].result() for job in self.jobs]

    def _finish(self, result: JobResult) -> None:
        self.results[result.id].set_result(result)
        self.observer.job_done(result)

    async def _session(self, key: str, jobs: list[Job]) -> None:
        todo = [job for job in jobs if not self.results[job.id].done()]
        session_id = jobs[0].session_id or ""
        try:
            # The stack closes the box at the end, which removes an ephemeral session.
            async with AsyncExitStack() as stack:
                box: ClaudeBox | None = None
                for job in todo:
                    self.observer.session_state(key, "waiting", job.id)
                    blocker = await self._failed_dependency(job)
                    if blocker is not None:
                        why = f"skipped: dependency {blocker!r} failed"
                        self._finish(_failed(job, session_id, why))
                        continue
                    async with self.gate:
                        if box is None:
                            self.observer.session_state(key, "opening", job.id)
                            box = await _open(job.session_id, stack)
                            session_id = box.session_id
                        result = await self._run(key, box, job)
                        # Before the box closes: closing removes an ephemeral session.
                        await self._export(box, result)
                    self._finish(result)
                if box is not None:
                    # Before the box closes: closing removes an ephemeral session.
                    await self._download(key, box)
        except ClaudeBoxError as exc:
            for job in todo:
                if not self.results[job.id].done():
                    self._finish(_failed(job, session_id, str(exc)))
        failed = any(not self.results[job.id].result().success for job in jobs)
        self.observer.session_state(key, "failed" if failed else "done")

    async def _export(self, box: ClaudeBox, result: JobResult) -> None:
        if self.export is None or not result.task_id:
            return
        turns = [turn for turn in await box.trajectory() if turn.task_id == result.task_id]
        self.export.mkdir(parents=True, exist_ok=True)
        (self.export / f"{result.id}.jsonl").write_text(
            "".join(turn.model_dump_json() + "\n" for turn in turns), encoding="utf-8"
        )

    async def _download(self, key: str, box: ClaudeBox) -> None:
        first = self.first_task.get(key)
        if self.download is None or first is None:
            return
        try:
            done = await box.files.download(self.download / box.session_id, since_task=first)
        except ClaudeBoxError as exc:
            self.on_download(box.session_id, exc)
        else:
            self.on_download(box.session_id, done)

    async def _failed_dependency(self, job: Job) -> str | None:
        for name in job.depends_on:
            if not (await self.results[name]).success:
                return name
        return None

    async def _run(self, key: str, box: ClaudeBox, job: Job) -> JobResult:
        start = self.starts[job.id]
        sent, resent = start.sent, start.unknown
        attempt = 1
        while True:
            self.observer.session_state(key, "running" if attempt == 1 else "retrying", job.id)
            self.record_send(sent)
            result = await _attempt(box, job, attempt, sent.key, resent)
            if result.task_id:
                self.first_task.setdefault(key, result.task_id)
            if result.success or attempt > self.retry:
                return result
            attempt += 1
            if result.key:
                # The failure is the worker's own outcome: the retry is a new run, a new key.
                sent = sent.model_copy(update={"round": sent.round + 1})


async def _open(session_id: str | None, stack: AsyncExitStack) -> ClaudeBox:
    if session_id is None:
        return await stack.enter_async_context(ClaudeBox())
    try:
        return await stack.enter_async_context(ClaudeBox.reconnect(session_id))
    except SessionNotFoundError:
        pass
    try:
        return await stack.enter_async_context(ClaudeBox(session_id=session_id))
    except SessionAlreadyExistsError:  # another producer created it a moment ago
        return await stack.enter_async_context(ClaudeBox.reconnect(session_id))


async def _attempt(box: ClaudeBox, job: Job, attempt: int, key: str, resent: bool) -> JobResult:
    try:
        result = await box.code(job.prompt, **_keyed(job, key).code_options())
    except ClaudeBoxError as exc:
        return _failed(job, box.session_id, str(exc), attempt, resent)
    return JobResult(
        id=job.id,
        session_id=box.session_id,
        success=result.success,
        exit_code=result.exit_code,
        duration_s=result.duration_s,
        response=result.response,
        error=result.error,
        attempts=attempt,
        task_id=result.task_id,
        key=key,
        replayed=result.replayed,
        resent=resent,
        cost_usd=result.cost_usd,
        usage=result.usage,
    )


def _keyed(job: Job, key: str) -> Job:
    """The batch names each send itself: a key in the jobs file would repeat across rounds."""
    return job.model_copy(update={"idempotency_key": key})


def _failed(
    job: Job, session_id: str, error: str, attempts: int = 1, resent: bool = False
) -> JobResult:
    return JobResult(
        id=job.id,
        session_id=session_id,
        success=False,
        exit_code=None,
        duration_s=0,
        error=error,
        attempts=attempts,
        resent=resent,
    )


# --- the command's batch: a file in, results.jsonl and a live display out ----------------------


class ResultsFile:
    """results.jsonl, written a line as each job ends, so an interrupted batch keeps its work."""

    def __init__(self, path: Path, carried: Sequence[JobResult]) -> None:
        self.path = path
        path.write_text("".join(result.model_dump_json() + "\n" for result in carried))

    def write(self, result: JobResult) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(result.model_dump_json() + "\n")
            handle.flush()
            # Before the journal's next line: a resume must not think an answered job unknown.
            os.fsync(handle.fileno())


async def run_batch(
    jobs_file: Path,
    results_file: Path,
    *,
    concurrency: int = DEFAULT_CONCURRENCY,
    retry: int = 0,
    resume: Path | None = None,
    export: Path | None = None,
    download: Path | None = None,
    console: Console,
) -> tuple[list[JobResult], list[str]]:
    """``claudebox-pool submit --wait``: run the file's jobs with a live display; the results,
    and what went wrong downloading sessions' files (``download``)."""
    jobs = plan(read_jobs(jobs_file))
    earlier = latest_results(resume) if resume is not None else {}
    done = {job_id: result for job_id, result in earlier.items() if result.success}
    sent = journal.read(resume) if resume is not None else []
    batch_id = sent[-1].batch_id if sent else journal.new_batch_id()
    known = {job_id: result.key for job_id, result in earlier.items() if result.key}
    starts = journal.starts(batch_id, [job.id for job in jobs], sent, known)
    await pool.ensure_workers()
    # Read before written: --resume may name the results file itself.
    output = ResultsFile(results_file, [done[job.id] for job in jobs if job.id in done])
    sends = journal.Journal(journal.path_of(results_file), sent)
    fetched: list[tuple[str, TransferResult | ClaudeBoxError]] = []
    try:
        with BatchProgress(console, jobs, done, record=output.write) as progress:
            results = await submit(
                jobs,
                concurrency=concurrency,
                retry=retry,
                done=done,
                observer=progress,
                starts=starts,
                record_send=sends.record,
                export=export,
                download=download,
                on_download=lambda session_id, outcome: fetched.append((session_id, outcome)),
            )
    finally:
        sends.close()
    console.print(summary(results))
    console.print(f"results written to {results_file}")
    failures = []
    for session_id, outcome in sorted(fetched, key=lambda each: each[0]):
        if isinstance(outcome, ClaudeBoxError):
            failures.append(f"session '{session_id}': its files were not downloaded: {outcome}")
        else:
            console.print(
                f"downloaded {outcome.files} files ({outcome.bytes} bytes) of session "
                f"'{session_id}' into {download and download / session_id}",
                highlight=False,
            )
    return results, failures


def all_succeeded(results: Sequence[JobResult]) -> bool:
    return all(result.success for result in results)
