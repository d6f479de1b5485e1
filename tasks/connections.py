"""Redis clients for the registry, locks and heartbeats, from the same URL as Celery's results."""

from __future__ import annotations

import redis
import redis.asyncio

from claudebox_pool.tasks.settings import Settings

_CELERY_SOCKET_SCHEME = "redis+socket://"


def redis_py_url(url: str) -> str:
    """Celery spells a unix socket ``redis+socket:///path``; redis-py spells it ``unix:///path``."""
    if url.startswith(_CELERY_SOCKET_SCHEME):
        return "unix://" + url.removeprefix(_CELERY_SOCKET_SCHEME)
    return url


def redacted(url: str) -> str:
    """The URL with any password hidden, for messages and logs."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}"


def sync_redis(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(
        redis_py_url(settings.result_backend),
        socket_connect_timeout=5,
        health_check_interval=30,
    )


def async_redis(settings: Settings) -> redis.asyncio.Redis:
    return redis.asyncio.Redis.from_url(
        redis_py_url(settings.result_backend),
        socket_connect_timeout=5,
        health_check_interval=30,
    )


def text(value: bytes | str) -> str:
    """A Redis reply as text (the clients here leave replies undecoded)."""
    return value.decode() if isinstance(value, bytes) else value
