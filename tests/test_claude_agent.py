"""The claude agent with the real Claude Code CLI (pinned, from npm) and no model credential."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from claudebox_pool import ClaudeBox
from claudebox_pool.tasks.models import CodeRequest
from claudebox_pool.workers.agents.claude import MCP_CONFIG_NAME, write_mcp_config
from claudebox_pool.workers.runtimes.base import SandboxSpec
from tests.conftest import CLAUDE_CLI, WorkerFactory
from tests.support.sandboxes import owned

needs_cli = pytest.mark.skipif(
    not Path(CLAUDE_CLI).exists(),
    reason="needs the Claude Code CLI from the npm registry (scripts/setup installs it)",
)


@pytest.fixture(scope="module")
def uncredentialed_pool(start_workers: WorkerFactory) -> None:
    for name in ("ANTHROPIC_API_KEY", "CLAUDE_CODE_OAUTH_TOKEN"):
        os.environ.pop(name, None)
    start_workers(1, concurrency=1)


@needs_cli
def test_cli_without_credentials_gives_a_failed_result_with_its_message(
    uncredentialed_pool: None, clean_state: object
) -> None:
    async def scenario() -> object:
        async with ClaudeBox(session_id="no-key", agent="claude") as box:
            return await box.code("Create hello.py")

    result = asyncio.run(scenario())

    assert result.success is False  # type: ignore[attr-defined]
    assert "Not logged in" in (result.error or "")  # type: ignore[attr-defined]
    assert result.exit_code == 1  # type: ignore[attr-defined]


@needs_cli
def test_cli_session_id_is_kept_for_resume(uncredentialed_pool: None, clean_state: object) -> None:
    async def scenario() -> None:
        async with ClaudeBox(session_id="keeps-id", agent="claude") as box:
            await box.code("first")

    asyncio.run(scenario())

    record = next(r for r in ClaudeBox.list_sessions() if r.session_id == "keeps-id")
    assert record.claude_session_id
    assert (Path(record.workspace_path).parent / ".claudebox" / "agent-home").is_dir()


def test_the_mcp_config_is_written_anew_never_through_a_planted_link(tmp_path: Path) -> None:
    home, outside = tmp_path / "home", tmp_path / "outside.json"
    home.mkdir()
    outside.write_text("untouched")
    (home / MCP_CONFIG_NAME).symlink_to(outside)
    spec = owned(SandboxSpec("mcp", tmp_path, home, cpus=1, memory_mib=512, disk_size_gb=1))
    servers = {"fs": {"command": "node", "args": ["fs.js"], "env": {"TOKEN": "t"}}}

    written = write_mcp_config(request_with(mcp_servers=servers), spec)
    config = home / MCP_CONFIG_NAME
    mode, owner = config.lstat().st_mode, config.lstat().st_uid
    kept = json.loads(config.read_text())
    removed = not write_mcp_config(request_with(), spec) and not config.exists()

    assert written and stat.S_ISREG(mode) and stat.S_IMODE(mode) == 0o600
    assert owner == (spec.identity.uid if spec.identity else os.geteuid())
    assert kept["mcpServers"]["fs"]["env"] == {"TOKEN": "t"}
    assert outside.read_text() == "untouched"
    assert removed


def request_with(**options: Any) -> CodeRequest:
    return CodeRequest(session_id="mcp", prompt="hi", agent="claude", **options)
