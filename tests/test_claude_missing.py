"""A worker whose Claude Code CLI is missing fails the call with what to do, and stays up."""

from __future__ import annotations

import asyncio

from claudebox_pool import ClaudeBox, CodeResult
from tests.conftest import WorkerFactory


def test_missing_cli_is_a_failed_result_not_a_crash(
    start_workers: WorkerFactory, clean_state: object
) -> None:
    (worker,) = start_workers(1, concurrency=1, CLAUDEBOX_CLAUDE_CLI="/nonexistent/claude")

    async def scenario() -> tuple[CodeResult, CodeResult]:
        async with ClaudeBox(session_id="no-cli") as box:
            failed = await box.code("Create hello.py", agent="claude")
            after = await box.code("echo still here")
        return failed, after

    failed, after = asyncio.run(scenario())

    assert failed.success is False
    assert "claudebox-pool install-cli" in (failed.error or "")
    assert after.success and after.response == "still here\n"
    assert worker.proc is not None and worker.proc.poll() is None
