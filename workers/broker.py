"""kombu's Redis transport, with the fix that lets a worker outlive a Redis outage.

On a lost broker connection Celery's consumer (5.7.0) first collects the connection, which
drops the transport's link to it, then closes it; closing the channel hands its unacked
messages back, for which kombu (5.7.0, the latest release) reads the connection's address
through that dropped link and raises AttributeError. Only connection errors are ignored there,
so the worker exits with ``Unrecoverable error: AttributeError("'NoneType' object has no
attribute 'hostname'")``, whenever the channel is still open at that point (two outages in three
here). Raising a connection error instead is what the same close does when the link is there and
Redis is not: it is ignored, the messages stay unacked for the next worker to hand back
(``warm.rescue``), and the consumer reconnects. Installed for the ``redis``, ``rediss`` and
``redis+socket`` URLs by replacing kombu's transport alias before the worker connects.
"""

from __future__ import annotations

from typing import Any

from kombu import transport
from kombu.transport import redis as kombu_redis
from redis.exceptions import ConnectionError as RedisConnectionError


class Channel(kombu_redis.Channel):
    def _connparams(self, asynchronous: bool = False) -> Any:
        if self.connection.client is None:
            raise RedisConnectionError("the broker connection was closed after a connection loss")
        return super()._connparams(asynchronous)  # type: ignore[no-untyped-call]


class Transport(kombu_redis.Transport):
    Channel = Channel


def install() -> None:
    for alias in ("redis", "rediss"):
        transport.TRANSPORT_ALIASES[alias] = f"{__name__}:Transport"
