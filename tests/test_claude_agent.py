"""The claude agent with the real Claude Code CLI (pinned, from npm) and no model credential."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from claudebox_pool import ClaudeBox
from tests.conftest import CLAUDE_CLI, WorkerFactory

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
