"""Finding the files a run created: one listing before, stats and changed directories after."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from claudebox_pool.workers.workspace_scan import Snapshot


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


def test_unchanged_directories_are_only_stat_ed_after_the_run(tmp_path: Path) -> None:
    for directory in range(20):
        (tmp_path / f"d{directory}").mkdir()
        for index in range(1000):
            (tmp_path / f"d{directory}" / f"f{index}").touch()
    (tmp_path / "d7" / "new").touch()

    def fastest(action: Callable[[], object]) -> float:
        timings = []
        for _ in range(3):
            started = time.perf_counter()
            action()
            timings.append(time.perf_counter() - started)
        return min(timings)

    # No racy window: the directories were all just made.
    before = Snapshot.take(tmp_path, racy_ns=0)
    listing = fastest(lambda: Snapshot.take(tmp_path, racy_ns=0))
    after = fastest(lambda: before.created(100, 10_000))

    assert before.created(100, 10_000).listed == []
    assert after < listing / 5  # measured here: about 1/50 (21 stats against 20,000 entries)


def test_a_file_hidden_by_setting_the_directory_mtime_back_is_still_found(tmp_path: Path) -> None:
    (tmp_path / "kept").mkdir()
    before = Snapshot.take(tmp_path, racy_ns=0)
    status = os.stat(tmp_path / "kept")
    (tmp_path / "kept" / "hidden.txt").touch()
    os.utime(tmp_path / "kept", ns=(status.st_atime_ns, status.st_mtime_ns))

    assert before.created(100, 10_000).listed == ["kept/hidden.txt"]


def test_a_directory_replaced_by_a_link_is_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "host-secret.txt").touch()
    ws = tmp_path / "ws"
    (ws / "sub").mkdir(parents=True)
    before = Snapshot.take(ws, racy_ns=0)
    (ws / "sub").rmdir()
    (ws / "sub").symlink_to(outside)

    assert before.created(100, 10_000).listed == ["sub"]


def test_names_past_either_cap_are_counted_not_kept(tmp_path: Path) -> None:
    before = Snapshot.take(tmp_path)
    for index in range(50):
        (tmp_path / f"file-{index:03d}").write_text("")

    by_count = before.created(10, 10_000)
    by_bytes = before.created(100, 8 * 5)

    assert (len(by_count.listed), by_count.count) == (10, 50)
    assert (len(by_bytes.listed), by_bytes.count, by_bytes.listed_bytes) == (5, 50, 40)
