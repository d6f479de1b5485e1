"""Get-or-create: one session, whichever of many producers racing for it creates it."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import redis

from claudebox_pool import ClaudeBox
from claudebox_pool.tasks.settings import get_settings
from tests.support.processes import REPO, Worker, wait_for

RACERS = 8

# Each racer imports everything, says it is ready, then waits for the one "go" that the test
# gives once all of them are ready, so that their opens reach the pool together.
RACER = """
import asyncio, json, os, sys
import redis
from claudebox_pool import ClaudeBox

client = redis.Redis.from_url(os.environ["CLAUDEBOX_BROKER_URL"])
client.rpush("test:ready", sys.argv[1])
assert client.blpop(["test:go"], timeout=120) is not None

async def main() -> None:
    async with ClaudeBox.get_or_create("raced") as box:
        result = await box.code(f"echo {sys.argv[1]} >> racers.txt")
        print(json.dumps({"success": result.success, "workspace": box.workspace_path}))

asyncio.run(main())
"""


def test_racing_producers_share_one_session_created_once(
    pool: list[Worker], clean_state: redis.Redis, tmp_path: Path
) -> None:
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(n)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(RACERS)
    ]
    try:
        wait_for(lambda: clean_state.llen("test:ready") == RACERS, 120, "the racers to start")
        clean_state.rpush("test:go", *range(RACERS))
        outcomes = [racer.communicate(timeout=300) for racer in racers]
    finally:
        for racer in racers:
            racer.kill()
    for racer, (out, err) in zip(racers, outcomes, strict=True):
        assert racer.returncode == 0, err
        assert json.loads(out) == {
            "success": True,
            "workspace": str(get_settings().sessions_root / "raced" / "workspace"),
        }
    session = get_settings().sessions_root / "raced"
    assert sorted((session / "workspace" / "racers.txt").read_text().split()) == [
        str(n) for n in range(RACERS)
    ]
    history = [json.loads(line) for line in (session / ".claudebox" / "history.jsonl").open()]
    assert [entry["action"] for entry in history].count("session_created") == 1


def test_get_or_create_opens_an_existing_session_as_it_is(
    pool: list[Worker], clean_state: redis.Redis
) -> None:
    async def scenario() -> tuple[str, str, str]:
        async with ClaudeBox.get_or_create("kept", budget_usd=5) as box:
            await box.code("echo first > note.txt")
        again = await ClaudeBox.get_or_create("kept", budget_usd=9)
        async with again:
            note = (await again.code("cat note.txt")).response.strip()
        listed = {r.session_id: r for r in ClaudeBox.list_sessions()}["kept"]
        return note, str(listed.budget_usd), str(again.is_ephemeral)

    # The second call found the session: its files, and the budget it was created with.
    assert asyncio.run(scenario()) == ("first", "5.0", "False")
