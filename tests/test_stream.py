"""Live output and cancellation of running code tasks, against a real pool.

The agent here is ``shell``. A job that must still be running while the test looks at it waits
for a file the test creates in its workspace (the test and the worker share the disk), so no
test depends on a sleep being long enough.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import selectors
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import pytest
import redis

from claudebox_pool import ClaudeBox, StreamEvent
from claudebox_pool.producer import live, pool
from claudebox_pool.tasks import keys, names
from claudebox_pool.tasks.models import CodeRequest
from claudebox_pool.tasks.settings import get_settings
from claudebox_pool.workers.streaming import line_events
from tests.support.processes import REPO, claudebox_pool

pytestmark = pytest.mark.usefixtures("pool", "clean_state")

WAIT_FOR_GO = "while [ ! -f go ]; do sleep 0.02; done"
"""Shell that blocks until the test creates ``go`` in the workspace."""


def workspace(session_id: str) -> Path:
    return get_settings().sessions_root / session_id / "workspace"


def history_actions(session_id: str) -> list[dict[str, object]]:
    history = get_settings().sessions_root / session_id / ".claudebox" / "history.jsonl"
    return [json.loads(line) for line in history.read_text().splitlines()]


async def create_sessions(*session_ids: str) -> None:
    for session_id in session_ids:
        async with ClaudeBox(session_id=session_id):
            pass


def read_line(stream: IO[str], timeout_s: float) -> str:
    """The next line of a child's pipe, or TimeoutError: never blocks the suite for good."""
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        if not selector.select(timeout_s):
            raise TimeoutError(f"no line within {timeout_s}s")
    return stream.readline()


def test_stream_yields_output_lines_while_the_task_is_still_running() -> None:
    async def scenario() -> tuple[list[StreamEvent], bool, object]:
        running_when_seen = False
        seen: list[StreamEvent] = []
        async with ClaudeBox(session_id="streamed") as box:
            stream = box.stream(f"echo ready; {WAIT_FOR_GO}; echo done; echo oops >&2")
            async for event in stream:
                seen.append(event)
                if event.text == "ready":
                    client = redis.asyncio.Redis.from_url(get_settings().result_backend)
                    running_when_seen = not await live.finished(client, box.running_task_id or "")
                    await client.aclose()
                    (workspace("streamed") / "go").touch()
        return seen, running_when_seen, stream.result

    seen, running_when_seen, result = asyncio.run(scenario())

    assert running_when_seen
    lines = [(event.stream, event.text) for event in seen if event.kind == "line"]
    assert [text for pipe, text in lines if pipe == "stdout"] == ["ready", "done"]
    assert [text for pipe, text in lines if pipe == "stderr"] == ["oops"]
    assert seen[-1].kind == "end" and seen[-1].success is True
    assert result is not None and result.success  # type: ignore[attr-defined]


def test_a_late_consumer_replays_the_whole_output_from_the_start() -> None:
    async def scenario() -> tuple[list[StreamEvent], str]:
        async with ClaudeBox(session_id="late") as box:
            result = await box.code("seq 1 5")
        return [event async for event in live.events(result.task_id)], result.task_id

    events, _ = asyncio.run(scenario())

    assert [event.text for event in events if event.kind == "line"] == ["1", "2", "3", "4", "5"]
    assert events[-1].kind == "end"


def test_the_output_stream_expires_after_the_stream_ttl(clean_state: redis.Redis) -> None:
    async def scenario() -> str:
        async with ClaudeBox(session_id="expiring") as box:
            return (await box.code("echo x")).task_id

    task_id = asyncio.run(scenario())

    assert 0 < clean_state.ttl(keys.task_output(task_id)) <= get_settings().stream_ttl_s


def test_code_hands_each_event_to_on_output_before_it_returns() -> None:
    got: list[StreamEvent] = []

    async def scenario() -> None:
        async with ClaudeBox(session_id="callback") as box:
            await box.code("echo a; echo b", on_output=got.append)

    asyncio.run(scenario())

    assert [event.text for event in got if event.kind == "line"] == ["a", "b"]
    assert got[-1].kind == "end"


def test_claudebox_pool_code_prints_each_line_as_the_agent_prints_it() -> None:
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "claudebox_pool.producer.cli",
            "code",
            "cli-live",
            f"echo ready; {WAIT_FOR_GO}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        cwd=REPO,
        env=dict(os.environ),
    )
    try:
        assert child.stdout is not None
        first = read_line(child.stdout, 60)
        still_running = child.poll() is None
        (workspace("cli-live") / "go").touch()
        rest, errors = child.communicate(timeout=60)
    finally:
        child.kill()

    assert (first, still_running) == ("ready\n", True)
    assert (child.returncode, rest) == (0, ""), errors


def test_cancel_stops_a_sleeping_agent_within_2s_and_the_session_stays_usable() -> None:
    async def scenario() -> tuple[float, object, object]:
        async with ClaudeBox(session_id="stopped") as box:
            started = asyncio.Event()

            def on_output(event: StreamEvent) -> None:
                if event.text == "started":
                    started.set()

            call = asyncio.create_task(box.code("echo started; sleep 60", on_output=on_output))
            await asyncio.wait_for(started.wait(), 60)
            asked = time.monotonic()
            assert await box.cancel() is not None
            result = await asyncio.wait_for(call, 30)
            took = time.monotonic() - asked
            after = await box.code("echo still here")
        return took, result, after

    took, result, after = asyncio.run(scenario())

    assert took < 2
    assert (result.success, result.error) == (False, "cancelled")  # type: ignore[attr-defined]
    assert after.response == "still here\n"  # type: ignore[attr-defined]
    actions = history_actions("stopped")
    cancelled = [entry for entry in actions if entry["action"] == "cancelled"]
    assert cancelled == [
        {**cancelled[0], "context": {"task_id": result.task_id}}  # type: ignore[attr-defined]
    ]


def send_code(session_id: str, prompt: str) -> str:
    """Queue a code task with no producer waiting for it (as a script or another host would)."""
    request = CodeRequest(session_id=session_id, prompt=prompt, agent="shell")
    return pool.send(names.CODE, request.model_dump(mode="json"))


async def wait_for_line(task_id: str, text: str) -> None:
    async with contextlib.aclosing(live.events(task_id)) as events:
        async for event in events:
            if event.text == text:
                return
    raise AssertionError(f"task {task_id} ended without printing {text!r}")


def test_claudebox_pool_cancel_stops_a_task_by_id_then_says_it_has_finished() -> None:
    asyncio.run(create_sessions("by-id"))
    task_id = send_code("by-id", f"echo started; {WAIT_FOR_GO}")
    asyncio.run(asyncio.wait_for(wait_for_line(task_id, "started"), 60))

    done = claudebox_pool("cancel", task_id)
    result = asyncio.run(live.wait(task_id, 30))
    again = claudebox_pool("cancel", task_id)

    assert done.returncode == 0, done.stderr
    assert result["error"] == "cancelled"
    assert again.returncode == 1
    assert "already finished" in again.stderr


def test_a_task_cancelled_while_queued_never_starts_its_agent() -> None:
    asyncio.run(create_sessions("queued"))
    first = send_code("queued", f"echo started; {WAIT_FOR_GO}")
    asyncio.run(asyncio.wait_for(wait_for_line(first, "started"), 60))
    second = send_code("queued", "touch second-ran")

    assert asyncio.run(live.cancel(second)) is True
    (workspace("queued") / "go").touch()
    result = asyncio.run(live.wait(second, 60))

    assert (result["success"], result["error"]) == (False, "cancelled")
    assert not (workspace("queued") / "second-ran").exists()
    assert history_actions("queued")[-1]["context"] == {"task_id": second, "before_start": True}


def test_claude_stream_json_becomes_text_and_tool_events() -> None:
    lines = [
        {"type": "system", "subtype": "init", "session_id": "s1"},
        {
            "type": "assistant",
            "message": {
                "content": [
                    {"type": "text", "text": "I will write it."},
                    {
                        "type": "tool_use",
                        "id": "tu1",
                        "name": "Write",
                        "input": {"file_path": "/workspace/hi.txt", "content": "hi"},
                    },
                ]
            },
        },
        {
            "type": "user",
            "message": {
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "tu1",
                        "content": [{"type": "text", "text": "File created"}],
                    }
                ]
            },
        },
        {"type": "result", "subtype": "success", "is_error": False, "result": "Done"},
    ]

    events = [e for line in lines for e in line_events("claude", "stdout", json.dumps(line))]

    assert [(e.kind, e.tool, e.text) for e in events] == [
        ("text", None, "I will write it."),
        ("tool_use", "Write", '{"file_path": "/workspace/hi.txt", "content": "hi"}'),
        ("tool_result", None, "File created"),
    ]
    assert line_events("claude", "stdout", "Segmentation fault")[0].kind == "line"
