"""The registry's index: Redis-side filtering and paging (``ClaudeBox.alist_sessions``), kept in
step by the workers' writers and rebuilt by a reindex."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
import redis

from claudebox_pool import ClaudeBox, ClaudeBoxError
from claudebox_pool.tasks import keys, registry
from claudebox_pool.tasks.models import SessionRecord, SessionStatus
from claudebox_pool.workers import registry as writers
from tests.support.processes import claudebox_pool

STATUS_CYCLE: tuple[SessionStatus, ...] = ("created", "running", "stopped", "corrupted")


def stamp(days_ago: float) -> str:
    when = datetime.now(UTC) - timedelta(days=days_ago)
    return when.replace(tzinfo=None).isoformat(timespec="microseconds")


def registered(client: redis.Redis, count: int = 40) -> list[SessionRecord]:
    """``count`` sessions in two families of ids, of every status, updated 0 to count-1 days ago;
    written by the workers' own writer."""
    records = [
        SessionRecord(
            session_id=f"{'alpha' if n % 3 else 'beta'}-{n:03d}",
            created_at=stamp(n),
            updated_at=stamp(n),
            last_accessed=stamp(n),
            workspace_path=f"/nowhere/{n}/workspace",
            status=STATUS_CYCLE[n % 4],
            total_commands=n,
        )
        for n in range(count)
    ]
    for record in records:
        writers.put(client, record)
    return sorted(records, key=lambda record: record.session_id)


def listed(**filters: object) -> list[str]:
    found = asyncio.run(ClaudeBox.alist_sessions(**filters))  # type: ignore[arg-type]
    return [record.session_id for record in found]


def test_filters_run_in_redis_and_match_the_records(
    pool_env: dict[str, str], clean_state: redis.Redis
) -> None:
    records = registered(clean_state)
    assert listed() == [r.session_id for r in records]
    assert listed(prefix="beta") == [r.session_id for r in records if r.session_id[0] == "b"]
    assert listed(status="stopped") == [r.session_id for r in records if r.status == "stopped"]
    old = [r.session_id for r in records if r.total_commands > 10]
    assert listed(older_than=timedelta(days=10, hours=1)) == old
    assert listed(older_than=10.1 * 86400) == old
    assert listed(prefix="alpha", status="running", older_than=timedelta(days=20)) == [
        r.session_id
        for r in records
        if r.session_id[0] == "a" and r.status == "running" and r.total_commands > 20
    ]
    # What comes back is the whole record, defaults filled in again.
    first = asyncio.run(ClaudeBox.alist_sessions(limit=1))[0]
    assert first == records[0]


def test_pages_follow_the_cursor_to_the_end(
    pool_env: dict[str, str], clean_state: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    records = registered(clean_state)
    # Calls that look at few ids each: a sparse filter must still fill its pages.
    monkeypatch.setattr(registry, "PAGE_CALL_SCAN", 3)
    monkeypatch.setattr(registry, "PAGE_CALL_IDS", 2)
    cases: list[tuple[dict[str, object], Callable[[SessionRecord], bool]]] = [
        ({}, lambda r: True),
        ({"prefix": "alpha"}, lambda r: r.session_id.startswith("alpha")),
        (
            {"status": "corrupted", "older_than": 86400 * 5.5},
            lambda r: r.status == "corrupted" and r.total_commands > 5,
        ),
    ]
    for filters, wanted in cases:
        pages: list[list[str]] = []
        after = None
        while not pages or len(pages[-1]) == 4:
            pages.append(listed(limit=4, after=after, **filters))
            after = pages[-1][-1] if pages[-1] else None
        assert all(len(page) == 4 for page in pages[:-1])
        assert [sid for page in pages for sid in page] == [
            r.session_id for r in records if wanted(r)
        ]
    assert listed(prefix="beta", after="alpha-999") == listed(prefix="beta")
    assert listed(prefix="alpha", after="beta-000") == []


def test_writers_and_reindex_keep_the_index_in_step(
    pool_env: dict[str, str], clean_state: redis.Redis
) -> None:
    records = registered(clean_state, 12)
    gone = next(record for record in records if record.status == "created")
    moved = next(record for record in records if record.status == "running")
    assert writers.drop(clean_state, gone.session_id)
    writers.put(clean_state, moved.model_copy(update={"status": "stopped"}))
    assert gone.session_id not in listed()
    assert moved.session_id in listed(status="stopped")
    assert moved.session_id not in listed(status=moved.status)
    # A registry written before the index existed, and an id whose entry was removed by hand.
    for status in registry.STATUSES:
        clean_state.delete(keys.registry_status(status))
    clean_state.delete(keys.registry_ids())
    clean_state.zadd(keys.registry_ids(), {"stale-1": 0})
    assert listed() == []  # an id without an entry is skipped, not an error
    writers.rebuild_index(clean_state)
    kept = [record for record in records if record != gone]
    assert listed() == [r.session_id for r in kept]
    assert listed(status="running") == [
        r.session_id for r in kept if r.status == "running" and r != moved
    ]
    assert listed(status="stopped") == sorted(
        {moved.session_id} | {r.session_id for r in kept if r.status == "stopped"}
    )
    assert clean_state.zscore(keys.registry_ids(), "stale-1") is None


@pytest.mark.parametrize(
    ("filters", "problem"),
    [
        ({"prefix": "a/b"}, "cannot begin a session id"),
        ({"limit": 0}, "must be at least 1"),
        ({"status": "sleeping"}, "is none of"),
        ({"after": "../x"}, "Invalid session id"),
    ],
)
def test_bad_filters_are_refused_before_redis_is_asked(
    pool_env: dict[str, str], filters: dict[str, object], problem: str
) -> None:
    with pytest.raises(ClaudeBoxError, match=problem):
        listed(**filters)


def test_the_cli_lists_a_page(pool_env: dict[str, str], clean_state: redis.Redis) -> None:
    records = registered(clean_state)
    betas = [r.session_id for r in records if r.session_id.startswith("beta")]
    first = claudebox_pool("sessions", "list", "--prefix", "beta", "--limit", "3", "--json")
    assert first.returncode == 0, first.stderr
    page = [json.loads(line)["session_id"] for line in first.stdout.splitlines()]
    second = claudebox_pool("sessions", "list", "--prefix", "beta", "--after", page[-1], "--json")
    assert page + [json.loads(line)["session_id"] for line in second.stdout.splitlines()] == betas
    assert page == betas[:3]
