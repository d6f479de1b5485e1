"""A producer's lease on each box it holds open, so that the pool's sweeps leave it alone.

While a box is open its producer keeps ``claudebox:lease:<session>`` in Redis, with a TTL of
``CLAUDEBOX_LEASE_TTL_S`` renewed every third of it by a task on the box's event loop. A
producer that dies (killed, its machine gone) stops renewing: the lease expires, and the leak
sweep collects its ephemeral session once that has not been updated for as long. The lease is
taken before the session is created, so that no sweep sees a new ephemeral session without one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket

from redis.exceptions import RedisError

from claudebox_pool.producer import pool
from claudebox_pool.tasks import keys

log = logging.getLogger(__name__)


class Lease:
    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        self._renewer: asyncio.Task[None] | None = None

    async def take(self) -> None:
        """Write the lease and keep renewing it until :meth:`release`; PoolUnavailableError if
        Redis cannot be reached."""
        with pool.map_redis_errors():
            await self._write()
        self._renewer = asyncio.create_task(self._renew(), name=f"lease-{self.session_id}")

    async def release(self) -> None:
        renewer, self._renewer = self._renewer, None
        if renewer is None:
            return
        renewer.cancel()
        # A box opened under another event loop (an earlier asyncio.run) has its renewer there.
        if renewer.get_loop() is asyncio.get_running_loop():
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
        try:
            client = await pool.redis_client()
            await client.delete(keys.session_lease(self.session_id))
        except (RedisError, OSError) as exc:
            log.warning("could not drop the lease on %s (it expires): %s", self.session_id, exc)

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(pool.settings().lease_ttl_s / 3)
            try:
                await self._write()
            except (RedisError, OSError) as exc:
                # A blip is survivable: two more renewals come before the lease runs out.
                log.warning("could not renew the lease on %s: %s", self.session_id, exc)

    async def _write(self) -> None:
        current = pool.settings()
        holder = f"{socket.gethostname()}:{os.getpid()}"
        client = await pool.redis_client()
        await client.set(keys.session_lease(self.session_id), holder, ex=current.lease_ttl_s)
