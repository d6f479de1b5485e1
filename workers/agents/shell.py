"""The ``shell`` agent: the prompt is a shell command run by ``sh -c`` in the workspace."""

from __future__ import annotations

from claudebox_pool.tasks.models import CodeRequest, SessionRecord
from claudebox_pool.workers.agents.base import (
    BASE_ENV,
    Agent,
    AgentOutcome,
    Invocation,
    failure_reason,
)
from claudebox_pool.workers.runtimes.base import ExecResult, Sandbox


class ShellAgent(Agent):
    name = "shell"

    def invocation(
        self, request: CodeRequest, session: SessionRecord, sandbox: Sandbox
    ) -> Invocation:
        env = {**BASE_ENV, "HOME": sandbox.home, **request.env}
        return Invocation(["sh", "-c", request.prompt], env)

    def outcome(self, result: ExecResult, timeout_s: float) -> AgentOutcome:
        error = failure_reason(result, timeout_s)
        return AgentOutcome(
            success=error is None,
            response=result.stdout,
            exit_code=result.exit_code,
            raw_output=result.stdout + result.stderr,
            error=error,
            num_turns=1,
        )
