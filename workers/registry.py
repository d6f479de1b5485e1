"""Writing the session registry, and rebuilding it from disk.

The registry is an index, never the truth: the store's session.json files are. A worker
reconciles it at start and ``claudebox-pool sessions reindex`` does the same on demand. A session
whose session.json cannot be read stays listed, with status ``corrupted`` and what is wrong, so
that it can be found and removed; one bad record never stops a reindex.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import redis
from redis.client import Pipeline
from redis.exceptions import RedisError

from claudebox_pool.tasks import keys
from claudebox_pool.tasks.connections import text
from claudebox_pool.tasks.errors import SessionCorruptedError
from claudebox_pool.tasks.models import ReindexResult, SessionRecord, iso_to_epoch, utc_now
from claudebox_pool.tasks.registry import STATUSES, entry, read_all, read_one
from claudebox_pool.workers.store import SessionStore

log = logging.getLogger(__name__)

REINDEX_BATCH = 500
"""Sessions registered per Redis round trip while reindexing."""


# Puts each given id, whose registry entry exists, in the id set and in its status's set
# (out of the others); drops from the index each given id whose entry is gone. Reading the
# status here, under the script's atomicity, keeps a rebuild from undoing a concurrent put.
# KEYS: [1] the registry hash, [2] the id set, [3...] the status sets, in ARGV[1]'s order.
# ARGV: [1] the statuses, comma-separated, [2...] the ids.
_REINDEX_IDS = """
local statuses = {}
for status in string.gmatch(ARGV[1], '[^,]+') do statuses[#statuses + 1] = status end
for i = 2, #ARGV do
  local id = ARGV[i]
  local raw = redis.call('HGET', KEYS[1], id)
  local status = raw and (cjson.decode(raw)['status'] or 'created')
  if raw then redis.call('ZADD', KEYS[2], 0, id) else redis.call('ZREM', KEYS[2], id) end
  for j, name in ipairs(statuses) do
    if name == status then
      redis.call('ZADD', KEYS[2 + j], 0, id)
    else
      redis.call('ZREM', KEYS[2 + j], id)
    end
  end
end
return #ARGV - 1
"""


def stage(pipe: Pipeline, record: SessionRecord) -> None:
    """The writes of one record: its entry and every index of it (tasks.registry), queued on a
    MULTI pipeline so that readers see all of them or none."""
    session_id = record.session_id
    pipe.hset(keys.registry(), session_id, entry(record))
    pipe.zadd(keys.registry_by_updated(), {session_id: iso_to_epoch(record.updated_at)})
    pipe.zadd(keys.registry_ids(), {session_id: 0})
    for status in STATUSES:
        if status != record.status:
            pipe.zrem(keys.registry_status(status), session_id)
    pipe.zadd(keys.registry_status(record.status), {session_id: 0})


def put(client: redis.Redis, record: SessionRecord) -> None:
    pipe = client.pipeline()
    stage(pipe, record)
    pipe.execute()


def put_corrupted(client: redis.Redis, store: SessionStore, error: SessionCorruptedError) -> None:
    """List the session as corrupted, keeping what its last good entry knew of it."""
    known = read_one(client, error.session_id)
    workspace = str(store.paths(error.session_id).workspace)
    record = SessionRecord.of_corrupted(error, workspace, utc_now(), known)
    put(client, record.model_copy(update={"node": store.node or record.node}))


def put_if_corrupted(client: redis.Redis, record: SessionRecord) -> None:
    """Register ``record`` where it is listed as corrupted: its session.json was restored."""
    listed = read_one(client, record.session_id)
    if listed is not None and listed.status == "corrupted":
        put(client, record)


@contextmanager
def noting_corruption(client: redis.Redis, store: SessionStore) -> Iterator[None]:
    """A session found corrupted in the body is listed as corrupted before the error goes on."""
    try:
        yield
    except SessionCorruptedError as exc:
        with suppress(RedisError):  # the error itself must reach the caller
            put_corrupted(client, store, exc)
        raise


def drop(client: redis.Redis, session_id: str) -> bool:
    """Forget a session; True if it was registered."""
    pipe = client.pipeline()
    pipe.hdel(keys.registry(), session_id)
    pipe.zrem(keys.registry_by_updated(), session_id)
    pipe.zrem(keys.registry_ids(), session_id)
    for status in STATUSES:
        pipe.zrem(keys.registry_status(status), session_id)
    removed, *_ = pipe.execute()
    return bool(removed)


def rebuild_index(client: redis.Redis) -> int:
    """Make the id and status sets agree with the registry's entries (after an upgrade from a
    registry without them, or keys removed by hand); returns the ids looked at. Batched, so
    that each script call holds Redis briefly; an entry put meanwhile is indexed by its put."""
    script = client.register_script(_REINDEX_IDS)
    index_keys = [keys.registry(), keys.registry_ids()]
    index_keys += [keys.registry_status(status) for status in STATUSES]
    looked = 0
    for listing in (
        client.hscan_iter(keys.registry(), count=REINDEX_BATCH),
        client.zscan_iter(keys.registry_ids(), count=REINDEX_BATCH),
    ):
        batch: list[str] = []
        for found, _ in listing:
            batch.append(text(found))
            if len(batch) == REINDEX_BATCH:
                looked += script(keys=index_keys, args=[",".join(STATUSES), *batch])
                batch = []
        if batch:
            looked += script(keys=index_keys, args=[",".join(STATUSES), *batch])
    return looked


def reindex(client: redis.Redis, store: SessionStore) -> ReindexResult:
    """Register every session on this store's disk; drop entries of this store that are gone.

    Entries bound to another node (or, without a node, under another sessions root) are left
    alone, and so is a copy on this disk of a session bound to another node.
    """
    on_disk: set[str] = set()
    corrupted: list[str] = []
    elsewhere = {r.session_id for r in read_all(client) if _bound_elsewhere(r, store)}
    left: list[str] = []
    pipe = client.pipeline()  # MULTI: a batch's records and their index entries land together
    for session_id in store.ids():
        if session_id in elsewhere:
            # A copy left behind by `sessions move`: registering it would pull the session back.
            left.append(session_id)
            continue
        try:
            record = store.load(session_id)
        except SessionCorruptedError as exc:
            log.warning("reindex: session %s listed as corrupted: %s", session_id, exc)
            put_corrupted(client, store, exc)
            corrupted.append(session_id)
            continue
        stage(pipe, record)
        on_disk.add(session_id)
        if len(on_disk) % REINDEX_BATCH == 0:
            pipe.execute()
    pipe.execute()
    root = str(store.root) + "/"
    dropped = 0
    for record in read_all(client):
        if (
            record.session_id not in on_disk
            and record.session_id not in corrupted
            and not _bound_elsewhere(record, store)
            and (bool(record.node and store.node) or record.workspace_path.startswith(root))
        ):
            drop(client, record.session_id)
            dropped += 1
    rebuild_index(client)
    return ReindexResult(indexed=len(on_disk), dropped=dropped, corrupted=corrupted, elsewhere=left)


def _bound_elsewhere(record: SessionRecord, store: SessionStore) -> bool:
    """Registered to another node: that node holds the live copy, whatever lies on this disk."""
    return bool(record.node and store.node and record.node != store.node)
