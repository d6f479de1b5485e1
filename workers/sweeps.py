"""Beat's sweeps: sessions removed on a schedule, each with its reason, never one in use.

- **age**: sessions whose ``updated_at`` is older than their limit (the longest matching prefix
  of ``CLAUDEBOX_SWEEP_AGE_RULES``, else ``CLAUDEBOX_SWEEP_MAX_AGE_DAYS``; neither: kept),
  archived first unless ``CLAUDEBOX_SWEEP_ARCHIVE`` is off;
- **leaks**: ephemeral sessions whose producer vanished (no lease, not updated for
  ``CLAUDEBOX_LEASE_TTL_S``), and sandboxes the runtime keeps for sessions that are gone.

A session in use is never touched: one whose lock a task holds is skipped (a sweep never waits
for a lock), and so is one a producer holds open (its lease, renewed while the box is open).
Both are checked under the session's lock, after the verdict is made again there, just before
the removal. Every run is logged and appended to ``<home>/sweeps.jsonl``, one SweepReport a
line: what it removed and why, what it left alone and why.

**One run per node and interval, however many beats run.** Each node sweeps its own sessions
root (beat's message is sent on to every live node, ``workers.fanout``). Each run first claims
its sweep for its node in Redis (``SET NX`` on ``keys.sweep_claim``) for 90% of the interval
beat fires it at, and the claim is
not released when the run ends. A second beat fires the same sweep within the same interval,
whatever its phase, finds the claim taken, and its message is dropped; the next interval finds
it expired. Chosen over RedBeat (a scheduler that only fires while it holds a Redis lock)
because it needs no other scheduler and no second copy of the schedule in Redis
(``tasks.schedule`` stays its one source), and it also holds for a sweep sent by hand or
redelivered after a worker died. The cost: one message per extra beat per interval, dropped in
a millisecond. If the beat holding the schedule dies, the other one's next firing runs it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import redis

from claudebox_pool.tasks import keys
from claudebox_pool.tasks.errors import ClaudeBoxError, SessionNotFoundError
from claudebox_pool.tasks.lifecycle import SweepReport, SweptSession
from claudebox_pool.tasks.models import CleanupRequest, SessionRecord, iso_to_epoch, utc_now
from claudebox_pool.tasks.settings import Settings
from claudebox_pool.workers import sessions
from claudebox_pool.workers.context import WorkerContext
from claudebox_pool.workers.lock import SessionLock
from claudebox_pool.workers.runtimes.base import Runtime
from claudebox_pool.workers.store import SessionStore

log = logging.getLogger(__name__)

AGE = "age"
LEAKS = "leaks"
CLAIM_SHARE = 0.9
"""Share of its interval a sweep's claim lasts: long enough to cover another beat's firing of
the same tick, short enough to have expired at the next one despite timer jitter."""
LOG_NAME = "sweeps.jsonl"

Verdict = Callable[[SessionRecord, float], str | None]
"""Given a session and the time now (epoch seconds): why to remove it, or None to keep it."""


def sweep_age(ctx: WorkerContext, every_s: float) -> SweepReport | None:
    """Run the age sweep, unless it already ran in this interval (then None)."""
    return _run(ctx, AGE, every_s, too_old(ctx.settings), ctx.settings.sweep_archive)


def sweep_leaks(ctx: WorkerContext, every_s: float) -> SweepReport | None:
    """Run the leak sweep, unless it already ran in this interval (then None)."""
    return _run(ctx, LEAKS, every_s, leaked(ctx.settings), archive=False)


def age_limit(settings: Settings, session_id: str) -> tuple[float, str] | None:
    """The age limit in days of ``session_id``, and the rule that sets it; None: no limit."""
    prefixes = [prefix for prefix in settings.sweep_age_rules if session_id.startswith(prefix)]
    if prefixes:
        prefix = max(prefixes, key=len)
        return settings.sweep_age_rules[prefix], f"rule '{prefix}'"
    if settings.sweep_max_age_days is not None:
        return settings.sweep_max_age_days, "CLAUDEBOX_SWEEP_MAX_AGE_DAYS"
    return None


def too_old(settings: Settings) -> Verdict:
    def verdict(record: SessionRecord, now: float) -> str | None:
        limit = age_limit(settings, record.session_id)
        if limit is None:
            return None
        days, rule = limit
        idle_days = (now - iso_to_epoch(record.updated_at)) / 86400
        if idle_days <= days:
            return None
        return f"not updated for {idle_days:.2f} days, over the {days:g}-day limit of {rule}"

    return verdict


def leaked(settings: Settings) -> Verdict:
    def verdict(record: SessionRecord, now: float) -> str | None:
        idle_s = now - iso_to_epoch(record.updated_at)
        if not record.ephemeral or idle_s <= settings.lease_ttl_s:
            return None
        return (
            f"ephemeral with no producer holding it open, not updated for {idle_s:.0f}s "
            f"(CLAUDEBOX_LEASE_TTL_S={settings.lease_ttl_s})"
        )

    return verdict


def claim(ctx: WorkerContext, sweep: str, every_s: float) -> bool:
    """True for this node's first run of ``sweep`` in this interval."""
    lifetime_ms = max(1, int(every_s * CLAIM_SHARE * 1000))
    key = keys.sweep_claim(sweep, ctx.node)
    return bool(ctx.redis.set(key, utc_now(), nx=True, px=lifetime_ms))


def _run(
    ctx: WorkerContext, sweep: str, every_s: float, verdict: Verdict, archive: bool
) -> SweepReport | None:
    if not claim(ctx, sweep, every_s):
        log.info("%s sweep: already run in this interval (a second beat?); skipped", sweep)
        return None
    report = SweepReport(sweep=sweep, started_at=utc_now())
    now = time.time()
    for session_id in ctx.store.ids():
        try:
            reason = verdict(ctx.store.load(session_id), now)
        except ClaudeBoxError:
            continue  # corrupted: nothing to judge it by (`sessions reindex` reports it)
        if reason is not None:
            _remove(ctx, report, session_id, verdict, archive)
    if sweep == LEAKS:
        report.sandboxes_removed = orphan_sandboxes(
            ctx.runtime, ctx.store, ctx.redis, ctx.settings.lock_ttl_s
        )
    report.finished_at = utc_now()
    _record(ctx, report)
    return report


def _remove(
    ctx: WorkerContext, report: SweepReport, session_id: str, verdict: Verdict, archive: bool
) -> None:
    lock = SessionLock(ctx.redis, session_id, ctx.settings.lock_ttl_s)
    if not lock.acquire(0):
        report.skipped.append(SweptSession(session_id=session_id, reason="a task holds its lock"))
        return
    with lock:
        try:
            # Judged again under the lock: a task may have updated it since the first look.
            reason = verdict(ctx.store.load(session_id), time.time())
            if reason is None:
                return
            if ctx.redis.exists(keys.session_lease(session_id)):
                report.skipped.append(
                    SweptSession(session_id=session_id, reason="a producer holds it open")
                )
                return
            request = CleanupRequest(
                session_id=session_id,
                remove_workspace=True,
                reason=f"{report.sweep} sweep: {reason}",
                archive=archive,
            )
            result = sessions.cleanup_session(ctx, request, lock)
        except SessionNotFoundError:
            return  # removed by someone else since the first look
        except ClaudeBoxError as exc:
            report.skipped.append(SweptSession(session_id=session_id, reason=f"failed: {exc}"))
            return
    report.removed.append(
        SweptSession(session_id=session_id, reason=reason, archive=result.archive_path)
    )


def orphan_sandboxes(
    runtime: Runtime, store: SessionStore, client: redis.Redis, lock_ttl_s: int
) -> list[str]:
    """Remove what ``runtime`` keeps for sessions that no longer exist on disk; their ids."""
    removed = []
    for session_id in runtime.kept():
        if store.exists(session_id):
            continue
        lock = SessionLock(client, session_id, lock_ttl_s)
        if not lock.acquire(0):
            continue  # being created right now
        with lock:
            if not store.exists(session_id) and runtime.remove(session_id):
                removed.append(session_id)
    return removed


def _record(ctx: WorkerContext, report: SweepReport) -> None:
    for each in report.removed:
        log.info("%s sweep removed %s: %s", report.sweep, each.session_id, each.reason)
    for each in report.skipped:
        log.info("%s sweep left %s alone: %s", report.sweep, each.session_id, each.reason)
    for session_id in report.sandboxes_removed:
        log.info("%s sweep removed the sandbox of %s (session gone)", report.sweep, session_id)
    path = ctx.settings.home / LOG_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    # One whole line in one append: runs on several hosts may share this file.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (report.model_dump_json() + "\n").encode())
    finally:
        os.close(fd)
