"""A worker's request for a claudebox task, whose ``info()`` shows only the display text.

``celery inspect active|reserved|scheduled|query_task`` answers with ``Request.info()``, which
carries the raw arguments (the whole prompt) unless the asker passes ``safe=True``; any client
holding the broker URL chooses that. Here the arguments are always the ``argsrepr`` that
``tasks.monitoring`` wrote into the message.
"""

from __future__ import annotations

from typing import Any

from celery.worker.request import Request

from claudebox_pool.tasks.monitoring import TASK_PREFIX


class RedactedRequest(Request):  # type: ignore[misc]  # Celery ships no type information
    def info(self, safe: bool = False) -> dict[str, Any]:
        shown: dict[str, Any] = super().info(safe=safe or self.name.startswith(TASK_PREFIX))
        return shown
