"""The beat schedule: what the pool does on its own, and how often."""

from __future__ import annotations

from typing import Any

from tasks import names
from tasks.settings import Settings


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    return {
        "reindex-registry": {
            "task": names.REINDEX,
            "schedule": float(settings.reindex_every_s),
            "args": ({},),
        },
    }
