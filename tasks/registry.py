"""Reading the session registry: the Redis index of every session, for listing from anywhere.

Workers write it (``workers.registry``); anyone may read it. It holds only what can be rebuilt
from the sessions on disk.

Beside the hash of records (id -> JSON, with default values left out so that a big listing
parses little), the workers keep sorted sets of ids, all of score 0, which Redis orders by id:
one of every session and one per status. A page (:func:`page`) walks one of them from a
cursor, so its cost depends on the page, never on how many sessions there are.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final, get_args

import redis
import redis.asyncio
from pydantic import ValidationError

from claudebox_pool.tasks import keys
from claudebox_pool.tasks.connections import text
from claudebox_pool.tasks.models import SessionRecord, SessionStatus

STATUSES: Final[tuple[SessionStatus, ...]] = get_args(SessionStatus)

PAGE_CALL_IDS: Final = 2000
"""Records one page call returns at most: a listing without a limit takes several calls."""
PAGE_CALL_SCAN: Final = 10_000
"""Ids one page call looks at at most, matching or not (with ``older_than``), so that a filter
that matches few never holds Redis for long: the producer goes on from the call's cursor."""

# Walks a lex-ordered set of ids from a bound and returns the records of the ids that match.
# KEYS: [1] the ids to walk, [2] ids scored by updated_at, [3] the registry hash.
# ARGV: [1] first bound ("-", "[<prefix>" or "(<after>"), [2] last bound ("+" or
#       "(<prefix>\255"), [3] records wanted, [4] updated before (epoch seconds, "" for any),
#       [5] ids to look at at most.
# Returns {cursor, entries}: cursor is the last id looked at, or "" when the walk reached the
# last bound (no more can match); entries the matching entries joined by newlines (JSON holds
# none), one reply for the whole page, which a client parses far faster than one per entry.
_PAGE: Final = r"""
local first, last = ARGV[1], ARGV[2]
local wanted, before, budget = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local picked, cursor = {}, ''
while #picked < wanted and budget > 0 do
  local count = math.min(budget, before and 256 or (wanted - #picked))
  local ids = redis.call('ZRANGEBYLEX', KEYS[1], first, last, 'LIMIT', 0, count)
  budget = budget - #ids
  local looked = 0
  for _, id in ipairs(ids) do
    if #picked >= wanted then break end
    looked = looked + 1
    cursor = id
    local score = before and redis.call('ZSCORE', KEYS[2], id)
    if not before or (score and tonumber(score) < before) then
      picked[#picked + 1] = id
    end
  end
  if #ids < count and looked == #ids then
    cursor = ''
    break
  end
  if #ids > 0 then first = '(' .. ids[#ids] end
end
local entries = {}
if #picked > 0 then
  for _, raw in ipairs(redis.call('HMGET', KEYS[3], unpack(picked))) do
    if raw then entries[#entries + 1] = raw end
  end
end
return {cursor, table.concat(entries, '\n')}
"""


def parse(raw: bytes | str | None) -> SessionRecord | None:
    """A registry entry as a record; None for a missing or unreadable one."""
    if raw is None:
        return None
    try:
        return SessionRecord.model_validate_json(raw)
    except ValidationError:
        return None


def entry(record: SessionRecord) -> str:
    """A record as the registry stores it: defaults left out, which halves what a listing of
    fresh sessions reads and parses (parsing fills them in again)."""
    return record.model_dump_json(exclude_defaults=True)


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Parsing thousands of records makes tens of thousands of objects, none of them in a
    cycle; the cyclic collector, run every 700 allocations, would scan them over and over (it
    took half of a 10,000-session listing's time)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def read_all(client: redis.Redis) -> list[SessionRecord]:
    """Every registered session, oldest first."""
    raws = client.hvals(keys.registry())
    with _collector_paused():
        records = [record for raw in raws if (record := parse(raw))]
    return sorted(records, key=lambda record: (record.created_at, record.session_id))


def read_one(client: redis.Redis, session_id: str) -> SessionRecord | None:
    return parse(client.hget(keys.registry(), session_id))


async def page(
    client: redis.asyncio.Redis,
    *,
    prefix: str | None = None,
    status: SessionStatus | None = None,
    older_than_s: float | None = None,
    limit: int | None = None,
    after: str | None = None,
) -> list[SessionRecord]:
    """Registered sessions in id order, filtered and paged by Redis: those whose id starts
    with ``prefix``, of ``status``, last updated more than ``older_than_s`` seconds ago; at
    most ``limit`` of them, starting after the id ``after`` (the last id of the previous page).

    A page shorter than ``limit`` is the last one. Each Redis call reads at most
    :data:`PAGE_CALL_IDS` records and looks at :data:`PAGE_CALL_SCAN` ids, so no call holds
    Redis long and memory follows the page, not the registry.
    """
    first = "-" if prefix is None else f"[{prefix}"
    # Byte 255 sorts after every character an id may hold (ASCII).
    last = b"+" if prefix is None else f"({prefix}".encode() + b"\xff"
    if after is not None and (prefix is None or after >= prefix):
        first = f"({after}"
    before = "" if older_than_s is None else repr(time.time() - older_than_s)
    walked = keys.registry_ids() if status is None else keys.registry_status(status)

    def call(cursor: str, had: int) -> asyncio.Future[Any]:
        wanted = PAGE_CALL_IDS if limit is None else min(PAGE_CALL_IDS, limit - had)
        keys_and_args = (walked, keys.registry_by_updated(), keys.registry(), cursor, last)
        return asyncio.ensure_future(
            client.eval(_PAGE, 3, *keys_and_args, wanted, before, PAGE_CALL_SCAN)
        )

    found: list[SessionRecord] = []
    pending = call(first, 0)
    try:
        while True:
            reply = await pending
            went_to = text(reply[0])
            raws = reply[1].split(b"\n") if reply[1] else []
            more = bool(went_to) and (limit is None or len(found) + len(raws) < limit)
            if more:
                # Asked before this reply is parsed, so that Redis walks on meanwhile.
                pending = call(f"({went_to}", len(found) + len(raws))
            with _collector_paused():
                found.extend(record for raw in raws if (record := parse(raw)) is not None)
            if not more:
                break
    finally:
        pending.cancel()  # a no-op once awaited; else the caller was cancelled mid-listing
    return found
