"""What an operator asks of a running pool: its status, its recent tasks, one task's result.

Read from where each fact lives: heartbeats and warm-sandbox owners in Redis (``tasks.keys``),
what each worker is running and its slots from Celery's remote control (``inspect``), queue
depths from the broker's lists, and what was sent from the task records (``tasks.task_records``).
"""

from __future__ import annotations

import time
from contextlib import closing
from typing import Any, Literal

import redis
from celery import states
from pydantic import BaseModel

from claudebox_pool.producer import pool
from claudebox_pool.tasks import keys, names
from claudebox_pool.tasks.app import app
from claudebox_pool.tasks.connections import redis_py_url, sync_redis, text
from claudebox_pool.tasks.errors import TaskNotFoundError
from claudebox_pool.tasks.models import CodeResult, WorkerInfo, utc_now
from claudebox_pool.tasks.streaming import FIELD, StreamEvent
from claudebox_pool.tasks.task_records import TaskRecord

INSPECT_TIMEOUT_S = 1.0
"""How long ``status`` waits for workers to answer; one that does not is silent."""
PAGE = 200
"""Task records read at a time while filtering them."""

TaskState = Literal["queued", "running", "succeeded", "failed", "revoked"]
TASK_STATES: tuple[TaskState, ...] = ("queued", "running", "succeeded", "failed", "revoked")


class WorkerStatus(BaseModel):
    hostname: str
    node: str | None = None
    state: Literal["alive", "silent"]
    """alive: it answered just now; silent: it sent heartbeats before, but did not answer."""
    heartbeat_age_s: float | None = None
    busy: int = 0
    slots: int | None = None
    warm: int = 0
    """Sandboxes it keeps warm for sessions now."""


class QueueDepth(BaseModel):
    queue: str
    depth: int


class RunningTask(BaseModel):
    task_id: str
    name: str
    worker: str
    session_id: str | None = None
    agent: str | None = None
    age_s: float | None = None
    shown: str = ""


class WarmSandbox(BaseModel):
    session_id: str
    worker: str


class PoolStatus(BaseModel):
    at: str
    workers: list[WorkerStatus]
    busy: int
    slots: int
    queues: list[QueueDepth]
    running: list[RunningTask]
    warm: list[WarmSandbox]


class TaskSummary(BaseModel):
    """One line of ``claudebox-pool tasks``."""

    task_id: str
    name: str
    state: TaskState
    session_id: str | None = None
    agent: str | None = None
    sent_at: str
    shown: str = ""


def status() -> PoolStatus:
    """The pool as it is now; PoolUnavailableError if Redis cannot be reached."""
    settings = pool.settings()
    with closing(sync_redis(settings)) as client, pool.map_redis_errors():
        heartbeats: list[tuple[bytes, float]] = client.zrange(
            keys.workers(), 0, -1, withscores=True
        )  # type: ignore[assignment]
        beats = {text(hostname): seen for hostname, seen in heartbeats}
        infos = _worker_infos(client)
        node_names: list[bytes] = client.zrange(keys.nodes(), 0, -1)  # type: ignore[assignment]
        nodes = [text(n) for n in node_names]
        own: set[bytes] = client.smembers(keys.worker_queues())  # type: ignore[assignment]
        own_queues = sorted(text(h) for h in own)
        warm = _warm(client)
        alive_s = settings.worker_alive_s
        expected = sum(time.time() - seen <= alive_s for seen in beats.values())
        inspect = app.control.inspect(timeout=INSPECT_TIMEOUT_S, limit=expected or None)
        active: dict[str, list[dict[str, Any]]] = inspect.active() or {}
        stats: dict[str, dict[str, Any]] = inspect.stats() or {}
        records = _records(client, [t["id"] for tasks in active.values() for t in tasks])
    queues = [names.QUEUE, *(names.node_queue(n) for n in nodes)]
    queues += [names.worker_queue(h) for h in own_queues]
    now = time.time()
    workers = []
    for hostname in sorted(beats.keys() | active.keys()):
        info = infos.get(hostname)
        answering = hostname in active
        pool_stats = stats.get(hostname, {}).get("pool", {})
        slots = pool_stats.get("max-concurrency")
        workers.append(
            WorkerStatus(
                hostname=hostname,
                node=info.node if info else None,
                state="alive" if answering else "silent",
                heartbeat_age_s=round(now - beats[hostname], 1) if hostname in beats else None,
                busy=len(active.get(hostname, [])),
                slots=slots if isinstance(slots, int) else None,
                warm=sum(held.worker == hostname for held in warm),
            )
        )
    running = [
        _running(task, hostname, records.get(task["id"]), now)
        for hostname, tasks in sorted(active.items())
        for task in tasks
    ]
    return PoolStatus(
        at=utc_now(),
        workers=workers,
        busy=sum(w.busy for w in workers if w.state == "alive"),
        slots=sum(w.slots or 0 for w in workers if w.state == "alive"),
        queues=[QueueDepth(queue=q, depth=d) for q, d in zip(queues, _depths(queues), strict=True)],
        running=running,
        warm=warm,
    )


def _worker_infos(client: redis.Redis) -> dict[str, WorkerInfo]:
    found = {}
    for hostname, raw in client.hgetall(keys.worker_info()).items():
        try:
            found[text(hostname)] = WorkerInfo.model_validate_json(raw)
        except ValueError:
            continue  # written by another version: its heartbeat still counts
    return found


def _warm(client: redis.Redis) -> list[WarmSandbox]:
    prefix = keys.warm("")
    found = []
    for key in client.scan_iter(match=keys.warm("*"), count=500):
        owner = client.get(key)
        if owner is not None:
            found.append(WarmSandbox(session_id=text(key)[len(prefix) :], worker=text(owner)))
    return sorted(found, key=lambda w: w.session_id)


def _depths(queues: list[str]) -> list[int]:
    """Messages waiting in each queue: the lengths of the broker's lists (kombu's Redis
    transport keeps a queue as a list under its name)."""
    url = redis_py_url(pool.settings().broker_url)
    broker = redis.Redis.from_url(url, socket_connect_timeout=5)
    with closing(broker), pool.map_redis_errors():
        pipe = broker.pipeline(transaction=False)
        for queue in queues:
            pipe.llen(queue)
        return [int(n) for n in pipe.execute()]


def _records(client: redis.Redis, task_ids: list[str]) -> dict[str, TaskRecord]:
    if not task_ids:
        return {}
    raws = client.mget([keys.task_record(t) for t in task_ids])
    return {
        t: TaskRecord.model_validate_json(raw)
        for t, raw in zip(task_ids, raws, strict=True)
        if raw is not None
    }


def _running(
    task: dict[str, Any], hostname: str, record: TaskRecord | None, now: float
) -> RunningTask:
    started = task.get("time_start")
    return RunningTask(
        task_id=task["id"],
        name=task.get("name") or "",
        worker=hostname,
        session_id=record.session_id if record else None,
        agent=record.agent if record else None,
        age_s=round(now - started, 1) if isinstance(started, int | float) else None,
        # A claudebox request's args are its display text (``tasks.redacted_request``).
        shown=str(task.get("args") or (record.shown if record else "")),
    )


def recent_tasks(
    session_id: str | None = None, state: TaskState | None = None, limit: int = 20
) -> list[TaskSummary]:
    """The most recent tasks sent to the pool, newest first, that match the filters."""
    found: list[TaskSummary] = []
    with closing(sync_redis(pool.settings())) as client, pool.map_redis_errors():
        start = 0
        while len(found) < limit:
            page: list[bytes] = client.zrevrange(keys.recent_tasks(), start, start + PAGE - 1)  # type: ignore[assignment]
            ids = [text(t) for t in page]
            if not ids:
                break
            start += PAGE
            records = _records(client, ids)
            wanted = [
                records[t]
                for t in ids
                if t in records and (session_id is None or records[t].session_id == session_id)
            ]
            for record, task_state in zip(wanted, _states(client, wanted), strict=True):
                if state is None or task_state == state:
                    found.append(
                        TaskSummary(
                            task_id=record.task_id,
                            name=record.name,
                            state=task_state,
                            session_id=record.session_id,
                            agent=record.agent,
                            sent_at=record.sent_at,
                            shown=record.shown,
                        )
                    )
    return found[:limit]


def _states(client: redis.Redis, records: list[TaskRecord]) -> list[TaskState]:
    if not records:
        return []
    pipe = client.pipeline(transaction=False)
    for record in records:
        pipe.get(app.backend.get_key_for_task(record.task_id))
        # A code task writes its live output as it runs: one without a result yet is running.
        pipe.exists(keys.task_output(record.task_id))
    replies = pipe.execute()
    return [
        _state(raw, bool(streaming))
        for raw, streaming in zip(replies[::2], replies[1::2], strict=True)
    ]


def _state(raw: bytes | str | None, streaming: bool) -> TaskState:
    if raw is None:
        return "running" if streaming else "queued"
    meta = app.backend.decode_result(raw)
    status = meta["status"]
    if status == states.SUCCESS:
        result = meta.get("result")
        failed = isinstance(result, dict) and result.get("success") is False
        return "failed" if failed else "succeeded"
    if status == states.REVOKED:
        return "revoked"
    if status in states.READY_STATES:
        return "failed"
    return "running"


def task_record(task_id: str) -> TaskRecord | None:
    with closing(sync_redis(pool.settings())) as client, pool.map_redis_errors():
        raw = client.get(keys.task_record(task_id))
    return None if raw is None else TaskRecord.model_validate_json(raw)


def known(client: redis.Redis, task_id: str) -> bool:
    """Whether the pool knows a task by this id: it was sent (and recorded), has a result, or
    has written live output."""
    pipe = client.pipeline(transaction=False)
    for key in (
        keys.task_record(task_id),
        app.backend.get_key_for_task(task_id),
        keys.task_output(task_id),
    ):
        pipe.exists(key)
    return any(pipe.execute())


def require_known(task_id: str) -> None:
    """TaskNotFoundError unless the pool knows the task (:func:`known`)."""
    with closing(sync_redis(pool.settings())) as client, pool.map_redis_errors():
        if not known(client, task_id):
            raise TaskNotFoundError(task_id)


def finished_result(task_id: str) -> tuple[TaskState, Any]:
    """A task's state, and its return value once it has finished (its error raised as
    ``pool.wait`` raises it); TaskNotFoundError for an id the pool does not know."""
    with closing(sync_redis(pool.settings())) as client, pool.map_redis_errors():
        raw = client.get(app.backend.get_key_for_task(task_id))
        if raw is None:
            if not known(client, task_id):
                raise TaskNotFoundError(task_id)
            return _state(None, bool(client.exists(keys.task_output(task_id)))), None
    meta = app.backend.decode_result(raw)
    if meta["status"] not in states.READY_STATES:
        return "running", None
    return _state(raw, False), pool.outcome(task_id, meta)


def as_code_result(value: Any) -> CodeResult | None:
    """A task's return value as a CodeResult, if it is one."""
    if not isinstance(value, dict) or "response" not in value:
        return None
    try:
        return CodeResult.model_validate(value)
    except ValueError:
        return None


async def output_so_far(task_id: str) -> list[StreamEvent]:
    """The events of a code task's live output written until now (``tasks.streaming``)."""
    with pool.map_redis_errors():
        client = await pool.redis_client()
        entries: list[tuple[bytes, dict[bytes, bytes]]] = await client.xrange(  # type: ignore[assignment]
            keys.task_output(task_id)
        )
    return [StreamEvent.model_validate_json(fields[FIELD.encode()]) for _, fields in entries]
