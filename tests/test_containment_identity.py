"""Containment, identity: a sandbox is never host root nor the worker's user, holds no capability
on the host, cannot undo a read-only bind, and leaves nothing a host user can use.

Each test is an attack a prompt-injected agent would try, run through the real pool (a root
worker, bwrap, the shell agent, warm sandboxes) or a cold bwrap sandbox, as root.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from claudebox_pool import ClaudeBox
from claudebox_pool.producer.local_pool import run_dir
from claudebox_pool.tasks.settings import get_settings
from claudebox_pool.workers.runtimes.base import Identity, SandboxSpec
from claudebox_pool.workers.runtimes.bwrap import BwrapRuntime, launch_as
from claudebox_pool.workers.runtimes.launch import become
from tests.support.sandboxes import TEST_UID, owned

pytestmark = [
    pytest.mark.usefixtures("pool", "clean_state"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the attacks of a root worker's sandbox"),
]

NO_CAPABILITY = "0000000000000000"
NOBODY = 65534


def session_dir(session_id: str) -> Path:
    return get_settings().sessions_root / session_id


def sandbox_uid(session_id: str) -> int:
    record = json.loads((session_dir(session_id) / ".claudebox" / "session.json").read_text())
    uid = record["sandbox_uid"]
    assert isinstance(uid, int)
    return uid


async def run(session_id: str, command: str, **options: object) -> tuple[bool, str]:
    async with ClaudeBox(session_id=session_id, **options) as box:  # type: ignore[arg-type]
        result = await box.code(command)
        return result.success, result.response


def cap_eff(status: str) -> str:
    return next(line.split()[1] for line in status.splitlines() if line.startswith("CapEff:"))


def as_user(uid: int, command: list[str]) -> subprocess.CompletedProcess[str]:
    """``command`` run on the host by an unprivileged user (no group, no capability), its path
    resolved by that user's own shell: setpriv ran a program given by a path that user could
    not reach (measured here)."""
    user = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"]
    return subprocess.run(
        [*user, "sh", "-c", 'exec "$@"', "sh", *command],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


# --- identity ----------------------------------------------------------------------------------


def test_a_sandbox_runs_as_the_sessions_own_uid_with_no_capability() -> None:
    ok, out = asyncio.run(run("who", "cat /proc/self/status; touch made-here"))

    assert ok, out
    assert cap_eff(out) == NO_CAPABILITY
    made = (session_dir("who") / "workspace" / "made-here").stat()
    assert made.st_uid not in (0, os.geteuid())
    uid = sandbox_uid("who")
    assert (made.st_uid, made.st_gid) == (uid, uid)
    assert uid >= get_settings().sandbox_uid_base


def test_a_cold_sandbox_runs_as_its_identity_with_no_capability(tmp_path: Path) -> None:
    (tmp_path / "workspace").mkdir()
    (tmp_path / "home").mkdir()
    spec = owned(SandboxSpec("cold", tmp_path / "workspace", tmp_path / "home", 1, 256, 1))

    with BwrapRuntime().open(spec) as sandbox:
        result = sandbox.exec(
            ["sh", "-c", "cat /proc/self/status; touch made-here"], {"PATH": "/usr/bin"}, 20
        )

    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "workspace" / "made-here").stat().st_uid == TEST_UID
    assert cap_eff(result.stdout) == NO_CAPABILITY


def test_two_sessions_get_two_uids_and_cannot_reach_each_others_files() -> None:
    asyncio.run(run("alice", "echo alice-secret > secret"))
    asyncio.run(run("bob", "echo bob > note"))
    alice, bob = sandbox_uid("alice"), sandbox_uid("bob")
    secret = session_dir("alice") / "workspace" / "secret"

    as_bob = as_user(bob, ["sh", "-c", f"cat {secret}; echo tampered > {secret}"])

    assert alice != bob
    assert secret.stat().st_uid == alice
    assert "alice-secret" not in as_bob.stdout
    assert secret.read_text() == "alice-secret\n"


# --- read-only binds ---------------------------------------------------------------------------


@pytest.fixture
def escape() -> Iterator[Path]:
    """Where a sandbox that broke the read-only system would leave its mark (removed after)."""
    mark = Path("/usr/claudebox-escape")
    yield mark
    mark.unlink(missing_ok=True)


def test_the_system_cannot_be_remounted_writable(escape: Path) -> None:
    attack = (
        "mount -o remount,bind,rw /usr && touch /usr/claudebox-escape; "
        "unshare -Urm sh -c 'mount -o remount,bind,rw /usr && touch /usr/claudebox-escape'; "
        "test -e /usr/claudebox-escape"
    )

    ok, out = asyncio.run(run("remount-usr", attack))

    assert not ok, out
    assert not escape.exists()


def test_an_input_cannot_be_remounted_writable() -> None:
    asyncio.run(run("source-a", "echo original > data.txt"))
    attack = (
        "mount -o remount,bind,rw /inputs/a; "
        "unshare -Urm sh -c 'mount -o remount,bind,rw /inputs/a; echo x > /inputs/a/data.txt'; "
        "echo tampered > /inputs/a/data.txt"
    )

    async def scenario() -> tuple[bool, str]:
        async with ClaudeBox(session_id="reader-b", inputs={"a": "source-a"}) as box:
            tried = await box.code(attack)
            return tried.success, (await box.code("cat /inputs/a/data.txt")).response

    ok, seen = asyncio.run(scenario())

    assert not ok
    assert (session_dir("source-a") / "workspace" / "data.txt").read_text() == "original\n"
    assert seen == "original\n"


def test_host_passwd_cannot_be_opened_for_writing_nor_shadow_read() -> None:
    before = hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest()
    shadow = Path("/etc/shadow").read_text()

    # Opened for appending with nothing written: harmless to this host if it ever succeeded.
    wrote, _ = asyncio.run(run("passwd", ": >> /etc/passwd"))
    _, out = asyncio.run(run("shadow", "cat /etc/shadow"))

    assert not wrote
    assert hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest() == before
    assert not any(line in out for line in shadow.splitlines() if ":" in line)


# --- what a sandbox leaves on the host ---------------------------------------------------------


def test_a_setuid_shell_left_in_the_workspace_gives_a_host_user_nothing() -> None:
    ok, out = asyncio.run(
        run(
            "setuid",
            "cp /bin/bash rootsh && chown 0:0 rootsh && chmod 4755 rootsh && "
            "grep ' /workspace ' /proc/self/mountinfo",
        )
    )
    shell = session_dir("setuid") / "workspace" / "rootsh"

    used = as_user(NOBODY, [str(shell), "-p", "-c", "id -u"])

    assert ok, out
    assert "nosuid" in out.split(" - ")[0]
    assert used.returncode != 0
    assert used.stdout.strip() != "0"
    assert shell.stat().st_uid == sandbox_uid("setuid") != 0


def test_the_home_the_sessions_root_and_the_run_directory_are_private() -> None:
    asyncio.run(run("private", "true"))
    settings = get_settings()

    for directory in (settings.home, settings.sessions_root, run_dir(settings)):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
    listing = as_user(NOBODY, ["ls", str(settings.sessions_root)])
    assert listing.returncode != 0


# --- a worker that is not root -----------------------------------------------------------------


@pytest.fixture
def service_dir() -> Iterator[Path]:
    """A directory a service user can reach (pytest's own temp dirs are root's, 0700)."""
    made = Path(tempfile.mkdtemp(prefix="claudebox-service-"))
    yield made
    shutil.rmtree(made, ignore_errors=True)


def test_a_non_root_workers_sandbox_runs_as_that_user_with_no_capability_nor_remount(
    service_dir: Path,
) -> None:
    # The pool's Python lives under /root here, out of a service user's reach, so the worker's
    # own child is played: it becomes the service user, then runs the bwrap command a worker of
    # that user builds (the host paths bound as they are, no staging, no switch).
    service = Identity(TEST_UID - 1, TEST_UID - 1)
    root = service_dir
    (root / "workspace").mkdir()
    (root / "home").mkdir()
    for path in (root, root / "workspace", root / "home"):
        os.chown(path, service.uid, service.gid)
    spec = SandboxSpec("service", root / "workspace", root / "home", 1, 256, 1)
    attack = (
        "cat /proc/self/status; touch made-here; "
        "mount -o remount,bind,rw /usr && echo REMOUNTED; "
        "unshare -Urm true && echo NESTED"
    )
    started = launch_as(spec, ["sh", "-c", attack], None)

    done = subprocess.run(
        started.argv,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd="/",
        preexec_fn=lambda: become(service),
    )

    assert (root / "workspace" / "made-here").stat().st_uid == service.uid, done.stderr
    assert cap_eff(done.stdout) == NO_CAPABILITY
    assert "REMOUNTED" not in done.stdout
    assert "NESTED" not in done.stdout


# --- files the worker manages --------------------------------------------------------------------


def test_a_fork_belongs_to_a_uid_of_its_own() -> None:
    asyncio.run(run("origin", "echo mine > file"))

    async def scenario() -> tuple[bool, str]:
        box = await ClaudeBox.fork("origin", "branch")
        async with box:
            result = await box.code("echo more >> file && cat file")
            return result.success, result.response

    ok, seen = asyncio.run(scenario())

    assert ok and seen == "mine\nmore\n"
    branch = sandbox_uid("branch")
    assert branch != sandbox_uid("origin")
    assert (session_dir("branch") / "workspace" / "file").stat().st_uid == branch
    assert (session_dir("origin") / "workspace" / "file").read_text() == "mine\n"


def test_a_session_from_before_identities_gets_one_on_its_next_task() -> None:
    asyncio.run(run("older", "echo old > file"))
    metadata = session_dir("older") / ".claudebox" / "session.json"
    record = json.loads(metadata.read_text())
    # As a worker of the previous version left it: no uid in session.json, files root's.
    del record["sandbox_uid"]
    metadata.write_text(json.dumps(record))
    for path in [
        session_dir("older") / "workspace",
        *(session_dir("older") / "workspace").iterdir(),
    ]:
        os.chown(path, 0, 0)

    async def scenario() -> tuple[bool, str]:
        async with ClaudeBox.reconnect("older") as box:
            result = await box.code("echo new >> file && cat file")
            return result.success, result.response

    ok, seen = asyncio.run(scenario())

    assert ok and seen == "old\nnew\n"
    uid = sandbox_uid("older")
    assert (session_dir("older") / "workspace" / "file").stat().st_uid == uid != 0
