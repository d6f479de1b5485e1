"""``ClaudeBox``: the session API of the user guide, served by the pool.

Ephemeral (no ``session_id``: a generated id, removed on exit even when the body raised) and
persistent sessions (named; they survive, ``reconnect`` continues them). One box sends its
``code`` calls one at a time, in the order they were made, so that calls gathered on one box
run in that order.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Generator
from contextlib import closing
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Self, Unpack, cast

from claudebox_pool.producer import lifecycle, live, pool
from claudebox_pool.producer.files import Files
from claudebox_pool.producer.lease import Lease
from claudebox_pool.producer.live import CodeStream, OutputCallback
from claudebox_pool.producer.options import (
    CallOptions,
    ClaudeOptions,
    SessionOptions,
    refuse_unreachable_mcp,
)
from claudebox_pool.tasks import env_travel, names, registry
from claudebox_pool.tasks.connections import sync_redis
from claudebox_pool.tasks.errors import InvalidRequestError, SessionCorruptedError
from claudebox_pool.tasks.lifecycle import Checkpoint
from claudebox_pool.tasks.models import (
    SESSION_ID_PATTERN,
    BoxDefaults,
    CleanupRequest,
    CleanupResult,
    CodeRequest,
    CodeResult,
    HistoryEntry,
    OpenMode,
    OpenRequest,
    SandboxOptions,
    SessionRecord,
    SessionStatus,
    TrajectoryTurn,
    opened,
    parse_payload,
    read_session_json,
    validate_session_id,
)
from claudebox_pool.tasks.registry import STATUSES, read_all
from claudebox_pool.tasks.settings import AgentName
from claudebox_pool.tasks.workspace_files import TransferResult

EPHEMERAL_PREFIX = "ephemeral-"
META_DIR = ".claudebox"
"""Where a session's directory keeps session.json (the workers' store lays it out)."""
WAIT_MARGIN_S = 120
"""How long a call waits past the task limit and the lock wait for one delivery of its task;
a `code` task delivered again (its worker died) gets the whole wait again (``live.outlasting``)."""


class ClaudeBox:
    """A coding-agent session, run by the pool's workers in a sandbox of its own."""

    def __init__(
        self,
        session_id: str | None = None,
        *,
        cpus: int | None = None,
        memory_mib: int | None = None,
        disk_size_gb: int | None = None,
        env: dict[str, str] | None = None,
        template: str | None = None,
        workspace_dir: str | Path | None = None,
        agent: AgentName | None = None,
        budget_usd: float | None = None,
        egress_allow: list[str] | None = None,
        template_session: str | None = None,
        inputs: dict[str, str] | None = None,
        template_dir: str | Path | None = None,
        **claude: Unpack[ClaudeOptions],
    ) -> None:
        unknown = claude.keys() - ClaudeOptions.__optional_keys__
        if unknown:
            raise TypeError(f"ClaudeBox() got an unexpected keyword argument {min(unknown)!r}")
        self._claude = claude
        self._ephemeral = session_id is None
        self._session_id = (
            f"{EPHEMERAL_PREFIX}{uuid.uuid4().hex[:16]}"
            if session_id is None
            else validate_session_id(session_id)
        )
        self._sandbox = SandboxOptions(
            cpus=cpus, memory_mib=memory_mib, disk_size_gb=disk_size_gb, template=template
        )
        self._env = dict(env or {})
        self._budget_usd = budget_usd
        self._egress_allow = tuple(egress_allow or ())
        self._agent: AgentName = agent or pool.settings().agent
        # Kept in session.json for a producer that reconnects; mcp_servers (tokens) are not.
        kept = {name: value for name, value in claude.items() if name != "mcp_servers"}
        self._defaults = parse_payload(BoxDefaults, {"agent": agent, **kept})
        self._workspace_dir = Path(workspace_dir).expanduser() if workspace_dir else None
        self._mode: OpenMode = "create"
        self._record: SessionRecord | None = None
        self._order = asyncio.Lock()
        self._task_id: str | None = None
        self._template_session = lifecycle.template_of(self._session_id, template_session)
        self._inputs = lifecycle.validated_inputs(inputs)
        self._lease = Lease(self._session_id)
        self._template_dir = _local_dir(template_dir) if template_dir is not None else None
        self.files = Files(self._session_id, self._order)
        """The workspace's files, from any machine (:class:`producer.files.Files`)."""

    @property
    def session_id(self) -> str:
        return self._session_id

    @property
    def is_ephemeral(self) -> bool:
        return self._ephemeral

    @property
    def workspace_path(self) -> str:
        """The session's workspace on the worker's disk (~/.claudebox/sessions/<id>/workspace)."""
        if self._record is not None:
            return self._record.workspace_path
        return str(pool.settings().sessions_root / self._session_id / "workspace")

    async def __aenter__(self) -> Self:
        if self._record is None:
            await self._lease.take()
            try:
                await self._open()
            except BaseException:
                await self._lease.release()
                raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self._ephemeral and self._record is not None:
                self._record = None
                await ClaudeBox.cleanup_session(self._session_id, remove_workspace=True)
        finally:
            await self._lease.release()

    async def _open(self) -> None:
        await pool.ensure_workers()
        request = OpenRequest(
            session_id=self._session_id,
            mode=self._mode,
            ephemeral=self._ephemeral,
            sandbox=self._sandbox,
            budget_usd=self._budget_usd,
            egress_allow=self._egress_allow,
            template_session=self._template_session,
            inputs=self._inputs,
            defaults=self._defaults,
        )
        raw = await pool.call(
            names.OPEN,
            request.model_dump(mode="json"),
            timeout_s=pool.settings().lock_wait_s + WAIT_MARGIN_S,
        )
        record = opened(raw)
        if self._workspace_dir is not None and not Path(record.workspace_path).is_relative_to(
            self._workspace_dir
        ):
            raise InvalidRequestError(
                f"workspace_dir={str(self._workspace_dir)!r} does not hold this pool's sessions "
                f"(they live under {Path(record.workspace_path).parent.parent}); the workers' "
                "CLAUDEBOX_HOME decides where sessions live"
            )
        self._record = record
        self._ephemeral = record.ephemeral
        if self._mode != "create":
            # The options the box was created with, kept in its session.json; those given to
            # get_or_create win over them (a reconnect gives none).
            kept = record.defaults.model_dump(exclude_none=True)
            stored_agent = kept.pop("agent", None)
            self._agent = self._defaults.agent or stored_agent or self._agent
            self._claude = cast(ClaudeOptions, {**kept, **self._claude})
        if self._template_dir is not None and self._mode == "create":
            # Before the first code call: the box's calls are not handed out until it is open.
            await self.files.upload(self._template_dir)

    async def code(
        self,
        prompt: str,
        max_turns: int | None = None,
        allowed_tools: list[str] | None = None,
        disallowed_tools: list[str] | None = None,
        *,
        on_output: OutputCallback | None = None,
        on_start: Callable[[str], object] | None = None,
        **options: Unpack[CallOptions],
    ) -> CodeResult:
        """Run ``prompt`` in the session; the result says whether the agent succeeded.

        The options are documented in :mod:`producer.options`; ``env`` adds to the box's
        environment for this call. ``on_output`` is called with each :class:`StreamEvent`
        (output lines, tool calls) while the agent runs; ``on_start`` with the task's id as
        soon as it is queued. Abandoning the call (cancelling the awaiting task, Ctrl-C)
        cancels the task in the pool too.
        """
        request = await self._code_request(
            prompt, max_turns, allowed_tools, disallowed_tools, options, "code"
        )
        current = pool.settings()
        wait_s = current.task_time_limit_s + current.lock_wait_s + WAIT_MARGIN_S
        async with self._order:
            self._task_id, route = await live.send(names.CODE, request.model_dump(mode="json"))
            try:
                if on_start is not None:
                    on_start(self._task_id)
                raw = await live.wait(self._task_id, wait_s, on_output, route)
            finally:
                self._task_id = None
        return CodeResult.model_validate(raw)

    async def start(
        self,
        prompt: str,
        max_turns: int | None = None,
        allowed_tools: list[str] | None = None,
        disallowed_tools: list[str] | None = None,
        **options: Unpack[CallOptions],
    ) -> str:
        """Queue ``prompt`` in the session as :meth:`code` would, and return its task id without
        waiting: the run goes on without this process (``claudebox-pool code --detach``).
        Follow it with ``claudebox-pool logs -f ID``, read it with ``claudebox-pool result ID``.
        """
        request = await self._code_request(
            prompt, max_turns, allowed_tools, disallowed_tools, options, "start"
        )
        async with self._order:
            task_id, _ = await live.send(names.CODE, request.model_dump(mode="json"))
        return task_id

    async def _code_request(
        self,
        prompt: str,
        max_turns: int | None,
        allowed_tools: list[str] | None,
        disallowed_tools: list[str] | None,
        options: CallOptions,
        method: str,
    ) -> CodeRequest:
        """The checked request of one call, its env values stored beside it (``env_travel``)."""
        unknown = options.keys() - CallOptions.__optional_keys__
        if unknown:
            raise TypeError(f"{method}() got an unexpected keyword argument {min(unknown)!r}")
        if self._record is None:
            raise InvalidRequestError(
                "this box is not open: use `async with ClaudeBox(...) as box:` or "
                "`box = await ClaudeBox.reconnect(session_id)`"
            )
        current = pool.settings()
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidRequestError("the prompt is empty; say what the agent should do")
        size = len(prompt.encode())
        if size > current.max_prompt_bytes:
            raise InvalidRequestError(
                f"the prompt is {size} bytes, over the limit of {current.max_prompt_bytes} "
                "(CLAUDEBOX_MAX_PROMPT_BYTES); put large inputs in the workspace instead"
            )
        # Every option travels under its own name: one added to CallOptions needs no line here.
        request = parse_payload(
            CodeRequest,
            {
                **self._claude,
                **{name: value for name, value in options.items() if value is not None},
                "session_id": self._session_id,
                "prompt": prompt,
                "agent": options.get("agent") or self._agent,
                "max_turns": max_turns,
                "allowed_tools": tuple(allowed_tools or ()),
                "disallowed_tools": tuple(disallowed_tools or ()),
                "env": {**self._env, **(options.get("env") or {})},
                "sandbox": self._sandbox,
            },
        )
        refuse_unreachable_mcp(request.mcp_servers, current.egress_allow, self._record.egress_allow)
        with pool.map_redis_errors():
            client = await pool.redis_client()
            return await env_travel.send_beside(client, request, current.result_ttl_s)

    def stream(
        self,
        prompt: str,
        max_turns: int | None = None,
        allowed_tools: list[str] | None = None,
        disallowed_tools: list[str] | None = None,
        **options: Unpack[CallOptions],
    ) -> CodeStream:
        """``async for event in box.stream(prompt)``: the events of a ``code`` call as they
        happen; the returned stream's ``result`` holds its CodeResult after the loop."""
        return CodeStream(
            lambda on_output: self.code(
                prompt, max_turns, allowed_tools, disallowed_tools, on_output=on_output, **options
            )
        )

    async def cancel(self) -> str | None:
        """Stop this box's running call inside its sandbox; the call then returns a result with
        ``error="cancelled"`` and the session stays usable. Returns the id of the task asked to
        stop, or None when no call was running."""
        task_id = self._task_id
        if task_id is None or not await live.cancel(task_id):
            return None
        return task_id

    @property
    def running_task_id(self) -> str | None:
        """The task id of the call this box is running now (for `claudebox-pool cancel`)."""
        return self._task_id

    @classmethod
    def reconnect(cls, session_id: str) -> _Reconnect:
        """Continue an existing session: ``async with ClaudeBox.reconnect(id) as box`` or
        ``box = await ClaudeBox.reconnect(id)``; SessionNotFoundError if there is none."""
        box = cls(session_id)
        box._mode = "reconnect"
        return _Reconnect(box)

    @classmethod
    def get_or_create(cls, session_id: str, **options: Unpack[SessionOptions]) -> _Reconnect:
        """The persistent session ``session_id``, created with these options if it does not
        exist yet: ``async with ClaudeBox.get_or_create(id) as box`` or ``box = await ...``.

        Race-free: the worker decides under the session's lock, so of many producers calling
        it at once for one id exactly one creates the session and all of them get it. An
        existing session keeps the sandbox, budget, egress and inputs it was created with; its
        calls take the options it was created with (``agent``, the Claude options), under the
        ones given here, and ``env`` as given here.
        """
        box = cls(session_id, **options)
        box._mode = "get_or_create"
        return _Reconnect(box)

    @staticmethod
    def list_sessions() -> list[SessionRecord]:
        """Every session of the pool (ephemeral ones included), oldest first.

        Read from the registry, and checked where this machine sees a session's sessions root:
        a session whose directory is gone from it (removed by hand) is left out, and one whose
        session.json cannot be read is listed with status ``corrupted`` (its ``corruption``
        says why; ``cleanup_session(id, remove_workspace=True)`` removes it).
        """
        with closing(sync_redis(pool.settings())) as client, pool.map_redis_errors():
            records = read_all(client)
        return [seen for record in records if (seen := _as_seen_here(record)) is not None]

    @staticmethod
    async def alist_sessions(
        prefix: str | None = None,
        status: SessionStatus | None = None,
        older_than: float | timedelta | None = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> list[SessionRecord]:
        """Registered sessions in session-id order, filtered and paged by Redis, without
        blocking the event loop and without reading the whole registry.

        ``prefix``: ids starting with it; ``status``: of that status; ``older_than``: last
        updated longer ago than that (seconds or a timedelta); ``limit``: at most that many;
        ``after``: the cursor, the last session id of the previous page (the next page starts
        at the first id after it). A page shorter than ``limit`` is the last one. Records are
        the registry's, not checked against a disk (``list_sessions`` does that).
        """
        if prefix is not None and not SESSION_ID_PATTERN.fullmatch(prefix):
            raise InvalidRequestError(
                f"prefix={prefix!r} cannot begin a session id (letters, digits, '-' and '_')"
            )
        if limit is not None and limit < 1:
            raise InvalidRequestError(f"limit={limit} must be at least 1")
        if status is not None and status not in STATUSES:
            raise InvalidRequestError(f"status={status!r} is none of {', '.join(STATUSES)}")
        seconds = older_than.total_seconds() if isinstance(older_than, timedelta) else older_than
        with pool.map_redis_errors():
            return await registry.page(
                await pool.redis_client(),
                prefix=prefix,
                status=status,
                older_than_s=seconds,
                limit=limit,
                after=None if after is None else validate_session_id(after),
            )

    @staticmethod
    async def cleanup_session(
        session_id: str, remove_workspace: bool = False, archive: bool = False
    ) -> CleanupResult:
        """Remove the session's sandbox; with ``remove_workspace`` its files too.

        Without it, the workspace, session.json and history stay for inspection. With
        ``archive``, the whole session is first written to a compressed archive in
        CLAUDEBOX_ARCHIVE_DIR (``archive_path`` in the result), which
        ``claudebox-pool sessions restore`` brings back.
        """
        request = CleanupRequest(
            session_id=validate_session_id(session_id),
            remove_workspace=remove_workspace,
            archive=archive,
        )
        await pool.ensure_workers()
        current = pool.settings()
        raw = await pool.call(
            names.CLEANUP,
            request.model_dump(mode="json"),
            timeout_s=current.task_time_limit_s + current.lock_wait_s + WAIT_MARGIN_S,
        )
        return CleanupResult.model_validate(raw)

    async def checkpoint(self, name: str, *, replace: bool = False) -> Checkpoint:
        """Snapshot the workspace as ``name``, after this box's earlier calls (``replace``
        overwrites a checkpoint of that name); recorded in the session's history."""
        async with self._order:
            return await lifecycle.checkpoint(self._session_id, name, replace)

    async def restore(self, name: str) -> Checkpoint:
        """Put the workspace back as checkpoint ``name`` holds it, once the session's running
        task (from any producer) has ended; recorded in the session's history."""
        async with self._order:
            return await lifecycle.restore(self._session_id, name)

    async def trajectory(self) -> list[TrajectoryTurn]:
        """The session's conversation from the CLI's transcript, after this box's earlier
        calls: messages, tool calls and results, usage and timings, each turn's ``task_id``
        (docs/trajectory.schema.json describes one turn)."""
        async with self._order:
            return await lifecycle.trajectory(self._session_id)

    async def history(self, limit: int | None = None) -> list[HistoryEntry]:
        """The session's history (history.jsonl), oldest first: its last ``limit`` entries, or
        all; after this box's earlier calls. Read on the session's node, so it works from a
        machine that cannot see the workers' disk."""
        async with self._order:
            return (await lifecycle.view(self._session_id, limit)).history

    async def metadata(self) -> SessionRecord:
        """The session's record as its session.json holds it now, after this box's earlier
        calls (read on the session's node)."""
        async with self._order:
            return (await lifecycle.view(self._session_id, 0)).record

    async def upload(self, local_dir: str | Path, to: str = ".") -> TransferResult:
        """Copy a directory of this machine into the workspace (directory ``to``), streamed
        as tar; links leading out of it are left out. In order with the box's calls."""
        return await self.files.upload(local_dir, to)

    async def download(self, to: str | Path, path: str = ".") -> TransferResult:
        """Copy workspace directory ``path`` into the local directory ``to``, streamed as tar;
        links leading out of the workspace are left out. In order with the box's calls."""
        return await self.files.download(to, path)

    def checkpoints(self) -> list[str]:
        """The names of the session's checkpoints, oldest first."""
        return lifecycle.checkpoints(self._session_id)

    @classmethod
    async def fork(cls, source_session_id: str, new_session_id: str) -> ClaudeBox:
        """Copy a session (workspace, agent home, history; under its lock) into a new
        persistent session, and return that one open: ``box = await ClaudeBox.fork(a, b)``."""
        await lifecycle.fork(source_session_id, new_session_id)
        return await cls.reconnect(new_session_id)

    def __repr__(self) -> str:
        kind = "ephemeral" if self._ephemeral else "persistent"
        return f"<ClaudeBox {self._session_id!r} {kind}>"


class _Reconnect:
    """What ``ClaudeBox.reconnect`` and ``get_or_create`` return: awaitable, and an async
    context manager."""

    def __init__(self, box: ClaudeBox) -> None:
        self._box = box

    def __await__(self) -> Generator[Any, None, ClaudeBox]:
        return self._box.__aenter__().__await__()

    async def __aenter__(self) -> ClaudeBox:
        return await self._box.__aenter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._box.__aexit__(exc_type, exc, tb)


def _local_dir(path: str | Path) -> Path:
    local = Path(path).expanduser()
    if not local.is_dir():
        raise InvalidRequestError(
            f"template_dir={str(path)!r} is not a directory on this machine; name a directory "
            "whose files the new session should start with"
        )
    return local


def _as_seen_here(record: SessionRecord) -> SessionRecord | None:
    """The registry's record as this machine's view of the disk corrects it: None if the
    session's directory was removed by hand, corrupted if its session.json cannot be read (or
    the disk's record, where one listed as corrupted was restored)."""
    session_dir = Path(record.workspace_path).parent
    if not session_dir.parent.is_dir():
        return record
    if not session_dir.exists():
        return None
    try:
        on_disk = read_session_json(record.session_id, session_dir / META_DIR / "session.json")
    except SessionCorruptedError as exc:
        return SessionRecord.of_corrupted(exc, record.workspace_path, record.updated_at, record)
    except PermissionError:
        return record  # the workers' files, not this user's to check
    if record.status != "corrupted":
        return record
    return on_disk.model_copy(update={"node": record.node, "workspace_path": record.workspace_path})
