"""The egress proxy: a sandbox reaches allow-listed hosts, and nothing else, through the gateway.

``CONNECT host:port`` opens a byte tunnel (HTTPS, or anything else a client speaks through it);
an absolute-form request (``GET http://host/...``) is passed on and its response relayed. A
refused target gets 403 and an ``egress_denied`` event naming it.

An allowed name is resolved once, here, and the connection goes to the address that was
checked: a name may not lead to loopback, link-local (cloud metadata at 169.254.169.254),
private or other non-global addresses unless that address is itself on the list, and a second
lookup (DNS rebinding) never happens.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from urllib.parse import urlsplit, urlunsplit

import httpx

from claudebox_pool.tasks.allowlist import DEFAULT_PORTS, AllowList, Target, parse_authority
from claudebox_pool.workers.gateway.lease import Ledger
from claudebox_pool.workers.gateway.relay import relay, request_headers
from claudebox_pool.workers.gateway.wire import HttpConnection, Request, anthropic_error

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
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
        address = await self._permit(http, ledger, target, default_port=443, method="CONNECT")
        if address is None:
            return
        try:
            far_reader, far_writer = await asyncio.wait_for(
                asyncio.open_connection(address, target.port), CONNECT_TIMEOUT_S
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
        default_port = DEFAULT_PORTS[parts.scheme.lower()]
        target = parse_authority(parts.netloc, default_port)
        if target is None:
            await _bad_target(http, request.target)
            return True
        address = await self._permit(http, ledger, target, default_port, method=request.method)
        if address is None:
            return True
        # The request goes to the checked address; the name travels in Host (and in SNI for
        # https), so the far end and its certificate are still matched by name.
        literal = f"[{address}]" if ":" in address else address
        netloc = f"{literal}:{target.port}"
        headers = {"host": parts.netloc, **request_headers(request.headers)}
        outgoing = self._client.build_request(
            request.method,
            urlunsplit(parts._replace(netloc=netloc)),
            headers=headers,
            content=request.body,
            extensions={"sni_hostname": target.host},
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
    ) -> str | None:
        """The address to connect to for an allowed target, else None with the client told."""
        allow = self._allow.union(ledger.egress)
        denied = {"host": target.host, "port": target.port, "method": method}
        if not allow.allows(target, default_port):
            ledger.record("egress_denied", denied)
            message = (
                f"the claudebox gateway does not allow egress to {target}; add it to the "
                "session's egress allow-list to reach it"
            )
            await http.send_json(403, anthropic_error("permission_error", message))
            return None
        try:
            addresses = await _resolve(target)
        except OSError as exc:
            log.info("session %s: cannot resolve %s: %s", ledger.session_id, target, exc)
            await http.send_json(502, anthropic_error("api_error", f"cannot resolve {target}"))
            return None
        for address in addresses:
            if address.is_global or allow.allows(Target(str(address), target.port), default_port):
                return str(address)
        shown = ", ".join(str(a) for a in addresses)
        ledger.record("egress_denied", {**denied, "addresses": shown})
        message = (
            f"the claudebox gateway does not allow egress to {target}: it resolves to {shown}, "
            "an address that is not public (loopback, link-local, private); put the address "
            "itself on the egress allow-list to reach it"
        )
        await http.send_json(403, anthropic_error("permission_error", message))
        return None


async def _resolve(target: Target) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    infos = await asyncio.get_running_loop().getaddrinfo(
        target.host, target.port, type=socket.SOCK_STREAM
    )
    addresses: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        # ::ffff:127.0.0.1 reaches 127.0.0.1; judge it as the IPv4 address it is.
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if address not in addresses:
            addresses.append(address)
    return addresses


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
