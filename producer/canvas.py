"""Sending a batch that nobody waits for (``submit --no-wait``): the order goes to Celery.

The sessions are opened first (that takes a moment, and a bad session id fails here, not in a
worker's log); then each session's jobs become one Celery chain of immutable signatures, sent
by the workers one after another, and the chains go out as a group, side by side. A session
whose jobs depend on another session's jobs waits for that whole session: sessions are put in
stages by their dependencies, and the stages are chained (a chord per stage), since a canvas
can only join whole groups. An ephemeral job's chain ends with the cleanup of its session.

What differs from waiting (see :mod:`producer.batch` for why the waiting path orders jobs
itself): a job runs after its dependencies even when they *returned* a failure (only a task
that raised stops its chain, and the later stages); there is no ``--retry`` and no
``--concurrency`` (the workers' slots are the only bound); dependencies that go both ways
between two sessions cannot be staged and are refused; and a step that finds its session busy
with another producer's task waits ``CLAUDEBOX_LOCK_WAIT_S`` counted from the submission.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from celery import chain, group
from celery.canvas import Signature
from pydantic import BaseModel
from redis.exceptions import RedisError

from producer import pool, routing
from producer.batch import Job, JobResult, by_session, plan
from producer.client import ClaudeBox
from tasks import names
from tasks.app import app
from tasks.connections import async_redis
from tasks.errors import InvalidRequestError, SessionAlreadyExistsError, SessionNotFoundError
from tasks.models import CleanupRequest, CodeRequest


class QueuedJob(BaseModel):
    """A job sent with ``--no-wait``: follow or cancel it by ``task_id``."""

    id: str
    session_id: str
    task_id: str


async def enqueue(
    jobs: Sequence[Job | Mapping[str, Any]], *, done: Mapping[str, JobResult] | None = None
) -> list[QueuedJob]:
    """Send a batch for the workers to run in order; return at once with the jobs' task ids.

    Jobs in ``done`` (an earlier run's successes) are left out.
    """
    checked = plan(jobs)
    finished = done or {}
    todo = [job for job in checked if job.id not in finished]
    if not todo:
        return []
    groups = by_session(todo)
    stages = _stages(groups, {job.id: job.session_key for job in checked}, set(finished))
    await pool.ensure_workers()
    opened = await asyncio.gather(*(_open(jobs[0]) for jobs in groups.values()))
    session_ids = dict(zip(groups, opened, strict=True))
    queues = await _queues(session_ids.values())
    queued: list[QueuedJob] = []
    chains: dict[str, Signature] = {}
    for key, session_jobs in groups.items():
        steps = []
        for job in session_jobs:
            task_id = str(uuid.uuid4())
            steps.append(_code_step(job, session_ids[key], task_id, queues[session_ids[key]]))
            queued.append(QueuedJob(id=job.id, session_id=session_ids[key], task_id=task_id))
        if session_jobs[0].session_id is None:
            steps.append(_cleanup_step(session_ids[key], queues[session_ids[key]]))
        chains[key] = chain(*steps)
    canvas = [group(*(chains[key] for key in stage)) for stage in stages]
    (canvas[0] if len(canvas) == 1 else chain(*canvas)).apply_async()
    order = {job.id: index for index, job in enumerate(checked)}
    return sorted(queued, key=lambda item: order[item.id])


def _stages(
    groups: Mapping[str, list[Job]], session_of: Mapping[str, str], finished: set[str]
) -> list[list[str]]:
    """Sessions in stages: each after every session it depends on (done jobs count as met)."""
    needs = {
        key: {
            session_of[name]
            for job in jobs
            for name in job.depends_on
            if name not in finished and session_of[name] != key
        }
        for key, jobs in groups.items()
    }
    stages: list[list[str]] = []
    placed: set[str] = set()
    while len(placed) < len(groups):
        stage = [key for key in groups if key not in placed and needs[key] <= placed]
        if not stage:
            tangled = sorted(key for key in groups if key not in placed)
            raise InvalidRequestError(
                f"sessions {tangled} depend on each other both ways; Celery can only order "
                "whole sessions, so run this batch with --wait"
            )
        stages.append(stage)
        placed.update(stage)
    return stages


async def _open(job: Job) -> str:
    """Create the job's session, or check that it exists; its id."""
    if job.session_id is None:
        box = ClaudeBox()
        await box.__aenter__()  # left open: the chain's last step removes it
        return box.session_id
    try:
        await ClaudeBox.reconnect(job.session_id)
    except SessionNotFoundError:
        # Another producer may have created it a moment ago.
        with contextlib.suppress(SessionAlreadyExistsError):
            await ClaudeBox(session_id=job.session_id).__aenter__()
    return job.session_id


async def _queues(session_ids: Iterable[str]) -> dict[str, str]:
    """The queue of each session: its node's, where its files live (``producer.routing``)."""
    client = async_redis(pool.settings())
    try:
        return {
            session_id: (await routing.route({"session_id": session_id}, client)).queue
            for session_id in session_ids
        }
    except (RedisError, OSError) as exc:
        raise pool.unreachable(exc) from None
    finally:
        await client.aclose()


def _code_step(job: Job, session_id: str, task_id: str, queue: str) -> Signature:
    request = CodeRequest(
        session_id=session_id,
        prompt=job.prompt,
        agent=job.agent or pool.settings().agent,
        env=job.env,
        timeout_s=job.timeout,
    )
    return app.signature(
        names.CODE,
        args=[request.model_dump(mode="json")],
        immutable=True,
        task_id=task_id,
        queue=queue,
    )


def _cleanup_step(session_id: str, queue: str) -> Signature:
    request = CleanupRequest(session_id=session_id, remove_workspace=True, reason="batch ended")
    return app.signature(
        names.CLEANUP, args=[request.model_dump(mode="json")], immutable=True, queue=queue
    )
