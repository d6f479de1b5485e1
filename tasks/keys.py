"""Every Redis key claudebox-pool writes, built here and nowhere else.

The whole keyspace, under one prefix so that it can be listed or cleared without touching
Celery's own keys (``celery-task-meta-*``, ``_kombu.*``, the queue lists)::

    claudebox:sessions                hash   session id -> SessionInfo JSON (the registry)
    claudebox:sessions:updated        zset   session id scored by updated_at (epoch seconds)
    claudebox:lock:<session>          string lock owner token, with a TTL
    claudebox:fence:<session>         int    fencing counter, bumped at each lock acquisition
    claudebox:attempts:<task id>      int    deliveries of one task, against redelivery loops
    claudebox:workers                 zset   worker hostname scored by last heartbeat
    claudebox:workers:info            hash   worker hostname -> WorkerInfo JSON
"""

from typing import Final

PREFIX: Final = "claudebox:"


def registry() -> str:
    return f"{PREFIX}sessions"


def registry_by_updated() -> str:
    return f"{PREFIX}sessions:updated"


def session_lock(session_id: str) -> str:
    return f"{PREFIX}lock:{session_id}"


def session_fence(session_id: str) -> str:
    return f"{PREFIX}fence:{session_id}"


def task_attempts(task_id: str) -> str:
    return f"{PREFIX}attempts:{task_id}"


def workers() -> str:
    return f"{PREFIX}workers"


def worker_info() -> str:
    return f"{PREFIX}workers:info"
