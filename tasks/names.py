"""Task and queue names: the only place they are spelled."""

from typing import Final

CODE: Final = "claudebox.code"
"""Run one prompt in a session's sandbox."""
OPEN: Final = "claudebox.open"
"""Create a session, or check that one exists, on the worker that holds the sessions root."""
CLEANUP: Final = "claudebox.cleanup"
"""Remove a session's sandbox, and its workspace if asked."""
REINDEX: Final = "claudebox.reindex"
"""Rebuild the Redis registry from the sessions on disk."""

QUEUE: Final = "claudebox"
"""The queue every worker consumes."""
