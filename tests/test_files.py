"""box.files, upload and download: a session's files in and out through a real worker, the
bytes through Redis in chunks."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path

import pytest
import redis

from claudebox_pool import (
    ClaudeBox,
    ClaudeBoxError,
    InvalidRequestError,
    JobResult,
    TransferResult,
    submit,
)
from claudebox_pool.producer import files as producer_files
from claudebox_pool.tasks import keys, names
from claudebox_pool.tasks.settings import get_settings
from claudebox_pool.tasks.transfer import Receiver, Sender
from claudebox_pool.tasks.workspace_files import FileRequest, TreeRequest
from tests.support.processes import claudebox_pool, wait_for

pytestmark = pytest.mark.usefixtures("pool", "clean_state")


def workspace(session_id: str) -> Path:
    return get_settings().sessions_root / session_id / "workspace"


def test_write_read_list_remove_round_trip(clean_state: redis.Redis) -> None:
    async def run() -> tuple[bytes, bytes, list[str], list[str]]:
        async with ClaudeBox(session_id="files-basic") as box:
            await box.files.write("src/deep/app.py", "print('hi')\n")
            await box.files.write("blob.bin", bytes(range(256)) * 10_000)
            result = await box.code("cat src/deep/app.py && ls -l blob.bin")
            assert result.success, result.error
            text = await box.files.read("src/deep/app.py")
            blob = await box.files.read("blob.bin")
            names = [info.path for info in await box.files.list()]
            await box.files.remove("src")
            after = [info.path for info in await box.files.list(".")]
            return text, blob, names, after

    text, blob, names, after = asyncio.run(run())

    assert text == b"print('hi')\n"
    assert blob == bytes(range(256)) * 10_000
    assert names == ["blob.bin", "src"]
    assert after == ["blob.bin"]
    assert not list(clean_state.scan_iter(keys.transfer_data("*")))
    history = workspace("files-basic").parent / ".claudebox" / "history.jsonl"
    noted = [json.loads(line) for line in history.read_text().splitlines()]
    assert [(e["action"], e["context"]["path"]) for e in noted if "file" in e["action"]] == [
        ("file_written", "src/deep/app.py"),
        ("file_written", "blob.bin"),
        ("file_removed", "src"),
    ]


def test_a_path_out_of_the_workspace_is_refused_before_anything_is_queued() -> None:
    # The session does not exist: only a check made before sending answers InvalidRequestError.
    files = ClaudeBox(session_id="never-made").files
    calls = [
        files.read("../secret"),
        files.read_to("/etc/hostname", io.BytesIO()),
        files.write("/etc/evil", b"x"),
        files.write("a/../../evil", "x"),
        files.list(".."),
        files.remove("../../sessions"),
        files.upload(Path(__file__).parent, to="../up"),
        files.download(Path("/nonexistent"), path="/"),
    ]

    async def run() -> list[BaseException | None]:
        outcomes: list[BaseException | None] = []
        for call in calls:
            try:
                await call
            except Exception as exc:
                outcomes.append(exc)
            else:
                outcomes.append(None)
        return outcomes

    outcomes = asyncio.run(run())

    assert all(isinstance(each, InvalidRequestError) for each in outcomes), outcomes
    assert all("leaves the session's workspace" in str(each) for each in outcomes)


def test_a_symlink_out_of_the_workspace_is_refused_for_every_operation() -> None:
    session_dir = get_settings().sessions_root / "files-links"
    links = "ln -s / root && ln -s ../.. up && ln -s /etc/hostname host && mkdir d && " + (
        "echo in > d/in.txt && ln -s d/in.txt inside"
    )

    async def run() -> tuple[list[BaseException | None], bytes]:
        async with ClaudeBox(session_id="files-links") as box:
            assert (await box.code(links)).success
            calls = [
                box.files.read("host"),
                box.files.read("root/etc/hostname"),
                box.files.read("up/files-links/.claudebox/session.json"),
                box.files.write("up/evil.txt", b"x"),
                box.files.write("root/etc/evil.txt", b"x"),
                box.files.list("root"),
                box.files.list("up"),
                box.files.remove("up/files-links/.claudebox/session.json"),
                box.files.download(session_dir.parent / "never", path="up"),
            ]
            outcomes: list[BaseException | None] = []
            for call in calls:
                try:
                    await call
                except Exception as exc:
                    outcomes.append(exc)
                else:
                    outcomes.append(None)
            # A link that stays inside is followed; removing a link removes the link only.
            inside = await box.files.read("inside")
            await box.files.remove("root")
            return outcomes, inside

    outcomes, inside = asyncio.run(run())

    assert all(isinstance(each, InvalidRequestError) for each in outcomes), outcomes
    assert all("symbolic link" in str(each) for each in outcomes), outcomes
    assert inside == b"in\n"
    assert not (session_dir.parent.parent / "evil.txt").exists()
    assert not Path("/etc/evil.txt").exists()
    assert (session_dir / ".claudebox" / "session.json").is_file()
    assert not (session_dir / "workspace" / "root").is_symlink()


def test_tar_members_leading_out_are_left_out_of_an_upload() -> None:
    crafted = io.BytesIO()
    with tarfile.open(fileobj=crafted, mode="w") as tar:
        for name, kind, target in (
            ("ok.txt", tarfile.REGTYPE, ""),
            ("../evil-up.txt", tarfile.REGTYPE, ""),
            ("/evil-abs.txt", tarfile.REGTYPE, ""),
            ("link-out", tarfile.SYMTYPE, "/etc"),
            ("link-up", tarfile.SYMTYPE, "../../.."),
            ("up/evil-through-link.txt", tarfile.REGTYPE, ""),
            ("dev-null", tarfile.CHRTYPE, ""),
        ):
            member = tarfile.TarInfo(name)
            member.type, member.linkname = kind, target
            data = b"payload\n" if kind == tarfile.REGTYPE else b""
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    root = get_settings().sessions_root

    async def run() -> TransferResult:
        async with ClaudeBox(session_id="files-tar") as box:
            assert (await box.code("ln -s ../.. up")).success
            request = TreeRequest(session_id="files-tar", token=uuid.uuid4().hex)

            def produce(out: Sender) -> None:
                out.write(crafted.getvalue())

            return await producer_files._send(names.FILES_UPLOAD, request, produce)

    done = asyncio.run(run())

    assert (workspace("files-tar") / "ok.txt").read_bytes() == b"payload\n"
    assert sorted(done.skipped) == sorted(
        [
            "../evil-up.txt",
            "/evil-abs.txt",
            "link-out",
            "link-up",
            "up/evil-through-link.txt",
            "dev-null",
        ]
    )
    assert not list(root.parent.rglob("evil-*"))
    assert not (workspace("files-tar") / "link-out").exists()


def test_written_files_belong_to_the_sessions_sandbox_user_who_can_edit_them() -> None:
    async def run() -> tuple[bool, bytes]:
        async with ClaudeBox(session_id="files-owner") as box:
            await box.files.write("new/dir/notes.txt", "one\n")
            await box.upload(Path(__file__).parent / "support", to="tree")
            edited = await box.code(
                "echo two >> new/dir/notes.txt && touch tree/added && rm new/dir/notes.txt && "
                "echo back > new/dir/notes.txt"
            )
            return edited.success, await box.files.read("new/dir/notes.txt")

    success, text = asyncio.run(run())

    uid = json.loads((workspace("files-owner").parent / ".claudebox" / "session.json").read_text())[
        "sandbox_uid"
    ]
    assert uid is not None and uid != 0
    assert success and text == b"back\n"
    owners = {path.lstat().st_uid for path in workspace("files-owner").rglob("*")}
    assert owners == {uid}


def test_writes_wait_for_a_running_code_call_of_another_producer(clean_state: redis.Redis) -> None:
    async def run() -> tuple[bytes, float, float]:
        async with ClaudeBox(session_id="files-order") as first:
            ended: dict[str, float] = {}

            async def slow_code() -> None:
                assert (await first.code("sleep 2; echo code > f.txt")).success
                ended["code"] = time.monotonic()

            running = asyncio.create_task(slow_code())
            await asyncio.to_thread(
                wait_for,
                lambda: clean_state.exists(keys.session_lock("files-order")),
                30,
                "the lock",
            )
            second = await ClaudeBox.reconnect("files-order")
            await second.files.write("f.txt", "files\n")
            ended["write"] = time.monotonic()
            await running
            return await second.files.read("f.txt"), ended["code"], ended["write"]

    text, code_ended, write_ended = asyncio.run(run())

    assert text == b"files\n"
    assert write_ended >= code_ended


def test_calls_on_one_box_keep_their_order() -> None:
    async def run() -> bytes:
        async with ClaudeBox(session_id="files-one-box") as box:
            await asyncio.gather(
                box.code("sleep 1; echo code > f.txt"),
                box.files.write("f.txt", "files\n"),
                box.code("cat f.txt > copy.txt"),
            )
            return await box.files.read("copy.txt")

    assert asyncio.run(run()) == b"files\n"


def test_upload_and_download_keep_links_inside_the_tree(tmp_path: Path) -> None:
    source = tmp_path / "source"
    (source / "pkg" / "sub").mkdir(parents=True)
    (source / "pkg" / "mod.py").write_text("x = 1\n")
    (source / "pkg" / "sub" / "data.bin").write_bytes(os.urandom(3_000_000))
    (source / "empty").mkdir()
    (source / "link-in").symlink_to("pkg/mod.py")
    (source / "link-out").symlink_to("/etc/hostname")
    (source / "pkg" / "hard.py").hardlink_to(source / "pkg" / "mod.py")
    back = tmp_path / "back"

    async def run() -> tuple[TransferResult, TransferResult, TransferResult]:
        async with ClaudeBox(session_id="files-tree") as box:
            up = await box.upload(source, to="proj")
            assert (await box.code("ln -s /etc proj/host-etc && echo new > proj/new.txt")).success
            down = await box.download(back)
            part = await box.files.download(tmp_path / "part", path="proj/pkg")
            return up, down, part

    up, down, part = asyncio.run(run())

    assert up.skipped == ["link-out"]
    assert down.skipped == ["proj/host-etc"]
    got = back / "proj"
    assert (got / "pkg" / "sub" / "data.bin").read_bytes() == (
        source / "pkg" / "sub" / "data.bin"
    ).read_bytes()
    assert (got / "link-in").readlink() == Path("pkg/mod.py")
    assert (got / "pkg" / "hard.py").read_text() == "x = 1\n"
    assert (got / "empty").is_dir()
    assert not (got / "link-out").exists() and not (got / "host-etc").exists()
    assert (got / "new.txt").read_text() == "new\n"
    assert sorted(p.name for p in (tmp_path / "part").iterdir()) == ["hard.py", "mod.py", "sub"]
    assert part.files == 3


def test_template_dir_seeds_a_new_session(tmp_path: Path) -> None:
    (tmp_path / "template" / "src").mkdir(parents=True)
    (tmp_path / "template" / "src" / "main.py").write_text("print('from template')\n")

    async def run() -> str:
        async with ClaudeBox(session_id="files-templ", template_dir=tmp_path / "template") as box:
            result = await box.code("python3 src/main.py")
            return result.response

    assert "from template" in asyncio.run(run())
    with pytest.raises(InvalidRequestError, match="not a directory"):
        ClaudeBox(session_id="files-templ2", template_dir=tmp_path / "missing")


def test_cli_files_get_put_ls_rm_and_download(tmp_path: Path) -> None:
    asyncio.run(_make("files-cli"))
    local = tmp_path / "in.txt"
    local.write_text("from disk\n")

    put = claudebox_pool("files", "put", "files-cli", str(local), "docs/in.txt")
    piped = subprocess.run(
        [
            sys.executable,
            "-m",
            "claudebox_pool.producer.cli",
            "files",
            "put",
            "files-cli",
            "-",
            "piped.txt",
        ],
        input=b"from stdin\n",
        capture_output=True,
        check=False,
    )
    listed = claudebox_pool("files", "ls", "files-cli", "--json")
    got = claudebox_pool("files", "get", "files-cli", "piped.txt", "-")
    to_file = claudebox_pool("files", "get", "files-cli", "docs/in.txt", str(tmp_path / "out.txt"))
    removed = claudebox_pool("files", "rm", "files-cli", "piped.txt")
    downloaded = claudebox_pool("download", "files-cli", str(tmp_path / "dl"), "--path", "docs")
    escape = claudebox_pool("files", "get", "files-cli", "../session.json", "-")
    missing = claudebox_pool("files", "get", "files-cli", "nope.txt", "-")

    assert put.returncode == 0, put.stderr
    assert piped.returncode == 0, piped.stderr
    assert [json.loads(line)["path"] for line in listed.stdout.splitlines()] == [
        "docs",
        "piped.txt",
    ]
    assert got.returncode == 0 and got.stdout == "from stdin\n"
    assert to_file.returncode == 0 and (tmp_path / "out.txt").read_text() == "from disk\n"
    assert removed.returncode == 0 and not (workspace("files-cli") / "piped.txt").exists()
    assert downloaded.returncode == 0 and (tmp_path / "dl" / "in.txt").read_text() == "from disk\n"
    for refused in (escape, missing):
        assert refused.returncode == 2, refused.stderr
        assert refused.stderr.startswith("error:") and "Traceback" not in refused.stderr


async def _make(session_id: str) -> None:
    async with ClaudeBox(session_id=session_id):
        pass


def test_a_write_the_producer_abandons_leaves_nothing_behind(clean_state: redis.Redis) -> None:
    class LocalDiskGone(Exception):
        pass

    def produce(out: Sender) -> None:
        out.write(os.urandom(3 << 20))
        raise LocalDiskGone

    async def run() -> bytes:
        async with ClaudeBox(session_id="files-abandon") as box:
            request = FileRequest(session_id="files-abandon", path="half.bin", token="t" * 32)
            with pytest.raises(LocalDiskGone):
                await producer_files._send(names.FILES_WRITE, request, produce)
            # The worker learns of it from the stream, drops its half file and the session
            # takes its next call.
            await box.files.write("whole.txt", "ok")
            return await box.files.read("whole.txt")

    assert asyncio.run(run()) == b"ok"
    assert sorted(path.name for path in workspace("files-abandon").iterdir()) == ["whole.txt"]
    assert not list(clean_state.scan_iter(f"{keys.PREFIX}transfer:*"))


def test_a_read_the_producer_abandons_stops_the_worker_at_once(
    clean_state: redis.Redis, tmp_path: Path
) -> None:
    class LocalDiskGone(Exception):
        pass

    def consume(got: Receiver) -> None:
        got.read(1 << 20)
        raise LocalDiskGone

    async def run() -> None:
        async with ClaudeBox(session_id="files-stop") as box:
            await box.files.write("big.bin", os.urandom(40 << 20))
            with pytest.raises(InvalidRequestError, match="cannot write"):
                await box.files.read_to("big.bin", tmp_path / "no" / "such" / "dir.bin")
            request = FileRequest(session_id="files-stop", path="big.bin", token="s" * 32)
            with pytest.raises(LocalDiskGone):
                await producer_files._receive(names.FILES_READ, request, consume)

    asyncio.run(run())

    # Well before CLAUDEBOX_TRANSFER_IDLE_S (120 s): the worker read the producer's stop.
    wait_for(lambda: not list(clean_state.scan_iter(f"{keys.PREFIX}transfer:*")), 30, "keys gone")


def test_submit_downloads_what_each_session_changed_ephemeral_ones_included(
    tmp_path: Path,
) -> None:
    told: dict[str, TransferResult | ClaudeBoxError] = {}

    async def run() -> list[JobResult]:
        async with ClaudeBox(session_id="dl-kept") as box:
            # Stamped an hour back: the batch's first job may start within the clock's grain.
            await box.files.write("before.txt", "old\n")
            assert (await box.code("touch -d '1 hour ago' before.txt")).success
        return await submit(
            [
                {"id": "kept", "session_id": "dl-kept", "prompt": "echo k > made.txt"},
                {"id": "gone", "prompt": "mkdir -p sub && echo e > sub/made.txt"},
            ],
            download=tmp_path,
            on_download=told.__setitem__,
        )

    results = asyncio.run(run())

    assert all(result.success for result in results)
    ephemeral = results[1].session_id
    assert sorted(told) == sorted(["dl-kept", ephemeral])
    assert all(isinstance(outcome, TransferResult) for outcome in told.values())
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == [
        "dl-kept/made.txt",
        f"{ephemeral}/sub/made.txt",
    ]
    assert not workspace(ephemeral).exists()
