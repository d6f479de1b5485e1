"""The beat schedule: what the pool does on its own, and how often.

Each sweep gets its interval in its arguments: the worker keeps the sweep's claim (see
``workers.sweeps``) for most of the interval that beat fires it at, whatever its own settings.
Every entry goes to the common queue with ``every_node``: the worker that takes it sends it on to
every other live node, so that each node's sessions root is swept and reindexed where the
nodes' roots are not shared (``workers.fanout``).
"""

from __future__ import annotations

from typing import Any

from claudebox_pool.tasks import names
from claudebox_pool.tasks.settings import Settings


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    return {
        "reindex-registry": {
            "task": names.REINDEX,
            "schedule": float(settings.reindex_every_s),
            "args": ({"every_node": True},),
        },
        "sweep-age": {
            "task": names.SWEEP_AGE,
            "schedule": float(settings.sweep_age_every_s),
            "args": ({"every_s": settings.sweep_age_every_s, "every_node": True},),
        },
        "sweep-leaks": {
            "task": names.SWEEP_LEAKS,
            "schedule": float(settings.sweep_leaks_every_s),
            "args": ({"every_s": settings.sweep_leaks_every_s, "every_node": True},),
        },
    }
