"""The model gateway and egress proxy, end to end with real sockets and real processes.

The real Claude Code CLI runs in a real bubblewrap sandbox with no network and reaches the
scripted model server only through a lease's socket; the egress probes run python3 inside
the same kind of sandbox. The few tests that need no sandbox speak HTTP to a lease's socket
directly.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from claudebox_pool.tasks.allowlist import AllowList, Target
from claudebox_pool.tasks.settings import CLI_BETAS
from claudebox_pool.workers.gateway import (
    DEFAULT_PRICES,
    GUEST_SOCKET_DIR,
    PLACEHOLDER_API_KEY,
    Credential,
    Gateway,
    Lease,
    bridged_argv,
    sandbox_env,
)
from claudebox_pool.workers.gateway.policy import RequestPolicy
from claudebox_pool.workers.gateway.pricing import price_for
from claudebox_pool.workers.gateway.usage import StreamMeter
from claudebox_pool.workers.runtimes.base import AGENT_HOME, ExecResult, Mount, SandboxSpec
from claudebox_pool.workers.runtimes.bwrap import BwrapRuntime
from claudebox_pool.workers.runtimes.process import run_process
from tests import conftest
from tests.support.model_server import (
    Cut,
    Fail,
    Hold,
    ModelServer,
    Reply,
    Text,
    ToolUse,
    sse_events,
)
from tests.support.sandboxes import owned

REAL_KEY = "sk-ant-api03-real-key-held-only-by-the-gateway"
EXEC_TIMEOUT_S = 60
OPUS_COST_PER_TURN = (1200 * 5.0 + 80 * 25.0) / 1e6
"""A scripted reply's default usage (1200 in, 80 out) at the opus price: the CLI asks for an
opus model by default."""


def _claude_cli() -> Path | None:
    path = Path(conftest.CLAUDE_CLI)
    return path.resolve() if path.exists() else None


CLAUDE_CLI = _claude_cli()
needs_cli = pytest.mark.skipif(
    CLAUDE_CLI is None,
    reason="needs the Claude Code CLI from the npm registry (scripts/setup installs it)",
)


def _install_dir(cli: Path) -> Path:
    """The CLI's node_modules: the native binary lives in a package inside it."""
    return next((p for p in cli.parents if p.name == "node_modules"), cli.parent)


@pytest.fixture
def model() -> Iterator[ModelServer]:
    with ModelServer() as server:
        yield server


@pytest.fixture
def gateway(model: ModelServer) -> Iterator[Gateway]:
    with Gateway(model.url, Credential.api_key(REAL_KEY)) as gw:
        yield gw


def run_in_sandbox(
    lease: Lease,
    root: Path,
    argv: Sequence[str],
    mounts: Sequence[Mount] = (),
    extra_env: dict[str, str] | None = None,
) -> ExecResult:
    """``argv`` under bwrap with only the lease's socket as a way out, bridged to loopback."""
    workspace, home = root / "workspace", root / "home"
    workspace.mkdir(exist_ok=True)
    home.mkdir(exist_ok=True)
    spec = owned(
        SandboxSpec(
            session_id=lease.session_id,
            workspace=workspace,
            home=home,
            cpus=1,
            memory_mib=1024,
            disk_size_gb=1,
            mounts=(Mount(lease.socket_dir, GUEST_SOCKET_DIR, read_only=False), *mounts),
        )
    )
    if spec.identity is not None:
        lease.give_to(spec.identity.uid, spec.identity.gid)
    env = {"PATH": "/usr/bin:/bin", "HOME": AGENT_HOME, "IS_SANDBOX": "1", **sandbox_env()}
    env.update(extra_env or {})
    with BwrapRuntime().open(spec) as sandbox:
        return sandbox.exec(bridged_argv(argv), env, timeout_s=EXEC_TIMEOUT_S)


def run_cli(
    lease: Lease, root: Path, prompt: str, extra_env: dict[str, str] | None = None
) -> dict[str, Any]:
    """The CLI's final stream-json ``result`` line for one ``-p`` run in a sandbox."""
    assert CLAUDE_CLI is not None
    install = _install_dir(CLAUDE_CLI)
    guest = Path("/opt/claude-code")
    argv = [
        str(guest / CLAUDE_CLI.relative_to(install)),
        "-p",
        prompt,
        "--output-format",
        "stream-json",
        "--verbose",
        "--dangerously-skip-permissions",
    ]
    done = run_in_sandbox(lease, root, argv, [Mount(install, str(guest))], extra_env)
    return _result_line(done.stdout, done.stderr)


def _result_line(stdout: str, stderr: str) -> dict[str, Any]:
    lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    results = [line for line in lines if line.get("type") == "result"]
    assert results, f"no result line; stdout={stdout[-2000:]!r} stderr={stderr[-2000:]!r}"
    result: dict[str, Any] = results[-1]
    return result


class _UnixConnection(http.client.HTTPConnection):
    """HTTP to a lease's socket, as socat inside a sandbox would carry it."""

    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=10)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(str(self._path))


def _post_message(
    lease: Lease,
    headers: dict[str, str] | None = None,
    *,
    over_tcp: bool = False,
    extra: dict[str, Any] | None = None,
    path: str = "/v1/messages",
) -> tuple[int, Any]:
    connection: http.client.HTTPConnection
    if over_tcp:
        assert lease.tcp_address is not None
        connection = http.client.HTTPConnection(*lease.tcp_address, timeout=10)
    else:
        connection = _UnixConnection(lease.socket_path)
    body = {"model": "claude-sonnet-4-5", "max_tokens": 64, "stream": True, "messages": []}
    body.update(extra or {})
    connection.request(
        "POST",
        path,
        body=json.dumps(body),
        headers={"content-type": "application/json", **(headers or {})},
    )
    response = connection.getresponse()
    raw = response.read()
    connection.close()
    is_json = response.getheader("content-type", "").startswith("application/json")
    return response.status, json.loads(raw) if is_json else raw


# --- the scripted model server itself -----------------------------------------------------


@needs_cli
def test_model_server_drives_the_cli_on_the_host(model: ModelServer, tmp_path: Path) -> None:
    assert CLAUDE_CLI is not None
    target = tmp_path / "hi.txt"
    model.push([ToolUse("Write", {"file_path": str(target), "content": "hello\n"})], [Text("ok")])
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "ANTHROPIC_BASE_URL": model.url,
        "ANTHROPIC_API_KEY": "placeholder",
        "DISABLE_TELEMETRY": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "IS_SANDBOX": "1",
    }
    argv = [str(CLAUDE_CLI), "-p", "write hi.txt", "--output-format", "stream-json"]
    argv += ["--verbose", "--dangerously-skip-permissions"]
    done = run_process(argv, env, str(tmp_path), EXEC_TIMEOUT_S, None, None)

    result = _result_line(done.stdout, done.stderr)
    assert (result["subtype"], result["num_turns"], result["result"]) == ("success", 2, "ok")
    assert target.read_text() == "hello\n"
    first, second = model.message_requests()
    assert first.headers["x-api-key"] == "placeholder"
    assert "Write" in {tool["name"] for tool in first.body["tools"]}
    assert second.body["messages"][-1]["content"][0]["type"] == "tool_result"


# --- model calls through the gateway ------------------------------------------------------


@needs_cli
def test_cli_in_sandbox_reaches_the_model_only_through_the_gateway(
    model: ModelServer, gateway: Gateway, tmp_path: Path
) -> None:
    model.push(
        [ToolUse("Write", {"file_path": "/workspace/hi.txt", "content": "hello\n"})],
        [ToolUse("Bash", {"command": "env", "description": "show the environment"})],
        [Text("done")],
    )
    with gateway.lease("web-api") as lease:
        result = run_cli(lease, tmp_path, "write hi.txt")
        usage, events = lease.usage, lease.events

    assert (result["subtype"], result["result"]) == ("success", "done")
    assert (tmp_path / "workspace" / "hi.txt").read_text() == "hello\n"
    calls = model.message_requests()
    assert [call.headers.get("x-api-key") for call in calls] == [REAL_KEY] * 3
    sandbox_env_seen = json.dumps(calls[2].body["messages"][-1])
    assert f"ANTHROPIC_API_KEY={PLACEHOLDER_API_KEY}" in sandbox_env_seen
    assert not any(REAL_KEY in json.dumps(call.body) for call in calls)
    assert (usage.requests, usage.input_tokens, usage.output_tokens) == (3, 3600, 240)
    assert usage.cost_usd == pytest.approx(3 * OPUS_COST_PER_TURN)
    assert events == []


@needs_cli
def test_budget_refuses_the_second_model_call(
    model: ModelServer, gateway: Gateway, tmp_path: Path
) -> None:
    model.push(
        [ToolUse("Write", {"file_path": "/workspace/a.txt", "content": "a"})], [Text("unreached")]
    )
    with gateway.lease("capped", budget_usd=0.005) as lease:
        result = run_cli(lease, tmp_path, "write a.txt")
        usage, events = lease.usage, lease.events

    assert result["is_error"] is True
    assert "session 'capped'" in result["result"] and "$0.0050 budget" in result["result"]
    assert len(model.message_requests()) == 1
    assert usage.requests == 1
    assert events == [
        ("budget_exceeded", {"budget_usd": 0.005, "spent_usd": pytest.approx(OPUS_COST_PER_TURN)})
    ]


def test_earlier_spend_counts_against_the_budget(model: ModelServer, gateway: Gateway) -> None:
    with gateway.lease("spent", budget_usd=1.0, spent_usd=1.0) as lease:
        status, body = _post_message(lease)
        events = lease.events

    assert status == 400
    assert body["error"]["type"] == "billing_error"
    assert "session 'spent'" in body["error"]["message"]
    assert model.requests == []
    assert events == [("budget_exceeded", {"budget_usd": 1.0, "spent_usd": 1.0})]


def test_usage_is_split_by_the_model_each_reply_names_with_its_cache_tokens(
    model: ModelServer, gateway: Gateway
) -> None:
    model.push(
        Reply([Text("a")], 1000, 50, 300, 2000, model="claude-opus-4-5"),
        Reply([Text("b")], 400, 20, 0, 900, model="claude-haiku-4-5"),
        Reply([Text("c")], 100, 10, model="claude-opus-4-5"),
    )
    with gateway.lease("split") as lease:
        statuses = [_post_message(lease)[0] for _ in range(3)]
        usage = lease.usage

    assert statuses == [200, 200, 200]
    opus_cost = (1100 * 5.0 + 60 * 25.0 + 300 * 6.25 + 2000 * 0.5) / 1e6
    haiku_cost = (400 * 1.0 + 20 * 5.0 + 900 * 0.1) / 1e6
    assert {name: used.model_dump() for name, used in usage.by_model.items()} == {
        "claude-opus-4-5": {
            "input_tokens": 1100,
            "output_tokens": 60,
            "cache_creation_input_tokens": 300,
            "cache_read_input_tokens": 2000,
            "cost_usd": pytest.approx(opus_cost),
        },
        "claude-haiku-4-5": {
            "input_tokens": 400,
            "output_tokens": 20,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 900,
            "cost_usd": pytest.approx(haiku_cost),
        },
    }
    assert (usage.requests, usage.cache_creation_input_tokens) == (3, 300)
    assert usage.cache_read_input_tokens == 2900
    assert usage.cost_usd == pytest.approx(opus_cost + haiku_cost)


# --- leases over TCP (a micro-VM's way in) -----------------------------------------------


def test_a_request_through_a_lease_tcp_address_is_metered_to_that_lease(
    model: ModelServer, gateway: Gateway
) -> None:
    model.push(Reply([Text("hi")]))
    with gateway.lease("vm", tcp_host="127.0.0.1") as lease, gateway.lease("other") as other:
        status, _body = _post_message(lease, over_tcp=True)
        usage, other_usage = lease.usage, other.usage

    assert other.tcp_address is None
    assert status == 200
    assert (usage.requests, usage.input_tokens, usage.output_tokens) == (1, 1200, 80)
    assert other_usage.requests == 0
    (request,) = model.message_requests()
    assert request.headers["x-api-key"] == REAL_KEY


def test_a_tcp_lease_keeps_its_budget(model: ModelServer, gateway: Gateway) -> None:
    with gateway.lease("spent-vm", budget_usd=1.0, spent_usd=1.0, tcp_host="127.0.0.1") as lease:
        status, body = _post_message(lease, over_tcp=True)

    assert status == 400
    assert body["error"]["type"] == "billing_error"
    assert model.requests == []


def test_closing_a_lease_closes_its_tcp_listener(gateway: Gateway) -> None:
    lease = gateway.lease("closing", tcp_host="127.0.0.1")
    assert lease.tcp_address is not None
    host, port = lease.tcp_address
    socket.create_connection((host, port), timeout=5).close()

    lease.close()

    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, port), timeout=5)


def test_stream_reaches_the_sandbox_as_it_is_written(model: ModelServer, gateway: Gateway) -> None:
    resume = threading.Event()
    model.push(Hold(Reply([Text("hi")]), after_events=1, resume=resume))
    with gateway.lease("live") as lease:
        connection = _UnixConnection(lease.socket_path)
        connection.request("POST", "/v1/messages", body=b"{}")
        response = connection.getresponse()
        first_event = b"".join(iter(response.readline, b"\n"))
        assert not resume.is_set()
        resume.set()
        rest = response.read()
        connection.close()
        usage = lease.usage

    assert first_event.startswith(b"event: message_start")
    assert b"event: message_stop" in rest
    assert (usage.input_tokens, usage.output_tokens) == (1200, 80)


def test_oauth_token_replaces_whatever_the_sandbox_sends(model: ModelServer) -> None:
    model.push([Text("hi")])
    with (
        Gateway(model.url, Credential.oauth_token("sk-ant-oat01-secret")) as gateway,
        gateway.lease("oauth") as lease,
    ):
        _post_message(
            lease,
            {
                "x-api-key": PLACEHOLDER_API_KEY,
                "authorization": "Bearer forged",
                "anthropic-beta": "claude-code-20250219",
            },
        )

    (call,) = model.requests
    assert "x-api-key" not in call.headers
    assert call.headers["authorization"] == "Bearer sk-ant-oat01-secret"
    assert call.headers["anthropic-beta"] == "claude-code-20250219,oauth-2025-04-20"


def test_endpoints_beyond_the_messages_api_are_not_forwarded(
    model: ModelServer, gateway: Gateway
) -> None:
    with gateway.lease("batcher") as lease:
        connection = _UnixConnection(lease.socket_path)
        connection.request("POST", "/v1/messages/batches", body=b"{}")
        status = connection.getresponse().status
        connection.close()
        events = lease.events

    assert status == 404
    assert model.requests == []
    assert events == [("model_route_denied", {"method": "POST", "path": "/v1/messages/batches"})]


def _get(lease: Lease, path: str) -> int:
    connection = _UnixConnection(lease.socket_path)
    connection.request("GET", path)
    status = connection.getresponse().status
    connection.close()
    return status


@pytest.mark.parametrize(
    "path",
    [
        "/v1/models/..",
        "/v1/models/../files",
        "/v1/models/%2e%2e/files",
        "/v1/models/%2E%2E%2Ffiles",
        "/v1/models/%252e%252e/files",
        "//v1/files",
        "/v1/models/x/../../organizations",
    ],
)
def test_paths_are_normalised_before_the_route_check(
    model: ModelServer, gateway: Gateway, path: str
) -> None:
    with gateway.lease("traverser") as lease:
        status = _get(lease, path)
        events = lease.events

    assert status == 404
    assert model.requests == []
    assert [action for action, _ in events] == ["model_route_denied"]


def test_a_normalised_path_is_what_is_forwarded(model: ModelServer, gateway: Gateway) -> None:
    model.push(Reply([Text("hi")]))
    with gateway.lease("slashes") as lease:
        status, _body = _post_message(lease, path="/v1//messages/./?beta=true")

    assert status == 200
    (call,) = model.requests
    assert call.path == "/v1/messages?beta=true"


_SERVER_SIDE_REACH = {
    "mcp_servers": {
        "mcp_servers": [{"type": "url", "url": "https://attacker.example/mcp", "name": "x"}]
    },
    "web_fetch": {"tools": [{"type": "web_fetch_20250910", "name": "web_fetch"}]},
    "web_search": {"tools": [{"type": "web_search_20250305", "name": "web_search"}]},
    "code_execution": {"tools": [{"type": "code_execution_20250825", "name": "code_execution"}]},
}


@pytest.mark.parametrize("feature", sorted(_SERVER_SIDE_REACH))
def test_requests_that_make_the_provider_reach_the_internet_are_refused(
    model: ModelServer, gateway: Gateway, feature: str
) -> None:
    with gateway.lease("reacher") as lease:
        status, body = _post_message(lease, extra=_SERVER_SIDE_REACH[feature])
        events = lease.events

    assert status == 403
    assert body["error"]["type"] == "permission_error"
    assert "CLAUDEBOX_GATEWAY_ALLOW_SERVER_TOOLS" in body["error"]["message"]
    assert model.requests == []
    ((action, context),) = events
    assert (action, context["reason"]) == ("model_request_denied", "server_tools")


def test_custom_tools_pass_and_server_tools_pass_once_allowed(model: ModelServer) -> None:
    model.push(Reply([Text("one")]), Reply([Text("two")]))
    custom = {"tools": [{"name": "Bash", "input_schema": {"type": "object"}, "type": "custom"}]}
    with Gateway(model.url, Credential.api_key(REAL_KEY)) as strict, strict.lease("c") as lease:
        custom_status, _ = _post_message(lease, extra=custom)
    policy = RequestPolicy(allow_server_tools=True)
    with (
        Gateway(model.url, Credential.api_key(REAL_KEY), policy=policy) as open_gateway,
        open_gateway.lease("s") as lease,
    ):
        server_status, _ = _post_message(lease, extra=_SERVER_SIDE_REACH["web_fetch"])

    assert (custom_status, server_status) == (200, 200)
    assert len(model.message_requests()) == 2


def test_unknown_beta_values_are_refused(model: ModelServer, gateway: Gateway) -> None:
    model.push(Reply([Text("hi")]))
    with gateway.lease("beta") as lease:
        known, _ = _post_message(lease, {"anthropic-beta": ",".join(CLI_BETAS)})
        unknown, body = _post_message(
            lease, {"anthropic-beta": "claude-code-20250219,mcp-client-2025-04-04"}
        )
        events = lease.events

    assert (known, unknown) == (200, 403)
    assert "mcp-client-2025-04-04" in body["error"]["message"]
    assert "CLAUDEBOX_GATEWAY_ALLOWED_BETAS" in body["error"]["message"]
    assert len(model.requests) == 1
    assert events == [
        (
            "model_request_denied",
            {
                "reason": "beta_not_allowed",
                "detail": "anthropic-beta mcp-client-2025-04-04 is not on the allow-list",
            },
        )
    ]


@needs_cli
def test_the_cli_shows_why_a_model_call_was_refused(
    model: ModelServer, gateway: Gateway, tmp_path: Path
) -> None:
    with gateway.lease("extra-beta") as lease:
        result = run_cli(lease, tmp_path, "hi", {"ANTHROPIC_BETAS": "mcp-client-2025-04-04"})
        events = lease.events

    assert result["is_error"] is True
    assert "mcp-client-2025-04-04 is not on the allow-list" in result["result"]
    assert model.message_requests() == []
    assert {action for action, _ in events} == {"model_request_denied"}


# --- upstream failures ----------------------------------------------------------------------


@needs_cli
@pytest.mark.parametrize(
    ("status", "error_type", "shown"),
    [(401, "authentication_error", "API Error: 401"), (529, "overloaded_error", "API Error: 529")],
)
def test_upstream_errors_reach_the_cli_and_are_recorded(
    model: ModelServer,
    gateway: Gateway,
    tmp_path: Path,
    status: int,
    error_type: str,
    shown: str,
) -> None:
    model.push(Fail(status, "scripted upstream failure", should_retry=False))
    with gateway.lease("failing") as lease:
        result = run_cli(lease, tmp_path, "hello")
        events = lease.events

    assert result["is_error"] is True and shown in result["result"]
    assert events == [
        (
            "model_error",
            {"status": status, "type": error_type, "message": "scripted upstream failure"},
        )
    ]


@needs_cli
def test_stream_cut_upstream_is_cut_for_the_cli_too(
    model: ModelServer, gateway: Gateway, tmp_path: Path
) -> None:
    model.push(Cut(Reply([Text("partial")]), after_events=2), [Text("recovered")])
    with gateway.lease("flaky") as lease:
        result = run_cli(lease, tmp_path, "hello")
        usage, events = lease.usage, lease.events

    assert (result["subtype"], result["result"]) == ("success", "recovered")
    assert events == [
        ("model_error", {"status": 200, "message": "upstream closed the stream mid-response"})
    ]
    # The cut reply had reported its input tokens before it broke off: they are charged.
    assert (usage.requests, usage.input_tokens) == (2, 2400)


def test_credential_never_leaves_the_gateway(model: ModelServer, gateway: Gateway) -> None:
    model.push(Fail(401, f"key {REAL_KEY} was revoked", should_retry=False))
    with gateway.lease("leaky") as lease:
        status, _body = _post_message(lease)
        events = lease.events

    assert status == 401
    assert events[0][1]["message"] == "key [redacted] was revoked"
    shown = [repr(gateway), repr(lease), repr(Credential.api_key(REAL_KEY)), repr(events)]
    assert not any(REAL_KEY in text for text in shown)


# --- egress ---------------------------------------------------------------------------------


class _Site:
    """A loopback HTTP server on the host that says which path it was asked for."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = f"site saw {self.path}".encode()
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.httpd.server_address[1])
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> _Site:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


_EGRESS_PROBE = r"""
import json, os, socket, sys, urllib.error, urllib.request
proxy = os.environ["HTTP_PROXY"]
proxy_port = int(proxy.rsplit(":", 1)[1])
allowed, denied = int(sys.argv[1]), int(sys.argv[2])
# The sites are on the host's loopback, which NO_PROXY exempts from the proxy; urllib would
# then try them directly, inside the sandbox, where nothing listens.
for name in ("NO_PROXY", "no_proxy"):
    os.environ.pop(name, None)
opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy}))

def fetch(port):
    try:
        with opener.open(f"http://127.0.0.1:{port}/via-proxy", timeout=10) as response:
            return [response.status, response.read().decode()]
    except urllib.error.HTTPError as error:
        return [error.code, json.loads(error.read())["error"]["type"]]

def tunnel(host, port):
    s = socket.create_connection(("127.0.0.1", proxy_port), timeout=10)
    s.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    reply = s.makefile("rb")
    status = int(reply.readline().split()[1])
    while reply.readline() not in (b"\r\n", b""):
        pass
    if status != 200:
        return [status]
    s.sendall(b"GET /via-tunnel HTTP/1.0\r\nHost: site\r\n\r\n")
    return [status, reply.read().split(b"\r\n\r\n", 1)[1].decode()]

def direct(host, port):
    try:
        socket.create_connection((host, port), timeout=5).close()
        return "connected"
    except OSError as error:
        return type(error).__name__

print(json.dumps({
    "allowed": fetch(allowed),
    "denied": fetch(denied),
    "tunnel_allowed": tunnel("localhost", allowed),
    "tunnel_denied": tunnel("127.0.0.1", denied),
    "direct_loopback": direct("127.0.0.1", allowed),
    "direct_outside": direct("192.0.2.1", 80),
}))
"""


def test_egress_reaches_allowed_hosts_only_and_only_through_the_proxy(
    model: ModelServer, tmp_path: Path
) -> None:
    with _Site() as allowed, _Site() as denied:
        gateway = Gateway(
            model.url, Credential.api_key(REAL_KEY), egress_allow=[f"127.0.0.1:{allowed.port}"]
        )
        with gateway, gateway.lease("egress", egress_allow=[f"localhost:{allowed.port}"]) as lease:
            argv = ["/usr/bin/python3", "-c", _EGRESS_PROBE, str(allowed.port), str(denied.port)]
            done = run_in_sandbox(lease, tmp_path, argv)
            events = lease.events

    assert done.exit_code == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["allowed"] == [200, "site saw /via-proxy"]
    assert seen["tunnel_allowed"] == [200, "site saw /via-tunnel"]
    assert seen["denied"] == [403, "permission_error"]
    assert seen["tunnel_denied"] == [403]
    assert seen["direct_loopback"] == "ConnectionRefusedError"
    assert seen["direct_outside"] != "connected"
    assert events == [
        ("egress_denied", {"host": "127.0.0.1", "port": denied.port, "method": "GET"}),
        ("egress_denied", {"host": "127.0.0.1", "port": denied.port, "method": "CONNECT"}),
    ]
    assert model.requests == []


def _connect(lease: Lease, authority: str) -> tuple[int, bytes]:
    """A CONNECT through the lease's socket: the status, and the body of a refusal."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(lease.socket_path))
        sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        reply = sock.makefile("rb")
        status = int(reply.readline().split()[1])
        length = 0
        while (line := reply.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        return status, reply.read(length) if status != 200 else b""


def test_an_allowed_name_that_resolves_to_loopback_is_refused(
    model: ModelServer, tmp_path: Path
) -> None:
    with _Site() as site:
        allowed = [f"localhost:{site.port}", "169.254.169.254:80"]
        with (
            Gateway(model.url, None, egress_allow=allowed) as gateway,
            gateway.lease("rebind") as lease,
        ):
            by_name, body = _connect(lease, f"localhost:{site.port}")
            # An address named on the list is the operator's own choice; it is allowed (the
            # metadata address then fails to connect here, which is a 502, not a 403).
            by_address, _ = _connect(lease, "169.254.169.254:80")
            events = lease.events

    assert by_name == 403
    assert "not public" in json.loads(body)["error"]["message"]
    assert by_address != 403
    assert events[0][0] == "egress_denied"
    assert "127.0.0.1" in events[0][1]["addresses"]


def test_a_listed_address_lets_a_name_resolving_to_it_through(model: ModelServer) -> None:
    with _Site() as site:
        allowed = [f"localhost:{site.port}", f"127.0.0.1:{site.port}"]
        with (
            Gateway(model.url, None, egress_allow=allowed) as gateway,
            gateway.lease("listed") as lease,
        ):
            status, _ = _connect(lease, f"localhost:{site.port}")
            events = lease.events

    assert status == 200
    assert events == []


# --- the pieces underneath -------------------------------------------------------------------


def test_allow_list_matches_host_port_or_a_bare_host_on_its_default_port() -> None:
    allow = AllowList.of(["PyPI.org", "127.0.0.1:8080", "[::1]:9000"])

    assert allow.allows(Target("pypi.org", 443), default_port=443)
    assert not allow.allows(Target("pypi.org", 8443), default_port=443)
    assert allow.allows(Target("127.0.0.1", 8080), default_port=80)
    assert not allow.allows(Target("127.0.0.1", 80), default_port=80)
    assert allow.allows(Target("::1", 9000), default_port=443)
    assert not allow.allows(Target("files.pypi.org", 443), default_port=443)


def test_allow_list_refuses_an_entry_that_is_not_host_or_host_port() -> None:
    with pytest.raises(ValueError, match=re.escape("'https://pypi.org/simple'")):
        AllowList.of(["https://pypi.org/simple"])


def test_stream_meter_reads_usage_however_the_stream_is_split() -> None:
    reply = Reply([Text("hi"), ToolUse("Bash", {"command": "ls"})], 10, 20, 30, 40)
    stream = b"".join(
        f"event: {event}\r\ndata: {json.dumps(data)}\r\n\r\n".encode()
        for event, data in sse_events(reply, "claude-haiku-4-5")
    )
    meter = StreamMeter()
    for start in range(0, len(stream), 7):
        meter.feed(stream[start : start + 7])

    assert (meter.model, meter.complete, meter.error) == ("claude-haiku-4-5", True, None)
    tokens = meter.tokens
    assert (tokens.input_tokens, tokens.output_tokens) == (10, 20)
    assert (tokens.cache_creation_input_tokens, tokens.cache_read_input_tokens) == (30, 40)


def test_an_unknown_model_is_priced_as_sonnet() -> None:
    assert price_for("claude-opus-4-5", DEFAULT_PRICES) is DEFAULT_PRICES["opus"]
    assert price_for("mystery-model", DEFAULT_PRICES) is DEFAULT_PRICES["sonnet"]
    assert price_for(None, DEFAULT_PRICES) is DEFAULT_PRICES["sonnet"]
