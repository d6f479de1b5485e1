"""Finding the files a run created: one listing before, stats and changed directories after."""

from __future__ import annotations

import os
from pathlib import Path

from claudebox_pool.workers.workspace_scan import RACY_NS, Snapshot


def _age(path: Path) -> None:
    """Date a directory back past the racy window, as one made long before a run would be."""
    old = os.stat(path).st_mtime_ns - 10 * RACY_NS
    os.utime(path, ns=(old, old))


def test_created_lists_new_nested_files_and_leaves_git_out(tmp_path: Path) -> None:
    (tmp_path / "old.txt").write_text("")
    before = Snapshot.take(tmp_path)
    (tmp_path / "src" / "pkg").mkdir(parents=True)
    (tmp_path / "src" / "pkg" / "mod.py").write_text("")
    (tmp_path / "README.md").write_text("")
    (tmp_path / ".git" / "objects").mkdir(parents=True)
    (tmp_path / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (tmp_path / ".gitignore").write_text("")
    (tmp_path / "old.txt").write_text("changed, not created")

    found = before.created(100, 10_000)

    assert found.listed == [".gitignore", "README.md", "src/pkg/mod.py"]
    assert found.count == 3


def test_created_lists_links_without_following_them(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("host data")
    ws = tmp_path / "ws"
    ws.mkdir()
    before = Snapshot.take(ws)
    (ws / "to-dir").symlink_to(outside)
    (ws / "to-file").symlink_to(outside / "secret.txt")
    (ws / "loop").symlink_to(ws)

    assert before.created(100, 10_000).listed == ["loop", "to-dir", "to-file"]


def test_an_unchanged_directory_is_not_listed_again(tmp_path: Path) -> None:
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "a.txt").write_text("")
    _age(kept)
    before = Snapshot.take(tmp_path)
    # Written behind the directory's back with its mtime put back: a listing would see it,
    # a stat cannot, which shows that the unchanged directory was only stat-ed.
    status = os.stat(kept)
    (kept / "hidden.txt").write_text("")
    os.utime(kept, ns=(status.st_atime_ns, status.st_mtime_ns))
    (tmp_path / "new.txt").write_text("")

    assert before.created(100, 10_000).listed == ["new.txt"]


def test_a_directory_changed_just_before_the_snapshot_is_listed_again(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("")
    before = Snapshot.take(tmp_path)
    status = os.stat(tmp_path)
    (tmp_path / "b.txt").write_text("")
    # The same timestamp tick as the snapshot: only the racy rule catches the new file.
    os.utime(tmp_path, ns=(status.st_atime_ns, status.st_mtime_ns))

    assert before.created(100, 10_000).listed == ["b.txt"]


def test_names_past_either_cap_are_counted_not_kept(tmp_path: Path) -> None:
    before = Snapshot.take(tmp_path)
    for index in range(50):
        (tmp_path / f"file-{index:03d}").write_text("")

    by_count = before.created(10, 10_000)
    by_bytes = before.created(100, 8 * 5)

    assert (len(by_count.listed), by_count.count) == (10, 50)
    assert (len(by_bytes.listed), by_bytes.count, by_bytes.listed_bytes) == (5, 50, 40)
