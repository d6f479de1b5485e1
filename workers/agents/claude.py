"""The ``claude`` agent: the real Claude Code CLI, run headless inside the sandbox.

The command is an argv, never a shell string; the prompt goes to the CLI's stdin. The CLI's
own home (``~/.claude``, where it keeps transcripts keyed by the working directory) is the
session's agent home, so every ``code`` call after the first resumes the conversation with
``--resume`` from the same cwd. The CLI binary is bound read-only into the sandbox at
:data:`CLI_GUEST_DIR`. The model credential never enters the sandbox: the CLI reaches the
model through the worker's gateway (``workers.model_access``).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from pathlib import Path

from claudebox_pool.tasks.models import CodeRequest, SessionRecord
from claudebox_pool.tasks.settings import Settings, find_cli
from claudebox_pool.workers.agents.base import (
    BASE_ENV,
    Agent,
    AgentOutcome,
    Invocation,
)
from claudebox_pool.workers.agents.stream import parse
from claudebox_pool.workers.runtimes.base import ExecResult, Mount, Sandbox, SandboxSpec

CLI_GUEST_DIR = "/opt/claude-code"
CLI_ENV = {
    "IS_SANDBOX": "1",
    "DISABLE_TELEMETRY": "1",
    "DISABLE_AUTOUPDATER": "1",
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
}


def cli_version(cli: Path) -> str | None:
    """``claude --version``'s first word, or None if it does not answer."""
    try:
        done = subprocess.run(
            [str(cli), "--version"], capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    words = done.stdout.split()
    return words[0] if done.returncode == 0 and words else None


MCP_CONFIG_NAME = ".claudebox-mcp.json"
"""The call's MCP servers, written into the agent home for ``--mcp-config``: in a file (mode
0600, the sandbox's owner) rather than argv, where any host user could read their secrets."""


def write_mcp_config(request: CodeRequest, spec: SandboxSpec) -> bool:
    """Write the request's MCP config into the session's agent home, or remove one a former
    call left; whether there is one now. The agent home is the sandbox's to plant links in:
    the file is made anew, never followed."""
    home = os.open(spec.home, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(MCP_CONFIG_NAME, dir_fd=home)
        if not request.mcp_servers:
            return False
        servers = {
            name: server.model_dump(mode="json") for name, server in request.mcp_servers.items()
        }
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(MCP_CONFIG_NAME, flags, 0o600, dir_fd=home)
        with os.fdopen(fd, "w") as config:
            if spec.identity is not None:
                os.fchown(fd, spec.identity.uid, spec.identity.gid)
            json.dump({"mcpServers": servers}, config)
        return True
    finally:
        os.close(home)


def build_argv(
    cli: str, request: CodeRequest, resume: str | None, mcp_config: str | None = None
) -> list[str]:
    argv = [cli, "-p", "--output-format", "stream-json", "--verbose"]
    # --dangerously-skip-permissions overrides --permission-mode (the CLI reports
    # bypassPermissions whatever mode is asked for): a mode asked for is passed instead of it.
    if request.permission_mode is None:
        argv.append("--dangerously-skip-permissions")
    if request.max_turns is not None:
        argv += ["--max-turns", str(request.max_turns)]
    for tool in request.allowed_tools:
        argv += ["--allowedTools", tool]
    for tool in request.disallowed_tools:
        argv += ["--disallowedTools", tool]
    texts = {
        "--model": request.model,
        "--fallback-model": request.fallback_model,
        "--system-prompt": request.system_prompt,
        "--append-system-prompt": request.append_system_prompt,
        "--permission-mode": request.permission_mode,
        "--effort": request.effort,
    }
    argv += [part for flag, value in texts.items() if value is not None for part in (flag, value)]
    # The CLI takes a JSON string where it also takes a file name; JSON keeps these in argv.
    objects = {
        "--json-schema": request.json_schema,
        "--agents": request.agents,
        "--settings": request.settings,
    }
    argv += [
        part
        for flag, value in objects.items()
        if value is not None
        for part in (flag, json.dumps(value))
    ]
    for directory in request.add_dirs:
        argv += ["--add-dir", directory]
    if request.include_partial_messages:
        argv.append("--include-partial-messages")
    if mcp_config is not None:
        # Strict: the servers of this call alone, none from settings or a .mcp.json on disk.
        argv += ["--mcp-config", mcp_config, "--strict-mcp-config"]
    if resume:
        argv += ["--resume", resume]
    # The prompt is not here: -p with no positional reads it from stdin, where any size up to
    # CLAUDEBOX_MAX_PROMPT_BYTES fits (one argv string over 128 KB fails with E2BIG). "--" ends
    # the options all the same, so that nothing after them is ever read as one.
    return [*argv, "--"]


class ClaudeAgent(Agent):
    name = "claude"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cli = find_cli(settings)

    def mounts(self) -> tuple[Mount, ...]:
        if self.cli is None:
            return ()
        return (Mount(self.cli.parent, CLI_GUEST_DIR),)

    def invocation(
        self, request: CodeRequest, session: SessionRecord, sandbox: Sandbox
    ) -> Invocation:
        if self.cli is None:
            raise FileNotFoundError(
                "Claude Code CLI not found: run `claudebox-pool install-cli`, or set "
                "CLAUDEBOX_CLAUDE_CLI to its path"
            )
        cli_mount = self.mounts()[0]
        cli = f"{sandbox.path_of(cli_mount)}/{self.cli.name}"
        env = {**BASE_ENV, **CLI_ENV, "HOME": sandbox.home, **request.env}
        mcp_config = (
            f"{sandbox.home}/{MCP_CONFIG_NAME}" if write_mcp_config(request, sandbox.spec) else None
        )
        argv = build_argv(cli, request, session.claude_session_id, mcp_config)
        return Invocation(argv, env, stdin=request.prompt.encode())

    def outcome(self, result: ExecResult, timeout_s: float) -> AgentOutcome:
        summary = parse(result.stdout)
        final = summary.result
        stderr_tail = "\n".join(result.stderr_tail[-5:]).strip()
        if result.cancelled or result.timed_out or final is None:
            if result.cancelled:
                why = "cancelled"
            elif result.timed_out:
                why = f"timed out after {timeout_s:.0f}s"
            elif summary.cut_lines:
                why = (
                    f"the CLI exited {result.exit_code} with no readable result: "
                    f"{summary.cut_lines} line(s) of its output were over "
                    "CLAUDEBOX_MAX_LINE_BYTES and cut, the result may be one of them; raise "
                    "that setting to read answers this long"
                )
            else:
                why = f"the CLI exited {result.exit_code} without a result"
            error = why + (f": {stderr_tail}" if stderr_tail else "")
            return AgentOutcome(
                success=False,
                response=summary.response,
                exit_code=result.exit_code,
                raw_output=result.stdout + result.stderr,
                error=error,
                cli_session_id=summary.cli_session_id,
            )
        is_error = bool(final.get("is_error")) or result.exit_code != 0
        cost = final.get("total_cost_usd")
        turns = final.get("num_turns")
        return AgentOutcome(
            success=not is_error,
            response=summary.response,
            exit_code=result.exit_code,
            raw_output=result.stdout + result.stderr,
            error=summary.response if is_error else None,
            num_turns=turns if isinstance(turns, int) else 0,
            cost_usd=float(cost) if isinstance(cost, int | float) else 0.0,
            cli_session_id=summary.cli_session_id,
        )
