"""The boxlite runtime: its image, its boxes and its errors, up to the boot; then, where the host
can boot a micro-VM, what a command inside one sees.

Every boxlite call here is the real SDK on a temporary home. Hosts without VT-x/AMD-V (a
paravirtual /dev/kvm) stop at the boot: the tests that need a running VM are skipped there.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import boxlite
import pytest

from tasks.errors import RuntimeUnavailableError, SandboxError
from tasks.settings import Settings, get_settings
from tests.support.processes import RedisServer
from workers.runtimes.auto import hardware_virtualisation
from workers.runtimes.base import Mount, SandboxSpec
from workers.runtimes.boxlite import (
    MARKER,
    BoxliteRuntime,
    box_name,
    box_options,
    box_volumes,
    boxlite_root,
    configured_image,
    probe_host,
    sandbox_error,
)
from workers.runtimes.supervise import LineSplitter, LoopThread, Output, supervise
from workers.store import SessionStore
from workers.sweeps import orphan_sandboxes

REPO = Path(__file__).resolve().parents[1]
OCI_SCRIPT = REPO / "deploy" / "image" / "oci_layout.py"
HOST = hardware_virtualisation()
needs_vm = pytest.mark.skipif(
    not HOST.ok, reason="needs hardware virtualisation (KVM with VT-x/AMD-V)"
)
cannot_boot = pytest.mark.skipif(HOST.ok, reason="this host can boot micro-VMs")
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/root", "LANG": "C.UTF-8"}


def load_oci_layout() -> ModuleType:
    spec = importlib.util.spec_from_file_location("oci_layout", OCI_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the class is being built.
    sys.modules["oci_layout"] = module
    spec.loader.exec_module(module)
    return module


oci = load_oci_layout()


def make_tree(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "workspace").mkdir()
    (root / "etc" / "motd").write_text("hello from the image\n")
    tool = root / "bin" / "tool"
    tool.write_text("#!/bin/sh\necho tool\n")
    tool.chmod(0o755)
    (root / "bin" / "sh").symlink_to("tool")
    os.link(tool, root / "bin" / "tool2")
    return root


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("image")
    made = oci.write_layout(make_tree(base / "rootfs"), base / "layout", workdir="/workspace")
    path: Path = made.path
    return path


@pytest.fixture
def spec(tmp_path: Path) -> SandboxSpec:
    workspace, home = tmp_path / "workspace", tmp_path / "home"
    workspace.mkdir()
    home.mkdir()
    return SandboxSpec("s1", workspace, home, cpus=1, memory_mib=256, disk_size_gb=1)


@pytest.fixture
def settings(tmp_path: Path, layout: Path) -> Settings:
    return Settings(home=tmp_path / "claudebox", boxlite_image=str(layout))


@pytest.fixture
def runtime(settings: Settings) -> Iterator[BoxliteRuntime]:
    made = BoxliteRuntime(settings)
    yield made
    made.close()


def blob(layout: Path, digest: str, size: int) -> bytes:
    """A blob's bytes, checked against the digest and size that point at it."""
    data = (layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()
    assert "sha256:" + hashlib.sha256(data).hexdigest() == digest
    assert len(data) == size
    return data


def read_layout(layout: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], bytes]:
    index = json.loads((layout / "index.json").read_text())
    (entry,) = index["manifests"]
    manifest = json.loads(blob(layout, entry["digest"], entry["size"]))
    config = json.loads(blob(layout, manifest["config"]["digest"], manifest["config"]["size"]))
    (layer,) = manifest["layers"]
    return index, manifest, config, blob(layout, layer["digest"], layer["size"])


# --- the image layout ---------------------------------------------------------------------


def test_layout_blobs_match_their_digests_and_diff_id_is_the_uncompressed_tar(
    layout: Path,
) -> None:
    index, manifest, config, layer = read_layout(layout)

    assert json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    assert layout.stat().st_mode & 0o777 == 0o755
    assert index["manifests"][0]["annotations"] == {"org.opencontainers.image.ref.name": "latest"}
    assert manifest["layers"][0]["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
    uncompressed = gzip.decompress(layer)
    assert config["rootfs"] == {
        "type": "layers",
        "diff_ids": ["sha256:" + hashlib.sha256(uncompressed).hexdigest()],
    }
    assert config["os"] == "linux"
    assert config["config"]["WorkingDir"] == "/workspace"


def test_layout_layer_holds_the_tree_with_numeric_owners_only(layout: Path) -> None:
    *_, layer = read_layout(layout)

    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer))) as tar:
        members = {member.name: member for member in tar.getmembers()}
        motd = tar.extractfile("etc/motd")
        assert motd is not None and motd.read() == b"hello from the image\n"

    assert set(members) == {
        "bin",
        "bin/sh",
        "bin/tool",
        "bin/tool2",
        "etc",
        "etc/motd",
        "workspace",
    }
    assert members["bin/sh"].issym() and members["bin/sh"].linkname == "tool"
    # The CLI's 400 MB binary is hard-linked twice in the real image: stored once.
    assert members["bin/tool2"].islnk() and members["bin/tool2"].linkname == "bin/tool"
    assert members["bin/tool"].mode & 0o777 == 0o755
    assert all(m.uname == "" and m.gname == "" for m in members.values())
    assert members["etc/motd"].uid == os.getuid()


def test_the_same_tree_gives_the_same_digests(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "rootfs")

    first = oci.write_layout(tree, tmp_path / "one")
    second = oci.write_layout(tree, tmp_path / "two")

    assert first.manifest == second.manifest
    assert first.diff_id == second.diff_id


def test_a_failed_write_leaves_nothing_behind(tmp_path: Path) -> None:
    with pytest.raises(NotADirectoryError):
        oci.write_layout(tmp_path / "missing", tmp_path / "out")
    with pytest.raises(FileExistsError):
        oci.write_layout(make_tree(tmp_path / "rootfs"), tmp_path / "rootfs")

    assert sorted(p.name for p in tmp_path.iterdir()) == ["rootfs"]


def test_the_script_writes_environment_and_workdir_into_the_config(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "rootfs")

    args = ["--env", "A=1", "--env", "IS_SANDBOX=1", "--workdir", "/workspace", "--tag", "t1"]

    done = subprocess.run(
        [sys.executable, str(OCI_SCRIPT), str(tree), str(tmp_path / "out"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    index, _, config, _ = read_layout(tmp_path / "out")
    assert config["config"]["Env"] == ["A=1", "IS_SANDBOX=1"]
    assert config["config"]["WorkingDir"] == "/workspace"
    assert index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] == "t1"


# --- probe and settings -------------------------------------------------------------------


@cannot_boot
def test_probe_refuses_a_host_that_cannot_boot_micro_vms_and_says_why(settings: Settings) -> None:
    probe = probe_host(settings)

    assert not probe.ok
    assert HOST.reason in probe.reason
    assert "\n" not in probe.reason
    if Path("/dev/kvm").exists():
        assert "paravirtual" in probe.reason
        assert "vmx/svm" in probe.reason
    assert not BoxliteRuntime.probe().ok


def test_probe_without_an_image_says_how_to_build_one(tmp_path: Path) -> None:
    probe = probe_host(Settings(home=tmp_path))

    assert not probe.ok
    assert "no sandbox image" in probe.reason
    assert "deploy/image/build.sh" in probe.reason


def test_probe_refuses_a_directory_that_is_not_an_image_layout(tmp_path: Path) -> None:
    probe = probe_host(Settings(home=tmp_path, boxlite_image=str(tmp_path)))

    assert not probe.ok
    assert "not an OCI image layout" in probe.reason


@needs_vm
def test_probe_accepts_this_host_with_a_built_image(settings: Settings) -> None:
    assert probe_host(settings).ok


def test_the_default_image_is_the_layout_built_under_home(tmp_path: Path) -> None:
    assert configured_image(Settings(home=tmp_path)) is None

    built = tmp_path / "images" / "claudebox-sandbox"
    built.mkdir(parents=True)
    assert configured_image(Settings(home=tmp_path)) == str(built)
    assert configured_image(Settings(home=tmp_path, boxlite_image="x/y:1")) == "x/y:1"


# --- box options --------------------------------------------------------------------------


def test_box_options_come_from_the_spec_with_no_network(spec: SandboxSpec, layout: Path) -> None:
    options = box_options(spec, str(layout))

    assert options.rootfs_path == str(layout)
    assert options.image is None
    assert (options.cpus, options.memory_mib, options.disk_size_gb) == (1, 256, 1)
    assert options.working_dir == "/workspace"
    assert options.network.outbound.mode == "disabled"
    assert options.network.inbound.mode == "disabled"
    assert options.auto_delete == 0
    assert options.detach is False


def test_a_session_that_is_not_persistent_gets_a_box_deleted_when_it_stops(
    spec: SandboxSpec, layout: Path
) -> None:
    ephemeral = SandboxSpec(**{**spec.__dict__, "persistent": False})

    assert box_options(ephemeral, str(layout)).auto_delete != 0


def test_a_registry_name_is_passed_as_an_image(spec: SandboxSpec) -> None:
    options = box_options(spec, "ghcr.io/example/sandbox:1")

    assert options.image == "ghcr.io/example/sandbox:1"
    assert options.rootfs_path is None


def test_volumes_share_workspace_and_home_then_the_extra_mounts(
    spec: SandboxSpec, tmp_path: Path
) -> None:
    cli = tmp_path / "cli"
    with_mounts = SandboxSpec(**{**spec.__dict__, "mounts": (Mount(cli, "/opt/cli"),)})

    assert box_volumes(with_mounts) == [
        (str(spec.workspace), "/workspace", False),
        (str(spec.home), "/root", False),
        (str(cli), "/opt/cli", True),
    ]


# --- boxes, up to the boot ----------------------------------------------------------------


def test_boxlite_creates_a_box_from_the_layout_and_finds_it_by_name(
    spec: SandboxSpec, layout: Path, tmp_path: Path
) -> None:
    name = box_name(spec.session_id)

    async def scenario() -> tuple[Any, ...]:
        runtime = boxlite.Boxlite(boxlite.Options(home_dir=str(tmp_path / "boxlite")))
        box = await runtime.create(box_options(spec, str(layout)), name=name)
        found = await runtime.get(name)
        info = await runtime.get_info(name)
        listed = [each.name for each in await runtime.list_info()]
        await runtime.remove(name, force=True)
        gone = (await runtime.get(name), await runtime.get_info(name), await runtime.list_info())
        return box.id, found.id, info, listed, gone

    box_id, found_id, info, listed, gone = asyncio.run(asyncio.wait_for(scenario(), 30))

    assert found_id == box_id == info.id
    assert info.name == name
    assert info.image == f"rootfs:{layout}"
    assert (info.cpus, info.memory_mib) == (1, 256)
    assert info.state.status == "configured"
    assert listed == [name]
    assert gone == (None, None, [])


@pytest.mark.timeout(60)
def test_prepare_creates_the_box_once_and_remove_drops_it(
    runtime: BoxliteRuntime, spec: SandboxSpec
) -> None:
    box_id = runtime.prepare(spec)

    assert runtime.prepare(spec) == box_id
    assert (spec.home / MARKER).read_text().split()[0] == box_id
    assert runtime.info(spec.session_id).name == "claudebox-s1"
    assert runtime.remove("s1") is True
    assert runtime.info("s1") is None
    assert runtime.remove("s1") is False


@pytest.mark.timeout(60)
def test_a_box_the_session_did_not_make_is_replaced_not_reused(
    runtime: BoxliteRuntime, spec: SandboxSpec
) -> None:
    left_behind = runtime.prepare(spec)
    (spec.home / MARKER).unlink()  # as for a session created anew under the same id

    fresh = runtime.prepare(spec)

    assert fresh != left_behind
    assert runtime.info("s1").id == fresh


@pytest.mark.timeout(60)
def test_a_box_created_with_other_volumes_is_replaced(
    runtime: BoxliteRuntime, spec: SandboxSpec, tmp_path: Path
) -> None:
    without_cli = runtime.prepare(spec)
    with_cli = SandboxSpec(**{**spec.__dict__, "mounts": (Mount(tmp_path, "/opt/cli"),)})

    replaced = runtime.prepare(with_cli)

    assert replaced != without_cli
    assert runtime.prepare(with_cli) == replaced


@pytest.mark.timeout(60)
def test_the_leak_sweep_removes_the_boxes_of_sessions_that_are_gone(
    runtime: BoxliteRuntime, spec: SandboxSpec, settings: Settings, redis_server: RedisServer
) -> None:
    store = SessionStore(settings.sessions_root)
    store.paths("alive").root.mkdir(parents=True)
    runtime.prepare(SandboxSpec(**{**spec.__dict__, "session_id": "alive"}))
    runtime.prepare(spec)  # session s1 has no directory: its box is an orphan

    assert runtime.kept() == ["alive", "s1"]
    assert orphan_sandboxes(runtime, store, redis_server.client(), lock_ttl_s=10) == ["s1"]
    assert runtime.kept() == ["alive"]


@pytest.mark.timeout(60)
def test_each_runtime_takes_its_own_home_slot_and_gives_it_back(
    settings: Settings, spec: SandboxSpec
) -> None:
    first, second = BoxliteRuntime(settings), BoxliteRuntime(settings)
    try:
        first.prepare(spec)

        assert first.home != second.home
        assert first.home.parent == second.home.parent == boxlite_root(settings)
        assert second.info(spec.session_id) is None
    finally:
        first.close()
        second.close()
    again = BoxliteRuntime(settings)
    again.close()

    assert again.home == first.home


# --- errors -------------------------------------------------------------------------------


def test_open_without_an_image_says_how_to_build_one(tmp_path: Path, spec: SandboxSpec) -> None:
    runtime = BoxliteRuntime(Settings(home=tmp_path / "claudebox"))
    try:
        with pytest.raises(RuntimeUnavailableError, match=r"deploy/image/build\.sh"):
            runtime.open(spec)
        assert runtime.info(spec.session_id) is None
    finally:
        runtime.close()


@pytest.mark.timeout(60)
def test_an_image_that_cannot_be_pulled_is_a_sandbox_error_with_the_way_out(
    runtime: BoxliteRuntime, spec: SandboxSpec
) -> None:
    # .invalid never resolves (RFC 2606), so this fails the same with or without a network.
    unreachable = SandboxSpec(**{**spec.__dict__, "image": "registry.invalid/claudebox/box:1"})

    with pytest.raises(SandboxError, match="could not be loaded") as caught:
        runtime.open(unreachable)

    assert not isinstance(caught.value, RuntimeUnavailableError)
    assert "registry.invalid/claudebox/box:1" in str(caught.value)
    assert "deploy/image/build.sh" in str(caught.value)
    assert runtime.info(spec.session_id) is None


@pytest.mark.timeout(60)
def test_a_layout_with_a_missing_blob_is_refused_by_boxlite(
    runtime: BoxliteRuntime, spec: SandboxSpec, layout: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(layout, broken)
    *_, manifest_layer = read_layout(broken)
    digest = hashlib.sha256(manifest_layer).hexdigest()
    (broken / "blobs" / "sha256" / digest).unlink()

    with pytest.raises(SandboxError, match=r"could not be loaded.*layer"):
        runtime.open(SandboxSpec(**{**spec.__dict__, "image": str(broken)}))


@cannot_boot
@pytest.mark.timeout(120)
def test_on_a_host_that_cannot_boot_the_layout_gets_as_far_as_the_boot(
    runtime: BoxliteRuntime, spec: SandboxSpec
) -> None:
    started = time.monotonic()
    with pytest.raises(RuntimeUnavailableError, match="did not boot") as caught:
        runtime.open(spec)

    # Not "could not be loaded": the layout was imported, only the VM failed.
    assert HOST.reason in str(caught.value)
    assert "CLAUDEBOX_RUNTIME=bwrap" in str(caught.value)
    assert runtime.info(spec.session_id) is None
    assert time.monotonic() - started < 100


def test_boxlite_failures_map_to_errors_that_say_what_to_do() -> None:
    exhausted = sandbox_error(boxlite.ResourceExhaustedError("no memory"), "start it")
    refused = sandbox_error(boxlite.InvalidArgumentError("bad\n  cpus"), "start it")
    image = sandbox_error(boxlite.ImageError("gone"), "start it", "/img")
    engine = sandbox_error(boxlite.EngineError("The VM failed to start."), "start it")

    assert type(exhausted) is SandboxError and "CLAUDEBOX_MEMORY_MIB" in str(exhausted)
    assert str(refused) == "boxlite could not start it: InvalidArgumentError: bad cpus"
    assert "image /img could not be loaded (gone)" in str(image)
    assert isinstance(engine, RuntimeUnavailableError) == (not HOST.ok)


# --- supervising a command (the runtime's own plumbing, driven by plain coroutines) ----------


@pytest.fixture(scope="module")
def loop() -> Iterator[LoopThread]:
    made = LoopThread()
    yield made
    made.close()


def test_lines_reach_the_calling_thread_whole_however_the_chunks_are_cut(
    loop: LoopThread,
) -> None:
    e_acute = "é".encode()

    async def command(output: Output, stop: asyncio.Event) -> int:
        output.put("stdout", "first li")
        output.put("stdout", "ne\nsecond\n")
        output.put("stderr", e_acute[:1])
        output.put("stderr", e_acute[1:] + b"rr\n")
        output.put("stdout", "no newline")
        output.end("stdout")
        output.end("stderr")
        return 3

    seen: list[tuple[str, str]] = []
    threads: set[int] = set()

    def on_line(stream: str, line: str) -> None:
        seen.append((stream, line))
        threads.add(threading.get_ident())

    result = supervise(loop, command, 10, on_line)

    assert result.exit_code == 3
    assert result.stdout == "first line\nsecond\nno newline"
    assert result.stderr == "érr\n"
    assert [line for stream, line in seen if stream == "stdout"] == [
        "first line",
        "second",
        "no newline",
    ]
    assert threads == {threading.get_ident()}


async def wait_to_be_stopped(output: Output, stop: asyncio.Event) -> int:
    output.put("stdout", "ready\n")
    await stop.wait()
    return -9


def test_a_command_past_its_deadline_is_stopped(loop: LoopThread) -> None:
    result = supervise(loop, wait_to_be_stopped, 0.3)

    assert result.timed_out and not result.cancelled
    assert result.exit_code == -9
    assert result.stdout == "ready\n"
    assert 0.3 <= result.duration_s < 5


def test_a_cancelled_command_is_stopped(loop: LoopThread) -> None:
    cancel = threading.Event()

    def on_line(stream: str, line: str) -> None:
        if line == "ready":
            cancel.set()

    result = supervise(loop, wait_to_be_stopped, 60, on_line, cancel)

    assert result.cancelled and not result.timed_out
    assert result.duration_s < 5


def test_a_command_that_fails_to_start_raises(loop: LoopThread) -> None:
    async def command(output: Output, stop: asyncio.Event) -> int:
        raise boxlite.ExecutionError("no such file: nope")

    with pytest.raises(boxlite.ExecutionError):
        supervise(loop, command, 10)


def test_a_line_splitter_keeps_a_partial_line_until_flushed() -> None:
    splitter = LineSplitter()

    assert splitter.feed("a\nb") == ["a\n"]
    assert splitter.feed(b"c\n") == ["bc\n"]
    assert splitter.feed("d") == []
    assert splitter.flush() == "d"
    assert splitter.flush() == ""


# --- inside a running micro-VM (needs VT-x/AMD-V and a built image) ------------------------


@pytest.fixture
def vm_runtime(tmp_path: Path) -> Iterator[BoxliteRuntime]:
    image = configured_image(get_settings())
    if image is None:
        pytest.skip("needs the sandbox image: run deploy/image/build.sh")
    made = BoxliteRuntime(Settings(home=tmp_path / "claudebox", boxlite_image=image))
    yield made
    made.close()


@needs_vm
@pytest.mark.timeout(180)
def test_a_command_runs_in_the_workspace_and_its_lines_stream_out(
    vm_runtime: BoxliteRuntime, spec: SandboxSpec
) -> None:
    lines: list[tuple[str, str]] = []
    script = "pwd; echo out; echo err >&2; echo data > made.txt; exit 3"

    with vm_runtime.open(spec) as sandbox:
        result = sandbox.exec(["sh", "-c", script], ENV, 60, lambda *line: lines.append(line))

    assert result.exit_code == 3
    assert result.stdout == "/workspace\nout\n"
    assert result.stderr == "err\n"
    assert ("stdout", "out") in lines
    assert (spec.workspace / "made.txt").read_text() == "data\n"


@needs_vm
@pytest.mark.timeout(180)
def test_a_command_in_a_vm_is_killed_at_its_deadline_and_on_cancel(
    vm_runtime: BoxliteRuntime, spec: SandboxSpec
) -> None:
    cancel = threading.Event()

    def on_line(stream: str, line: str) -> None:
        if line == "ready":
            cancel.set()

    with vm_runtime.open(spec) as sandbox:
        late = sandbox.exec(["sleep", "120"], ENV, 2)
        cancelled = sandbox.exec(["sh", "-c", "echo ready; sleep 120"], ENV, 60, on_line, cancel)

    assert late.timed_out and late.duration_s < 30
    assert cancelled.cancelled and cancelled.duration_s < 30


@needs_vm
@pytest.mark.timeout(180)
def test_the_vm_has_no_network_interface_but_loopback(
    vm_runtime: BoxliteRuntime, spec: SandboxSpec
) -> None:
    with vm_runtime.open(spec) as sandbox:
        result = sandbox.exec(["ls", "/sys/class/net"], ENV, 30)

    assert set(result.stdout.split()) <= {"lo"}


@needs_vm
@pytest.mark.timeout(300)
def test_a_persistent_box_keeps_its_disk_between_tasks(
    vm_runtime: BoxliteRuntime, spec: SandboxSpec
) -> None:
    with vm_runtime.open(spec) as sandbox:
        sandbox.exec(["sh", "-c", "echo kept > /srv/mark"], ENV, 30)
    box_id = vm_runtime.info(spec.session_id).id
    assert not vm_runtime.info(spec.session_id).state.running

    with vm_runtime.open(spec) as sandbox:
        result = sandbox.exec(["cat", "/srv/mark"], ENV, 30)

    assert result.stdout == "kept\n"
    assert vm_runtime.info(spec.session_id).id == box_id


@needs_vm
@pytest.mark.timeout(180)
def test_a_box_that_is_not_persistent_is_removed_when_the_task_ends(
    vm_runtime: BoxliteRuntime, spec: SandboxSpec
) -> None:
    ephemeral = SandboxSpec(**{**spec.__dict__, "persistent": False})

    with vm_runtime.open(ephemeral) as sandbox:
        sandbox.exec(["true"], ENV, 30)

    assert vm_runtime.info(spec.session_id) is None
