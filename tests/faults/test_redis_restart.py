"""redis-server killed (SIGKILL) and restarted with its append-only file while a small batch
runs: every job finishes or fails with a reason, none silently disappears, and the registry is
there again (kept by the AOF, or rebuilt from disk by a reindex when it was lost).

This module runs its own Redis, home and worker, so that killing Redis hurts no other test.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import redis

from claudebox_pool import ClaudeBox
from claudebox_pool.producer import pool as producer_pool
from claudebox_pool.tasks import keys, names
from claudebox_pool.tasks.errors import ClaudeBoxError
from claudebox_pool.tasks.settings import get_settings
from tests.faults.conftest import open_session, pool_of_its_own, result_of, send_code
from tests.support.processes import RedisServer, wait_for

JOBS = 4

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def aof_redis(
    pool_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RedisServer]:
    base = tmp_path_factory.mktemp("redis-restart")
    env = {"CLAUDEBOX_LOCK_TTL_S": "2", "CLAUDEBOX_LOCK_WAIT_S": "30"}
    with pool_of_its_own(pool_env, base, **env) as (server, _):
        yield server


SETTLE_S = 15
"""Each job runs 2 s: one that has no outcome this long after the restart is not coming."""


def outcome(task_id: str) -> str:
    try:
        return result_of(task_id, SETTLE_S).response.strip()
    except ClaudeBoxError as exc:
        return f"failed: {type(exc).__name__}: {exc}"


def held_by_broker(client: redis.Redis, task_id: str) -> bool:
    """Whether the task's message is still in Redis, queued or unacked (kombu's own keys)."""
    messages = [*client.lrange(names.QUEUE, 0, -1), *client.hvals("unacked")]
    return any(task_id.encode() in message for message in messages)


@pytest.fixture(scope="module")
def crash_outcomes(aof_redis: RedisServer) -> dict[str, str]:
    """Four jobs on four sessions, two running when Redis is killed: each job's outcome."""
    server = aof_redis
    workspaces = [open_session(f"aof-{n}") for n in range(JOBS)]
    task_ids = [
        send_code(f"aof-{n}", f"touch .started; sleep 2; echo job-{n}") for n in range(JOBS)
    ]
    wait_for(
        lambda: sum((workspace / ".started").exists() for workspace in workspaces) >= 2,
        20,
        "two jobs to be running",
    )

    assert server.proc is not None
    server.proc.kill()
    server.proc.wait(10)
    server.start()  # same port, same directory: the AOF is replayed
    return {task_id: outcome(task_id) for task_id in task_ids}


def test_after_a_redis_crash_every_job_ends_or_is_still_held_for_redelivery(
    aof_redis: RedisServer, crash_outcomes: dict[str, str]
) -> None:
    client = aof_redis.client()
    for n, (task_id, said) in enumerate(crash_outcomes.items()):
        if "no result for task" in said:
            assert held_by_broker(client, task_id), f"job {n} vanished: {crash_outcomes}"
        else:
            assert said == f"job-{n}" or said.startswith("failed: "), crash_outcomes
    assert sorted(record.session_id for record in ClaudeBox.list_sessions()) == [
        f"aof-{n}" for n in range(JOBS)
    ]


def test_a_lost_registry_is_rebuilt_from_disk_by_a_reindex(
    aof_redis: RedisServer, crash_outcomes: dict[str, str]
) -> None:
    server = aof_redis
    root = get_settings().sessions_root
    # Dot-directories are the store's own (.sandbox-uids), not sessions.
    sessions = sorted(path.name for path in root.iterdir() if not path.name.startswith("."))
    assert sessions
    server.client().delete(keys.registry())
    assert ClaudeBox.list_sessions() == []

    task_id = producer_pool.send(names.REINDEX, {})
    indexed = asyncio.run(producer_pool.wait(task_id, 30))

    assert indexed["indexed"] == len(sessions)
    assert sorted(record.session_id for record in ClaudeBox.list_sessions()) == sessions
