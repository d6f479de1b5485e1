"""The ``claudebox-pool`` command: the Typer apps and shared helpers in :mod:`.app`, each group
of commands in a module of its own, registered by importing it here."""

from __future__ import annotations

# isort: off
# In this order: `--help` lists the commands in the order they were registered.
from claudebox_pool.producer.cli import (  # noqa: F401
    processes,
    work,
    monitor,
    admin,
    sessions,
    workspace_files,
)

# isort: on
from claudebox_pool.producer.cli.app import EXIT_CODES, cli, exit_code_for, main

__all__ = ["EXIT_CODES", "cli", "exit_code_for", "main"]
