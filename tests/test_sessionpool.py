"""SessionPool against a real pool: prompts spread over N sessions, side by side."""

from __future__ import annotations

import asyncio
import time

import pytest

from claudebox_pool import ClaudeBox, CodeResult, SessionPool
from claudebox_pool.tasks.settings import get_settings
from tests.conftest import WorkerFactory

SLEEP_S = 0.5


@pytest.fixture(scope="module")
def wide_pool(start_workers: WorkerFactory) -> None:
    start_workers(1, concurrency=4)


pytestmark = pytest.mark.usefixtures("wide_pool", "clean_state")


def test_map_spreads_prompts_over_named_sessions_and_keeps_their_order() -> None:
    async def scenario() -> tuple[list[CodeResult], list[str]]:
        async with SessionPool(size=2, prefix="exp-") as sessions:
            results = await sessions.map([f"echo {n} >> seen; echo {n}" for n in range(6)])
            return results, [box.session_id for box in sessions.sessions]

    results, ids = asyncio.run(scenario())

    assert ids == ["exp-0", "exp-1"]
    assert [result.response for result in results] == [f"{n}\n" for n in range(6)]
    assert {result.session_id for result in results} == {"exp-0", "exp-1"}
    seen = [
        (get_settings().sessions_root / session / "workspace" / "seen").read_text().split()
        for session in ids
    ]
    assert sorted(int(n) for lines in seen for n in lines) == list(range(6))


def test_map_runs_as_fast_as_the_guides_gather_over_as_many_boxes() -> None:
    prompts = [f"sleep {SLEEP_S}"] * 4

    async def with_pool() -> float:
        async with SessionPool(size=4) as sessions:
            started = time.monotonic()
            await sessions.map(prompts)
            return time.monotonic() - started

    async def with_gather() -> float:
        boxes = [ClaudeBox() for _ in prompts]
        for box in boxes:
            await box.__aenter__()
        started = time.monotonic()
        await asyncio.gather(*(box.code(p) for box, p in zip(boxes, prompts, strict=True)))
        took = time.monotonic() - started
        for box in boxes:
            await box.__aexit__(None, None, None)
        return took

    pooled, gathered = asyncio.run(with_pool()), asyncio.run(with_gather())

    assert pooled < 2 * SLEEP_S * 1.8, "four sleeps on four sessions did not overlap"
    assert pooled < gathered + 0.5


def test_an_unnamed_pool_removes_its_sessions_on_exit() -> None:
    async def scenario() -> list[str]:
        async with SessionPool(size=2) as sessions:
            await sessions.map(["true", "true"])
            return [box.session_id for box in sessions.sessions]

    ids = asyncio.run(scenario())

    assert all(not (get_settings().sessions_root / session).exists() for session in ids)


def test_map_runs_every_prompt_then_raises_the_first_error() -> None:
    async def scenario() -> list[CodeResult | BaseException]:
        async with SessionPool(size=2, prefix="errs-") as sessions:
            return await sessions.map(["echo ok", "   ", "echo ok"], return_exceptions=True)

    outcomes = asyncio.run(scenario())

    assert [type(outcome).__name__ for outcome in outcomes] == [
        "CodeResult",
        "InvalidRequestError",
        "CodeResult",
    ]
