"""The ``sessions`` sub-commands."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from claudebox_pool.producer import lifecycle
from claudebox_pool.producer.cli.app import (
    EXIT_FAILED,
    EXIT_USAGE,
    err,
    exit_code_for,
    fail,
    guarded,
    out,
    run,
    sessions_cli,
)
from claudebox_pool.producer.client import ClaudeBox
from claudebox_pool.producer.moves import move_session
from claudebox_pool.producer.progress import usage_table
from claudebox_pool.tasks import names
from claudebox_pool.tasks.errors import SessionNotFoundError
from claudebox_pool.tasks.lifecycle import megabytes
from claudebox_pool.tasks.models import (
    ReindexResult,
    SessionStatus,
    SessionView,
    validate_session_id,
)


@sessions_cli.command("list")
def sessions_list(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object a line.")] = False,
    prefix: Annotated[str | None, typer.Option(help="Only ids starting with this.")] = None,
    status: Annotated[
        SessionStatus | None, typer.Option(help="Only sessions of this status.")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="At most this many (a page).")] = None,
    after: Annotated[
        str | None, typer.Option(help="Start after this id: the last one of the previous page.")
    ] = None,
) -> None:
    """List every session of the pool, oldest first; with a filter or a page option, those
    matching, in id order, filtered and paged by Redis."""
    if prefix is None and status is None and limit is None and after is None:
        records = guarded(ClaudeBox.list_sessions)
    else:
        records = run(ClaudeBox.alist_sessions(prefix, status, None, limit, after))
    if as_json:
        for record in records:
            sys.stdout.write(record.model_dump_json() + "\n")
        return
    table = Table(
        "session", "status", "kind", "commands", "created", "updated", "node", "workspace"
    )
    for record in records:
        table.add_row(
            record.session_id,
            record.status,
            "ephemeral" if record.ephemeral else "persistent",
            str(record.total_commands),
            record.created_at[:19],
            record.updated_at[:19],
            record.node,
            record.workspace_path,
        )
    out.print(table)


SHOWN_HISTORY = 20
"""History entries `sessions show` prints (its --json gives them all)."""


@sessions_cli.command("show")
def sessions_show(
    session_id: Annotated[str, typer.Argument(help="Session id.")],
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON document: the record and the whole history.")
    ] = False,
) -> None:
    """Show a session's metadata and history, from any machine (read on the session's node)."""
    record = guarded(lambda: lifecycle.registered(session_id))
    if record is None:
        fail(str(SessionNotFoundError(session_id)), exit_code_for(SessionNotFoundError))
    if record.corruption is not None:
        # Its node cannot read it either: show what the registry knows, and what is wrong.
        if as_json:
            sys.stdout.write(SessionView(record=record, history=[]).model_dump_json() + "\n")
        else:
            out.print_json(record.model_dump_json())
        fail(str(record.corruption.error(session_id)), EXIT_FAILED)
    view = run(lifecycle.view(session_id, None if as_json else SHOWN_HISTORY))
    if as_json:
        sys.stdout.write(view.model_dump_json() + "\n")
        return
    out.print_json(view.record.model_dump_json())
    if view.record.total_usage:
        out.print(usage_table(view.record.total_usage, "model usage"))
    out.print(f"[bold]history[/] (the last {SHOWN_HISTORY} entries; --json has all)")
    for entry in view.history:
        out.print(entry.model_dump_json(), highlight=False, markup=False)


@sessions_cli.command("cleanup")
def sessions_cleanup(
    session_id: Annotated[str, typer.Argument(help="Session id.")],
    keep_workspace: Annotated[
        bool, typer.Option("--keep-workspace", help="Remove the sandbox only; keep the files.")
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask before deleting.")] = False,
    archive: Annotated[
        bool, typer.Option("--archive", help="Write the whole session to an archive first.")
    ] = False,
) -> None:
    """Remove a session (asks before deleting its files unless --yes)."""
    guarded(lambda: validate_session_id(session_id))
    if not keep_workspace and not yes:
        if not sys.stdin.isatty():
            fail("refusing to delete files without a terminal to confirm on; add --yes", EXIT_USAGE)
        if not typer.confirm(f"Delete session '{session_id}' and all its workspace files?"):
            out.print("cancelled")
            raise typer.Exit(EXIT_FAILED)
    result = run(
        ClaudeBox.cleanup_session(session_id, remove_workspace=not keep_workspace, archive=archive)
    )
    what = "session and workspace" if result.removed_workspace else "sandbox (files kept)"
    out.print(f"cleaned up {session_id}: {what} removed")
    if result.archive_path:
        out.print(f"archived to {result.archive_path}", highlight=False)


@sessions_cli.command("restore")
def sessions_restore(
    archive: Annotated[
        str, typer.Argument(help="An archive's file name in CLAUDEBOX_ARCHIVE_DIR, or its path.")
    ],
) -> None:
    """Bring back a session from the archive its cleanup wrote."""
    if Path(archive).exists():
        archive = str(Path(archive).resolve())  # the workers resolve a relative path elsewhere
    restored = run(lifecycle.restore_archive(archive))
    out.print(
        f"restored session {restored.session_id} ({restored.files} files) from {restored.archive}",
        highlight=False,
    )


@sessions_cli.command("export")
def sessions_export(
    session_id: Annotated[str, typer.Argument(help="Session id.")],
    format: Annotated[
        str,
        typer.Option(
            "--format", help="Only `jsonl`: one turn a line (docs/trajectory.schema.json)."
        ),
    ] = "jsonl",
) -> None:
    """The session's conversation from the CLI's transcript, one turn a line."""
    if format != "jsonl":
        fail(f"unknown export format {format!r}; use --format jsonl", 2)
    for turn in run(lifecycle.trajectory(session_id)):
        sys.stdout.write(turn.model_dump_json() + "\n")


@sessions_cli.command("du")
def sessions_du(
    as_json: Annotated[bool, typer.Option("--json", help="The whole report as JSON.")] = False,
) -> None:
    """Disk used by each session, largest first, with the disk's free space and the limits."""
    usage = run(lifecycle.disk_usage())
    if as_json:
        out.print_json(usage.model_dump_json())
        return
    table = Table("session", "size", "files", title=f"sessions in {usage.root}")
    for each in usage.sessions:
        table.add_row(each.session_id, megabytes(each.bytes), str(each.files))
    out.print(table)
    limit = megabytes(usage.max_sessions_bytes) if usage.max_sessions_bytes else "none"
    out.print(
        f"total {megabytes(usage.total_bytes)} (limit {limit}); "
        f"{megabytes(usage.free_bytes)} free on the disk (floor {megabytes(usage.min_free_bytes)})",
        highlight=False,
    )


@sessions_cli.command("reindex")
def sessions_reindex() -> None:
    """Rebuild the Redis registry from the sessions on the workers' disk."""

    async def go() -> ReindexResult:
        from claudebox_pool.producer import pool

        await pool.ensure_workers()
        # Each node reindexes its own disk.
        raws = await pool.call_on_every_node(names.REINDEX, {}, 600)
        results = [ReindexResult.model_validate(raw) for raw in raws]
        return ReindexResult(
            indexed=sum(r.indexed for r in results),
            dropped=sum(r.dropped for r in results),
            corrupted=[sid for r in results for sid in r.corrupted],
            elsewhere=[sid for r in results for sid in r.elsewhere],
        )

    result = run(go())
    out.print(f"indexed {result.indexed} sessions, dropped {result.dropped} stale entries")
    for session_id in result.corrupted:
        err.print(f"[yellow]corrupted:[/] {session_id} (see `claudebox-pool sessions show`)")
    for session_id in result.elsewhere:
        err.print(
            f"[yellow]left alone:[/] {session_id} is on a node's disk but bound to another "
            "node (a copy left by `sessions move`: remove it)"
        )


@sessions_cli.command("move")
def sessions_move(
    session_id: Annotated[str, typer.Argument(help="Session id.")],
    to: Annotated[str, typer.Option("--to", help="The node that now holds the session's files.")],
    force: Annotated[
        bool, typer.Option(help="Move even though the current node is alive.")
    ] = False,
) -> None:
    """Bind a session to another node, after copying its directory there (see the README)."""
    record = run(move_session(session_id, to, force=force))
    out.print(
        f"session {session_id} is now on node {record.node} ({record.workspace_path}); "
        "remove the copy on its old node",
        highlight=False,
    )
