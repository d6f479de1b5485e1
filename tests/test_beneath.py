"""Paths under a root a sandbox controls: links inside are followed (openat2), links out are
refused, and without openat2 no link is followed at all."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from claudebox_pool.tasks.errors import InvalidRequestError
from claudebox_pool.workers import beneath


@pytest.fixture
def root(tmp_path: Path) -> Iterator[int]:
    (tmp_path / "ws" / "d").mkdir(parents=True)
    (tmp_path / "ws" / "d" / "f.txt").write_text("inside\n")
    (tmp_path / "secret.txt").write_text("outside\n")
    (tmp_path / "ws" / "in").symlink_to("d/f.txt")
    (tmp_path / "ws" / "up").symlink_to("../secret.txt")
    (tmp_path / "ws" / "abs").symlink_to(tmp_path / "ws" / "d")
    fd = os.open(tmp_path / "ws", beneath.DIR)
    yield fd
    os.close(fd)


def read(root: int, path: str) -> str:
    with os.fdopen(beneath.open_beneath(root, path, os.O_RDONLY), "r") as handle:
        return handle.read()


@pytest.mark.parametrize("path", ["up", "abs/f.txt", "d/../../secret.txt"])
def test_a_path_leading_out_is_refused(root: int, path: str) -> None:
    with pytest.raises(InvalidRequestError, match="leads out"):
        read(root, path)


def test_a_link_inside_is_followed(root: int) -> None:
    assert read(root, "in") == "inside\n"
    assert read(root, "d/f.txt") == "inside\n"


def test_without_openat2_no_link_is_followed(root: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(beneath, "_openat2_works", False)

    assert read(root, "d/f.txt") == "inside\n"
    for path in ("in", "up", "abs/f.txt"):
        with pytest.raises(InvalidRequestError, match="symbolic link"):
            read(root, path)


def test_a_write_replaces_a_link_rather_than_writing_through_it(root: int, tmp_path: Path) -> None:
    folder = beneath.make_dirs(root, "new/deeper", None)
    try:
        os.symlink("../../../secret.txt", "target", dir_fd=folder)
        size = beneath.place(
            folder, "target", io.BytesIO(b"new\n"), chunk_bytes=2, owner=None, check=lambda: None
        )
    finally:
        os.close(folder)

    assert size == 4
    assert (tmp_path / "secret.txt").read_text() == "outside\n"
    written = tmp_path / "ws" / "new" / "deeper" / "target"
    assert not written.is_symlink() and written.read_text() == "new\n"
    assert sorted(os.listdir(written.parent)) == ["target"]
