"""The on-disk session store: the seed's layout, atomic session.json, append-only history."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from claudebox_pool.tasks.errors import (
    InvalidSessionIdError,
    LockLostError,
    SessionAlreadyExistsError,
    SessionCorruptedError,
    SessionNotFoundError,
)
from claudebox_pool.tasks.models import HistoryEntry, SessionRecord, utc_now
from claudebox_pool.workers.store import SessionStore, unguarded


def new_record(store: SessionStore, session_id: str = "proj", fence: int = 1) -> SessionRecord:
    now = utc_now()
    return SessionRecord(
        session_id=session_id,
        created_at=now,
        updated_at=now,
        last_accessed=now,
        workspace_path=str(store.paths(session_id).workspace),
        fence=fence,
    )


@pytest.fixture
def store(tmp_path: Path) -> SessionStore:
    return SessionStore(tmp_path / "sessions")


@pytest.fixture
def created(store: SessionStore) -> SessionRecord:
    return store.create(new_record(store))


def lost() -> None:
    raise LockLostError("proj")


# --- layout --------------------------------------------------------------------------------------


def test_create_lays_out_the_seeds_directories_and_files(store: SessionStore) -> None:
    store.create(new_record(store))

    root = store.root / "proj"
    assert (root / "workspace").is_dir()
    assert json.loads((root / ".claudebox" / "session.json").read_bytes())["session_id"] == "proj"
    assert [e.action for e in store.history("proj")] == ["session_created"]


def test_create_refuses_an_existing_session(store: SessionStore, created: SessionRecord) -> None:
    with pytest.raises(SessionAlreadyExistsError, match="Session 'proj' already exists"):
        store.create(new_record(store))


@pytest.mark.parametrize("session_id", ["../x", ".", "..", "a/b", "", "x" * 256])
def test_paths_refuse_an_id_that_could_escape_the_root(
    store: SessionStore, session_id: str
) -> None:
    with pytest.raises(InvalidSessionIdError):
        store.paths(session_id)


def test_ids_lists_only_directories_with_valid_names(store: SessionStore) -> None:
    store.create(new_record(store, "good-one"))
    (store.root / "has space").mkdir()
    (store.root / "stray-file").write_text("")
    (store.root / "linked").symlink_to(store.root / "good-one")

    assert list(store.ids()) == ["good-one"]


# --- session.json --------------------------------------------------------------------------------


def test_save_replaces_session_json_and_leaves_no_temporary_file(
    store: SessionStore, created: SessionRecord
) -> None:
    store.save(created.model_copy(update={"total_commands": 7}), unguarded)

    meta = store.paths("proj").meta
    assert sorted(os.listdir(meta)) == ["agent-home", "history.jsonl", "session.json"]
    assert store.load("proj").total_commands == 7


def test_save_by_a_stale_writer_with_a_lower_fence_raises_lock_lost(
    store: SessionStore, created: SessionRecord
) -> None:
    store.save(created.model_copy(update={"fence": 5, "total_commands": 2}), unguarded)

    with pytest.raises(LockLostError):
        store.save(created.model_copy(update={"fence": 4, "total_commands": 99}), unguarded)

    assert store.load("proj").total_commands == 2
    assert sorted(os.listdir(store.paths("proj").meta)) == [
        "agent-home",
        "history.jsonl",
        "session.json",
    ]


def test_save_checks_the_guard_before_writing(store: SessionStore, created: SessionRecord) -> None:
    with pytest.raises(LockLostError):
        store.save(created.model_copy(update={"total_commands": 99}), lost)

    assert store.load("proj").total_commands == 0


def test_load_of_a_missing_session_raises_session_not_found(store: SessionStore) -> None:
    with pytest.raises(SessionNotFoundError, match="Session 'proj' not found"):
        store.load("proj")


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "is missing"),
        (b"", "is not valid JSON"),
        (b"\x00\xffgarbage", "is not valid JSON"),
        (b'{"session_id": "proj", "created_at": "2025-01-01T10:0', "is not valid JSON"),
        (b'{"session_id": "proj"}', "lacks required fields"),
        (b"[]", "lacks required fields"),
        (b'"just a string"', "lacks required fields"),
    ],
    ids=["missing", "empty", "garbage", "partial", "fields-missing", "a-list", "a-string"],
)
def test_unreadable_session_json_raises_session_corrupted_naming_the_file(
    store: SessionStore, created: SessionRecord, content: bytes | None, problem: str
) -> None:
    session_json = store.paths("proj").session_json
    if content is None:
        session_json.unlink()
    else:
        session_json.write_bytes(content)

    with pytest.raises(SessionCorruptedError) as raised:
        store.load("proj")

    assert str(raised.value).startswith(f"Session 'proj' is corrupted: {session_json} {problem}")


# --- history.jsonl -------------------------------------------------------------------------------


def test_history_reads_back_appended_entries_in_order(
    store: SessionStore, created: SessionRecord
) -> None:
    first = HistoryEntry(action="code_execution", context={"prompt": "ls", "success": True})
    rest = [
        HistoryEntry(action="file_created", context={"file": "a.py"}),
        HistoryEntry(action="file_created", context={"file": "b.py"}),
    ]
    store.append_history("proj", first, unguarded)
    store.append_history_many("proj", rest, unguarded)

    assert store.history("proj")[1:] == [first, *rest]


def test_history_is_one_json_object_per_line(store: SessionStore, created: SessionRecord) -> None:
    store.append_history(
        "proj", HistoryEntry(action="note", context={"text": "two\nlines"}), unguarded
    )

    lines = store.paths("proj").history.read_text().splitlines()
    assert [json.loads(line)["action"] for line in lines] == ["session_created", "note"]
    assert set(json.loads(lines[1])) == {"timestamp", "action", "context"}


def test_append_history_checks_the_guard_before_writing(
    store: SessionStore, created: SessionRecord
) -> None:
    with pytest.raises(LockLostError):
        store.append_history("proj", HistoryEntry(action="late"), lost)

    assert [e.action for e in store.history("proj")] == ["session_created"]


def test_history_of_a_session_without_history_file_is_empty(
    store: SessionStore, created: SessionRecord
) -> None:
    store.paths("proj").history.unlink()

    assert store.history("proj") == []


# --- workspace -----------------------------------------------------------------------------------


def test_remove_deletes_a_link_inside_the_workspace_but_not_its_target(
    store: SessionStore, created: SessionRecord, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("host data")
    ws = store.paths("proj").workspace
    (ws / "to-dir").symlink_to(outside)
    (ws / "to-file").symlink_to(outside / "keep.txt")

    store.remove("proj", unguarded)

    assert not (store.root / "proj").exists()
    assert (outside / "keep.txt").read_text() == "host data"


def test_remove_checks_the_guard_before_deleting(
    store: SessionStore, created: SessionRecord
) -> None:
    with pytest.raises(LockLostError):
        store.remove("proj", lost)

    assert store.exists("proj")


def test_recent_history_reads_only_whole_lines_from_the_tail(
    store: SessionStore, created: SessionRecord
) -> None:
    entries = [HistoryEntry(action="step", context={"n": n}) for n in range(200)]
    store.append_history_many(created.session_id, entries, unguarded)
    line_bytes = len(entries[-1].model_dump_json()) + 1

    recent = store.recent_history(created.session_id, max_bytes=line_bytes * 10 + 5)

    assert [entry.context["n"] for entry in recent] == list(range(190, 200))
    assert len(store.recent_history(created.session_id, max_bytes=10**9)) == 201
