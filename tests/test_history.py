"""A session's history and metadata from a producer that cannot see the workers' disk."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import redis

from claudebox_pool import ClaudeBox
from claudebox_pool.tasks.models import HistoryEntry, SessionRecord
from claudebox_pool.tasks.settings import get_settings
from tests.support.processes import REPO, Worker

# Runs a command in a mount namespace of its own where an empty tmpfs lies over the workers'
# sessions root: whatever it prints came from the pool, not from the disk.
BLINDFOLD = 'mount -t tmpfs blind "$1" && shift && test -z "$(ls "$1")" && shift && exec "$@"'


def blind_cli(*args: str) -> subprocess.CompletedProcess[str]:
    get_settings().sessions_root.mkdir(parents=True, exist_ok=True)
    root = str(get_settings().sessions_root)
    blind = ["unshare", "-m", "--propagation", "private", "sh", "-c", BLINDFOLD, "sh", root, root]
    return subprocess.run(
        [*blind, sys.executable, "-m", "claudebox_pool.producer.cli", *args],
        cwd=REPO,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_history_and_metadata_come_from_the_sessions_node(
    pool: list[Worker], clean_state: redis.Redis
) -> None:
    async def scenario() -> tuple[list[HistoryEntry], list[HistoryEntry], SessionRecord]:
        async with ClaudeBox(session_id="told") as box:
            await box.code("echo one > a.txt")
            await box.code("echo two > b.txt")
            return await box.history(), await box.history(limit=1), await box.metadata()

    history, last, record = asyncio.run(scenario())
    actions = [entry.action for entry in history]
    assert actions[0] == "session_created" and actions.count("code_execution") == 2
    assert last == history[-1:]
    assert (record.session_id, record.total_commands) == ("told", 2)

    shown = blind_cli("sessions", "show", "told", "--json")
    assert shown.returncode == 0, shown.stderr
    document = json.loads(shown.stdout)
    assert SessionRecord.model_validate(document["record"]).total_commands == 2
    assert [HistoryEntry.model_validate(e) for e in document["history"]] == history

    printed = blind_cli("sessions", "show", "told")
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout.count('"action":"code_execution"') == 2


def test_show_of_an_unknown_session_says_so(pool: list[Worker], clean_state: redis.Redis) -> None:
    shown = blind_cli("sessions", "show", "nobody", "--json")
    assert shown.returncode == 2 and "Session 'nobody' not found" in shown.stderr
