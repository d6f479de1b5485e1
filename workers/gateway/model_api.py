"""Model API calls from a sandbox: credential swapped in, budget enforced, usage metered.

Only the routes the CLI needs are forwarded. The credential would open every other endpoint
of the API too, and some of them spend money the gateway cannot meter (message batches) or
reach beyond this session (files, admin).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from typing import Any

import httpx

from claudebox_pool.workers.gateway.credential import Credential
from claudebox_pool.workers.gateway.lease import Ledger
from claudebox_pool.workers.gateway.policy import RequestPolicy, normalise_path
from claudebox_pool.workers.gateway.pricing import Price, price_for
from claudebox_pool.workers.gateway.relay import read_raw, relay, request_headers, send_raw
from claudebox_pool.workers.gateway.usage import StreamMeter, read_error, read_message
from claudebox_pool.workers.gateway.wire import HttpConnection, Request, anthropic_error

log = logging.getLogger(__name__)

MESSAGES_PATH = "/v1/messages"
_ROUTES = (
    ("GET", re.compile(r"/")),
    ("HEAD", re.compile(r"/")),
    ("POST", re.compile(r"/v1/messages(/count_tokens)?")),
    ("GET", re.compile(r"/v1/models(/[A-Za-z0-9._-]+)?")),
)
_MESSAGE_LIMIT = 500
# The sandbox's own credential headers are placeholders and must not reach the API; the
# gateway asks for an unencoded body so that it can read usage from the stream it relays.
_DROPPED = ("x-api-key", "authorization", "accept-encoding")


class ModelApi:
    def __init__(
        self,
        client: httpx.AsyncClient,
        upstream_url: str,
        credential: Credential | None,
        prices: Mapping[str, Price],
        policy: RequestPolicy,
    ) -> None:
        self._client = client
        self._policy = policy
        self._base = upstream_url.rstrip("/")
        self._credential = credential
        self._prices = prices

    async def handle(self, http: HttpConnection, request: Request, ledger: Ledger) -> bool:
        """Answer one origin-form request; False if the connection must close after it."""
        normal = normalise_path(request.target)
        path = normal[0] if normal is not None else request.target.split("?", 1)[0]
        if normal is None or not any(
            request.method == m and route.fullmatch(path) for m, route in _ROUTES
        ):
            ledger.record("model_route_denied", {"method": request.method, "path": path})
            message = f"the claudebox gateway does not forward {request.method} {path}"
            await http.send_json(404, anthropic_error("not_found_error", message))
            return True
        target = f"{path}?{normal[1]}" if normal[1] else path
        if request.method == "POST" and (
            denial := self._policy.check(request.headers, request.body)
        ):
            ledger.record(
                "model_request_denied", {"reason": denial.reason, "detail": denial.detail}
            )
            # permission_error with x-should-retry false: the CLI shows the message and stops,
            # where it would retry an invalid_request_error with features turned off.
            await http.send_json(
                403,
                anthropic_error("permission_error", denial.message),
                [("x-should-retry", "false")],
            )
            return True
        metered = request.method == "POST" and path == MESSAGES_PATH
        if metered and (over := ledger.over_budget()) is not None:
            ledger.record("budget_exceeded", over)
            # billing_error, unlike invalid_request_error, stops the CLI at once: on the
            # latter it retries the call with features turned off, five more times.
            await http.send_json(
                400,
                anthropic_error("billing_error", _budget_message(ledger, over)),
                [("x-should-retry", "false")],
            )
            return True
        headers = request_headers(request.headers, drop=_DROPPED)
        headers["accept-encoding"] = "identity"
        if self._credential is not None:
            self._credential.apply(headers)
        upstream = self._client.build_request(
            request.method, self._base + target, headers=headers, content=request.body
        )
        try:
            response = await self._client.send(upstream, stream=True)
        except httpx.HTTPError as exc:
            self._model_error(
                ledger, 502, {"message": f"upstream unreachable ({type(exc).__name__})"}
            )
            await http.send_json(
                502,
                anthropic_error("api_error", "the claudebox gateway cannot reach the model API"),
            )
            return True
        if metered:
            ledger.count_request()
        try:
            return await self._answer(http, response, ledger, request.method, metered)
        finally:
            await response.aclose()

    async def _answer(
        self,
        http: HttpConnection,
        response: httpx.Response,
        ledger: Ledger,
        method: str,
        metered: bool,
    ) -> bool:
        # Usage and errors are recorded before the client can see the reply end: the task reads
        # the ledger as soon as the CLI exits, which may be the moment it has the last byte.
        # Errors count only for calls that do work (POST); the CLI's GET probes may 404.
        status = response.status_code
        streamed = response.headers.get("content-type", "").startswith("text/event-stream")
        account = _StreamAccount(ledger, self._prices, self._model_error)
        try:
            if status >= 400 and method == "POST":
                body = await read_raw(response)
                self._model_error(ledger, status, read_error(body))
                await send_raw(http, response, body)
            elif metered and streamed:
                await relay(http, response, account.feed, account.end)
            elif metered:
                body = await read_raw(response)
                model, tokens = read_message(body)
                ledger.charge(model, tokens, price_for(model, self._prices).cost_usd(tokens))
                await send_raw(http, response, body)
            else:
                await relay(http, response)
        except httpx.TransportError:
            self._model_error(
                ledger, status, {"message": "upstream closed the stream mid-response"}
            )
            return False
        finally:
            if metered and streamed:
                account.settle()
        return True

    def _model_error(self, ledger: Ledger, status: int, error: Mapping[str, Any]) -> None:
        context: dict[str, Any] = {"status": status}
        if isinstance(error.get("type"), str):
            context["type"] = error["type"]
        message = str(error.get("message", ""))
        if self._credential is not None:
            message = self._credential.redact(message)
        context["message"] = message[:_MESSAGE_LIMIT]
        ledger.record("model_error", context)
        log.warning("session %s: model API error %s: %s", ledger.session_id, status, message)


def _budget_message(ledger: Ledger, over: Mapping[str, Any]) -> str:
    return (
        f"session {ledger.session_id!r} has spent ${over['spent_usd']:.4f} of its "
        f"${over['budget_usd']:.4f} budget, so the claudebox gateway refuses further model "
        "calls; raise the session's budget to continue"
    )


ErrorReport = Callable[[Ledger, int, Mapping[str, Any]], None]


class _StreamAccount:
    """Meters a streamed reply and charges it once, as soon as its usage is final.

    That is at ``message_stop``, seen here before the client gets it; a stream that ends or
    breaks earlier is charged for what it had reported by then.
    """

    def __init__(self, ledger: Ledger, prices: Mapping[str, Price], report: ErrorReport) -> None:
        self._ledger = ledger
        self._prices = prices
        self._report = report
        self._meter = StreamMeter()
        self._charged = False
        self._reported = False

    def feed(self, chunk: bytes) -> None:
        self._meter.feed(chunk)
        if self._meter.error is not None and not self._reported:
            self._reported = True
            self._report(self._ledger, 200, self._meter.error)
        if self._meter.complete:
            self.settle()

    def end(self) -> None:
        if not self._meter.complete and not self._reported:
            self._reported = True
            self._report(self._ledger, 200, {"message": "the stream ended before message_stop"})
        self.settle()

    def settle(self) -> None:
        if not self._charged:
            self._charged = True
            tokens, model = self._meter.tokens, self._meter.model
            self._ledger.charge(model, tokens, price_for(model, self._prices).cost_usd(tokens))
