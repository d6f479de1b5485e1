"""A task's env values (and its MCP servers' configs) travel beside its message, never in it.

Whatever is in a task message is shown by ``celery inspect active``, kept by the result backend
and readable in the broker's queue lists by anyone holding the broker URL, so a producer puts
the values of ``CodeRequest.env``, and ``CodeRequest.mcp_servers`` whose env and headers hold
tokens as often as not, in a key of their own (:func:`tasks.keys.task_env`, expiring after
``CLAUDEBOX_RESULT_TTL_S``) and sends only that key's token as ``env_ref``; the worker reads
them back when it runs the task and deletes the key once the task has its result.
"""

from __future__ import annotations

import secrets

import redis
import redis.asyncio
from pydantic import BaseModel, ConfigDict, Field

from claudebox_pool.tasks import keys
from claudebox_pool.tasks.errors import InvalidRequestError
from claudebox_pool.tasks.models import CodeRequest, McpServer, McpServerName


class Beside(BaseModel):
    """What a task's ``env_ref`` key holds."""

    model_config = ConfigDict(extra="forbid")

    env: dict[str, str] = Field(default_factory=dict)
    mcp_servers: dict[McpServerName, McpServer] | None = None


async def send_beside(client: redis.asyncio.Redis, request: CodeRequest, ttl_s: int) -> CodeRequest:
    """``request`` with its env values moved to Redis, ready to be queued."""
    if not request.env and not request.mcp_servers:
        return request
    token = secrets.token_urlsafe(24)
    beside = Beside(env=request.env, mcp_servers=request.mcp_servers)
    await client.set(keys.task_env(token), beside.model_dump_json(), ex=ttl_s)
    return request.model_copy(update={"env": {}, "mcp_servers": None, "env_ref": token})


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
    beside = Beside.model_validate_json(raw)
    return request.model_copy(
        update={
            "env": {**beside.env, **request.env},
            "mcp_servers": request.mcp_servers or beside.mcp_servers,
        }
    )


def forget(client: redis.Redis, request: CodeRequest) -> None:
    """Drop the env values of a task that has its result (a redelivered one still needs them)."""
    if request.env_ref is not None:
        client.delete(keys.task_env(request.env_ref))
