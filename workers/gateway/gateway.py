"""The worker's gateway: one asyncio loop in a background thread, one unix socket per lease.

Celery task bodies are synchronous, so every public method here blocks until the loop has
done the work. A lease gets its own socket, which is how the gateway knows which session
every request belongs to without trusting anything the sandbox sends.

A lease may also listen on TCP (``tcp_host``), for a sandbox that cannot be given a unix
socket (a micro-VM: a socket does not cross the VM boundary through a shared folder). It is
served by the same per-lease handler, so metering, budget and egress are the socket's; the
lease is still known by where the connection arrived, its own port.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import threading
from collections.abc import Coroutine, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import h11
import httpx

from claudebox_pool.tasks.allowlist import AllowList
from claudebox_pool.workers.gateway.bridge import SOCKET_NAME
from claudebox_pool.workers.gateway.credential import Credential
from claudebox_pool.workers.gateway.egress import EgressProxy, is_absolute_form
from claudebox_pool.workers.gateway.lease import Lease, Ledger
from claudebox_pool.workers.gateway.model_api import ModelApi
from claudebox_pool.workers.gateway.policy import RequestPolicy
from claudebox_pool.workers.gateway.pricing import DEFAULT_PRICES, Price
from claudebox_pool.workers.gateway.relay import transparent_client
from claudebox_pool.workers.gateway.wire import BodyTooLarge, HttpConnection, anthropic_error

T = TypeVar("T")

CALL_TIMEOUT_S = 30.0
"""Longest a synchronous call waits for the loop (starting, leasing, closing)."""
# The CLI asks for a 600 s timeout per model call; a long extended-thinking reply needs it.
_MODEL_TIMEOUT = httpx.Timeout(connect=10.0, read=600.0, write=60.0, pool=30.0)
_EGRESS_TIMEOUT = httpx.Timeout(connect=10.0, read=300.0, write=60.0, pool=30.0)


class Gateway:
    """Model gateway and egress proxy for the sandboxes of one worker process.

    ``upstream_url`` is the Messages API (``https://api.anthropic.com``); ``prices`` maps a
    model family (a substring of the model name) to its :class:`Price`; ``egress_allow`` holds
    the ``host[:port]`` entries every lease may reach; ``policy`` says which provider-side
    features (server tools, beta flags) a model call may use. Sockets live in a private 0700
    directory under ``runtime_dir`` (the system temp directory by default).
    """

    def __init__(
        self,
        upstream_url: str,
        credential: Credential | None,
        prices: Mapping[str, Price] = DEFAULT_PRICES,
        egress_allow: Iterable[str] = (),
        *,
        policy: RequestPolicy | None = None,
        runtime_dir: Path | None = None,
    ) -> None:
        self.upstream_url = upstream_url
        self._allow = AllowList.of(egress_allow)
        self._runtime_dir = runtime_dir
        self._root: Path | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="claudebox-gateway", daemon=True
        )
        # httpx binds a client to a loop on first use, not on creation, so these are made here
        # and only ever used from the gateway's loop.
        self._model_client = transparent_client(_MODEL_TIMEOUT)
        self._egress_client = transparent_client(_EGRESS_TIMEOUT)
        self._model = ModelApi(
            self._model_client, upstream_url, credential, dict(prices), policy or RequestPolicy()
        )
        self._egress = EgressProxy(self._egress_client, self._allow)
        self._leases: dict[Path, _Served] = {}
        self._leases_lock = threading.Lock()

    def start(self) -> Self:
        self._root = Path(tempfile.mkdtemp(prefix="claudebox-gw-", dir=self._runtime_dir))
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close every lease and the upstream connections; the gateway cannot be restarted."""
        if not self._thread.is_alive():
            return
        with self._leases_lock:
            paths = list(self._leases)
        for path in paths:
            self._close_lease(path)
        self._call(self._close_clients())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=CALL_TIMEOUT_S)
        self._loop.close()
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)

    def lease(
        self,
        session_id: str,
        budget_usd: float | None = None,
        spent_usd: float = 0.0,
        egress_allow: Iterable[str] = (),
        *,
        tcp_host: str | None = None,
    ) -> Lease:
        """A fresh socket for one sandbox run of ``session_id``.

        Model calls are refused once ``spent_usd`` (the session's spend before this run) plus
        this lease's cost reaches ``budget_usd`` (None: no budget). ``egress_allow`` adds hosts
        for this lease only. With ``tcp_host`` the lease also listens on TCP there (see
        :attr:`Lease.tcp_address`); anyone who can connect to it uses the lease, so give a
        loopback address.
        """
        if self._root is None or not self._thread.is_alive():
            raise RuntimeError("the gateway is not running; call start() first")
        ledger = Ledger(session_id, budget_usd, spent_usd, AllowList.of(egress_allow))
        directory = Path(tempfile.mkdtemp(prefix="lease-", dir=self._root))
        path = directory / SOCKET_NAME
        try:
            served = self._call(self._serve_lease(ledger, path, tcp_host))
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        with self._leases_lock:
            self._leases[path] = served
        return Lease(ledger, path, lambda: self._close_lease(path), served.tcp_address)

    def __repr__(self) -> str:
        return f"Gateway(upstream_url={self.upstream_url!r}, leases={len(self._leases)})"

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(CALL_TIMEOUT_S)

    def _close_lease(self, path: Path) -> None:
        with self._leases_lock:
            served = self._leases.pop(path, None)
        if served is None:
            return
        if self._thread.is_alive():
            self._call(served.close())
        shutil.rmtree(path.parent, ignore_errors=True)

    async def _close_clients(self) -> None:
        await self._model_client.aclose()
        await self._egress_client.aclose()

    async def _serve_lease(self, ledger: Ledger, path: Path, tcp_host: str | None) -> _Served:
        served = _Served()

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            if task is not None:
                served.connections.add(task)
            try:
                await self._serve(ledger, HttpConnection(reader, writer))
            except asyncio.CancelledError:
                # Only Lease.close cancels a connection; asyncio would log the cancelled
                # handler as an error.
                pass
            finally:
                if task is not None:
                    served.connections.discard(task)
                writer.close()

        served.servers.append(await asyncio.start_unix_server(on_connect, path=str(path)))
        if tcp_host is not None:
            try:
                server = await asyncio.start_server(on_connect, tcp_host, 0)
            except OSError:
                await served.close()
                raise
            served.servers.append(server)
            sockname = server.sockets[0].getsockname()
            served.tcp_address = (str(sockname[0]), int(sockname[1]))
        return served

    async def _serve(self, ledger: Ledger, http: HttpConnection) -> None:
        try:
            while (request := await http.read_request()) is not None:
                if request.method == "CONNECT":
                    await self._egress.tunnel(http, request, ledger)
                    return
                if is_absolute_form(request.target):
                    reusable = await self._egress.forward(http, request, ledger)
                else:
                    reusable = await self._model.handle(http, request, ledger)
                if not reusable or not http.next_cycle():
                    return
        except BodyTooLarge:
            message = "request body too large for the claudebox gateway"
            await _refuse(http, 413, "request_too_large", message)
        except h11.RemoteProtocolError as exc:
            message = f"the claudebox gateway cannot parse this request: {exc}"
            await _refuse(http, exc.error_status_hint, "invalid_request_error", message)
        except ConnectionError:
            pass  # the client hung up; there is no one left to answer


async def _refuse(http: HttpConnection, status: int, error_type: str, message: str) -> None:
    with contextlib.suppress(ConnectionError):
        await http.send_json(status, anthropic_error(error_type, message))


class _Served:
    """The loop-side state of a lease: its listening servers and its open connections."""

    def __init__(self) -> None:
        self.servers: list[asyncio.Server] = []
        self.tcp_address: tuple[str, int] | None = None
        self.connections: set[asyncio.Task[Any]] = set()

    async def close(self) -> None:
        for server in self.servers:
            server.close()
        for task in list(self.connections):
            task.cancel()
        await asyncio.gather(*self.connections, return_exceptions=True)
