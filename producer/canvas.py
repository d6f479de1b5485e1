"""Sending a batch that nobody waits for (``submit --no-wait``): the order goes to Celery.

The sessions are opened first (that takes a moment, and a bad session id fails here, not in a
worker's log). Then the jobs become Celery chains of immutable signatures, which the workers
send on one step after another: a session's jobs form one chain, and sessions tied together
by ``depends_on`` share one chain, their jobs in an order that keeps both each session's file
order and every dependency. Unrelated chains go out side by side, as a group's members would;
they are sent one by one, as a group would leave a group result in this process holding every
member's result, subscribed, until someone drained it, and nobody here will (the tasks are
followed by id, ``producer.live``). A job without a session gets a session of its own, which
the step after it removes.

What differs from waiting (see :mod:`producer.batch` for why the waiting path orders jobs
itself): sessions tied by dependencies run one job at a time between them; a job runs after
its dependencies even when they *returned* a failure (only a task that raised stops its
chain); there is no ``--retry`` and no ``--concurrency`` (the workers' slots are the only
bound); and a step that finds its session busy with another producer's task waits
``CLAUDEBOX_LOCK_WAIT_S`` counted from the submission.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from celery import chain
from celery.canvas import Signature
from pydantic import BaseModel

from claudebox_pool.producer import journal, pool, routing
from claudebox_pool.producer.batch import Job, JobResult, by_session, plan
from claudebox_pool.producer.client import ClaudeBox
from claudebox_pool.producer.journal import Sent
from claudebox_pool.producer.options import refuse_unreachable_mcp
from claudebox_pool.tasks import env_travel, names
from claudebox_pool.tasks.app import app
from claudebox_pool.tasks.errors import SessionAlreadyExistsError, SessionNotFoundError
from claudebox_pool.tasks.models import CleanupRequest, CodeRequest

UNNAMED_PREFIX = "batch-"


class QueuedJob(BaseModel):
    """A job sent with ``--no-wait``: follow or cancel it by ``task_id``."""

    id: str
    session_id: str
    task_id: str
    key: str
    """The idempotency key its task carries (``producer.journal``'s form, round 1)."""


async def enqueue(
    jobs: Sequence[Job | Mapping[str, Any]], *, done: Mapping[str, JobResult] | None = None
) -> list[QueuedJob]:
    """Send a batch for the workers to run in order; return at once with the jobs' task ids.

    Jobs in ``done`` (an earlier run's successes) are left out; dependencies on them are met.
    """
    finished = done or {}
    todo = [job for job in plan(jobs) if job.id not in finished]
    if not todo:
        return []
    for job in todo:
        # Checked before any session is opened: a batch gives its sessions no hosts of their
        # own, so the workers' allow-list is the whole list (for a job's named session too).
        refuse_unreachable_mcp(job.mcp_servers, pool.settings().egress_allow)
    await pool.ensure_workers()
    groups = by_session(todo)
    opened = await asyncio.gather(*(_open(session_jobs[0]) for session_jobs in groups.values()))
    session_ids = dict(zip(groups, opened, strict=True))
    queues = await _queues(session_ids.values())
    batch_id = journal.new_batch_id()
    queued = {
        job.id: QueuedJob(
            id=job.id,
            session_id=session_ids[job.session_key],
            task_id=str(uuid.uuid4()),
            key=Sent(batch_id=batch_id, job_id=job.id).key,
        )
        for job in todo
    }
    for strand in _strands(todo):
        steps = []
        for job in strand:
            session_id = session_ids[job.session_key]
            task_id = queued[job.id].task_id
            keyed = job.model_copy(update={"idempotency_key": queued[job.id].key})
            steps.append(await _code_step(keyed, session_id, task_id, queues[session_id]))
            if job.session_id is None:
                steps.append(_cleanup_step(session_id, queues[session_id]))
        chain(*steps).apply_async()
    return [queued[job.id] for job in todo]


def _strands(jobs: list[Job]) -> list[list[Job]]:
    """The jobs in chains: sessions tied by dependencies share one."""
    tied = {job.session_key: job.session_key for job in jobs}

    def root(key: str) -> str:
        while tied[key] != key:
            key = tied[key]
        return key

    session_of = {job.id: job.session_key for job in jobs}
    for job in jobs:
        for name in job.depends_on:
            if name in session_of:  # a dependency done in an earlier run ties nothing
                tied[root(session_of[name])] = root(job.session_key)
    strands: dict[str, list[Job]] = {}
    for job in jobs:
        strands.setdefault(root(job.session_key), []).append(job)
    return [_in_order(strand) for strand in strands.values()]


def _in_order(jobs: list[Job]) -> list[Job]:
    """``jobs`` (in file order) in an order that keeps each session's file order and puts
    dependencies first; of the jobs free to go, the earliest in the file goes first."""
    position = {job.id: index for index, job in enumerate(jobs)}
    needs = {job.id: {name for name in job.depends_on if name in position} for job in jobs}
    for session_jobs in by_session(jobs).values():
        for earlier, later in itertools.pairwise(session_jobs):
            needs[later.id].add(earlier.id)
    ready = [position[job_id] for job_id, wanted in needs.items() if not wanted]
    heapq.heapify(ready)
    ordered: list[Job] = []
    while ready:
        job = jobs[heapq.heappop(ready)]
        ordered.append(job)
        for other, wanted in needs.items():
            if job.id in wanted:
                wanted.discard(job.id)
                if not wanted:
                    heapq.heappush(ready, position[other])
    return ordered


async def _open(job: Job) -> str:
    """Create the job's session, or check that it exists; its id.

    A job without a session gets a named one (``batch-<hex>``) rather than an ephemeral one:
    the leak sweep collects ephemeral sessions whose producer is gone, and this producer leaves
    at once. The job's chain removes the session in its last step.
    """
    if job.session_id is None:
        session_id = f"{UNNAMED_PREFIX}{uuid.uuid4().hex[:16]}"
        async with ClaudeBox(session_id=session_id):
            return session_id
    try:
        async with ClaudeBox.reconnect(job.session_id):
            return job.session_id
    except SessionNotFoundError:
        pass
    # Another producer may have created it a moment ago.
    with contextlib.suppress(SessionAlreadyExistsError):
        async with ClaudeBox(session_id=job.session_id):
            pass
    return job.session_id


async def _queues(session_ids: Iterable[str]) -> dict[str, str]:
    """The queue of each session: its node's, where its files live (``producer.routing``)."""
    with pool.map_redis_errors():
        client = await pool.redis_client()
        return {
            session_id: (await routing.route({"session_id": session_id}, client)).queue
            for session_id in session_ids
        }


async def _code_step(job: Job, session_id: str, task_id: str, queue: str) -> Signature:
    request = CodeRequest.model_validate(
        {
            **job.code_options(),
            "session_id": session_id,
            "prompt": job.prompt,
            "agent": job.agent or pool.settings().agent,
        }
    )
    with pool.map_redis_errors():
        client = await pool.redis_client()
        request = await env_travel.send_beside(client, request, pool.settings().result_ttl_s)
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
