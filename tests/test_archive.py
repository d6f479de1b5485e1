"""Archives through the real pool: archive, clean up, restore with the CLI, byte for byte; and
what an archive refuses to carry in or out."""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from claudebox_pool import ClaudeBox, InvalidRequestError, SessionAlreadyExistsError
from claudebox_pool.producer import lifecycle
from claudebox_pool.tasks import keys
from claudebox_pool.tasks.settings import get_settings
from tests.support.processes import claudebox_pool

pytestmark = pytest.mark.usefixtures("pool", "clean_state")


@pytest.fixture(autouse=True)
def archives() -> Iterator[Path]:
    root = get_settings().archives_root
    shutil.rmtree(root, ignore_errors=True)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def session_dir(session_id: str) -> Path:
    return get_settings().sessions_root / session_id


def everything(root: Path) -> dict[str, tuple[int, bytes | str]]:
    """Each entry below ``root``: its mode and its bytes, a link's target, or nothing (dirs)."""
    found: dict[str, tuple[int, bytes | str]] = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        if path.is_symlink():
            content: bytes | str = os.readlink(path)
        elif path.is_file():
            content = path.read_bytes()
        else:
            content = ""
        found[str(path.relative_to(root))] = (info.st_mode, content)
    return found


SESSION_FILES = (
    "mkdir -p src/deep && echo 'print(1)' > src/main.py && head -c 100000 /dev/urandom > blob"
    " && printf '#!/bin/sh\\necho hi\\n' > run.sh && chmod 755 run.sh"
    " && ln -s src/main.py main-link && ln -s ../blob src/deep/up-link && touch src/deep/empty"
)


def test_archive_cleanup_restore_round_trips_the_session_byte_for_byte(
    clean_state: redis.Redis,
) -> None:
    async def build() -> None:
        async with ClaudeBox(session_id="keeper") as box:
            await box.code(SESSION_FILES)
            await box.checkpoint("v1")
            await box.code("echo 'print(2)' >> src/main.py")

    asyncio.run(build())
    before = everything(session_dir("keeper"))

    result = asyncio.run(ClaudeBox.cleanup_session("keeper", remove_workspace=True, archive=True))

    assert result.archive_path is not None
    archive = Path(result.archive_path)
    assert archive.parent == get_settings().archives_root
    assert not session_dir("keeper").exists()
    assert "keeper" not in [s.session_id for s in ClaudeBox.list_sessions()]
    # A Redis that never counted this session's locks (flushed, or another pool's) must not
    # leave the restored session.json with a fencing number above every new lock holder's.
    clean_state.delete(keys.session_fence("keeper"))

    done = claudebox_pool("sessions", "restore", archive.name)

    assert done.returncode == 0, done.stderr
    assert "restored session keeper" in done.stdout
    assert everything(session_dir("keeper")) == before
    assert "keeper" in [s.session_id for s in ClaudeBox.list_sessions()]

    async def continue_it() -> str:
        async with ClaudeBox.reconnect("keeper") as box:
            return (await box.code("cat src/main.py")).response

    assert asyncio.run(continue_it()) == "print(1)\nprint(2)\n"


def test_links_leading_out_of_the_workspace_are_left_out_of_the_archive() -> None:
    secret = get_settings().home / "host-secret.txt"
    secret.write_text("host secret\n")

    async def build() -> None:
        async with ClaudeBox(session_id="leaky") as box:
            await box.code("echo mine > mine.txt && ln -s mine.txt fine")

    asyncio.run(build())
    workspace = session_dir("leaky") / "workspace"
    (workspace / "absolute").symlink_to(secret)
    (workspace / "climbing").symlink_to("../../../host-secret.txt")
    (workspace / "to-meta").symlink_to("../.claudebox/session.json")

    result = asyncio.run(ClaudeBox.cleanup_session("leaky", remove_workspace=True, archive=True))

    assert result.archive_path is not None
    with tarfile.open(result.archive_path) as tar:
        names = set(tar.getnames())
        contents = b"".join(
            handle.read()
            for member in tar.getmembers()
            if member.isfile() and (handle := tar.extractfile(member)) is not None
        )
    assert {"leaky/workspace/mine.txt", "leaky/workspace/fine"} <= names
    assert not names & {f"leaky/workspace/{n}" for n in ("absolute", "climbing", "to-meta")}
    assert b"host secret" not in contents


def test_restore_refuses_a_session_that_exists() -> None:
    async def build() -> str | None:
        async with ClaudeBox(session_id="twice") as box:
            await box.code("echo 1 > one.txt")
        return (await ClaudeBox.cleanup_session("twice", archive=True)).archive_path

    archive = asyncio.run(build())  # archived, and kept (remove_workspace=False)

    assert archive is not None
    with pytest.raises(SessionAlreadyExistsError, match="twice"):
        asyncio.run(lifecycle.restore_archive(archive))


def test_restore_refuses_an_archive_outside_the_archive_directory(tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.tar.gz"
    with tarfile.open(outside, "w:gz") as tar:
        tar.add(tmp_path, arcname="x", recursive=False)

    with pytest.raises(InvalidRequestError, match="not in the archive directory"):
        asyncio.run(lifecycle.restore_archive(str(outside)))


def add(tar: tarfile.TarFile, name: str, data: bytes = b"", **fields: object) -> None:
    member = tarfile.TarInfo(name)
    member.size = len(data)
    for field, value in fields.items():
        setattr(member, field, value)
    tar.addfile(member, io.BytesIO(data) if data else None)


SESSION_JSON = (
    b'{"session_id": "evil", "created_at": "2025-01-01T10:00:00.000000", '
    b'"updated_at": "2025-01-01T10:00:00.000000", "last_accessed": "2025-01-01T10:00:00.000000", '
    b'"workspace_path": "/x/evil/workspace"}'
)


@pytest.mark.parametrize(
    "unsafe",
    [
        {"name": "evil/workspace/../../../../escaped.txt", "data": b"out"},
        {"name": "evil/workspace/ln", "type": tarfile.SYMTYPE, "linkname": "/etc/passwd"},
        {"name": "evil/workspace/dev", "type": tarfile.CHRTYPE, "devmajor": 1, "devminor": 3},
    ],
    ids=["dot-dot", "absolute-link", "device"],
)
def test_restore_refuses_an_archive_with_an_unsafe_member(
    archives: Path, unsafe: dict[str, object]
) -> None:
    archives.mkdir(parents=True)
    crafted = archives / "evil-20250101T100000000000.tar.gz"
    with tarfile.open(crafted, "w:gz") as tar:
        add(tar, "evil/.claudebox/session.json", SESSION_JSON)
        name, data = str(unsafe.pop("name")), unsafe.pop("data", b"")
        assert isinstance(data, bytes)
        add(tar, name, data, **unsafe)

    with pytest.raises(InvalidRequestError, match="is not a claudebox session archive"):
        asyncio.run(lifecycle.restore_archive(crafted.name))
    assert not session_dir("evil").exists()
    assert not list(get_settings().sessions_root.glob(".restore-*"))
    assert not (get_settings().home / "escaped.txt").exists()


def test_cleanup_with_archive_from_the_cli_names_the_archive() -> None:
    async def create() -> None:
        async with ClaudeBox(session_id="by-cli"):
            pass

    asyncio.run(create())

    done = claudebox_pool("sessions", "cleanup", "by-cli", "--archive", "--yes")

    assert done.returncode == 0, done.stderr
    assert "archived to" in done.stdout
    assert len(list(get_settings().archives_root.glob("by-cli-*.tar.gz"))) == 1
