"""Reading the session registry: the Redis index of every session, for listing from anywhere.

Workers write it (``workers.registry``); anyone may read it. It holds only what can be rebuilt
from the sessions on disk.
"""

from __future__ import annotations

import redis
from pydantic import ValidationError

from tasks import keys
from tasks.models import SessionRecord


def read_all(client: redis.Redis) -> list[SessionRecord]:
    """Every registered session, oldest first."""
    records = []
    for raw in client.hvals(keys.registry()):
        try:
            records.append(SessionRecord.model_validate_json(raw))
        except ValidationError:
            continue
    return sorted(records, key=lambda record: (record.created_at, record.session_id))


def read_one(client: redis.Redis, session_id: str) -> SessionRecord | None:
    raw = client.hget(keys.registry(), session_id)
    if raw is None:
        return None
    try:
        return SessionRecord.model_validate_json(raw)
    except ValidationError:
        return None
