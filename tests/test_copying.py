"""Copying trees for checkpoints, restores, templates and forks, on the real filesystem."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from claudebox_pool.workers.copying import copy_tree, replace_dir


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "workspace"
    (root / "src" / "deep").mkdir(parents=True)
    (root / "src" / "app.py").write_text("print(1)\n")
    (root / "src" / "deep" / "data.bin").write_bytes(bytes(range(256)) * 40)
    script = root / "run.sh"
    script.write_text("#!/bin/sh\necho run\n")
    script.chmod(0o755)
    os.utime(root / "src" / "app.py", ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    (root / "link-inside").symlink_to("src/app.py")
    return root


def snapshot(root: Path) -> dict[str, tuple[str, bytes | str, int]]:
    """Every entry below ``root``: its kind, its content (or link target) and its mode."""
    found: dict[str, tuple[str, bytes | str, int]] = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        name = str(path.relative_to(root))
        if path.is_symlink():
            found[name] = ("link", os.readlink(path), 0)
        elif path.is_dir():
            found[name] = ("dir", "", info.st_mode)
        else:
            found[name] = ("file", path.read_bytes(), info.st_mode)
    return found


def test_a_copy_has_the_same_files_modes_links_and_times(tree: Path, tmp_path: Path) -> None:
    stats = copy_tree(tree, tmp_path / "copy")

    assert snapshot(tmp_path / "copy") == snapshot(tree)
    copied = tmp_path / "copy" / "src" / "app.py"
    assert copied.stat().st_mtime_ns == (tree / "src" / "app.py").stat().st_mtime_ns
    assert (stats.files, stats.linked) == (3, 0)
    assert stats.cloned + stats.copied == 3


def test_links_are_copied_as_links_and_never_followed(tree: Path, tmp_path: Path) -> None:
    secret = tmp_path / "outside-secret.txt"
    secret.write_text("not for the copy")
    (tree / "escape").symlink_to(secret)

    copy_tree(tree, tmp_path / "copy")

    escape = tmp_path / "copy" / "escape"
    assert escape.is_symlink()
    assert os.readlink(escape) == str(secret)
    assert not any(
        p.read_bytes() == b"not for the copy"
        for p in (tmp_path / "copy").rglob("*")
        if p.is_file() and not p.is_symlink()
    )


def test_special_files_are_left_out_and_named(tree: Path, tmp_path: Path) -> None:
    os.mkfifo(tree / "pipe")

    stats = copy_tree(tree, tmp_path / "copy")

    assert stats.skipped == ["pipe"]
    assert not (tmp_path / "copy" / "pipe").exists()


def test_unchanged_files_are_linked_to_the_earlier_tree_and_changed_ones_stored_anew(
    tree: Path, tmp_path: Path
) -> None:
    copy_tree(tree, tmp_path / "first")
    with (tree / "src" / "app.py").open("a") as handle:  # written in place: same inode
        handle.write("print(2)\n")

    stats = copy_tree(tree, tmp_path / "second", link_dest=tmp_path / "first")

    def inode(root: Path, name: str) -> int:
        return (root / name).stat().st_ino

    assert inode(tmp_path / "second", "run.sh") == inode(tmp_path / "first", "run.sh")
    assert inode(tmp_path / "second", "src/app.py") != inode(tmp_path / "first", "src/app.py")
    assert (tmp_path / "first" / "src" / "app.py").read_text() == "print(1)\n"
    assert (stats.linked, stats.files) == (2, 3)


def test_a_copy_never_shares_an_inode_with_its_source(tree: Path, tmp_path: Path) -> None:
    copy_tree(tree, tmp_path / "copy")

    (tree / "run.sh").write_text("changed in place\n")

    assert (tmp_path / "copy" / "run.sh").read_text() == "#!/bin/sh\necho run\n"


def test_replace_dir_swaps_in_the_new_tree_and_removes_the_old(tree: Path, tmp_path: Path) -> None:
    replacement = tmp_path / "replacement"
    replacement.mkdir()
    (replacement / "only.txt").write_text("new")

    replace_dir(tree, replacement)

    assert [p.name for p in tree.iterdir()] == ["only.txt"]
    assert not replacement.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["workspace"]
