"""HTTP/1.1 on one accepted connection: read requests, stream responses, switch to a tunnel.

h11 does the parsing and framing, so keep-alive, chunked bodies, ``Expect: 100-continue`` and
the ``CONNECT`` protocol switch behave as clients expect; this module only moves bytes between
h11 and an asyncio stream.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import h11

MAX_BODY_BYTES = 32 * 1024 * 1024
"""The Messages API's own request limit; a larger body is refused before it is forwarded."""
_READ_SIZE = 64 * 1024

Headers = list[tuple[str, str]]


class BodyTooLarge(Exception):
    pass


@dataclass(frozen=True)
class Request:
    method: str
    target: str
    headers: Headers
    body: bytes


def anthropic_error(error_type: str, message: str) -> dict[str, Any]:
    """The body the Messages API sends with an error status, which the CLI shows to the user."""
    return {"type": "error", "error": {"type": error_type, "message": message}}


class HttpConnection:
    """The server side of one client connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._h11 = h11.Connection(h11.SERVER)

    async def read_request(self) -> Request | None:
        """The next request with its whole body, or None when the client has gone."""
        event = await self._next_event()
        if not isinstance(event, h11.Request):
            return None
        if self._h11.they_are_waiting_for_100_continue:
            await self._send(h11.InformationalResponse(status_code=100, headers=[]))
        body = bytearray()
        while isinstance(chunk := await self._next_event(), h11.Data):
            body += chunk.data
            if len(body) > MAX_BODY_BYTES:
                raise BodyTooLarge
        if not isinstance(chunk, h11.EndOfMessage):
            return None
        return Request(
            method=event.method.decode("ascii"),
            target=event.target.decode("ascii"),
            headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers],
            body=bytes(body),
        )

    async def start_response(self, status: int, headers: Headers) -> None:
        await self._send(h11.Response(status_code=status, headers=headers, reason=_reason(status)))

    async def send_data(self, data: bytes) -> None:
        if data:
            await self._send(h11.Data(data=data))

    async def end_response(self) -> None:
        await self._send(h11.EndOfMessage())

    async def send_json(
        self, status: int, body: dict[str, Any], headers: Headers | None = None
    ) -> None:
        data = json.dumps(body).encode()
        await self.start_response(
            status,
            [
                ("content-type", "application/json"),
                ("content-length", str(len(data))),
                *(headers or []),
            ],
        )
        await self.send_data(data)
        await self.end_response()

    async def switch_to_tunnel(self) -> bytes:
        """Answer a CONNECT with 200; returns what the client already sent past its request."""
        await self.start_response(200, [])
        data, _closed = self._h11.trailing_data
        return data

    def next_cycle(self) -> bool:
        """Make the connection ready for the client's next request; False if it must close."""
        if self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE:
            self._h11.start_next_cycle()
            return True
        return False

    async def _next_event(self) -> Any:
        while (event := self._h11.next_event()) is h11.NEED_DATA:
            self._h11.receive_data(await self.reader.read(_READ_SIZE))
        return event

    async def _send(self, event: Any) -> None:
        data = self._h11.send(event)
        if data:
            self.writer.write(data)
            await self.writer.drain()


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""
