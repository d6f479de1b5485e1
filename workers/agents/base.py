"""The interface of an agent: build the command for a request, read the outcome of running it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from claudebox_pool.tasks.models import CodeRequest, SessionRecord, UsageByModel
from claudebox_pool.workers.runtimes.base import ExecResult, Mount, Sandbox

BASE_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
}
"""What every agent process starts from: nothing of the worker's own environment leaks in."""


@dataclass(frozen=True)
class Invocation:
    argv: list[str]
    env: dict[str, str]
    stdin: bytes | None = None
    """What the command reads on its standard input (None: nothing, it reads end of file)."""


@dataclass
class AgentOutcome:
    success: bool
    response: str
    exit_code: int
    raw_output: str
    error: str | None = None
    num_turns: int = 0
    cost_usd: float = 0.0
    cli_session_id: str | None = None
    model_requests: int = 0
    usage: UsageByModel = field(default_factory=dict)
    structured_output: Any = None
    events: list[tuple[str, dict[str, object]]] = field(default_factory=list)


class Agent(ABC):
    name: str

    def mounts(self) -> tuple[Mount, ...]:
        """Host paths the agent needs inside the sandbox (read-only unless said)."""
        return ()

    @abstractmethod
    def invocation(
        self, request: CodeRequest, session: SessionRecord, sandbox: Sandbox
    ) -> Invocation: ...

    @abstractmethod
    def outcome(self, result: ExecResult, timeout_s: float) -> AgentOutcome: ...


def failure_reason(result: ExecResult, timeout_s: float) -> str | None:
    """Why a run failed, in words, or None if it exited 0."""
    if result.cancelled:
        return "cancelled"
    if result.timed_out:
        return f"timed out after {timeout_s:.0f}s"
    if result.exit_code != 0:
        tail = "\n".join(result.stderr_tail[-5:]).strip()
        return f"exit code {result.exit_code}" + (f": {tail}" if tail else "")
    return None
