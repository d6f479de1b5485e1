"""What the create, code and cleanup tasks do to a session.

Every write goes through the store with the lock's ``check`` as its guard, and the registry is
updated after the disk, so that the registry never shows what the disk does not hold.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

from celery import Task
from redis.exceptions import RedisError

from claudebox_pool.tasks import logs
from claudebox_pool.tasks.errors import (
    ClaudeBoxError,
    DiskFullError,
    InvalidRequestError,
    SessionCorruptedError,
)
from claudebox_pool.tasks.models import (
    CleanupRequest,
    CleanupResult,
    CodeRequest,
    CodeResult,
    HistoryEntry,
    OpenRequest,
    SandboxOptions,
    SessionRecord,
    merged_usage,
    usage_total,
    utc_now,
)
from claudebox_pool.tasks.registry import read_one
from claudebox_pool.workers import (
    archive,
    caps,
    disk,
    identity,
    inputs,
    metrics,
    outage,
    registry,
)
from claudebox_pool.workers.agents.base import AgentOutcome
from claudebox_pool.workers.cancel import CancelWatch, cancelled_before_start, record_cancelled
from claudebox_pool.workers.context import WorkerContext
from claudebox_pool.workers.delivery import counted_delivery, session_lock
from claudebox_pool.workers.disk_watch import DiskWatch
from claudebox_pool.workers.lock import SessionLock
from claudebox_pool.workers.model_access import passage
from claudebox_pool.workers.runtimes.base import ExecResult, LineSink, SandboxSpec
from claudebox_pool.workers.store import SessionStore
from claudebox_pool.workers.streaming import OutputPublisher
from claudebox_pool.workers.workspace_scan import Created, Snapshot

log = logging.getLogger(__name__)

PROMPT_IN_HISTORY_CHARS = 10_000


def code(task: Task[Any, Any], ctx: WorkerContext, request: CodeRequest) -> CodeResult:
    """One code task: its delivery counted, its session locked, its output published, its
    cancel flag watched, and :func:`run_code` in the middle."""
    task_id = task.request.id or ""
    # A message sent around the producer (raw Celery) meets the same limit the producer sets.
    size = len(request.prompt.encode())
    if size > ctx.settings.max_prompt_bytes:
        raise InvalidRequestError(
            f"the prompt is {size} bytes, over the limit of {ctx.settings.max_prompt_bytes} "
            "(CLAUDEBOX_MAX_PROMPT_BYTES); put large inputs in the workspace instead"
        )
    with (
        metrics.counting_errors(request.agent),
        counted_delivery(ctx, task_id) as attempt,
        session_lock(task, ctx, request.session_id, request.enqueued_at) as lock,
        OutputPublisher(ctx.redis, task_id, request.agent, ctx.settings) as output,
        CancelWatch(ctx.redis, task_id, lock.lost) as watch,
    ):
        if watch.requested:
            result = cancelled_before_start(ctx.store, request, task_id, lock)
        else:

            def on_line(stream: str, line: str) -> None:
                logs.agent_output(request.session_id, stream, line)
                output.on_line(stream, line)

            result = run_code(
                ctx, request, lock, task_id, attempt, on_line=on_line, cancel=watch.stop
            )
            # The flag may come just as the agent ends by itself: then nothing was stopped.
            if watch.requested and (result.error or "").startswith("cancelled"):
                record_cancelled(ctx.store, request.session_id, task_id, lock)
        output.end(result)
    metrics.record_run(request.agent, result)
    return result


def existing(ctx: WorkerContext, request: OpenRequest) -> SessionRecord | None:
    """Get-or-create's check, made under the session's lock: the session if it exists (on this
    node's disk, or registered to another node, which holds it), None if it must be created.

    Creating registers the session before the lock is let go, so a creator that queued behind
    another one finds its session here, whichever node it runs on.
    """
    listed = read_one(ctx.redis, request.session_id)
    if listed is not None and listed.node and ctx.node and listed.node != ctx.node:
        return listed
    if not ctx.store.paths(request.session_id).meta.exists():
        return None  # absent, or a seeded directory without metadata: create adopts it
    with registry.noting_corruption(ctx.redis, ctx.store):
        record = ctx.store.load(request.session_id)
    registry.put_if_corrupted(ctx.redis, record)
    return record


def create_session(ctx: WorkerContext, request: OpenRequest, lock: SessionLock) -> SessionRecord:
    ctx.store.refuse_taken(request.session_id)  # before a uid is claimed for it
    inputs.check(ctx.store, request.session_id, request.inputs)
    disk.guard(ctx.settings, ctx.store, f"session '{request.session_id}' cannot be created")
    uid = (
        identity.claim(ctx.settings, ctx.store, request.session_id) if identity.enabled() else None
    )
    now = utc_now()
    record = SessionRecord(
        session_id=request.session_id,
        created_at=now,
        updated_at=now,
        last_accessed=now,
        workspace_path=str(ctx.store.paths(request.session_id).workspace),
        ephemeral=request.ephemeral,
        runtime=ctx.runtime.name,
        sandbox=request.sandbox,
        budget_usd=request.budget_usd,
        egress_allow=list(request.egress_allow),
        inputs=dict(request.inputs),
        defaults=request.defaults,
        node=ctx.node,
        fence=lock.fence,
        sandbox_uid=uid,
    )
    ctx.store.create(record)
    if uid is not None:
        # Files adopted with the directory (a template's copy) become the session's too.
        identity.hand_over(ctx.store.paths(request.session_id), uid)
    registry.put(ctx.redis, record)
    return record


def sandbox_spec(
    ctx: WorkerContext, record: SessionRecord, override: SandboxOptions
) -> SandboxSpec:
    def pick(name: str) -> int:
        value = getattr(override, name) or getattr(record.sandbox, name)
        return int(value if value is not None else getattr(ctx.settings, name))

    paths = ctx.store.paths(record.session_id)
    return SandboxSpec(
        session_id=record.session_id,
        workspace=paths.workspace,
        home=paths.agent_home,
        cpus=pick("cpus"),
        memory_mib=pick("memory_mib"),
        disk_size_gb=pick("disk_size_gb"),
        image=override.template or record.sandbox.template,
        mounts=inputs.mounts(ctx.store, record),
        persistent=not record.ephemeral,
        identity=identity.of(record),
    )


@dataclasses.dataclass(frozen=True)
class _Run:
    """What one run of the agent gave, for the session's records and the task's result."""

    outcome: AgentOutcome
    started_at: str
    duration_s: float
    found: Created
    """The files the run created: their count, and the names listed (capped)."""
    created: list[str]
    """The names as the result shows them, with a marker where the list was cut."""


def run_code(
    ctx: WorkerContext,
    request: CodeRequest,
    lock: SessionLock,
    task_id: str,
    attempt: int,
    *,
    on_line: LineSink | None = None,
    cancel: threading.Event | None = None,
) -> CodeResult:
    """``on_line`` gets the agent's output as it prints; ``cancel`` stops the agent (it defaults
    to the lock's ``lost`` Event; a caller passing its own must set it when the lock is lost)."""
    record = ctx.store.load(request.session_id)
    ctx.store.check_workspace(request.session_id)  # before anything is written
    record = identity.ensure(ctx.settings, ctx.store, record, lock.check)
    recorded = _recorded_run(ctx.store, request.session_id, task_id, request.idempotency_key)
    if recorded is not None:
        # Delivered again after it ran to its end (a resend under the same id or key, a
        # redelivery of a task whose worker died before the ack): give back its result.
        return recorded
    record, spec = _mark_running(ctx, request, record, lock, task_id, attempt)
    run = _run_agent(ctx, request, record, spec, lock, on_line, cancel)
    _record_run(ctx, request, record, run, lock, task_id)
    metrics.record_usage(run.outcome.usage, run.outcome.events)
    return _result(ctx, request, run, task_id)


def _mark_running(
    ctx: WorkerContext,
    request: CodeRequest,
    record: SessionRecord,
    lock: SessionLock,
    task_id: str,
    attempt: int,
) -> tuple[SessionRecord, SandboxSpec]:
    """Check the disk and the inputs, then record the session as running; its sandbox's spec."""
    store, guard = ctx.store, lock.check
    disk.guard(ctx.settings, store, f"session '{request.session_id}' cannot run a task")
    # Its inputs are checked here too, before anything is written.
    spec = sandbox_spec(ctx, record, request.sandbox)
    record = record.model_copy(
        update={"status": "running", "last_accessed": utc_now(), "fence": lock.fence}
    )
    store.save(record, guard)
    registry.put(ctx.redis, record)
    if attempt > 1:
        store.append_history(
            request.session_id,
            HistoryEntry(action="attempt_interrupted", context={"task_id": task_id}),
            guard,
        )
    if request.idempotency_key:
        store.append_history_many(
            request.session_id, _keyed_start(store, request.session_id, request, task_id), guard
        )
    return record, spec


def _keyed_start(
    store: SessionStore, session_id: str, request: CodeRequest, task_id: str
) -> list[HistoryEntry]:
    """A keyed run's ``code_started`` entry, after a ``rerun`` entry when another task started
    this key before and recorded no outcome: its command may have run, and runs again now."""
    key = request.idempotency_key
    started = {"task_id": task_id, "idempotency_key": key}
    earlier = [
        entry.context.get("task_id")
        for entry in store.recent_history(session_id, RECENT_HISTORY_BYTES, key)
        if entry.action == "code_started" and entry.context.get("idempotency_key") == key
    ]
    if not earlier or earlier[-1] == task_id:  # the same task again: attempt_interrupted says so
        return [HistoryEntry(action="code_started", context=started)]
    rerun = {
        **started,
        "earlier_task_id": earlier[-1],
        "reason": "an earlier run of this key recorded no outcome (its lock was lost, e.g. "
        "Redis was away longer than CLAUDEBOX_LOCK_TTL_S); its command may have run",
    }
    return [
        HistoryEntry(action="rerun", context=rerun),
        HistoryEntry(action="code_started", context=started),
    ]


def _run_agent(
    ctx: WorkerContext,
    request: CodeRequest,
    record: SessionRecord,
    spec: SandboxSpec,
    lock: SessionLock,
    on_line: LineSink | None,
    cancel: threading.Event | None,
) -> _Run:
    """Run the agent in the session's sandbox, through the model passage if it has one."""
    store = ctx.store
    agent = ctx.agent(request.agent)
    timeout_s = float(
        min(request.timeout_s or ctx.settings.task_time_limit_s, ctx.settings.task_time_limit_s)
    )
    before = Snapshot.take(store.paths(request.session_id).workspace)
    started_at = utc_now()
    started = time.monotonic()
    with passage(ctx, request, record) as way_out, _stopped_on_error(ctx, record, lock):
        extra = agent.mounts() + ((way_out.mount,) if way_out else ())
        spec = dataclasses.replace(spec, mounts=spec.mounts + extra)
        watch = DiskWatch(ctx.settings, store, spec, cancel if cancel is not None else lock.lost)
        try:
            with ctx.runtime.open(spec) as sandbox, watch.watching(sandbox):
                invocation = agent.invocation(request, record, sandbox)
                if way_out is not None:
                    invocation = way_out.wrap(invocation, sandbox)
                executed = sandbox.exec(
                    invocation.argv,
                    invocation.env,
                    timeout_s,
                    on_line=on_line,
                    cancel=watch.stop,
                    stdin=invocation.stdin,
                )
            outcome = _contained(agent.outcome(executed, timeout_s), executed, watch)
        except FileNotFoundError as exc:
            outcome = agent_missing(str(exc))
        if way_out is not None:
            outcome = way_out.settle(outcome, request.session_id)
    duration_s = time.monotonic() - started
    outcome = caps.outcome(outcome, ctx.settings)
    found = before.created(ctx.settings.max_files_listed, ctx.settings.max_files_listed_bytes)
    return _Run(outcome, started_at, duration_s, found, caps.files_listed(found, ctx.settings))


def _record_run(
    ctx: WorkerContext,
    request: CodeRequest,
    record: SessionRecord,
    run: _Run,
    lock: SessionLock,
    task_id: str,
) -> None:
    """Add the run to the session's counters and history; the session is stopped again."""
    outcome, created = run.outcome, run.created
    used = usage_total(outcome.usage)
    now = utc_now()
    record = record.model_copy(
        update={
            "status": "stopped",
            "updated_at": now,
            "last_accessed": now,
            "total_commands": record.total_commands + 1,
            "total_files_created": record.total_files_created + run.found.count,
            "total_turns": record.total_turns + outcome.num_turns,
            "total_duration_ms": record.total_duration_ms + int(run.duration_s * 1000),
            "total_cost_usd": record.total_cost_usd + outcome.cost_usd,
            "total_input_tokens": record.total_input_tokens + used.input_tokens,
            "total_output_tokens": record.total_output_tokens + used.output_tokens,
            "total_cache_creation_input_tokens": record.total_cache_creation_input_tokens
            + used.cache_creation_input_tokens,
            "total_cache_read_input_tokens": record.total_cache_read_input_tokens
            + used.cache_read_input_tokens,
            "total_usage": merged_usage(record.total_usage, outcome.usage),
            "total_model_requests": record.total_model_requests + outcome.model_requests,
            "claude_session_id": outcome.cli_session_id or record.claude_session_id,
        }
    )
    entries = [
        HistoryEntry(
            action="code_execution",
            context={
                "prompt": request.prompt[:PROMPT_IN_HISTORY_CHARS],
                "success": outcome.success,
                "exit_code": outcome.exit_code,
                "duration_s": round(run.duration_s, 3),
                "started_at": run.started_at,
                "agent": request.agent,
                "task_id": task_id,
                **({"idempotency_key": request.idempotency_key} if request.idempotency_key else {}),
                "response": outcome.response[:PROMPT_IN_HISTORY_CHARS],
                "cost_usd": outcome.cost_usd,
                "num_turns": outcome.num_turns,
                "usage": {model: u.model_dump() for model, u in outcome.usage.items()},
                "files_created": created,
                **({"error": outcome.error} if outcome.error else {}),
                **({"env_keys": sorted(request.env)} if request.env else {}),
            },
        ),
        *(HistoryEntry(action="file_created", context={"file": name}) for name in run.found.listed),
        *(HistoryEntry(action=action, context=context) for action, context in outcome.events),
    ]
    try:
        ctx.store.commit(record, entries, lock.check)
    except DiskFullError as exc:
        raise DiskFullError(
            f"{exc.problem}. The command of task {task_id} did run (exit code "
            f"{outcome.exit_code}); its outcome is missing from the session's history",
            exc.largest,
        ) from None
    outage.retried(ctx.settings, "registry update", lambda: registry.put(ctx.redis, record))


def _structured(request: CodeRequest, outcome: AgentOutcome) -> Any:
    """The schema's object: the CLI's own field, else its answer, which with ``--json-schema``
    is that object as JSON, checked by the CLI's StructuredOutput tool."""
    if request.json_schema is None or not outcome.success:
        return None
    if outcome.structured_output is not None:
        return outcome.structured_output
    try:
        return json.loads(outcome.response)
    except ValueError:
        return None


def _result(ctx: WorkerContext, request: CodeRequest, run: _Run, task_id: str) -> CodeResult:
    outcome = run.outcome
    result = CodeResult(
        success=outcome.success,
        response=outcome.response,
        exit_code=outcome.exit_code,
        raw_output=outcome.raw_output,
        error=outcome.error,
        structured_output=_structured(request, outcome),
        duration_s=round(run.duration_s, 3),
        cost_usd=outcome.cost_usd,
        num_turns=outcome.num_turns,
        session_id=request.session_id,
        task_id=task_id,
        files_created=run.created,
        usage=outcome.usage,
    )
    return caps.fit(result, ctx.settings)


def cleanup_session(
    ctx: WorkerContext, request: CleanupRequest, lock: SessionLock
) -> CleanupResult:
    store, guard = ctx.store, lock.check
    if not store.exists(request.session_id) and registry.drop(ctx.redis, request.session_id):
        # Removed by hand (the guide's fix for a corrupted session): forget it here too.
        return CleanupResult(
            session_id=request.session_id, removed_workspace=True, removed_sandbox=False
        )
    record = _record_unless_removing_corrupted(ctx, request)
    removed_sandbox = ctx.runtime.remove(request.session_id)
    archived = archive.write(ctx.settings, store, request.session_id) if request.archive else None
    if request.remove_workspace:
        store.remove(request.session_id, guard)
        if record is not None:
            # A corrupted session's uid needs no release: a claim naming a gone session is free.
            identity.release(store, record)
        registry.drop(ctx.redis, request.session_id)
        log.info("removed session %s (%s)", request.session_id, request.reason)
    elif record is not None:
        now = utc_now()
        record = record.model_copy(
            update={"status": "stopped", "box_id": None, "updated_at": now, "fence": lock.fence}
        )
        entry = HistoryEntry(
            action="cleanup",
            context={
                "remove_workspace": False,
                "removed_sandbox": removed_sandbox,
                "reason": request.reason,
                **({"archive": str(archived)} if archived else {}),
            },
        )
        store.commit(record, [entry], guard)
        registry.put(ctx.redis, record)
    return CleanupResult(
        session_id=request.session_id,
        removed_workspace=request.remove_workspace,
        removed_sandbox=removed_sandbox,
        archive_path=str(archived) if archived else None,
    )


def _record_unless_removing_corrupted(
    ctx: WorkerContext, request: CleanupRequest
) -> SessionRecord | None:
    """The session's record; None for a corrupted session whose removal was asked for (the
    fix its error recommends), which goes ahead without it."""
    try:
        return ctx.store.load(request.session_id)
    except SessionCorruptedError as exc:
        if not request.remove_workspace:
            raise
        log.warning("removing corrupted session %s: %s", request.session_id, exc)
        return None


@contextmanager
def _stopped_on_error(
    ctx: WorkerContext, record: SessionRecord, lock: SessionLock
) -> Iterator[None]:
    """A run that fails with an error of its own leaves the session stopped, not running."""
    try:
        yield
    except BaseException:
        stopped = record.model_copy(update={"status": "stopped", "updated_at": utc_now()})
        with suppress(ClaudeBoxError, OSError, RedisError):
            ctx.store.save(stopped, lock.check)
            registry.put(ctx.redis, stopped)
        raise


RECENT_HISTORY_BYTES = 1 << 20
"""How far back a redelivered task's earlier run is looked for: a duplicate arrives within the
visibility timeout, long before a session's history grows a megabyte past it."""


def _recorded_run(
    store: SessionStore, session_id: str, task_id: str, key: str | None
) -> CodeResult | None:
    """The result that a completed run of ``task_id``, or of idempotency ``key``, recorded in
    history (its response cut at PROMPT_IN_HISTORY_CHARS, no raw output), or None if none did.

    Called under the session's lock, so that no run of the same key can be recording meanwhile.
    """
    for field, wanted in (("task_id", task_id), ("idempotency_key", key)):
        if not wanted:
            continue
        for entry in reversed(store.recent_history(session_id, RECENT_HISTORY_BYTES, wanted)):
            if entry.action == "code_execution" and entry.context.get(field) == wanted:
                return _replayed(session_id, entry.context)
    return None


def _replayed(session_id: str, context: dict[str, Any]) -> CodeResult:
    return CodeResult.model_validate(
        {
            "success": context.get("success"),
            "response": context.get("response", ""),
            "exit_code": context.get("exit_code"),
            "raw_output": "",
            "error": context.get("error"),
            "duration_s": context.get("duration_s"),
            "cost_usd": context.get("cost_usd", 0.0),
            "num_turns": context.get("num_turns", 0),
            "session_id": session_id,
            "task_id": context.get("task_id", ""),
            "files_created": context.get("files_created", []),
            "replayed": True,
            "usage": context.get("usage", {}),
        }
    )


def _contained(outcome: AgentOutcome, executed: ExecResult, watch: DiskWatch) -> AgentOutcome:
    """A run stopped at a sandbox limit failed, whatever its exit code, and says which."""
    if watch.breach is not None:
        error = f"{type(watch.breach).__name__}: {watch.breach}"
    elif executed.limit is not None:
        error = executed.limit
    else:
        return outcome
    return dataclasses.replace(outcome, success=False, error=error)


def agent_missing(message: str) -> AgentOutcome:
    return AgentOutcome(success=False, response="", exit_code=127, raw_output="", error=message)
