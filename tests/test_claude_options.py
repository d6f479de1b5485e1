"""Call options reach the real pinned CLI in a real worker's sandbox, as the scripted Messages
API sees them (the fixtures are test_claude_pool's: one worker, one scripted server)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest
import redis
from celery.signals import before_task_publish

from claudebox_pool import ClaudeBox, CodeResult, InvalidRequestError, StreamEvent
from claudebox_pool.tasks.settings import get_settings
from tests.support.model_server import Fail, ModelServer, Text, ToolUse
from tests.test_claude_pool import fresh, model, pytestmark, user_texts, worker

__all__ = ["fresh", "model", "pytestmark", "worker"]


def code(session_id: str, prompt: str, **options: Any) -> CodeResult:
    async def scenario() -> CodeResult:
        async with ClaudeBox(session_id=session_id, agent="claude") as box:
            return await box.code(prompt, **options)

    return asyncio.run(scenario())


def system_text(body: dict[str, Any]) -> str:
    system = body.get("system") or []
    blocks = [{"text": system}] if isinstance(system, str) else system
    return "\n".join(block.get("text", "") for block in blocks)


def test_model_and_system_prompts_reach_the_model(fresh: redis.Redis, model: ModelServer) -> None:
    model.push([Text("replaced")], [Text("appended")])

    code(
        "sys",
        "-starts with a dash",
        model="claude-sonnet-4-5-20250929",
        system_prompt="You are PELICAN.",
    )
    code("sys2", "hello", append_system_prompt="Always mention OSPREY.")

    first, second = [call.body for call in model.message_requests()]
    assert first["model"] == "claude-sonnet-4-5-20250929"
    assert system_text(first).strip().endswith("You are PELICAN.")
    assert "You are Claude Code" not in system_text(first)
    assert "Always mention OSPREY." in system_text(second)
    assert "PELICAN" not in system_text(second)


def test_json_schema_gives_structured_output(fresh: redis.Redis, model: ModelServer) -> None:
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "integer"}},
        "required": ["answer"],
    }
    model.push([ToolUse("StructuredOutput", {"answer": 42})], [Text("done")])

    result = code("schema", "what is six times seven?", json_schema=schema)

    offered = [tool["name"] for tool in model.message_requests()[0].body["tools"]]
    assert "StructuredOutput" in offered, offered
    assert result.success, result.error
    assert result.structured_output == {"answer": 42}


def test_the_fallback_model_answers_when_the_first_is_overloaded(
    fresh: redis.Redis, model: ModelServer
) -> None:
    model.push(Fail(529, "Overloaded", should_retry=False), [Text("from the fallback")])

    result = code(
        "fallback",
        "hello",
        model="claude-opus-4-5-20251101",
        fallback_model="claude-sonnet-4-5-20250929",
    )

    asked = [call.body["model"] for call in model.message_requests()]
    assert result.response == "from the fallback", result.error
    assert asked[0] == "claude-opus-4-5-20251101"
    assert asked[-1] == "claude-sonnet-4-5-20250929"


def test_partial_text_reaches_stream(fresh: redis.Redis, model: ModelServer) -> None:
    model.push([Text("a streamed answer")])

    async def scenario() -> list[StreamEvent]:
        async with ClaudeBox(session_id="partial", agent="claude") as box:
            return [event async for event in box.stream("hi", include_partial_messages=True)]

    events = asyncio.run(scenario())

    partial = "".join(event.text or "" for event in events if event.kind == "partial")
    assert partial == "a streamed answer"
    assert [event.kind for event in events].index("partial") < [
        event.kind for event in events
    ].index("text")


def test_a_boxs_options_apply_to_its_calls_and_a_call_overrides_them(
    fresh: redis.Redis, model: ModelServer
) -> None:
    model.push([Text("one")], [Text("two")])

    async def scenario() -> None:
        async with ClaudeBox(
            session_id="boxed",
            agent="claude",
            model="claude-sonnet-4-5-20250929",
            append_system_prompt="Box says HERON.",
        ) as box:
            await box.code("first")
            await box.code("second", model="claude-opus-4-5-20251101")

    asyncio.run(scenario())

    first, second = [call.body for call in model.message_requests()]
    assert first["model"] == "claude-sonnet-4-5-20250929"
    assert second["model"] == "claude-opus-4-5-20251101"
    assert "Box says HERON." in system_text(first)
    assert "Box says HERON." in system_text(second)


def test_a_prompt_of_the_largest_allowed_size_reaches_the_model_whole(
    fresh: redis.Redis, model: ModelServer
) -> None:
    limit = get_settings().max_prompt_bytes
    # Far past the 128 KB one argv string may hold; marked at both ends to show nothing is cut.
    prompt = "BEGIN " + "lorem ipsum " * ((limit - 10) // 12)
    prompt += "." * (limit - 4 - len(prompt)) + " END"
    model.push([Text("read it all")])

    result = code("big-prompt", prompt)

    assert len(prompt.encode()) == limit
    assert result.success, result.error
    assert prompt in user_texts(model.message_requests()[0].body)


ABACUS = r"""
import json, os, sys

TOOL = {
    "name": "add",
    "description": "Adds two integers.",
    "inputSchema": {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"],
    },
}
for line in sys.stdin:
    message = json.loads(line)
    if "id" not in message:
        continue
    method, params = message["method"], message.get("params") or {}
    if method == "initialize":
        result = {
            "protocolVersion": params["protocolVersion"],
            "capabilities": {"tools": {}},
            "serverInfo": {"name": "abacus", "version": "1"},
        }
    elif method == "tools/list":
        result = {"tools": [TOOL]}
    elif method == "tools/call":
        total = params["arguments"]["a"] + params["arguments"]["b"]
        text = f"{os.environ['MARK']} {total} in {os.getcwd()}"
        result = {"content": [{"type": "text", "text": text}]}
    else:
        error = {"code": -32601, "message": method}
        print(json.dumps({"jsonrpc": "2.0", "id": message["id"], "error": error}), flush=True)
        continue
    print(json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": result}), flush=True)
"""
"""A stdio MCP server of one tool, ``add``, whose answer names its env's MARK and its cwd."""


def test_a_stdio_mcp_servers_tool_runs_in_the_sandbox_and_its_result_reaches_the_model(
    fresh: redis.Redis, model: ModelServer
) -> None:
    # The pinned CLI defers MCP tools: named in a system reminder, loaded through ToolSearch.
    model.push(
        [ToolUse("ToolSearch", {"query": "select:mcp__abacus__add"})],
        [ToolUse("mcp__abacus__add", {"a": 2, "b": 40})],
        [Text("the sum is 42")],
    )
    servers = {
        "abacus": {"command": "python3", "args": ["-c", ABACUS], "env": {"MARK": "PANGOLIN"}}
    }

    result = code("mcp", "add 2 and 40 with the abacus", mcp_servers=servers)

    first, second, third = [call.body for call in model.message_requests()]
    assert any("mcp__abacus__add" in text for text in user_texts(first))
    offered = {tool["name"]: tool for tool in second["tools"]}
    assert offered["mcp__abacus__add"]["input_schema"]["required"] == ["a", "b"]
    # Run by the CLI inside the sandbox: its cwd is the sandbox's workspace.
    assert any("PANGOLIN 42 in /workspace" in text for text in user_texts(third))
    assert result.success, result.error
    assert result.response == "the sum is 42"


def test_an_http_mcp_server_off_the_egress_list_is_refused_before_queueing(
    fresh: redis.Redis, model: ModelServer
) -> None:
    published: list[str] = []

    def on_publish(sender: str | None = None, **_: object) -> None:
        published.append(str(sender))

    far = {"docs": {"type": "http", "url": "https://reader:hunter2@mcp.example.net/mcp"}}

    async def scenario() -> None:
        async with ClaudeBox(
            session_id="mcp-far", agent="claude", egress_allow=["docs.example.com"]
        ) as box:
            before_task_publish.connect(on_publish)
            try:
                await box.code("read the docs", mcp_servers=far)
            finally:
                before_task_publish.disconnect(on_publish)

    with pytest.raises(InvalidRequestError, match=r"'docs' is at mcp\.example\.net,") as refused:
        asyncio.run(scenario())

    assert published == []
    assert "hunter2" not in str(refused.value)
    assert model.message_requests() == []


def test_the_tools_offered_follow_disallowed_tools_and_the_settings_deny_rules(
    fresh: redis.Redis, model: ModelServer
) -> None:
    model.push([Text("plain")], [Text("narrowed")])

    code("tools-plain", "hi")
    code(
        "tools-narrow",
        "hi",
        allowed_tools=["Read"],
        disallowed_tools=["Write"],
        settings={"permissions": {"deny": ["Bash"]}},
    )

    plain, narrowed = (
        {tool["name"] for tool in call.body["tools"]} for call in model.message_requests()
    )
    assert {"Read", "Write", "Bash"} <= plain
    assert "Read" in narrowed
    assert not {"Write", "Bash"} & narrowed


def test_effort_permission_mode_and_add_dirs_reach_the_model(
    fresh: redis.Redis, model: ModelServer
) -> None:
    model.push([Text("planned")])

    code("modes", "hi", effort="low", permission_mode="plan", add_dirs=["/usr/share"])

    (body,) = [call.body for call in model.message_requests()]
    told = "\n".join(user_texts(body))
    assert body["output_config"]["effort"] == "low"
    assert "Plan mode is active" in told
    assert "Additional working directories:\n  - /usr/share" in told


def test_a_subagent_is_offered_and_asked_with_its_own_prompt_and_tools(
    fresh: redis.Redis, model: ModelServer
) -> None:
    reviewer = {
        "description": "Reviews code for KESTREL bugs.",
        "prompt": "You are the KESTREL reviewer.",
        "tools": ["Read"],
    }
    model.push(
        [
            ToolUse(
                "Agent",
                {
                    "subagent_type": "reviewer",
                    "description": "review",
                    "prompt": "review x.py",
                    # In the foreground: the main loop waits, so the script's order is certain.
                    "run_in_background": False,
                },
            )
        ],
        [Text("x.py has no KESTREL bugs")],
        [Text("reviewed")],
    )

    result = code("subagent", "have x.py reviewed", agents={"reviewer": reviewer})

    main, sub, last = [call.body for call in model.message_requests()]
    assert "reviewer: Reviews code for KESTREL bugs." in "\n".join(user_texts(main))
    assert "You are the KESTREL reviewer." in system_text(sub)
    assert [tool["name"] for tool in sub["tools"]] == ["Read"]
    assert "review x.py" in user_texts(sub)
    assert any("x.py has no KESTREL bugs" in text for text in user_texts(last))
    assert result.response == "reviewed"


def test_a_reconnected_box_calls_with_the_options_it_was_created_with(
    fresh: redis.Redis, model: ModelServer
) -> None:
    model.push([Text("one")], [Text("two")], [Text("three")])
    sonnet, opus = "claude-sonnet-4-5-20250929", "claude-opus-4-5-20251101"

    async def scenario() -> None:
        async with ClaudeBox(
            session_id="kept", agent="claude", model=sonnet, append_system_prompt="Box says EGRET."
        ) as box:
            await box.code("first")
        # Another producer, days later: it names only the session.
        async with ClaudeBox.reconnect("kept") as box:
            await box.code("second")
            await box.code("third", model=opus)

    asyncio.run(scenario())

    bodies = [call.body for call in model.message_requests()]
    assert [body["model"] for body in bodies] == [sonnet, sonnet, opus]
    assert all("Box says EGRET." in system_text(body) for body in bodies)


def test_get_or_create_of_an_existing_box_calls_with_its_options_under_the_given_ones(
    fresh: redis.Redis, model: ModelServer
) -> None:
    model.push([Text("one")], [Text("two")], [Text("three")])
    sonnet, opus = "claude-sonnet-4-5-20250929", "claude-opus-4-5-20251101"

    async def scenario() -> None:
        async with ClaudeBox.get_or_create(
            "got", agent="claude", model=sonnet, append_system_prompt="Box says HERON."
        ) as box:
            await box.code("first")
        async with ClaudeBox.get_or_create("got") as box:  # found: the stored options
            await box.code("second")
        async with ClaudeBox.get_or_create("got", model=opus) as box:  # given ones win
            await box.code("third")

    asyncio.run(scenario())

    bodies = [call.body for call in model.message_requests()]
    assert [body["model"] for body in bodies] == [sonnet, sonnet, opus]
    assert all("Box says HERON." in system_text(body) for body in bodies)


class _McpHttp(BaseHTTPRequestHandler):
    """An MCP server over streamable HTTP, answering in JSON: one tool, ``ping``."""

    seen: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        message = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.seen.append({"headers": {k.lower(): v for k, v in self.headers.items()}})
        if "id" not in message:
            self.send_response(202)
            self.end_headers()
            return
        method, params = message["method"], message.get("params") or {}
        result: dict[str, Any] = {}
        if method == "initialize":
            result = {
                "protocolVersion": params["protocolVersion"],
                "capabilities": {"tools": {}},
                "serverInfo": {"name": "web", "version": "1"},
            }
        elif method == "tools/list":
            schema = {"type": "object", "properties": {}}
            result = {"tools": [{"name": "ping", "description": "Pings.", "inputSchema": schema}]}
        elif method == "tools/call":
            result = {"content": [{"type": "text", "text": "PONG-HERON"}]}
        body = json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": result}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self.send_response(405)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _outward_address() -> str | None:
    """This host's address on its default route (no packet is sent), or None without one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address = str(probe.getsockname()[0])
    return None if address.startswith("127.") else address


def test_an_http_mcp_server_on_the_egress_list_is_reached_through_the_proxy(
    fresh: redis.Redis, model: ModelServer
) -> None:
    # Not loopback: the sandbox's own loopback is not the host's, and NO_PROXY keeps it local.
    address = _outward_address()
    if address is None:
        pytest.skip("needs a non-loopback address of this host for the MCP server")
    server = ThreadingHTTPServer((address, 0), _McpHttp)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    port = server.server_address[1]
    model.push(
        [ToolUse("ToolSearch", {"query": "select:mcp__web__ping"})],
        [ToolUse("mcp__web__ping", {})],
        [Text("pinged")],
    )
    web = {"type": "http", "url": f"http://{address}:{port}/mcp", "headers": {"X-Key": "k1"}}

    async def scenario() -> CodeResult:
        async with ClaudeBox(
            session_id="mcp-http", agent="claude", egress_allow=[f"{address}:{port}"]
        ) as box:
            return await box.code("ping it", mcp_servers={"web": web})

    try:
        result = asyncio.run(scenario())
    finally:
        server.shutdown()
        server.server_close()

    assert result.success, result.error
    assert _McpHttp.seen and all(seen["headers"]["x-key"] == "k1" for seen in _McpHttp.seen)
    last = model.message_requests()[-1].body
    assert any("PONG-HERON" in text for text in user_texts(last))
