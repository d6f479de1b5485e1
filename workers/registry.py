"""Writing the session registry, and rebuilding it from disk.

The registry is an index, never the truth: the store's session.json files are. A worker
reconciles it at start and ``claudebox-pool sessions reindex`` does the same on demand.
"""

from __future__ import annotations

import redis

from tasks import keys
from tasks.errors import SessionCorruptedError
from tasks.models import ReindexResult, SessionRecord, iso_to_epoch
from tasks.registry import read_all
from workers.store import SessionStore


def put(client: redis.Redis, record: SessionRecord) -> None:
    pipe = client.pipeline()
    pipe.hset(keys.registry(), record.session_id, record.model_dump_json())
    pipe.zadd(keys.registry_by_updated(), {record.session_id: iso_to_epoch(record.updated_at)})
    pipe.execute()


def drop(client: redis.Redis, session_id: str) -> bool:
    """Forget a session; True if it was registered."""
    pipe = client.pipeline()
    pipe.hdel(keys.registry(), session_id)
    pipe.zrem(keys.registry_by_updated(), session_id)
    removed, _ = pipe.execute()
    return bool(removed)


def reindex(client: redis.Redis, store: SessionStore) -> ReindexResult:
    """Register every session on this store's disk; drop entries of this store that are gone.

    Entries whose workspace lies under another sessions root (another host's) are left alone.
    """
    on_disk: set[str] = set()
    corrupted: list[str] = []
    for session_id in store.ids():
        try:
            record = store.load(session_id)
        except SessionCorruptedError:
            corrupted.append(session_id)
            continue
        put(client, record)
        on_disk.add(session_id)
    root = str(store.root) + "/"
    dropped = 0
    for record in read_all(client):
        if record.session_id not in on_disk and record.workspace_path.startswith(root):
            drop(client, record.session_id)
            dropped += 1
    return ReindexResult(indexed=len(on_disk), dropped=dropped, corrupted=corrupted)
