"""Redis writes that must outlive a Redis restart: retried with backoff, not dropped.

A run's outcome is recorded on disk first; what follows it in Redis (the registry, the
delivery count) is retried for up to ``CLAUDEBOX_REDIS_OUTAGE_S`` so that a task whose command
ran while Redis was away still ends with its result instead of failing after the fact.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from redis.exceptions import RedisError

from claudebox_pool.tasks.settings import Settings

log = logging.getLogger(__name__)

FIRST_PAUSE_S = 0.1
MAX_PAUSE_S = 2.0

T = TypeVar("T")


def retried(settings: Settings, what: str, call: Callable[[], T]) -> T:
    """``call()``, tried again with backoff while Redis cannot be reached, up to
    ``CLAUDEBOX_REDIS_OUTAGE_S`` after the first failure; then its RedisError."""
    give_up_at = time.monotonic() + settings.redis_outage_s
    pause = FIRST_PAUSE_S
    while True:
        try:
            return call()
        except RedisError as exc:
            now = time.monotonic()
            if now >= give_up_at:
                raise
            wait_s = min(pause, give_up_at - now)
            log.warning("%s: Redis unreachable, retrying in %.1fs: %s", what, wait_s, exc)
        time.sleep(wait_s)
        pause = min(pause * 2, MAX_PAUSE_S)
