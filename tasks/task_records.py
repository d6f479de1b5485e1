"""A record of every task sent to the pool, for ``claudebox-pool tasks``, ``status`` and
``cancel``/``result`` of an unknown id.

Celery keeps nothing of a task until it has a result (``result_extended`` is off: it would keep
whole prompts), so a queued or running task is invisible to a later process. Whoever publishes a
task (a producer, a worker sending a chain's next step, Flower's API) writes a
:class:`TaskRecord` under ``keys.task_record(id)`` and scores the id by its send time in
``keys.recent_tasks()``; both are kept as long as results are (``CLAUDEBOX_RESULT_TTL_S``). A
record holds only what monitors may show (``tasks.monitoring``): never the prompt whole, never
``env``.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import redis
from pydantic import BaseModel, ConfigDict
from redis.exceptions import RedisError

from claudebox_pool.tasks import keys
from claudebox_pool.tasks.models import utc_now


class TaskRecord(BaseModel):
    """What was sent: a task's id, name, where it went, and its display fields."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    task_id: str
    name: str
    queue: str | None = None
    session_id: str | None = None
    agent: str | None = None
    shown: str = ""
    """The display text monitors show of its arguments (``tasks.monitoring.describe``)."""
    sent_at: str
    sent: float
    """Epoch seconds, for ages."""


def from_message(headers: dict[str, Any], body: Any, queue: str | None) -> TaskRecord | None:
    """The record of a task message (Celery's protocol 2), or None for another kind."""
    task_id, name = headers.get("id"), headers.get("task")
    if not isinstance(task_id, str) or not isinstance(name, str):
        return None
    args = body[0] if isinstance(body, list | tuple) and body else ()
    payload = args[0] if isinstance(args, list | tuple) and args else None
    fields = payload if isinstance(payload, dict) else {}
    session_id, agent = fields.get("session_id"), fields.get("agent")
    return TaskRecord(
        task_id=task_id,
        name=name,
        queue=queue,
        session_id=session_id if isinstance(session_id, str) else None,
        agent=agent if isinstance(agent, str) else None,
        shown=str(headers.get("argsrepr") or ""),
        sent_at=utc_now(),
        sent=time.time(),
    )


def write(client: redis.Redis, record: TaskRecord, ttl_s: int) -> None:
    """Keep ``record`` for ``ttl_s``; records older than that leave the index at the same time."""
    pipe = client.pipeline(transaction=False)
    pipe.set(keys.task_record(record.task_id), record.model_dump_json(), ex=ttl_s)
    pipe.zadd(keys.recent_tasks(), {record.task_id: record.sent})
    pipe.zremrangebyscore(keys.recent_tasks(), "-inf", record.sent - ttl_s)
    # The task is already sent: losing its record costs a line in `tasks`, while raising here
    # would make the caller believe the send failed and send it again.
    with contextlib.suppress(RedisError, OSError):
        pipe.execute()
