"""The sessions guide (seed/sessions-guide.md), every example run against a real pool.

Each test keeps the guide's code as close to verbatim as it can: only ``from claudebox import``
became ``from producer import``, and since the pool's agent here is ``shell``, the prompts are
shell commands doing what the guide's prompt asks (``"Create hello.py"`` becomes
``"echo 'print(1)' > hello.py"``). The guide's ``print`` calls stay; where they say something a
user relies on, the test reads them back.

The test process and the worker share HOME, so ``~/.claudebox`` is the same directory on both
sides, as for a user on one machine.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis

from claudebox_pool import (
    ClaudeBox,
    CodeResult,
    InvalidRequestError,
    InvalidSessionIdError,
    SessionAlreadyExistsError,
    SessionCorruptedError,
    SessionNotFoundError,
)
from claudebox_pool.producer import pool as producer_pool
from claudebox_pool.tasks import keys, names
from claudebox_pool.tasks.app import app
from claudebox_pool.tasks.models import iso_to_epoch

pytestmark = pytest.mark.usefixtures("pool", "clean_state")

GUIDE_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}")
"""The guide's timestamp format, 2025-01-01T10:00:00.000000 (UTC, no offset)."""

SEED_FIELDS = (
    "session_id",
    "box_id",
    "created_at",
    "updated_at",
    "total_commands",
    "total_files_created",
    "workspace_path",
)


# --- the guide's own helper functions, verbatim (they are reused by several tests) -------------


def list_all_sessions() -> None:
    sessions = ClaudeBox.list_sessions()

    for session in sessions:
        print(f"ID: {session.session_id}")
        print(f"Status: {session.status}")
        print(f"Created: {session.created_at}")
        print(f"Workspace: {session.workspace_path}")
        print()


def find_session(search_term: str) -> None:
    """Find sessions matching search term."""
    sessions = ClaudeBox.list_sessions()
    matches = [s for s in sessions if search_term in s.session_id]

    print(f"Found {len(matches)} matching session(s):")
    for session in matches:
        print(f"  - {session.session_id} (created {session.created_at})")


def get_session_info(session_id: str) -> dict[str, Any] | None:
    """Get detailed info about a session."""
    import os

    session_file = os.path.expanduser(f"~/.claudebox/sessions/{session_id}/.claudebox/session.json")

    if not os.path.exists(session_file):
        print(f"Session '{session_id}' not found")
        return None

    with open(session_file) as f:
        metadata: dict[str, Any] = json.load(f)

    return metadata


def read_session_metadata(session_id: str) -> dict[str, Any]:
    """Read session metadata from JSON file."""
    metadata_file = os.path.expanduser(
        f"~/.claudebox/sessions/{session_id}/.claudebox/session.json"
    )

    with open(metadata_file) as f:
        metadata: dict[str, Any] = json.load(f)
        return metadata


def read_action_history(session_id: str) -> list[dict[str, Any]]:
    """Read all actions from history.jsonl."""
    # The guide's snippet uses `os` without importing it; this module imports it at the top.
    history_file = os.path.expanduser(
        f"~/.claudebox/sessions/{session_id}/.claudebox/history.jsonl"
    )

    actions = []
    with open(history_file) as f:
        for line in f:
            actions.append(json.loads(line))

    return actions


# --- test helpers --------------------------------------------------------------------------------


def session_dir(session_id: str) -> Path:
    """The guide's ~/.claudebox/sessions/<id>/, spelled as the guide spells it."""
    return Path(os.path.expanduser(f"~/.claudebox/sessions/{session_id}"))


def workspace(session_id: str) -> Path:
    return session_dir(session_id) / "workspace"


def listed_ids() -> list[str]:
    return [session.session_id for session in ClaudeBox.list_sessions()]


async def create_sessions(*session_ids: str) -> None:
    for session_id in session_ids:
        async with ClaudeBox(session_id=session_id) as box:
            await box.code(f"echo {session_id} > id.txt")


def make_old(days: int, *session_ids: str) -> None:
    """Backdate sessions on disk (the source of truth), then rebuild the registry from it."""
    created = (datetime.now(UTC) - timedelta(days=days)).replace(tzinfo=None)
    for session_id in session_ids:
        path = session_dir(session_id) / ".claudebox" / "session.json"
        record = json.loads(path.read_text())
        record["created_at"] = record["updated_at"] = created.isoformat(timespec="microseconds")
        path.write_text(json.dumps(record))
    # Awaited the producer's way, not with AsyncResult.get: Celery caches app.backend, so one
    # touched before pool_env ran (tests/test_errors.py does) still points at the wrong Redis.
    task_id = app.send_task(names.REINDEX).id
    asyncio.run(producer_pool.wait(task_id, timeout_s=30))


def code_execution_window(session_id: str) -> tuple[float, float]:
    """(start, end) in epoch seconds of the session's single code_execution, from its history.

    A history entry is stamped when the run ends; its duration gives the start.
    """
    (entry,) = [a for a in read_action_history(session_id) if a["action"] == "code_execution"]
    end = iso_to_epoch(entry["timestamp"])
    return end - float(entry["context"]["duration_s"]), end


@pytest.fixture
def checkpoints() -> Iterator[Path]:
    """The guide's ~/.claudebox/checkpoints/, removed after the test (clean_state keeps it)."""
    path = Path(os.path.expanduser("~/.claudebox/checkpoints"))
    shutil.rmtree(path, ignore_errors=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


# --- Ephemeral vs Persistent Sessions ------------------------------------------------------------


def test_ephemeral_session_workspace_is_deleted_on_exit(capsys: pytest.CaptureFixture[str]) -> None:
    seen: dict[str, Any] = {}

    async def main() -> None:
        # No session_id = ephemeral
        async with ClaudeBox() as box:
            result = await box.code("echo 'print(1)' > hello.py && echo created hello.py")
            print(result.response)
            seen["workspace"] = box.workspace_path
            seen["hello_during"] = os.path.exists(os.path.join(box.workspace_path, "hello.py"))
        # Workspace automatically deleted here

    asyncio.run(main())

    assert seen["hello_during"]
    assert "created hello.py" in capsys.readouterr().out
    assert not Path(seen["workspace"]).parent.exists()
    assert listed_ids() == []


def test_ephemeral_session_workspace_is_deleted_when_the_body_raises() -> None:
    seen: dict[str, str] = {}

    async def main() -> None:
        async with ClaudeBox() as box:
            seen["workspace"] = box.workspace_path
            await box.code("echo 'print(1)' > hello.py")
            raise RuntimeError("the user's code failed")

    with pytest.raises(RuntimeError, match="the user's code failed"):
        asyncio.run(main())

    assert not Path(seen["workspace"]).parent.exists()
    assert listed_ids() == []


def test_quick_task_and_quick_analysis_leave_nothing_behind() -> None:
    """Creating Sessions / Ephemeral Session, and Best Practice 3."""
    sessions_root = Path(os.path.expanduser("~/.claudebox/sessions"))

    async def quick_task() -> None:
        async with ClaudeBox() as box:
            result = await box.code("echo analysed > analysis.txt")
            # Process result
            assert result.success
        # Auto-cleanup happens here

    # ✅ For quick tasks, use ephemeral
    async def quick_analysis() -> CodeResult:
        async with ClaudeBox() as box:  # No session_id
            return await box.code("echo 42")
        # Auto-cleanup

    asyncio.run(quick_task())
    result = asyncio.run(quick_analysis())

    assert result.success and result.response.strip() == "42"
    assert list(sessions_root.iterdir()) == []
    assert listed_ids() == []


def test_persistent_session_workspace_persists_at_home_claudebox_sessions(
    capsys: pytest.CaptureFixture[str],
) -> None:
    async def main() -> None:
        # With session_id = persistent
        async with ClaudeBox(session_id="my-project") as box:
            await box.code("mkdir -p src tests && touch src/__init__.py README.md")
            print(f"Workspace: {box.workspace_path}")
        # Workspace persists at ~/.claudebox/sessions/my-project/

    asyncio.run(main())

    expected = os.path.expanduser("~/.claudebox/sessions/my-project/workspace")
    assert f"Workspace: {expected}\n" in capsys.readouterr().out
    assert (workspace("my-project") / "src" / "__init__.py").is_file()
    assert (workspace("my-project") / "README.md").is_file()


def test_first_time_persistent_session_is_listed_as_stopped_after_exit(
    capsys: pytest.CaptureFixture[str],
) -> None:
    async def create_project() -> None:
        async with ClaudeBox(session_id="my-project") as box:
            await box.code("mkdir -p src && echo 'print(1)' > src/main.py")
            print(f"Workspace: {box.workspace_path}")
            # Workspace persists after exit

    asyncio.run(create_project())

    (session,) = ClaudeBox.list_sessions()
    assert (session.session_id, session.status) == ("my-project", "stopped")
    assert session.workspace_path == str(workspace("my-project"))
    assert (workspace("my-project") / "src" / "main.py").read_text() == "print(1)\n"


# --- Session Lifecycle ---------------------------------------------------------------------------


def test_lifecycle_create_work_exit_reconnect_cleanup() -> None:
    seen: dict[str, Any] = {}

    async def lifecycle() -> None:
        # 1. CREATE SESSION and 2. WORK IN SESSION (Day 1)
        async with ClaudeBox(session_id="proj") as box:
            await box.code("echo 'app = []' > app.py")
            await box.code("echo 'def feature_a(): ...' > feature_a.py")
        # 3. SESSION EXIT: VM stops, but workspace persists!
        seen["after_exit"] = sorted(os.listdir(workspace("proj")))
        # 4. RECONNECT (Day 2, 3, ...)
        async with ClaudeBox.reconnect("proj") as box:
            result = await box.code("ls && echo 'def feature_b(): ...' > feature_b.py")
            seen["listing_on_day_2"] = result.response.split()
        seen["commands"] = read_session_metadata("proj")["total_commands"]
        # 5. CLEANUP (When finished)
        await ClaudeBox.cleanup_session("proj", remove_workspace=True)

    asyncio.run(lifecycle())

    assert seen["after_exit"] == ["app.py", "feature_a.py"]
    assert seen["listing_on_day_2"] == ["app.py", "feature_a.py"]
    assert seen["commands"] == 3
    assert not session_dir("proj").exists()
    assert listed_ids() == []


def test_session_is_created_then_stopped_through_the_state_transitions() -> None:
    statuses: list[str] = []

    async def transitions() -> None:
        async with ClaudeBox(session_id="x"):
            statuses.append(ClaudeBox.list_sessions()[0].status)
        async with ClaudeBox.reconnect("x") as box:
            await box.code("true")
        statuses.append(ClaudeBox.list_sessions()[0].status)

    asyncio.run(transitions())

    assert statuses == ["created", "stopped"]


# --- Creating Sessions: checking if a session exists ---------------------------------------------


async def safe_create() -> None:
    session_id = "my-project"

    # Check if already exists
    sessions = ClaudeBox.list_sessions()
    exists = any(s.session_id == session_id for s in sessions)

    if exists:
        print(f"Session '{session_id}' exists, reconnecting...")
        async with ClaudeBox.reconnect(session_id) as box:
            await box.code("echo reconnected >> log.txt")
    else:
        print(f"Creating new session '{session_id}'...")
        async with ClaudeBox(session_id=session_id) as box:
            await box.code("echo created >> log.txt")


def test_safe_create_creates_a_missing_session(capsys: pytest.CaptureFixture[str]) -> None:
    asyncio.run(safe_create())

    assert "Creating new session 'my-project'..." in capsys.readouterr().out
    assert (workspace("my-project") / "log.txt").read_text() == "created\n"


def test_safe_create_reconnects_to_an_existing_session(capsys: pytest.CaptureFixture[str]) -> None:
    asyncio.run(safe_create())

    asyncio.run(safe_create())

    assert "Session 'my-project' exists, reconnecting..." in capsys.readouterr().out
    assert (workspace("my-project") / "log.txt").read_text() == "created\nreconnected\n"


# --- Reconnecting to Sessions --------------------------------------------------------------------


def test_reconnect_continues_in_the_same_workspace() -> None:
    async def reconnect_example() -> CodeResult:
        # Day 1: Create
        async with ClaudeBox(session_id="project") as box:
            await box.code("echo day1 > notes.txt")

        # Day 2: Reconnect
        async with ClaudeBox.reconnect("project") as box:
            return await box.code("echo day2 >> notes.txt && cat notes.txt")

    result = asyncio.run(reconnect_example())

    assert result.response == "day1\nday2\n"


async def safe_reconnect(session_id: str) -> CodeResult | None:
    try:
        async with ClaudeBox.reconnect(session_id) as box:
            result = await box.code("echo continued >> work.txt")
            return result
    except SessionNotFoundError:
        print(f"Session '{session_id}' not found. Create it first!")
        return None


def test_safe_reconnect_returns_none_for_a_missing_session(
    capsys: pytest.CaptureFixture[str],
) -> None:
    result = asyncio.run(safe_reconnect("never-created"))

    assert result is None
    assert "Session 'never-created' not found. Create it first!" in capsys.readouterr().out
    assert not session_dir("never-created").exists()


def test_safe_reconnect_continues_an_existing_session() -> None:
    asyncio.run(create_sessions("existing"))

    result = asyncio.run(safe_reconnect("existing"))

    assert result is not None and result.success
    assert (workspace("existing") / "work.txt").read_text() == "continued\n"


async def smart_session(session_id: str) -> CodeResult:
    """Create if doesn't exist, reconnect if it does."""
    sessions = ClaudeBox.list_sessions()
    exists = any(s.session_id == session_id for s in sessions)

    if exists:
        box = await ClaudeBox.reconnect(session_id)
    else:
        box = ClaudeBox(session_id=session_id)

    async with box:
        # Work here
        result = await box.code("echo task >> tasks.txt && cat tasks.txt")
        return result


def test_smart_session_creates_a_missing_session() -> None:
    result = asyncio.run(smart_session("smart"))

    assert result.response == "task\n"
    assert listed_ids() == ["smart"]


def test_smart_session_reconnects_with_the_awaited_form_when_the_session_exists() -> None:
    asyncio.run(smart_session("smart"))

    result = asyncio.run(smart_session("smart"))

    assert result.response == "task\ntask\n"
    assert read_session_metadata("smart")["total_commands"] == 2


# --- Listing Sessions ----------------------------------------------------------------------------


def test_list_all_sessions_prints_every_session(capsys: pytest.CaptureFixture[str]) -> None:
    asyncio.run(create_sessions("frontend-app", "backend-api"))
    capsys.readouterr()

    list_all_sessions()

    out = capsys.readouterr().out
    blocks = [block.splitlines() for block in out.strip().split("\n\n")]
    assert [block[0] for block in blocks] == ["ID: frontend-app", "ID: backend-api"]
    for block, session_id in zip(blocks, ["frontend-app", "backend-api"], strict=True):
        assert block[1] == "Status: stopped"
        assert GUIDE_TIMESTAMP.fullmatch(block[2].removeprefix("Created: "))
        assert block[3] == f"Workspace: {workspace(session_id)}"


def test_find_session_lists_sessions_whose_id_contains_the_term(
    capsys: pytest.CaptureFixture[str],
) -> None:
    asyncio.run(create_sessions("feature-user-auth", "feature-payment-gateway", "backend-api"))
    capsys.readouterr()

    find_session("feature")

    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "Found 2 matching session(s):"
    assert [line.split(" (created ")[0] for line in lines[1:]] == [
        "  - feature-user-auth",
        "  - feature-payment-gateway",
    ]


def test_get_session_info_returns_the_session_json() -> None:
    asyncio.run(create_sessions("my-project"))

    metadata = get_session_info("my-project")

    assert metadata is not None
    assert metadata["session_id"] == "my-project"
    assert metadata["workspace_path"] == str(workspace("my-project"))


def test_get_session_info_reports_a_missing_session(capsys: pytest.CaptureFixture[str]) -> None:
    metadata = get_session_info("my-project")

    assert metadata is None
    assert capsys.readouterr().out == "Session 'my-project' not found\n"


# --- Session Metadata ----------------------------------------------------------------------------


def test_session_metadata_has_the_guides_fields_counts_and_timestamp_format(
    capsys: pytest.CaptureFixture[str],
) -> None:
    async def work() -> None:
        async with ClaudeBox(session_id="my-project") as box:
            await box.code("echo 'print(1)' > app.py && echo '[]' > data.json")
            await box.code("echo 'print(2)' >> app.py")

    asyncio.run(work())

    # Usage
    metadata = read_session_metadata("my-project")
    print(f"Created: {metadata['created_at']}")
    print(f"Commands executed: {metadata['total_commands']}")

    assert set(SEED_FIELDS) <= metadata.keys()
    assert metadata["session_id"] == "my-project"
    assert metadata["total_commands"] == 2
    assert metadata["total_files_created"] == 2
    assert metadata["workspace_path"] == os.path.expanduser(
        "~/.claudebox/sessions/my-project/workspace"
    )
    assert GUIDE_TIMESTAMP.fullmatch(metadata["created_at"])
    assert GUIDE_TIMESTAMP.fullmatch(metadata["updated_at"])
    assert metadata["created_at"] < metadata["updated_at"]
    assert "Commands executed: 2\n" in capsys.readouterr().out


def test_action_history_logs_creation_execution_and_created_files(
    capsys: pytest.CaptureFixture[str],
) -> None:
    async def work() -> None:
        async with ClaudeBox(session_id="my-project") as box:
            await box.code("echo 'app = 1' > app.py")

    asyncio.run(work())

    # Usage
    actions = read_action_history("my-project")
    print(f"Total actions: {len(actions)}")
    for action in actions[-5:]:  # Last 5
        print(f"  {action['timestamp']}: {action['action']}")

    assert [a["action"] for a in actions] == ["session_created", "code_execution", "file_created"]
    created, execution, file_created = actions
    assert created["context"] == {"session_id": "my-project"}
    assert execution["context"]["prompt"] == "echo 'app = 1' > app.py"
    assert execution["context"]["success"] is True
    assert file_created["context"] == {"file": "app.py"}
    assert all(GUIDE_TIMESTAMP.fullmatch(a["timestamp"]) for a in actions)
    assert "Total actions: 3\n" in capsys.readouterr().out


def test_action_history_records_a_failed_command_as_unsuccessful() -> None:
    async def work() -> CodeResult:
        async with ClaudeBox(session_id="my-project") as box:
            return await box.code("exit 3")

    result = asyncio.run(work())

    execution = read_action_history("my-project")[-1]
    assert (result.success, result.exit_code) == (False, 3)
    assert execution["action"] == "code_execution"
    assert execution["context"]["success"] is False


# --- Session Cleanup -----------------------------------------------------------------------------


def test_cleanup_keep_workspace_keeps_files_metadata_and_history() -> None:
    asyncio.run(create_sessions("my-project"))

    async def cleanup_keep_workspace() -> None:
        # Removes VM, keeps files for inspection
        await ClaudeBox.cleanup_session("my-project", remove_workspace=False)
        # Files still at ~/.claudebox/sessions/my-project/

    asyncio.run(cleanup_keep_workspace())

    assert (workspace("my-project") / "id.txt").read_text() == "my-project\n"
    assert read_session_metadata("my-project")["total_commands"] == 1
    assert [a["action"] for a in read_action_history("my-project")][:2] == [
        "session_created",
        "code_execution",
    ]
    assert listed_ids() == ["my-project"]


def test_a_session_cleaned_up_keeping_its_workspace_can_be_reconnected() -> None:
    asyncio.run(create_sessions("my-project"))
    asyncio.run(ClaudeBox.cleanup_session("my-project", remove_workspace=False))

    assert asyncio.run(safe_reconnect("my-project")) is not None
    assert (workspace("my-project") / "work.txt").read_text() == "continued\n"


def test_cleanup_everything_deletes_the_session_directory() -> None:
    asyncio.run(create_sessions("my-project"))

    async def cleanup_everything() -> None:
        # Removes VM and all workspace files
        await ClaudeBox.cleanup_session("my-project", remove_workspace=True)
        # ~/.claudebox/sessions/my-project/ deleted

    asyncio.run(cleanup_everything())

    assert not os.path.exists(os.path.expanduser("~/.claudebox/sessions/my-project/"))
    assert listed_ids() == []


def test_archive_and_cleanup_copies_the_workspace_out_then_deletes_the_session(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    asyncio.run(create_sessions("my-project"))

    async def archive_and_cleanup(session_id: str, archive_dir: str) -> None:
        """Archive workspace before cleanup."""
        workspace = f"~/.claudebox/sessions/{session_id}/workspace"
        workspace = os.path.expanduser(workspace)

        # Archive to external location
        archive_path = f"{archive_dir}/{session_id}"
        shutil.copytree(workspace, archive_path)
        print(f"Archived to {archive_path}")

        # Now safe to cleanup
        await ClaudeBox.cleanup_session(session_id, remove_workspace=True)
        print(f"Cleaned up session '{session_id}'")

    asyncio.run(archive_and_cleanup("my-project", str(tmp_path)))

    assert (tmp_path / "my-project" / "id.txt").read_text() == "my-project\n"
    assert not session_dir("my-project").exists()
    assert "Cleaned up session 'my-project'" in capsys.readouterr().out


def test_cleanup_old_sessions_removes_only_sessions_older_than_the_cutoff() -> None:
    asyncio.run(create_sessions("old-experiment", "recent-work"))
    make_old(40, "old-experiment")

    async def cleanup_old_sessions(days_old: int = 30) -> None:
        """Clean up sessions older than N days."""
        sessions = ClaudeBox.list_sessions()
        cutoff = datetime.now() - timedelta(days=days_old)

        for session in sessions:
            created = datetime.fromisoformat(session.created_at)
            if created < cutoff:
                print(f"Cleaning up old session: {session.session_id}")
                await ClaudeBox.cleanup_session(session.session_id, remove_workspace=True)

    asyncio.run(cleanup_old_sessions())

    assert not session_dir("old-experiment").exists()
    assert session_dir("recent-work").exists()
    assert listed_ids() == ["recent-work"]


@pytest.mark.parametrize(("answer", "removed"), [("yes", True), ("YES", True), ("no", False)])
def test_cleanup_with_confirm_deletes_only_on_yes(
    answer: str, removed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    asyncio.run(create_sessions("my-project"))
    prompts: list[str] = []

    def keyboard(prompt: str = "") -> str:
        prompts.append(prompt)
        return answer

    monkeypatch.setattr(builtins, "input", keyboard)

    async def cleanup_with_confirm(session_id: str) -> None:
        """Ask user before cleanup."""
        print(f"About to delete session '{session_id}' and all workspace files.")
        confirm = input("Are you sure? (yes/no): ")

        if confirm.lower() == "yes":
            await ClaudeBox.cleanup_session(session_id, remove_workspace=True)
            print("✅ Cleaned up")
        else:
            print("❌ Cancelled")

    asyncio.run(cleanup_with_confirm("my-project"))

    assert prompts == ["Are you sure? (yes/no): "]
    assert session_dir("my-project").exists() is not removed
    assert ("my-project" in listed_ids()) is not removed


# --- Advanced Session Patterns -------------------------------------------------------------------


def test_parallel_sessions_run_at_the_same_time() -> None:
    # Each task sleeps: not to synchronise anything, but to last long enough that running
    # them one after the other could not produce overlapping windows.
    async def parallel_sessions() -> tuple[CodeResult, CodeResult]:
        """Run multiple sessions in parallel."""

        async def task_a() -> CodeResult:
            async with ClaudeBox(session_id="task-a") as box:
                return await box.code("sleep 1 && echo api > api.py")

        async def task_b() -> CodeResult:
            async with ClaudeBox(session_id="task-b") as box:
                return await box.code("sleep 1 && echo ui > ui.js")

        results = await asyncio.gather(task_a(), task_b())
        return results

    results = asyncio.run(parallel_sessions())

    assert [r.files_created for r in results] == [["api.py"], ["ui.js"]]
    start_a, end_a = code_execution_window("task-a")
    start_b, end_b = code_execution_window("task-b")
    assert start_a < end_b and start_b < end_a, "the two sessions ran one after the other"


def test_a_session_cannot_read_another_sessions_workspace_from_its_sandbox() -> None:
    asyncio.run(create_sessions("data-prep"))

    async def peek() -> CodeResult:
        async with ClaudeBox(session_id="analysis") as box:
            prep_workspace = os.path.expanduser("~/.claudebox/sessions/data-prep/workspace")
            return await box.code(f"cat {prep_workspace}/id.txt")

    result = asyncio.run(peek())

    assert not result.success
    assert "data-prep" not in result.response


def test_session_chain_passes_files_from_one_session_to_the_next() -> None:
    # The guide asks the agent to "Copy data from ~/.claudebox/sessions/data-prep/workspace".
    # Each session runs in its own sandbox, which sees only its own workspace (at /workspace):
    # another session's workspace is not visible inside it (the test above holds that). What
    # the guide means, handing one session's output to the next, is done from the host, where
    # every workspace is a plain directory: the copy happens where the guide's prompt stands.
    async def session_chain() -> None:
        """Chain sessions with dependencies."""
        # Session 1: Data preparation
        async with ClaudeBox(session_id="data-prep") as box:
            await box.code("printf '3\\n1\\n2\\n' > data.csv")

        # Session 2: Analysis (depends on session 1)
        async with ClaudeBox(session_id="analysis") as box:
            # Copy data from session 1
            prep_workspace = "~/.claudebox/sessions/data-prep/workspace"
            shutil.copy(os.path.expanduser(f"{prep_workspace}/data.csv"), box.workspace_path)
            await box.code("sort -n data.csv > results.csv")

        # Session 3: Visualization (depends on session 2)
        async with ClaudeBox(session_id="visualization") as box:
            analysis_workspace = "~/.claudebox/sessions/analysis/workspace"
            shutil.copy(os.path.expanduser(f"{analysis_workspace}/results.csv"), box.workspace_path)
            await box.code("sed 's/^/#/' results.csv > chart.txt")

    asyncio.run(session_chain())

    assert (workspace("visualization") / "chart.txt").read_text() == "#1\n#2\n#3\n"


def test_session_with_checkpoints_copies_the_workspace_after_each_phase(
    checkpoints: Path,
) -> None:
    async def session_with_checkpoints(session_id: str) -> None:
        """Create checkpoints by copying workspace."""
        import os
        import shutil

        async with ClaudeBox(session_id=session_id) as box:
            # Checkpoint 1
            await box.code("echo phase1 > phase1.txt")
            checkpoint_1 = f"~/.claudebox/checkpoints/{session_id}-phase1"
            shutil.copytree(box.workspace_path, os.path.expanduser(checkpoint_1))

            # Checkpoint 2
            await box.code("echo phase2 > phase2.txt")
            checkpoint_2 = f"~/.claudebox/checkpoints/{session_id}-phase2"
            shutil.copytree(box.workspace_path, os.path.expanduser(checkpoint_2))

    asyncio.run(session_with_checkpoints("my-project"))

    assert sorted(os.listdir(checkpoints / "my-project-phase1")) == ["phase1.txt"]
    assert sorted(os.listdir(checkpoints / "my-project-phase2")) == ["phase1.txt", "phase2.txt"]


def test_create_from_template_starts_a_session_with_the_templates_files() -> None:
    async def template() -> None:
        async with ClaudeBox(session_id="python-template") as box:
            await box.code("mkdir -p src && echo 'print(1)' > src/main.py")

    asyncio.run(template())

    async def create_from_template(session_id: str, template_session: str) -> None:
        """Create new session from template workspace."""
        import os
        import shutil

        # Copy template workspace to new session
        template_workspace = os.path.expanduser(
            f"~/.claudebox/sessions/{template_session}/workspace"
        )
        new_workspace = os.path.expanduser(f"~/.claudebox/sessions/{session_id}/workspace")
        os.makedirs(os.path.dirname(new_workspace), exist_ok=True)
        shutil.copytree(template_workspace, new_workspace)

        # Now use the session
        async with ClaudeBox(session_id=session_id) as box:
            await box.code("cp src/main.py src/continued.py")

    asyncio.run(create_from_template("new-service", "python-template"))

    assert (workspace("new-service") / "src" / "continued.py").read_text() == "print(1)\n"
    assert listed_ids() == ["python-template", "new-service"]


# --- Best Practices ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "session_id",
    [
        # Best Practices and Naming Conventions: descriptive, project-, date-based ids.
        "web-api-server",
        "data-analysis-2024",
        "experiment-2024-01-15",
        "test-run-20240115",
        "feature-user-auth",
        "exp-2024-01-15-model-a",
        "user-auth-service",
        # "Too generic" is a style advice, not a rule: these are valid ids.
        "test123",
        "temp",
        "snake_case_id",
        "a" * 255,
    ],
)
def test_ids_following_the_naming_rules_are_accepted(session_id: str) -> None:
    box = ClaudeBox(session_id=session_id)

    assert (box.session_id, box.is_ephemeral) == (session_id, False)


def test_session_ids_are_case_sensitive() -> None:
    async def both() -> None:
        async with ClaudeBox(session_id="Project") as box:
            await box.code("echo upper > which.txt")
        async with ClaudeBox(session_id="project") as box:
            await box.code("echo lower > which.txt")

    asyncio.run(both())

    assert (workspace("Project") / "which.txt").read_text() == "upper\n"
    assert (workspace("project") / "which.txt").read_text() == "lower\n"


def test_a_255_character_session_id_works_end_to_end() -> None:
    session_id = "a" * 255

    async def work() -> CodeResult:
        async with ClaudeBox(session_id=session_id) as box:
            return await box.code("echo ok > ok.txt")

    result = asyncio.run(work())

    assert result.files_created == ["ok.txt"]
    assert listed_ids() == [session_id]


@pytest.mark.parametrize(
    ("prompt", "outcome"),
    [
        ("echo report > analysis.txt", contextlib.nullcontext()),
        ("", pytest.raises(InvalidRequestError, match="the prompt is empty")),
    ],
    ids=["work-succeeds", "work-raises"],
)
def test_responsible_cleanup_removes_the_session_even_if_an_error_occurred(
    prompt: str, outcome: contextlib.AbstractContextManager[object]
) -> None:
    async def responsible_cleanup() -> None:
        session_id = "temporary-analysis"

        try:
            async with ClaudeBox(session_id=session_id) as box:
                await box.code(prompt)
        finally:
            # Always cleanup, even if error occurred
            await ClaudeBox.cleanup_session(session_id, remove_workspace=True)

    with outcome:
        asyncio.run(responsible_cleanup())

    assert not session_dir("temporary-analysis").exists()
    assert listed_ids() == []


def test_documented_session_without_work_is_created_and_kept() -> None:
    async def documented_session() -> None:
        """
        Session: ml-training-experiment
        Purpose: Train model on customer data
        Expected duration: 3 days
        Cleanup: After model evaluation complete
        """
        async with ClaudeBox(session_id="ml-training-experiment"):
            ...

    asyncio.run(documented_session())

    metadata = read_session_metadata("ml-training-experiment")
    assert (metadata["status"], metadata["total_commands"]) == ("created", 0)
    assert workspace("ml-training-experiment").is_dir()


GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "Guide Test",
    "GIT_AUTHOR_EMAIL": "guide@example.invalid",
    "GIT_COMMITTER_NAME": "Guide Test",
    "GIT_COMMITTER_EMAIL": "guide@example.invalid",
}


def test_versioned_session_puts_the_workspace_under_git() -> None:
    async def versioned_session() -> list[CodeResult]:
        # The identity git needs to commit travels as the session's env.
        async with ClaudeBox(session_id="versioned-project", env=GIT_IDENTITY) as box:
            results = [await box.code("echo 'print(1)' > app.py")]
            results.append(await box.code("git init"))
            results.append(await box.code("git add ."))
            results.append(await box.code("git commit -m 'Initial commit'"))
            # Workspace is now version controlled
            return results

    results = asyncio.run(versioned_session())

    assert all(r.success for r in results), [r.raw_output for r in results]
    log = subprocess.run(
        # The workspace belongs to the session's own uid: git trusts it only when told to.
        [
            "/usr/bin/git",
            "-c",
            f"safe.directory={workspace('versioned-project')}",
            "-C",
            str(workspace("versioned-project")),
            "log",
            "--format=%s %an",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert log.stdout == "Initial commit Guide Test\n"
    assert read_session_metadata("versioned-project")["total_files_created"] == 1


def test_weekly_cleanup_removes_old_temp_sessions_only(capsys: pytest.CaptureFixture[str]) -> None:
    asyncio.run(create_sessions("temp-old", "temp-new", "keep-old"))
    make_old(8, "temp-old", "keep-old")

    async def weekly_cleanup() -> None:
        """Run weekly to clean up old sessions."""
        sessions = ClaudeBox.list_sessions()
        cutoff = datetime.now() - timedelta(days=7)

        for session in sessions:
            if "temp-" in session.session_id:  # Cleanup temp sessions
                created = datetime.fromisoformat(session.created_at)
                if created < cutoff:
                    await ClaudeBox.cleanup_session(session.session_id, remove_workspace=True)
                    print(f"Cleaned up: {session.session_id}")

    # Run weekly via cron or scheduler
    asyncio.run(weekly_cleanup())

    assert capsys.readouterr().out == "Cleaned up: temp-old\n"
    assert sorted(listed_ids()) == ["keep-old", "temp-new"]
    assert not session_dir("temp-old").exists()


# --- Troubleshooting -----------------------------------------------------------------------------


def test_creating_an_existing_session_raises_session_already_exists() -> None:
    asyncio.run(create_sessions("my-project"))

    async def create_again() -> None:
        async with ClaudeBox(session_id="my-project"):
            ...

    with pytest.raises(SessionAlreadyExistsError, match="Session 'my-project' already exists"):
        asyncio.run(create_again())

    assert (workspace("my-project") / "id.txt").read_text() == "my-project\n"


def test_reconnect_is_the_solution_to_session_already_exists() -> None:
    asyncio.run(create_sessions("my-project"))

    async def solution() -> CodeResult:
        # Use reconnect instead
        async with ClaudeBox.reconnect("my-project") as box:
            return await box.code("cat id.txt")

    assert asyncio.run(solution()).response == "my-project\n"


def test_reconnecting_a_missing_session_raises_session_not_found() -> None:
    async def reconnect() -> None:
        async with ClaudeBox.reconnect("my-project"):
            ...

    with pytest.raises(SessionNotFoundError, match="Session 'my-project' not found"):
        asyncio.run(reconnect())

    assert not session_dir("my-project").exists()


def test_creating_is_the_solution_to_session_not_found() -> None:
    async def solution() -> None:
        # Create it first
        async with ClaudeBox(session_id="my-project"):
            ...

    asyncio.run(solution())

    assert listed_ids() == ["my-project"]
    assert asyncio.run(safe_reconnect("my-project")) is not None


def test_disk_full_solution_cleans_up_the_sessions_the_user_confirms(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asyncio.run(create_sessions("big-dataset", "keep-me"))
    answers = iter(["yes", "no"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(answers))

    async def solution() -> None:
        # Clean up old sessions
        sessions = ClaudeBox.list_sessions()
        for session in sessions:
            print(f"Clean up {session.session_id}? (yes/no)")
            if input() == "yes":
                await ClaudeBox.cleanup_session(session.session_id, remove_workspace=True)

    asyncio.run(solution())

    assert listed_ids() == ["keep-me"]
    assert not session_dir("big-dataset").exists()


def corrupt(session_id: str) -> Path:
    session_json = session_dir(session_id) / ".claudebox" / "session.json"
    session_json.write_text('{"session_id": "corrupted-session", "created_at": ')
    return session_json


def test_reconnecting_a_corrupted_session_raises_session_corrupted_naming_the_file() -> None:
    asyncio.run(create_sessions("corrupted-session"))
    session_json = corrupt("corrupted-session")

    async def reconnect() -> None:
        async with ClaudeBox.reconnect("corrupted-session"):
            ...

    with pytest.raises(SessionCorruptedError) as raised:
        asyncio.run(reconnect())

    assert str(session_json) in str(raised.value)
    assert "claudebox-pool sessions cleanup corrupted-session --yes" in str(raised.value)


def test_removing_a_corrupted_session_by_hand_lets_a_fresh_session_work() -> None:
    asyncio.run(create_sessions("corrupted-session"))
    corrupt("corrupted-session")

    # Remove corrupted session manually
    subprocess.run("rm -rf ~/.claudebox/sessions/corrupted-session/", shell=True, check=True)

    async def fresh() -> CodeResult:
        # Create fresh session
        async with ClaudeBox(session_id="fresh-session") as box:
            return await box.code("echo fresh > fresh.txt")

    assert asyncio.run(fresh()).files_created == ["fresh.txt"]


def test_a_session_removed_by_hand_is_no_longer_listed() -> None:
    asyncio.run(create_sessions("corrupted-session", "fresh-session"))
    corrupt("corrupted-session")

    subprocess.run("rm -rf ~/.claudebox/sessions/corrupted-session/", shell=True, check=True)

    assert listed_ids() == ["fresh-session"]


# --- Session ID naming rules ---------------------------------------------------------------------

INVALID_IDS = [
    "my project",
    "web app",
    "project@123",
    "app#1",
    "test/version",
    "",
    "a" * 256,
    "../x",
    ".",
    "..",
    "proj\n",
]


def keyspace(client: redis.Redis) -> dict[str, object]:
    """What a refused call must not change: our keys, Celery's results and the queue."""
    ours = {key for key in client.scan_iter(f"{keys.PREFIX}*") if key != keys.workers().encode()}
    results = set(client.scan_iter("celery-task-meta-*"))
    return {"ours": ours, "results": results, "queued": client.llen(names.QUEUE)}


def refuse(entry: str, session_id: str) -> None:
    if entry == "create":
        ClaudeBox(session_id=session_id)
    elif entry == "reconnect":
        ClaudeBox.reconnect(session_id)
    else:
        asyncio.run(ClaudeBox.cleanup_session(session_id, remove_workspace=True))


@pytest.mark.parametrize("entry", ["create", "reconnect", "cleanup"])
@pytest.mark.parametrize("session_id", INVALID_IDS, ids=lambda s: repr(s[:20]))
def test_invalid_session_id_is_refused_before_anything_touches_disk_or_redis(
    session_id: str, entry: str, clean_state: redis.Redis
) -> None:
    before = keyspace(clean_state)

    with pytest.raises(InvalidSessionIdError, match="Invalid session id"):
        refuse(entry, session_id)

    assert keyspace(clean_state) == before
    assert not os.path.exists(os.path.expanduser("~/.claudebox/sessions"))
