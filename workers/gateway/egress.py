"""The egress proxy: a sandbox reaches allow-listed hosts, and nothing else, through the gateway.

``CONNECT host:port`` opens a byte tunnel (HTTPS, or anything else a client speaks through it);
an absolute-form request (``GET http://host/...``) is passed on and its response relayed. A
refused target gets 403 and an ``egress_denied`` event naming it.
"""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import urlsplit

import httpx

from claudebox_pool.workers.gateway.allowlist import AllowList, Target, parse_authority
from claudebox_pool.workers.gateway.lease import Ledger
from claudebox_pool.workers.gateway.relay import relay, request_headers
from claudebox_pool.workers.gateway.wire import HttpConnection, Request, anthropic_error

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
_DEFAULT_PORTS = {"http": 80, "https": 443}
_PIPE_READ_SIZE = 64 * 1024


def is_absolute_form(target: str) -> bool:
    return target.lower().startswith(("http://", "https://"))


class EgressProxy:
    def __init__(self, client: httpx.AsyncClient, allow: AllowList) -> None:
        self._client = client
        self._allow = allow

    async def tunnel(self, http: HttpConnection, request: Request, ledger: Ledger) -> None:
        """Answer a CONNECT and carry bytes both ways until either side closes."""
        target = parse_authority(request.target, default_port=443)
        if target is None:
            await _bad_target(http, request.target)
            return
        if not await self._permit(http, ledger, target, default_port=443, method="CONNECT"):
            return
        try:
            far_reader, far_writer = await asyncio.wait_for(
                asyncio.open_connection(target.host, target.port), CONNECT_TIMEOUT_S
            )
        except (OSError, TimeoutError) as exc:
            log.info("session %s: CONNECT %s failed: %s", ledger.session_id, target, exc)
            await http.send_json(502, anthropic_error("api_error", f"cannot connect to {target}"))
            return
        try:
            early = await http.switch_to_tunnel()
            if early:
                far_writer.write(early)
            await asyncio.gather(_pipe(http.reader, far_writer), _pipe(far_reader, http.writer))
        finally:
            far_writer.close()

    async def forward(self, http: HttpConnection, request: Request, ledger: Ledger) -> bool:
        """Pass on an absolute-form request; False if the connection must close after it."""
        parts = urlsplit(request.target)
        default_port = _DEFAULT_PORTS[parts.scheme.lower()]
        target = parse_authority(parts.netloc, default_port)
        if target is None:
            await _bad_target(http, request.target)
            return True
        if not await self._permit(http, ledger, target, default_port, method=request.method):
            return True
        outgoing = self._client.build_request(
            request.method,
            request.target,
            headers=request_headers(request.headers),
            content=request.body,
        )
        try:
            response = await self._client.send(outgoing, stream=True)
        except httpx.HTTPError as exc:
            log.info("session %s: %s %s failed: %s", ledger.session_id, request.method, target, exc)
            await http.send_json(502, anthropic_error("api_error", f"cannot reach {target}"))
            return True
        try:
            await relay(http, response)
        except httpx.TransportError:
            return False
        finally:
            await response.aclose()
        return True

    async def _permit(
        self, http: HttpConnection, ledger: Ledger, target: Target, default_port: int, method: str
    ) -> bool:
        if self._allow.union(ledger.egress).allows(target, default_port):
            return True
        ledger.record("egress_denied", {"host": target.host, "port": target.port, "method": method})
        message = (
            f"the claudebox gateway does not allow egress to {target}; add it to the session's "
            "egress allow-list to reach it"
        )
        await http.send_json(403, anthropic_error("permission_error", message))
        return False


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    # A half-close is passed on (TLS close_notify and HTTP/1.0 bodies rely on it). A reset
    # closes the other side outright, which ends the opposite direction's read too.
    try:
        while data := await reader.read(_PIPE_READ_SIZE):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except ConnectionError:
        writer.close()


async def _bad_target(http: HttpConnection, target: str) -> None:
    message = f"the claudebox gateway cannot proxy to {target!r}: not host:port"
    await http.send_json(400, anthropic_error("invalid_request_error", message))
