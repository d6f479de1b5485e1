"""Reading the session registry: the Redis index of every session, for listing from anywhere.

Workers write it (``workers.registry``); anyone may read it. It holds only what can be rebuilt
from the sessions on disk.
"""

from __future__ import annotations

import redis
from pydantic import ValidationError

from claudebox_pool.tasks import keys
from claudebox_pool.tasks.models import SessionRecord


def parse(raw: bytes | str | None) -> SessionRecord | None:
    """A registry entry as a record; None for a missing or unreadable one."""
    if raw is None:
        return None
    try:
        return SessionRecord.model_validate_json(raw)
    except ValidationError:
        return None


def read_all(client: redis.Redis) -> list[SessionRecord]:
    """Every registered session, oldest first."""
    records = [record for raw in client.hvals(keys.registry()) if (record := parse(raw))]
    return sorted(records, key=lambda record: (record.created_at, record.session_id))


def read_one(client: redis.Redis, session_id: str) -> SessionRecord | None:
    return parse(client.hget(keys.registry(), session_id))
