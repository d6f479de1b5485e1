"""Session chains: other sessions' workspaces, mounted read-only in a session's sandbox.

``ClaudeBox(session_id="analysis", inputs={"data": "data-prep"})`` records the inputs in the
session; every sandbox of it then sees ``data-prep``'s workspace at ``/inputs/data``, read-only
(bwrap and boxlite honour the mount; the ``local`` runtime, development only, mounts nothing).
It is a live view, not a copy: take a checkpoint of the input session, or fork it, for a
snapshot. No lock of the input session is taken, so that a long task never blocks its readers.
"""

from __future__ import annotations

from collections.abc import Mapping

from claudebox_pool.tasks.errors import InvalidRequestError
from claudebox_pool.tasks.models import SessionRecord
from claudebox_pool.workers.runtimes.base import Mount
from claudebox_pool.workers.store import SessionStore

INPUTS_DIR = "/inputs"
"""Where a sandbox sees its inputs, one directory per input name."""


def check(store: SessionStore, session_id: str, inputs: Mapping[str, str]) -> None:
    """InvalidRequestError unless every input names an existing session."""
    for name, source in sorted(inputs.items()):
        if not store.paths(source).workspace.is_dir():
            raise InvalidRequestError(
                f"input '{name}' of session '{session_id}' is session '{source}', which does "
                f"not exist; create '{source}' first, or leave the input out"
            )


def mounts(store: SessionStore, record: SessionRecord) -> tuple[Mount, ...]:
    """The read-only mounts of the session's inputs; InvalidRequestError if one is gone."""
    check(store, record.session_id, record.inputs)
    return tuple(
        Mount(store.paths(source).workspace, f"{INPUTS_DIR}/{name}", read_only=True)
        for name, source in sorted(record.inputs.items())
    )
