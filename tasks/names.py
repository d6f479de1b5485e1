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
CHECKPOINT: Final = "claudebox.checkpoint"
"""Snapshot a session's workspace under a name."""
RESTORE_CHECKPOINT: Final = "claudebox.restore_checkpoint"
"""Put a session's workspace back as a checkpoint holds it."""
FORK: Final = "claudebox.fork"
"""Copy a session (workspace, history, agent home) into a new one, under the source's lock."""
RESTORE_ARCHIVE: Final = "claudebox.restore_archive"
"""Bring back a session from the archive its cleanup wrote."""
DISK_USAGE: Final = "claudebox.disk_usage"
"""Measure the sessions root: each session's size, the disk's free space, the limits."""
SWEEP_AGE: Final = "claudebox.sweep_age"
"""Beat's age sweep: remove sessions idle past their age rule."""
SWEEP_LEAKS: Final = "claudebox.sweep_leaks"
"""Beat's leak sweep: remove ephemeral sessions whose producer vanished, and orphan sandboxes."""
ADOPT: Final = "claudebox.adopt"
"""Bind a session whose files were copied onto this node to it (`claudebox-pool sessions move`)."""
TRAJECTORY: Final = "claudebox.trajectory"
"""Read one page of a session's conversation from the CLI's transcript in its agent home."""
HISTORY: Final = "claudebox.history"
"""Read a session's session.json and history.jsonl on its node, for a producer anywhere."""
FILES_READ: Final = "claudebox.files.read"
"""Stream one workspace file to a producer through Redis (``tasks.transfer``)."""
FILES_WRITE: Final = "claudebox.files.write"
"""Write one workspace file streamed from a producer, under the session's lock."""
FILES_LIST: Final = "claudebox.files.list"
"""List one directory of a session's workspace."""
FILES_REMOVE: Final = "claudebox.files.remove"
"""Remove a file or a directory tree of a session's workspace, under its lock."""
FILES_UPLOAD: Final = "claudebox.files.upload"
"""Unpack a tar stream from a producer into a session's workspace, under its lock."""
FILES_DOWNLOAD: Final = "claudebox.files.download"
"""Stream a directory of a session's workspace to a producer as tar."""

DROP_WARM: Final = "claudebox_drop_warm"
"""Remote-control command: stop the warm sandbox a worker keeps for a session (it runs in the
worker's main process, where warm sandboxes are kept)."""

QUEUE: Final = "claudebox"
"""The queue every worker consumes."""


def node_queue(node: str) -> str:
    """The queue only ``node``'s workers consume: tasks of the sessions whose files it holds."""
    return f"{QUEUE}.node.{node}"


def worker_queue(hostname: str) -> str:
    """The queue of one worker: the tasks of sessions whose sandbox it keeps warm."""
    return f"{QUEUE}.worker.{hostname}"
