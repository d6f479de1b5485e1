"""The claude agent for real: the pinned Claude Code CLI in a bwrap sandbox of a real worker,
reaching a scripted Messages API only through the worker's model gateway.

The scripted server is the one stand-in: it plays the paid remote model. Everything between
the producer and it is real: Redis, the Celery worker, bwrap, socat, the CLI, the gateway.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis

from claudebox_pool import ClaudeBox, CodeResult, SessionNotFoundError
from tests.conftest import CLAUDE_CLI, WorkerFactory
from tests.support.model_server import Cut, Fail, ModelServer, Reply, Text, ToolUse
from tests.support.processes import Worker

pytestmark = pytest.mark.skipif(
    not Path(CLAUDE_CLI).exists(),
    reason="needs the Claude Code CLI from the npm registry (scripts/setup installs it)",
)

CANARY = "sk-ant-api03-canary-7f3a9c1e5b2d4f6a8c0e"


@pytest.fixture(scope="module")
def model() -> Iterator[ModelServer]:
    with ModelServer() as server:
        yield server


@pytest.fixture(scope="module")
def worker(start_workers: WorkerFactory, model: ModelServer) -> Worker:
    (started,) = start_workers(
        1,
        concurrency=1,
        CLAUDEBOX_MODEL_API_URL=model.url,
        CLAUDEBOX_ANTHROPIC_API_KEY=CANARY,
    )
    return started


@pytest.fixture
def fresh(worker: Worker, model: ModelServer, clean_state: redis.Redis) -> redis.Redis:
    model.reset()
    return clean_state


def code(session_id: str, prompt: str, **options: Any) -> CodeResult:
    per_call = _call_options(options)

    async def scenario() -> CodeResult:
        try:
            box = await ClaudeBox.reconnect(session_id)
        except SessionNotFoundError:
            box = ClaudeBox(session_id=session_id, agent="claude", **options)
        async with box:
            return await box.code(prompt, agent="claude", **per_call)

    return asyncio.run(scenario())


def _call_options(options: dict[str, Any]) -> dict[str, Any]:
    keys = ("max_turns", "allowed_tools", "disallowed_tools")
    return {key: options.pop(key) for key in keys if key in options}


def history(session_id: str) -> list[dict[str, Any]]:
    path = session_dir(session_id) / ".claudebox" / "history.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def session_dir(session_id: str) -> Path:
    record = next(r for r in ClaudeBox.list_sessions() if r.session_id == session_id)
    return Path(record.workspace_path).parent


def user_texts(body: dict[str, Any]) -> list[str]:
    """Every text the user side of a request carries (prompts and tool results)."""
    texts = []
    for message in body["messages"]:
        content = message["content"]
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        for block in blocks:
            if block.get("type") == "text":
                texts.append(block["text"])
            elif block.get("type") == "tool_result":
                texts.append(json.dumps(block.get("content")))
    return texts


def test_write_then_bash_makes_files_history_and_a_metered_result(
    fresh: redis.Redis, model: ModelServer
) -> None:
    model.push(
        [ToolUse("Write", {"file_path": "/workspace/hello.py", "content": "print('hi')\n"})],
        [ToolUse("Bash", {"command": "python3 hello.py > out.txt", "description": "run it"})],
        [Text("hello.py written and run")],
    )

    result = code("writer", "Create hello.py and run it")

    workspace = session_dir("writer") / "workspace"
    assert result.success, result.error
    assert (workspace / "hello.py").read_text() == "print('hi')\n"
    assert (workspace / "out.txt").read_text() == "hi\n"
    assert result.response == "hello.py written and run"
    assert result.num_turns == 3
    assert result.cost_usd > 0
    actions = [entry["action"] for entry in history("writer")]
    assert actions.count("code_execution") == 1
    created = [e["context"]["file"] for e in history("writer") if e["action"] == "file_created"]
    assert sorted(created) == ["hello.py", "out.txt"]
    record = json.loads((session_dir("writer") / ".claudebox" / "session.json").read_text())
    assert record["total_output_tokens"] == 3 * 80
    assert record["total_cost_usd"] == pytest.approx(result.cost_usd)


def test_later_calls_and_a_reconnect_continue_the_conversation(
    fresh: redis.Redis, model: ModelServer
) -> None:
    model.push([Text("first answer")], [Text("second answer")], [Text("third answer")])

    code("talk", "remember the word pelican")
    code("talk", "what was the word?")

    async def after_reconnect() -> CodeResult:
        async with ClaudeBox.reconnect("talk") as box:
            return await box.code("and again?", agent="claude")

    third = asyncio.run(after_reconnect())

    calls = model.message_requests()
    assert third.response == "third answer"
    assert any("pelican" in text for text in user_texts(calls[1].body))
    assert any("pelican" in text for text in user_texts(calls[2].body))
    assert any("what was the word?" in text for text in user_texts(calls[2].body))


def test_tool_options_reach_the_cli(fresh: redis.Redis, model: ModelServer) -> None:
    model.push([Text("ok")], [ToolUse("Bash", {"command": "true", "description": "x"})])

    code("tools", "no bash for you", disallowed_tools=["Bash"])
    limited = code("tools", "one turn only", max_turns=1)

    offered = [tool["name"] for tool in model.message_requests()[0].body["tools"]]
    assert "Bash" not in offered and "Write" in offered
    assert len(model.message_requests()) == 2
    assert not limited.success


@pytest.mark.parametrize(
    "turn, expected",
    [
        (Fail(401, "invalid x-api-key", should_retry=False), "invalid x-api-key"),
        (Fail(429, "slow down please", should_retry=False), "slow down please"),
        (Fail(529, "Overloaded", should_retry=False), "Overloaded"),
    ],
)
def test_upstream_errors_give_a_failed_result_with_the_apis_message(
    fresh: redis.Redis, model: ModelServer, worker: Worker, turn: Fail, expected: str
) -> None:
    model.push(turn)

    result = code("upstream", "hello")

    assert not result.success
    assert expected in (result.error or "")
    model.push([Text("recovered")])
    assert code("upstream", "again").response == "recovered"
    assert worker.proc is not None and worker.proc.poll() is None


def test_a_model_call_the_gateway_refuses_fails_the_run_and_is_in_history(
    fresh: redis.Redis, model: ModelServer
) -> None:
    # The CLI adds ANTHROPIC_BETAS to its anthropic-beta header; this one lets the provider
    # connect to remote MCP servers, past the egress allow-list.
    result = code("extra-beta", "hello", env={"ANTHROPIC_BETAS": "mcp-client-2025-04-04"})

    assert not result.success
    assert "mcp-client-2025-04-04 is not on the allow-list" in result.response + (
        result.error or ""
    )
    assert model.message_requests() == []
    denied = [e["context"] for e in history("extra-beta") if e["action"] == "model_request_denied"]
    assert denied and denied[0]["reason"] == "beta_not_allowed"


def test_a_stream_cut_mid_way_is_not_a_crash(fresh: redis.Redis, model: ModelServer) -> None:
    model.push(Cut(Reply([Text("never finished")])), [Text("second try")])

    result = code("cut", "hello")

    assert result.response == "second try"
    assert any(entry["action"] == "code_execution" for entry in history("cut"))


def test_the_key_is_nowhere_but_in_the_upstream_request(
    fresh: redis.Redis, model: ModelServer, worker: Worker
) -> None:
    hunt = (
        "env; tr '\\0' '\\n' < /proc/self/environ;"
        " cat /proc/1/environ 2>/dev/null | tr '\\0' '\\n';"
        " grep -rl 'sk-ant-api03' /workspace /root /tmp /etc /run /opt 2>/dev/null; echo hunted"
    )
    model.push(
        [ToolUse("Bash", {"command": f"({hunt}) > loot.txt 2>&1", "description": "look"})],
        [Text("looked everywhere")],
    )

    result = code("canary", "find the key")

    assert result.success, result.error
    loot = (session_dir("canary") / "workspace" / "loot.txt").read_text()
    assert "hunted" in loot and "ANTHROPIC_API_KEY=sk-ant-claudebox" in loot
    assert all(r.headers.get("x-api-key") == CANARY for r in model.message_requests())
    places = {
        "result": result.model_dump_json(),
        "session files": "".join(
            p.read_text(errors="replace")
            for p in session_dir("canary").rglob("*")
            if p.is_file() and p.stat().st_size < 5_000_000
        ),
        "worker log": worker.log(),
        "redis": "".join(
            repr(fresh.dump(key)) for key in fresh.scan_iter("*") if fresh.type(key) != b"none"
        ),
    }
    for where, text in places.items():
        assert CANARY not in text, f"the key leaked into {where}"


def test_a_budget_lets_the_first_call_through_and_refuses_the_second(
    fresh: redis.Redis, model: ModelServer
) -> None:
    model.push([Text("first")], [Text("never sent")])

    first = code("budgeted", "one", budget_usd=0.005)
    second = code("budgeted", "two")

    assert first.success and first.cost_usd > 0.005
    assert not second.success
    assert "session 'budgeted' reached its model budget of $0.0050" in (second.error or "")
    assert len(model.message_requests()) == 1
    assert any(entry["action"] == "budget_exceeded" for entry in history("budgeted"))


class _Hello(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"hello from the allowed host")

    def log_message(self, format: str, *args: Any) -> None:
        return


@pytest.fixture
def web_servers() -> Iterator[tuple[int, int]]:
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), _Hello) for _ in range(2)]
    for server in servers:
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield servers[0].server_address[1], servers[1].server_address[1]
    for server in servers:
        server.shutdown()
        server.server_close()


def test_egress_reaches_allowed_hosts_only_through_the_proxy(
    fresh: redis.Redis, web_servers: tuple[int, int]
) -> None:
    allowed, denied = web_servers
    fetch = (
        "import sys, urllib.request\n"
        "try:\n"
        "    print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())\n"
        "except Exception as exc:\n"
        "    print('failed:', exc)\n"
    )
    # NO_PROXY covers loopback (the bridge itself), so it is dropped to send these through.
    via_proxy = 'env -u NO_PROXY -u no_proxy python3 -c "$FETCH"'
    prompt = (
        f"{via_proxy} http://127.0.0.1:{allowed}/; {via_proxy} http://127.0.0.1:{denied}/; "
        f'env -u HTTP_PROXY -u http_proxy python3 -c "$FETCH" http://127.0.0.1:{allowed}/'
    )

    async def scenario() -> CodeResult:
        box = ClaudeBox(
            session_id="egress", env={"FETCH": fetch}, egress_allow=[f"127.0.0.1:{allowed}"]
        )
        async with box:
            return await box.code(prompt)

    lines = asyncio.run(scenario()).response.splitlines()

    assert lines[0] == "hello from the allowed host"
    assert lines[1].startswith("failed:") and "403" in lines[1]
    assert lines[2].startswith("failed:")
    denials = [e["context"] for e in history("egress") if e["action"] == "egress_denied"]
    assert [d["port"] for d in denials] == [denied]
