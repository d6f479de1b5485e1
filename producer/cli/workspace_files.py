"""The ``files`` sub-commands and ``download``: a session's workspace files, from any machine."""

from __future__ import annotations

import sys
from pathlib import Path, PurePosixPath
from typing import Annotated, BinaryIO

import typer
from rich.table import Table

from claudebox_pool.producer.cli.app import EXIT_USAGE, cli, err, fail, files_cli, guarded, out, run
from claudebox_pool.producer.files import Files

# --- files in and out, from any machine ---------------------------------------------------------

SessionArg = Annotated[str, typer.Argument(help="Session id.")]
WorkspacePathArg = Annotated[str, typer.Argument(help="Path relative to the workspace.")]


@files_cli.command("get")
def files_get(
    session_id: SessionArg,
    path: WorkspacePathArg,
    local: Annotated[
        str, typer.Argument(help="Local file to write ('-': stdout; default: its name here).")
    ] = "",
) -> None:
    """Copy a workspace file to this machine, streamed."""
    files = guarded(lambda: Files(session_id))
    target = local or PurePosixPath(path).name
    if not target:
        fail(f"{path!r} names no file; give the workspace file to copy", EXIT_USAGE)
    if target == "-":
        run(files.read_to(path, sys.stdout.buffer))
        sys.stdout.flush()
        return
    size = run(files.read_to(path, Path(target)))
    err.print(f"{path} -> {target} ({size} bytes)", highlight=False)


@files_cli.command("put")
def files_put(
    session_id: SessionArg,
    local: Annotated[str, typer.Argument(help="Local file to send ('-': stdin).")],
    path: WorkspacePathArg,
) -> None:
    """Copy a file of this machine into the workspace (parent directories made), streamed."""
    files = guarded(lambda: Files(session_id))
    source: str | BinaryIO = sys.stdin.buffer if local == "-" else local
    size = run(files.write_from(source, path))
    err.print(f"{local} -> {path} ({size} bytes)", highlight=False)


@files_cli.command("ls")
def files_ls(
    session_id: SessionArg,
    path: Annotated[str, typer.Argument(help="Directory relative to the workspace.")] = ".",
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object a line.")] = False,
) -> None:
    """List a workspace directory."""
    files = guarded(lambda: Files(session_id))
    entries = run(files.list(path))
    if as_json:
        for entry in entries:
            sys.stdout.write(entry.model_dump_json() + "\n")
        return
    table = Table("name", "size", "modified")
    for entry in entries:
        shown = entry.name + ("/" if entry.is_dir else "") + (" @" if entry.is_symlink else "")
        table.add_row(shown, str(entry.size), entry.modified[:19])
    out.print(table)


@files_cli.command("rm")
def files_rm(session_id: SessionArg, path: WorkspacePathArg) -> None:
    """Remove a workspace file, link or directory tree."""
    files = guarded(lambda: Files(session_id))
    run(files.remove(path))


@cli.command()
def download(
    session_id: SessionArg,
    directory: Annotated[Path, typer.Argument(help="Local directory to write into (made).")],
    path: Annotated[str, typer.Option(help="Workspace directory to download.")] = ".",
) -> None:
    """Copy a session's workspace (or a directory of it) to this machine, streamed as tar."""
    files = guarded(lambda: Files(session_id))
    done = run(files.download(directory, path))
    err.print(f"{done.files} files ({done.bytes} bytes) -> {directory}", highlight=False)
    for name in done.skipped:
        err.print(f"left out {name} (a link leading out of the workspace, or not a file)")
