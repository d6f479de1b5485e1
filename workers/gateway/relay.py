"""Passing a request on with httpx and its response back through h11, byte for byte, as it comes."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import httpx

from claudebox_pool.workers.gateway.wire import Headers, HttpConnection

# Hop-by-hop headers (RFC 9110 §7.6.1) describe one connection and are never passed on; host
# and framing are recomputed for the next hop by httpx (requests) and h11 (responses).
_NOT_PASSED_ON = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
_CLIENT_DEFAULTS = ("accept", "accept-encoding", "user-agent")


def _ignore(_chunk: bytes) -> None:
    pass


def _nothing() -> None:
    pass


def transparent_client(timeout: httpx.Timeout) -> httpx.AsyncClient:
    """An httpx client that adds no headers of its own and reads no proxy from the environment.

    httpx's defaults (``accept-encoding: gzip``, its user agent) would change what the far end
    sends back, and the relayed body is passed on undecoded.
    """
    client = httpx.AsyncClient(timeout=timeout, trust_env=False, follow_redirects=False)
    for name in _CLIENT_DEFAULTS:
        del client.headers[name]
    return client


def request_headers(headers: Iterable[tuple[str, str]], drop: Iterable[str] = ()) -> dict[str, str]:
    """A client's headers to pass on, lower-cased; repeated ones joined as RFC 9110 allows."""
    dropped = _NOT_PASSED_ON | {name.lower() for name in drop}
    out: dict[str, str] = {}
    for name, value in headers:
        key = name.lower()
        if key not in dropped:
            out[key] = f"{out[key]}, {value}" if key in out else value
    return out


def response_headers(response: httpx.Response) -> Headers:
    # The body is relayed raw (still content-encoded), so its upstream length still holds.
    kept = [(k, v) for k, v in response.headers.multi_items() if k.lower() not in _NOT_PASSED_ON]
    length = response.headers.get("content-length")
    return [*kept, ("content-length", length)] if length is not None else kept


async def relay(
    http: HttpConnection,
    response: httpx.Response,
    tap: Callable[[bytes], None] = _ignore,
    before_end: Callable[[], None] = _nothing,
) -> None:
    """Stream ``response`` to the client as it arrives.

    ``tap`` sees each chunk before the client does and ``before_end`` runs before the client
    learns the body is over, so whatever they record is in place once the client acts on it.
    Raises ``httpx.TransportError`` if the far end breaks off; the client's response is then
    left unterminated so that it sees the break too.
    """
    await http.start_response(response.status_code, response_headers(response))
    async for chunk in response.aiter_raw():
        tap(chunk)
        await http.send_data(chunk)
    before_end()
    await http.end_response()


async def read_raw(response: httpx.Response) -> bytes:
    """The whole body as it came (still content-encoded), for a reply read before it is sent."""
    return b"".join([chunk async for chunk in response.aiter_raw()])


async def send_raw(http: HttpConnection, response: httpx.Response, body: bytes) -> None:
    await http.start_response(response.status_code, response_headers(response))
    await http.send_data(body)
    await http.end_response()
