"""A task's env values travel beside its message, never in it.

Whatever is in a task message is shown by ``celery inspect active``, kept by the result backend
and readable in the broker's queue lists by anyone holding the broker URL, so a producer puts
the values of ``CodeRequest.env`` in a key of their own (:func:`tasks.keys.task_env`, expiring
after ``CLAUDEBOX_RESULT_TTL_S``) and sends only that key's token as ``env_ref``; the worker
reads them back when it runs the task and deletes the key once the task has its result.
"""

from __future__ import annotations

import json
import secrets

import redis
import redis.asyncio

from claudebox_pool.tasks import keys
from claudebox_pool.tasks.errors import InvalidRequestError
from claudebox_pool.tasks.models import CodeRequest


async def send_beside(client: redis.asyncio.Redis, request: CodeRequest, ttl_s: int) -> CodeRequest:
    """``request`` with its env values moved to Redis, ready to be queued."""
    if not request.env:
        return request
    token = secrets.token_urlsafe(24)
    await client.set(keys.task_env(token), json.dumps(request.env), ex=ttl_s)
    return request.model_copy(update={"env": {}, "env_ref": token})


def bring_back(client: redis.Redis, request: CodeRequest) -> CodeRequest:
    """``request`` with the env values its producer sent beside it."""
    if request.env_ref is None:
        return request
    raw = client.get(keys.task_env(request.env_ref))
    if raw is None:
        raise InvalidRequestError(
            f"the environment values of this task for session {request.session_id!r} expired "
            "in Redis before a worker ran it (they are kept CLAUDEBOX_RESULT_TTL_S seconds); "
            "send the task again"
        )
    env: dict[str, str] = json.loads(raw)
    return request.model_copy(update={"env": {**env, **request.env}})


def forget(client: redis.Redis, request: CodeRequest) -> None:
    """Drop the env values of a task that has its result (a redelivered one still needs them)."""
    if request.env_ref is not None:
        client.delete(keys.task_env(request.env_ref))
