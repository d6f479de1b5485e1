"""The options of one ``code`` call, declared once for every way of making one.

``ClaudeBox.code`` and ``ClaudeBox.stream`` take :class:`CallOptions` as keywords, after the
three agent limits the seed's signature takes positionally; ``SessionPool.code`` and
``SessionPool.map`` take every option as a keyword (:class:`CodeOptions`); a batch job, a line
of a jobs file, carries them as fields (:class:`OptionFields`, validated).

Adding an option is one change here: a key in :class:`CallOptions` (its type and what it does)
and its field in :class:`OptionFields`, side by side; the call sends it under the same name in
``tasks.models.CodeRequest``, where the worker reads it. tests/test_options.py names any of the
three that lacks it. An unset keyword option is None, so a field the worker reads defaults to
None too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypedDict, cast
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field

from claudebox_pool.tasks.allowlist import AllowList
from claudebox_pool.tasks.errors import InvalidRequestError
from claudebox_pool.tasks.models import McpRemoteServer, McpServer, McpServerName
from claudebox_pool.tasks.settings import AgentName

PermissionMode = Literal["acceptEdits", "auto", "bypassPermissions", "manual", "dontAsk", "plan"]
"""The pinned CLI's ``--permission-mode`` choices."""
Effort = Literal["low", "medium", "high", "xhigh", "max"]
"""The pinned CLI's ``--effort`` levels."""


class ClaudeOptions(TypedDict, total=False):
    """Claude Code's options, which a box also takes as its defaults (a call's value wins)."""

    model: str | None
    """The model the agent asks for (claude's ``--model``)."""
    fallback_model: str | None
    """The model asked for when the first is overloaded (claude's ``--fallback-model``)."""
    system_prompt: str | None
    """Replaces the agent's system prompt (claude's ``--system-prompt``)."""
    append_system_prompt: str | None
    """Added after the agent's system prompt (claude's ``--append-system-prompt``)."""
    json_schema: dict[str, Any] | None
    """A JSON Schema the answer must match; the result's ``structured_output`` holds it."""
    permission_mode: PermissionMode | None
    """claude's ``--permission-mode``."""
    effort: Effort | None
    """claude's ``--effort``."""
    agents: dict[str, dict[str, Any]] | None
    """Subagent definitions, name to definition (claude's ``--agents``)."""
    settings: dict[str, Any] | None
    """Claude Code settings, as their JSON object (claude's ``--settings``)."""
    add_dirs: list[str] | None
    """More directories the agent may use, absolute paths inside the sandbox (``--add-dir``)."""
    include_partial_messages: bool | None
    """Partial text reaches ``box.stream()`` as it is generated."""
    mcp_servers: dict[str, dict[str, Any]] | None
    """MCP servers, name to config as the Claude Agent SDK takes them: ``{"command", "args",
    "env"}`` (stdio, run inside the sandbox) or ``{"type": "http" | "sse", "url", "headers"}``,
    whose host must be on the egress allow-list (claude's ``--mcp-config``, strict)."""


class SessionOptions(ClaudeOptions, total=False):
    """What a session is created with: its sandbox, budget, egress and inputs, and the
    defaults of its calls (``ClaudeBox.get_or_create`` takes these)."""

    cpus: int | None
    memory_mib: int | None
    disk_size_gb: int | None
    env: dict[str, str] | None
    template: str | None
    workspace_dir: str | Path | None
    agent: AgentName | None
    budget_usd: float | None
    egress_allow: list[str] | None
    template_session: str | None
    inputs: dict[str, str] | None


class BoxOptions(SessionOptions, total=False):
    """The keyword options of ``ClaudeBox(...)``: :class:`SessionOptions`, and a directory on
    the producer's machine that seeds a new session."""

    template_dir: str | Path | None


class CallOptions(ClaudeOptions, total=False):
    """The keyword options of one code call; unset ones take the box's, else the worker's."""

    timeout_s: int | None
    """Seconds before the agent is stopped; at most ``CLAUDEBOX_TASK_TIME_LIMIT_S``."""
    agent: AgentName | None
    """``claude`` or ``shell``; unset: the box's agent, else ``CLAUDEBOX_AGENT``."""
    env: dict[str, str] | None
    """Added to the box's environment for this call."""
    idempotency_key: str | None
    """Names this run: when the session already completed a run under this key (a resend
    after a lost answer), that run's outcome comes back (``replayed``) and nothing runs."""


class CodeOptions(CallOptions, total=False):
    """Every option of one code call, as keywords: :class:`CallOptions` and the agent's limits,
    which ``ClaudeBox.code`` also takes positionally (the seed's signature)."""

    max_turns: int | None
    """Agent turns at most (claude's ``--max-turns``)."""
    allowed_tools: list[str] | None
    """Tools the agent may use without asking (claude's ``--allowedTools``)."""
    disallowed_tools: list[str] | None
    """Tools the agent may not use (claude's ``--disallowedTools``)."""


class OptionFields(BaseModel):
    """:class:`CodeOptions` as validated fields of a model that carries them (a batch job)."""

    model_config = ConfigDict(extra="forbid")

    timeout_s: int | None = Field(default=None, gt=0)
    agent: AgentName | None = None
    env: dict[str, str] = Field(default_factory=dict)
    idempotency_key: str | None = Field(default=None, min_length=1)
    model: str | None = Field(default=None, min_length=1)
    fallback_model: str | None = Field(default=None, min_length=1)
    system_prompt: str | None = None
    append_system_prompt: str | None = None
    json_schema: dict[str, Any] | None = None
    permission_mode: PermissionMode | None = None
    effort: Effort | None = None
    agents: dict[str, dict[str, Any]] | None = None
    settings: dict[str, Any] | None = None
    add_dirs: list[str] = Field(default_factory=list)
    include_partial_messages: bool | None = None
    mcp_servers: dict[McpServerName, McpServer] | None = None
    max_turns: int | None = Field(default=None, gt=0)
    allowed_tools: list[str] = Field(default_factory=list)
    disallowed_tools: list[str] = Field(default_factory=list)

    def code_options(self) -> CodeOptions:
        """These fields, as the keywords of a code call."""
        return cast(CodeOptions, {name: getattr(self, name) for name in OptionFields.model_fields})


def refuse_unreachable_mcp(
    servers: Mapping[str, McpServer] | None, *egress_allow: Iterable[str]
) -> None:
    """InvalidRequestError naming the host of an http or sse MCP server that the egress
    allow-list (the union of ``egress_allow``) would not let the sandbox reach: refused here,
    before queueing, rather than failing inside the agent's run."""
    allow = AllowList.of(*egress_allow)
    for name, server in (servers or {}).items():
        if isinstance(server, McpRemoteServer) and not allow.allows_url(server.url):
            # The name and port alone: a URL's user:password part must not reach a message.
            parts = urlsplit(server.url)
            host = f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)
            raise InvalidRequestError(
                f"MCP server {name!r} is at {host}, which is not on the egress allow-list; add "
                f"it to CLAUDEBOX_EGRESS_ALLOW or to ClaudeBox(egress_allow=[{host!r}])"
            )
