"""What a model call from a sandbox may ask of the provider, checked before the key is added.

The Messages API can itself reach the internet for a request: remote MCP servers
(``mcp_servers``), server tools (web fetch, web search, code execution: a tool entry with a
``type``, where the CLI's own tools have none) and beta features behind ``anthropic-beta``. With
the real key those would fetch URLs the egress allow-list never sees, at fees the gateway does
not meter, so they are refused unless the operator allows them.

Paths are checked in the form the API will read them (percent-decoded once, dot segments and
repeated slashes resolved), and that form is what is forwarded.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

from claudebox_pool.tasks.settings import CLI_BETAS

_INTERNET_FIELDS = ("mcp_servers", "container")
"""Request fields that make the provider connect somewhere on the request's behalf."""
_CUSTOM_TOOL = "custom"


@dataclass(frozen=True)
class Denial:
    """Why a request is refused: ``reason`` goes to history, ``message`` to the CLI."""

    reason: str
    detail: str
    setting: str | None = None

    @property
    def message(self) -> str:
        refusal = f"the claudebox gateway refuses this model call: {self.detail}"
        if self.setting is None:
            return refusal
        return f"{refusal}; an operator can allow it with {self.setting}"


@dataclass(frozen=True)
class RequestPolicy:
    allow_server_tools: bool = False
    allowed_betas: frozenset[str] = frozenset(CLI_BETAS)

    @classmethod
    def of(cls, allow_server_tools: bool, allowed_betas: Iterable[str]) -> RequestPolicy:
        return cls(allow_server_tools, frozenset(b.strip() for b in allowed_betas if b.strip()))

    def check(self, headers: Iterable[tuple[str, str]], body: bytes) -> Denial | None:
        """The first thing in a Messages API request this policy refuses, or None."""
        for name, value in headers:
            lowered = name.lower()
            if lowered == "content-encoding" and value.strip().lower() != "identity":
                # An encoded body cannot be inspected, and the CLI never sends one.
                return Denial("encoded_body", f"a request body encoded as {value!r}")
            if lowered == "anthropic-beta":
                betas = (b.strip() for b in value.split(","))
                unknown = sorted(b for b in betas if b and b not in self.allowed_betas)
                if unknown:
                    return Denial(
                        "beta_not_allowed",
                        f"anthropic-beta {', '.join(unknown)} is not on the allow-list",
                        "CLAUDEBOX_GATEWAY_ALLOWED_BETAS",
                    )
        if self.allow_server_tools or not body:
            return None
        return _server_side_reach(body)


def _server_side_reach(body: bytes) -> Denial | None:
    try:
        request = json.loads(body)
    except ValueError:
        return Denial("unreadable_body", "a request body that is not JSON")
    if not isinstance(request, Mapping):
        return None
    for field in _INTERNET_FIELDS:
        if request.get(field) is not None:
            return _server_tools(f"the field {field!r}")
    tools = request.get("tools")
    for tool in tools if isinstance(tools, list) else ():
        kind = _tool_type(tool)
        if kind is not None:
            return _server_tools(f"the server tool {kind!r}")
    return None


def _tool_type(tool: Any) -> str | None:
    if not isinstance(tool, Mapping):
        return None
    kind = tool.get("type")
    if kind is None or kind == _CUSTOM_TOOL:
        return None
    return str(kind)


def _server_tools(what: str) -> Denial:
    return Denial(
        "server_tools",
        f"{what} makes the provider reach the internet past the egress allow-list",
        "CLAUDEBOX_GATEWAY_ALLOW_SERVER_TOOLS",
    )


def normalise_path(target: str) -> tuple[str, str] | None:
    """``(path, query)`` of an origin-form target as the API reads it, or None if the path
    hides something a single decoding would not show (a ``%`` left after decoding, a NUL)."""
    raw, _, query = target.partition("?")
    if not raw.startswith("/"):
        return None
    try:
        decoded = unquote(raw, errors="strict")
    except UnicodeDecodeError:
        return None
    if "%" in decoded or "\x00" in decoded or "\\" in decoded:
        return None
    path = posixpath.normpath("/" + decoded.lstrip("/"))
    # normpath keeps a leading "//" (POSIX allows it a meaning); the API gives it none.
    path = "/" + path.lstrip("/")
    return quote(path, safe="/._-~"), query
