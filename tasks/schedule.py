"""The beat schedule: what the pool does on its own, and how often.

Each sweep gets its interval in its arguments: the worker keeps the sweep's claim (see
``workers.sweeps``) for most of the interval that beat fires it at, whatever its own settings.
"""

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
        "sweep-age": {
            "task": names.SWEEP_AGE,
            "schedule": float(settings.sweep_age_every_s),
            "args": ({"every_s": settings.sweep_age_every_s},),
        },
        "sweep-leaks": {
            "task": names.SWEEP_LEAKS,
            "schedule": float(settings.sweep_leaks_every_s),
            "args": ({"every_s": settings.sweep_leaks_every_s},),
        },
    }
