"""What crosses the queue and what lies on disk: payloads, results and the session record.

Payloads are validated on both sides: the producer builds them (so a bad value fails before
anything is queued) and the worker parses them (so a message from elsewhere is checked too).
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    ValidationError,
)

from claudebox_pool.tasks.errors import (
    ClaudeBoxError,
    InvalidRequestError,
    InvalidSessionIdError,
    SessionCorruptedError,
    SessionNotFoundError,
)
from claudebox_pool.tasks.settings import AgentName

SESSION_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,255}")

IDEMPOTENCY_KEY_MAX_CHARS = 512
"""A key is only ever compared and written into history, never a path or a Redis key."""

SessionStatus = Literal["created", "running", "stopped", "corrupted"]
"""The guide's states: created (never run), running (a task holds it), stopped (between tasks);
and the pool's corrupted: its session.json cannot be read (the record's ``corruption`` says why)."""


def validate_session_id(session_id: object) -> str:
    """Return ``session_id`` if it follows the naming rules, else raise InvalidSessionIdError.

    Called before an id touches a path or a Redis key.
    """
    if not isinstance(session_id, str) or not SESSION_ID_PATTERN.fullmatch(session_id):
        raise InvalidSessionIdError(str(session_id))
    return session_id


SessionId = Annotated[str, AfterValidator(validate_session_id)]


def validate_name(value: object, what: str) -> str:
    """Return ``value`` if it is a valid ``what`` (a checkpoint or input name: the session id
    rules, as it becomes a path component), else raise InvalidRequestError."""
    if not isinstance(value, str) or not SESSION_ID_PATTERN.fullmatch(value):
        shown = str(value) if len(str(value)) <= 60 else str(value)[:57] + "..."
        raise InvalidRequestError(
            f"Invalid {what} {shown!r}: use 1 to 255 characters from a-z, A-Z, 0-9, '-' and '_' "
            "(no spaces, dots or slashes), e.g. 'before-refactor'"
        )
    return value


CheckpointName = Annotated[
    str, AfterValidator(lambda value: validate_name(value, "checkpoint name"))
]
InputName = Annotated[str, AfterValidator(lambda value: validate_name(value, "input name"))]


def utc_now() -> str:
    """Now, in UTC, ISO-8601 without offset, as the guide shows it (2025-01-01T10:00:00.000000)."""
    return datetime.now(UTC).replace(tzinfo=None).isoformat(timespec="microseconds")


def iso_to_epoch(stamp: str) -> float:
    return datetime.fromisoformat(stamp).replace(tzinfo=UTC).timestamp()


def _valid_time(stamp: str) -> str:
    # Refused here, not where the registry scores it: a bad stamp in one session.json once
    # stopped a worker's startup reindex.
    datetime.fromisoformat(stamp)
    return stamp


IsoTime = Annotated[str, AfterValidator(_valid_time)]


class TokenUsage(BaseModel):
    """Tokens one model used and what they cost, as the model gateway metered them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = Field(default=0, description="Tokens written to cache.")
    cache_read_input_tokens: int = Field(default=0, description="Tokens read from cache.")
    cost_usd: float = 0.0

    def __add__(self, other: TokenUsage) -> TokenUsage:
        return TokenUsage(
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
            cache_creation_input_tokens=self.cache_creation_input_tokens
            + other.cache_creation_input_tokens,
            cache_read_input_tokens=self.cache_read_input_tokens + other.cache_read_input_tokens,
            cost_usd=self.cost_usd + other.cost_usd,
        )


UsageByModel = dict[str, TokenUsage]
"""Usage keyed by the model name the API answered with (``unknown`` where it named none)."""


def merged_usage(*parts: Mapping[str, TokenUsage]) -> UsageByModel:
    """The per-model sum of several usages (a session's runs, a batch's jobs)."""
    merged: UsageByModel = {}
    for part in parts:
        for model, usage in part.items():
            merged[model] = merged[model] + usage if model in merged else usage
    return merged


def usage_total(usage: Mapping[str, TokenUsage]) -> TokenUsage:
    """All models' usage together."""
    return sum(usage.values(), TokenUsage())


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SandboxOptions(_Message):
    """Per-session sandbox resources; unset values take the worker's settings."""

    cpus: int | None = Field(default=None, gt=0)
    memory_mib: int | None = Field(default=None, gt=0)
    disk_size_gb: int | None = Field(default=None, gt=0)
    template: str | None = Field(default=None, description="Sandbox image (boxlite runtime).")


class BoxDefaults(_Message):
    """The options a box was created with, kept in its session.json, so that a producer that
    reconnects later calls with them too (``producer.options.ClaudeOptions`` describes them).

    ``mcp_servers`` and ``env`` are not kept: their values hold tokens as often as not, and
    session.json and the registry are read by anyone who lists sessions.
    """

    agent: AgentName | None = None
    model: str | None = Field(default=None, min_length=1)
    fallback_model: str | None = Field(default=None, min_length=1)
    system_prompt: str | None = None
    append_system_prompt: str | None = None
    json_schema: dict[str, Any] | None = None
    permission_mode: (
        Literal["acceptEdits", "auto", "bypassPermissions", "manual", "dontAsk", "plan"] | None
    ) = None
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None
    agents: dict[str, dict[str, Any]] | None = None
    settings: dict[str, Any] | None = None
    add_dirs: list[str] | None = None
    include_partial_messages: bool | None = None


OpenMode = Literal["create", "reconnect", "get_or_create"]
"""``get_or_create``: the session as it is if it exists, else a new one; decided under the
session's lock, so that of many producers opening one id at once exactly one creates it."""


class OpenRequest(_Message):
    """Create a session (``create``), check that it exists (``reconnect``), or either."""

    session_id: SessionId
    mode: OpenMode
    ephemeral: bool = False
    sandbox: SandboxOptions = SandboxOptions()
    budget_usd: float | None = Field(default=None, gt=0)
    egress_allow: tuple[str, ...] = ()
    template_session: SessionId | None = None
    inputs: dict[InputName, SessionId] = Field(default_factory=dict)
    defaults: BoxDefaults = BoxDefaults()
    enqueued_at: float = Field(default_factory=time.time)


def _object_schema(schema: dict[str, Any] | None) -> dict[str, Any] | None:
    # The CLI hands the schema to the model as a tool's input schema, which must be an object.
    if schema is not None and schema.get("type") != "object":
        raise ValueError(
            'json_schema must be a JSON Schema of an object: {"type": "object", '
            '"properties": {...}}'
        )
    return schema


def _sandbox_dir(path: str) -> str:
    # The agent sees only the sandbox: a host path or a climb out of it names nothing there.
    if not path.startswith("/") or ".." in Path(path).parts:
        raise ValueError(
            f"add_dirs entry {path!r} must be an absolute path inside the sandbox, "
            "without '..' (e.g. /workspace/lib)"
        )
    return path


class McpStdioServer(_Message):
    """An MCP server the CLI starts inside the sandbox and speaks to over stdin and stdout."""

    type: Literal["stdio"] = "stdio"
    command: str = Field(min_length=1, description="The program, as the sandbox sees it.")
    args: tuple[str, ...] = ()
    env: dict[str, str] = Field(default_factory=dict)


def _web_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError(f"MCP server url {url!r} must be an http:// or https:// URL with a host")
    return url


class McpRemoteServer(_Message):
    """An MCP server the CLI reaches over HTTP (``http``: streamable HTTP; ``sse``), through
    the egress proxy: its host must be on the session's egress allow-list."""

    type: Literal["http", "sse"]
    url: Annotated[str, AfterValidator(_web_url)]
    headers: dict[str, str] = Field(default_factory=dict)


def _mcp_kind(value: Any) -> str:
    kind = value.get("type", "stdio") if isinstance(value, dict) else value.type
    return "remote" if kind in ("http", "sse") else str(kind)


McpServer = Annotated[
    Annotated[McpStdioServer, Tag("stdio")] | Annotated[McpRemoteServer, Tag("remote")],
    Discriminator(_mcp_kind),
]
"""One MCP server's config, as the Claude Agent SDK's ``mcp_servers`` holds it."""
McpServerName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
"""The agent sees a server's tools as ``mcp__<name>__<tool>``."""


class CodeRequest(_Message):
    session_id: SessionId
    prompt: str
    agent: AgentName
    max_turns: int | None = Field(default=None, gt=0)
    allowed_tools: tuple[str, ...] = ()
    disallowed_tools: tuple[str, ...] = ()
    model: str | None = Field(default=None, min_length=1)
    fallback_model: str | None = Field(default=None, min_length=1)
    system_prompt: str | None = None
    append_system_prompt: str | None = None
    json_schema: Annotated[dict[str, Any] | None, AfterValidator(_object_schema)] = None
    permission_mode: (
        Literal["acceptEdits", "auto", "bypassPermissions", "manual", "dontAsk", "plan"] | None
    ) = None
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None
    agents: dict[str, dict[str, Any]] | None = None
    settings: dict[str, Any] | None = None
    add_dirs: tuple[Annotated[str, AfterValidator(_sandbox_dir)], ...] = ()
    include_partial_messages: bool | None = None
    mcp_servers: dict[McpServerName, McpServer] | None = None
    env: dict[str, str] = Field(default_factory=dict)
    env_ref: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="Token of the env values sent beside the message (``tasks.env_travel``).",
    )
    timeout_s: int | None = Field(default=None, gt=0)
    sandbox: SandboxOptions = SandboxOptions()
    idempotency_key: str | None = Field(
        default=None,
        min_length=1,
        max_length=IDEMPOTENCY_KEY_MAX_CHARS,
        description="Names this run: a session that completed a run under the same key gives "
        "back that run's recorded outcome instead of running the prompt again.",
    )
    enqueued_at: float = Field(default_factory=time.time)


class CleanupRequest(_Message):
    session_id: SessionId
    remove_workspace: bool
    reason: str = "requested"
    archive: bool = False
    enqueued_at: float = Field(default_factory=time.time)


class AdoptRequest(_Message):
    """Bind a session to ``node``, whose sessions root now holds a copy of its files."""

    session_id: SessionId
    node: str
    previous_node: str
    enqueued_at: float = Field(default_factory=time.time)


class CodeResult(BaseModel):
    """The outcome of one ``code`` call; the fields of ClaudeBox's result plus the pool's.

    Every cap leaves a marker like ``[... 1,234 bytes cut by CLAUDEBOX_<SETTING> ...]``, and
    the whole, as JSON, is at most CLAUDEBOX_MAX_RESULT_BYTES (raw_output gives way first).
    """

    model_config = ConfigDict(extra="forbid")

    success: bool
    response: str = Field(
        description="The agent's answer, its start kept up to CLAUDEBOX_MAX_RESPONSE_BYTES."
    )
    exit_code: int
    raw_output: str = Field(
        description="The output's tail, up to CLAUDEBOX_MAX_OUTPUT_BYTES (each pipe's, then "
        "both together); what was cut is named by a marker line at its start."
    )
    error: str | None = Field(
        default=None, description="Why the run failed, up to CLAUDEBOX_MAX_ERROR_BYTES."
    )
    structured_output: Any = Field(
        default=None,
        description="With json_schema: the answer as the object the schema describes.",
    )
    duration_s: float
    cost_usd: float = 0.0
    num_turns: int = 0
    session_id: str
    task_id: str = ""
    files_created: list[str] = Field(
        default_factory=list,
        description="New files by workspace path, up to CLAUDEBOX_MAX_FILES_LISTED names and "
        "CLAUDEBOX_MAX_FILES_LISTED_BYTES, then one marker entry counting the rest.",
    )
    replayed: bool = Field(
        default=False,
        description="Nothing ran now: this is the outcome history recorded for an earlier run "
        "of the same task id or idempotency key (its response cut, no raw output).",
    )
    usage: UsageByModel = Field(
        default_factory=dict,
        description="Tokens and cost of this call's model requests, per model, as the worker's "
        "model gateway metered them (empty for a run that called no model).",
    )


class CleanupResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    session_id: str
    removed_workspace: bool
    removed_sandbox: bool
    archive_path: str | None = None


class ReindexResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    indexed: int
    dropped: int
    corrupted: list[str] = Field(default_factory=list)
    elsewhere: list[str] = Field(
        default_factory=list, description="On this disk, but bound to another node: left alone."
    )


class Corruption(BaseModel):
    """What makes a session unreadable: the file at ``path`` and its ``problem``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    problem: str

    def error(self, session_id: str) -> SessionCorruptedError:
        return SessionCorruptedError(session_id, self.path, self.problem)


class SessionRecord(BaseModel):
    """A session's metadata: the content of session.json, and of its registry entry.

    The first seven fields are the guide's; the rest are ClaudeBox 0.3's and the pool's.
    """

    model_config = ConfigDict(extra="ignore")

    session_id: SessionId
    box_id: str | None = None
    created_at: IsoTime
    updated_at: IsoTime
    total_commands: int = 0
    total_files_created: int = 0
    workspace_path: str
    status: SessionStatus = "created"
    ephemeral: bool = False
    runtime: str = ""
    last_accessed: IsoTime
    total_turns: int = 0
    total_duration_ms: int = 0
    total_cost_usd: float = 0.0
    total_input_tokens: int = 0
    total_output_tokens: int = 0
    total_model_requests: int = 0
    budget_usd: float | None = None
    egress_allow: list[str] = Field(default_factory=list)
    inputs: dict[str, str] = Field(default_factory=dict)
    checkpoints: list[str] = Field(default_factory=list)
    claude_session_id: str | None = None
    sandbox: SandboxOptions = SandboxOptions()
    defaults: BoxDefaults = BoxDefaults()
    node: str = ""
    fence: int = 0
    sandbox_uid: int | None = None
    """The session's own host uid and gid (workers.identity); None until a root worker gives
    it one (older session.json files, sessions of a non-root worker)."""
    corruption: Corruption | None = None
    """Set only on a registry entry of status ``corrupted``, never in a session.json."""
    total_cache_creation_input_tokens: int = 0
    total_cache_read_input_tokens: int = 0
    total_usage: UsageByModel = Field(default_factory=dict)
    """Every run's metered usage, per model (the totals above add up its models)."""

    @classmethod
    def of_corrupted(
        cls,
        error: SessionCorruptedError,
        workspace_path: str,
        seen_at: str,
        known: SessionRecord | None,
    ) -> SessionRecord:
        """The registry's entry for a session whose session.json cannot be read: what was
        known of it (``known``, its last good entry) or else ``seen_at`` as its times."""
        base = known or cls(
            session_id=error.session_id,
            created_at=seen_at,
            updated_at=seen_at,
            last_accessed=seen_at,
            workspace_path=workspace_path,
        )
        return base.model_copy(
            update={
                "status": "corrupted",
                "workspace_path": workspace_path,
                "corruption": Corruption(path=error.path, problem=error.problem),
            }
        )


class SessionMissing(_Message):
    """The open task's answer to a reconnect when no session has that id. Reconnecting and
    creating on a miss is routine (``claudebox-pool code``, batches, session pools), so the
    miss is a task that succeeded, not one monitors count as failed; the producer turns it
    into SessionNotFoundError (:func:`opened`)."""

    missing: Literal[True] = True
    session_id: SessionId


def opened(raw: Any) -> SessionRecord:
    """The record an open task returned; SessionNotFoundError for a :class:`SessionMissing`."""
    if isinstance(raw, dict) and raw.get("missing") is True:
        raise SessionNotFoundError(SessionMissing.model_validate(raw).session_id)
    return SessionRecord.model_validate(raw)


def read_session_json(session_id: str, path: Path) -> SessionRecord:
    """The record in a session.json; SessionCorruptedError saying what is wrong with the file.
    A PermissionError is left to the caller: the file may be fine, only not for this user."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SessionCorruptedError(session_id, str(path), "is missing") from None
    except PermissionError:
        raise
    except OSError as exc:
        raise SessionCorruptedError(
            session_id, str(path), f"cannot be read ({exc.strerror})"
        ) from None
    try:
        return SessionRecord.model_validate_json(raw)
    except ValidationError as exc:
        raise SessionCorruptedError(session_id, str(path), _problem_of(exc)) from None


def _problem_of(exc: ValidationError) -> str:
    first = exc.errors()[0]
    if first["type"] == "json_invalid":
        return "is not valid JSON"
    if not first["loc"]:
        return "lacks required fields (it holds no JSON object)"
    field = ".".join(str(part) for part in first["loc"])
    if first["type"] == "missing":
        return f"lacks required fields ({field} missing)"
    return f"has an invalid {field} ({first['msg']})"


class HistoryEntry(BaseModel):
    """One line of history.jsonl."""

    timestamp: str = Field(default_factory=utc_now)
    action: str
    context: dict[str, object] = Field(default_factory=dict)


class WorkerInfo(BaseModel):
    """What a worker tells about itself at start, for `claudebox-pool doctor` and operators."""

    hostname: str
    node: str
    pid: int
    runtime: str
    runtime_reason: str
    sessions_root: str
    claude_cli: str | None = None
    claude_version: str | None = None
    warm: str | None = None
    """Whether and how the worker keeps sandboxes warm between a session's tasks."""
    containment: list[str] = []
    """What bounds a sandbox here and what enforces each bound, one line each."""
    started_at: str = Field(default_factory=utc_now)


ModelT = TypeVar("ModelT", bound=BaseModel)


def parse_payload(model: type[ModelT], payload: object) -> ModelT:
    """A task's payload as ``model``; a bad one raises a ClaudeBoxError that crosses the queue
    (a pydantic ValidationError would reach the producer as an anonymous Exception)."""
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        for error in exc.errors():
            cause = error.get("ctx", {}).get("error")
            if isinstance(cause, ClaudeBoxError):
                raise cause from None
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "payload"
        raise InvalidRequestError(f"malformed {model.__name__}: {where}: {first['msg']}") from None


class HistoryRequest(_Message):
    """A session's record and its last ``limit`` history entries (None: all of them)."""

    session_id: SessionId
    limit: int | None = Field(default=None, ge=0)
    enqueued_at: float = Field(default_factory=time.time)


class SessionView(BaseModel):
    """A session as its node's disk holds it: session.json and history.jsonl, oldest first."""

    record: SessionRecord
    history: list[HistoryEntry]


class TrajectoryRequest(_Message):
    """One page of a session's trajectory: the turns from ``offset`` on."""

    session_id: SessionId
    offset: int = Field(default=0, ge=0)
    enqueued_at: float = Field(default_factory=time.time)


class TrajectoryTurn(BaseModel):
    """One message of the conversation, as the CLI's transcript holds it.

    ``content`` holds the Messages API's blocks (``text``, ``tool_use``, ``tool_result``,
    ``thinking``); a user prompt given as a string becomes one ``text`` block.
    """

    session_id: str
    index: int
    task_id: str | None = Field(
        description="The `code` call (Celery task id) this turn belongs to; None when the "
        "session's history names no call whose run covers the turn's time."
    )
    role: Literal["user", "assistant"]
    timestamp: str
    duration_ms: int | None = Field(
        description="Time since the turn before it in the same call (the call's start for its "
        "first turn): model latency for an assistant turn, the tool's run for a tool result."
    )
    content: list[dict[str, Any]]
    model: str | None = None
    stop_reason: str | None = None
    usage: dict[str, Any] | None = None
    cut: bool = Field(
        default=False, description="Content replaced: over CLAUDEBOX_MAX_TRAJECTORY_PAGE_BYTES."
    )


class TrajectoryPage(BaseModel):
    session_id: str
    turns: list[TrajectoryTurn]
    next_offset: int | None = Field(description="Offset of the next page; None: this is the last.")
