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
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import boxlite
import pytest

from claudebox_pool.tasks.errors import RuntimeUnavailableError, SandboxError
from claudebox_pool.tasks.models import CodeRequest, SessionRecord, utc_now
from claudebox_pool.tasks.settings import Settings, get_settings
from claudebox_pool.workers.agents.base import Invocation
from claudebox_pool.workers.gateway import PLACEHOLDER_API_KEY, Credential, Gateway
from claudebox_pool.workers.model_access import passage
from claudebox_pool.workers.runtimes.auto import hardware_virtualisation
from claudebox_pool.workers.runtimes.base import GatewayMount, Mount, Runtime, SandboxSpec
from claudebox_pool.workers.runtimes.boxlite import (
    MARKER,
    BoxliteRuntime,
    BoxliteSandbox,
    box_name,
    box_options,
    box_shape,
    box_volumes,
    boxlite_root,
    configured_image,
    probe_host,
    sandbox_error,
)
from claudebox_pool.workers.runtimes.output import LineSplitter
from claudebox_pool.workers.runtimes.supervise import LoopThread, Output, supervise
from claudebox_pool.workers.store import SessionStore
from claudebox_pool.workers.sweeps import orphan_sandboxes
from claudebox_pool.workers.warm.client import KeeperClient
from claudebox_pool.workers.warm.keeper import Keeper
from claudebox_pool.workers.warm.protocol import WarmSpec, warmable
from claudebox_pool.workers.warm.sandbox import KeptRuntime
from tests.support.processes import RedisServer

REPO = Path(__file__).resolve().parents[1]
OCI_SCRIPT = REPO / "deploy" / "image" / "oci_layout.py"
HOST = hardware_virtualisation()
needs_vm = pytest.mark.skipif(
    not HOST.ok, reason="needs hardware virtualisation (KVM with VT-x/AMD-V)"
)
cannot_boot = pytest.mark.skipif(
    HOST.ok, reason="needs a host that cannot boot micro-VMs (this one has VT-x/AMD-V)"
)
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


# --- the way to the model gateway, up to the boot -----------------------------------------

REAL_KEY = "sk-ant-api03-real-key-held-only-by-the-gateway"


@dataclass
class Owner:
    """What a run's passage needs of its worker (a WorkerContext in production)."""

    settings: Settings
    gateway: Gateway
    runtime: Runtime
    has_credential: bool = True


@pytest.fixture
def gateway() -> Iterator[Gateway]:
    # Nothing is sent upstream here: only the lease and its address matter.
    with Gateway("http://127.0.0.1:9", Credential.api_key(REAL_KEY)) as started:
        yield started


def record_of(spec: SandboxSpec, egress: list[str] | None = None) -> SessionRecord:
    now = utc_now()
    return SessionRecord(
        session_id=spec.session_id,
        created_at=now,
        updated_at=now,
        last_accessed=now,
        workspace_path=str(spec.workspace),
        egress_allow=egress or [],
    )


def with_way_out(spec: SandboxSpec, mount: Mount) -> SandboxSpec:
    """The spec as ``run_code`` builds it: the passage's mount added to the others."""
    return SandboxSpec(**{**spec.__dict__, "mounts": (*spec.mounts, mount)})


def test_a_claude_run_gets_outbound_network_to_its_gateway_lease_only(
    runtime: BoxliteRuntime, gateway: Gateway, spec: SandboxSpec, settings: Settings, layout: Path
) -> None:
    owner = Owner(settings, gateway, runtime)
    request = CodeRequest(session_id=spec.session_id, prompt="hi", agent="claude")

    with passage(owner, request, record_of(spec)) as way_out:
        assert way_out is not None
        assert way_out.lease.tcp_address is not None
        host, port = way_out.lease.tcp_address
        options = box_options(with_way_out(spec, way_out.mount), str(layout))
        volumes = box_volumes(with_way_out(spec, way_out.mount))

    assert host == "127.0.0.1"
    assert runtime.gateway_host == "host.boxlite.internal"
    assert port > 0
    assert options.network.outbound.mode == "enabled"
    # Only the host the gateway listens on: boxlite takes no port in a rule (see the next test).
    assert options.network.outbound.allow_net == ["host.boxlite.internal"]
    assert options.network.inbound.mode == "disabled"
    # The lease's socket directory is not shared: a socket cannot cross the VM boundary.
    assert [guest for _host, guest, _ro in volumes] == ["/workspace", "/root"]


def test_a_shell_run_without_egress_keeps_the_network_disabled(
    runtime: BoxliteRuntime, gateway: Gateway, spec: SandboxSpec, settings: Settings, layout: Path
) -> None:
    owner = Owner(settings, gateway, runtime)
    request = CodeRequest(session_id=spec.session_id, prompt="true", agent="shell")

    with passage(owner, request, record_of(spec)) as way_out:
        assert way_out is None

    options = box_options(spec, str(layout))
    assert options.network.outbound.mode == "disabled"
    assert list(options.network.outbound.allow_net) == []


def test_a_shell_run_with_egress_hosts_goes_out_through_the_gateway_only(
    runtime: BoxliteRuntime, gateway: Gateway, spec: SandboxSpec, settings: Settings, layout: Path
) -> None:
    owner = Owner(settings, gateway, runtime)
    request = CodeRequest(session_id=spec.session_id, prompt="true", agent="shell")

    with passage(owner, request, record_of(spec, ["pypi.org"])) as way_out:
        assert way_out is not None and way_out.lease.tcp_address is not None
        options = box_options(with_way_out(spec, way_out.mount), str(layout))

    # pypi.org is reached through the gateway's egress proxy, never directly.
    assert options.network.outbound.allow_net == ["host.boxlite.internal"]


def test_the_agent_env_points_at_the_host_alias_with_no_bridge_and_no_credential(
    runtime: BoxliteRuntime, gateway: Gateway, spec: SandboxSpec, settings: Settings
) -> None:
    owner = Owner(settings, gateway, runtime)
    request = CodeRequest(session_id=spec.session_id, prompt="hi", agent="claude")
    agent = Invocation(["/opt/claude-code/claude", "-p", "hi"], {"HOME": "/root"})

    with passage(owner, request, record_of(spec)) as way_out:
        assert way_out is not None and way_out.lease.tcp_address is not None
        port = way_out.lease.tcp_address[1]
        sandbox = BoxliteSandbox(with_way_out(spec, way_out.mount), runtime, box=None)
        wrapped = way_out.wrap(agent, sandbox)

    url = f"http://host.boxlite.internal:{port}"
    assert wrapped.argv == agent.argv  # no socat: the VM speaks TCP to the host itself
    assert wrapped.env["ANTHROPIC_BASE_URL"] == url
    assert wrapped.env["HTTPS_PROXY"] == wrapped.env["HTTP_PROXY"] == url
    assert wrapped.env["ANTHROPIC_API_KEY"] == PLACEHOLDER_API_KEY
    assert not any(REAL_KEY in value for value in wrapped.env.values())
    assert wrapped.env["HOME"] == "/root"


def test_the_host_alias_is_a_setting(
    tmp_path: Path, layout: Path, gateway: Gateway, spec: SandboxSpec
) -> None:
    settings = Settings(
        home=tmp_path / "claudebox",
        boxlite_image=str(layout),
        boxlite_host_alias="192.168.127.254",
    )
    runtime = BoxliteRuntime(settings)
    try:
        owner = Owner(settings, gateway, runtime)
        request = CodeRequest(session_id=spec.session_id, prompt="hi", agent="claude")
        with passage(owner, request, record_of(spec)) as way_out:
            assert way_out is not None and way_out.lease.tcp_address is not None
            port = way_out.lease.tcp_address[1]
            sandbox = BoxliteSandbox(with_way_out(spec, way_out.mount), runtime, box=None)
            env = way_out.wrap(Invocation(["true"], {}), sandbox).env
    finally:
        runtime.close()

    assert env["ANTHROPIC_BASE_URL"] == f"http://192.168.127.254:{port}"


@pytest.mark.timeout(60)
def test_boxlite_takes_no_port_in_an_allow_net_rule(
    runtime: BoxliteRuntime, spec: SandboxSpec, layout: Path, tmp_path: Path
) -> None:
    """Why the box's allow-list holds the host alone: a ``host:port`` rule is refused."""
    sdk_runtime = boxlite.Boxlite(boxlite.Options(home_dir=str(tmp_path / "raw")))
    options = box_options(spec, str(layout))
    options.network = boxlite.NetworkSpec(
        outbound=boxlite.OutboundNetworkSpec(
            mode="enabled", allow_net=["host.boxlite.internal:3128"]
        ),
        inbound=boxlite.InboundNetworkSpec(mode="disabled"),
    )

    async def create() -> Any:
        return await sdk_runtime.create(options, name="port-rule")

    with pytest.raises(boxlite.BoxliteError, match="invalid allow_net rule"):
        asyncio.run(asyncio.wait_for(create(), 30))


@pytest.mark.timeout(60)
def test_a_session_keeps_its_box_from_run_to_run_despite_a_fresh_lease(
    runtime: BoxliteRuntime, gateway: Gateway, spec: SandboxSpec, settings: Settings
) -> None:
    owner = Owner(settings, gateway, runtime)
    request = CodeRequest(session_id=spec.session_id, prompt="hi", agent="claude")
    boxes = []
    for _run in range(2):
        with passage(owner, request, record_of(spec)) as way_out:
            assert way_out is not None
            boxes.append(runtime.prepare(with_way_out(spec, way_out.mount)))

    assert boxes[0] == boxes[1]


@pytest.mark.timeout(60)
def test_a_box_is_replaced_going_offline_but_not_for_another_lease_port(
    runtime: BoxliteRuntime, spec: SandboxSpec, tmp_path: Path
) -> None:
    def way_out(port: int) -> GatewayMount:
        return GatewayMount(tmp_path / f"lease-{port}", "/run/claudebox", False, port=port)

    online = runtime.prepare(with_way_out(spec, way_out(41001)))
    other_port = runtime.prepare(with_way_out(spec, way_out(41002)))
    offline = runtime.prepare(spec)

    assert other_port == online
    assert offline != online


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
    splitter = LineSplitter(1000)

    assert splitter.feed("a\nb") == ["a\n"]
    assert splitter.feed(b"c\n") == ["bc\n"]
    assert splitter.feed("d") == []
    assert splitter.flush() == "d"
    assert splitter.flush() == ""


# --- inside a running micro-VM (needs VT-x/AMD-V and a built image) ------------------------


@pytest.fixture
def vm_settings(tmp_path: Path) -> Settings:
    """Settings with this host's sandbox image, for the tests that boot a micro-VM."""
    image = configured_image(get_settings())
    if image is None:
        pytest.skip("needs the boxlite sandbox image built on this host (deploy/image/build.sh)")
    return Settings(home=tmp_path / "claudebox", boxlite_image=image)


@pytest.fixture
def vm_runtime(vm_settings: Settings) -> Iterator[BoxliteRuntime]:
    made = BoxliteRuntime(vm_settings)
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


@needs_vm
@pytest.mark.timeout(180)
def test_the_vm_reaches_its_gateway_lease_at_the_host_alias_and_nothing_beyond(
    vm_runtime: BoxliteRuntime, spec: SandboxSpec, gateway: Gateway
) -> None:
    owner = Owner(vm_runtime.settings, gateway, vm_runtime)
    # A spent budget: the gateway answers by itself, so no model server is needed.
    record = record_of(spec).model_copy(update={"budget_usd": 0.01, "total_cost_usd": 0.01})
    request = CodeRequest(session_id=spec.session_id, prompt="hi", agent="claude")
    probe = (
        "import json, os, socket, urllib.request, urllib.error\n"
        "url = os.environ['ANTHROPIC_BASE_URL'] + '/v1/messages'\n"
        "try:\n"
        "    urllib.request.urlopen(urllib.request.Request(url, data=b'{}'), timeout=20)\n"
        "except urllib.error.HTTPError as exc:\n"
        "    print(json.loads(exc.read())['error']['type'])\n"
        "try:\n"
        "    socket.create_connection(('1.1.1.1', 443), timeout=5)\n"
        "    print('outside reached')\n"
        "except OSError:\n"
        "    print('outside refused')\n"
    )

    with passage(owner, request, record) as way_out:
        assert way_out is not None
        with vm_runtime.open(with_way_out(spec, way_out.mount)) as sandbox:
            invocation = way_out.wrap(Invocation(["python3", "-c", probe], dict(ENV)), sandbox)
            result = sandbox.exec(invocation.argv, invocation.env, 60)
        events = way_out.lease.events

    assert result.stdout.split() == ["billing_error", "outside", "refused"], result.stderr
    assert [action for action, _ in events] == ["budget_exceeded"]


# --- warm boxes, held by the worker's keeper -----------------------------------------------


def held_keeper(redis_server: RedisServer, settings: Settings) -> Keeper:
    """A keeper holding a boxlite runtime, as a worker's main process does with warm boxes on."""
    return Keeper(
        settings,
        "keeper@test",
        redis_server.client(),
        lambda hostname, session_id: True,
        lambda hostname: None,
        held=lambda: BoxliteRuntime(settings),
    ).start()


def test_a_warm_box_keeps_its_shape_whatever_the_port_of_a_runs_lease(
    spec: SandboxSpec, layout: Path, tmp_path: Path
) -> None:
    def online(port: int) -> SandboxSpec:
        return with_way_out(spec, GatewayMount(tmp_path / f"lease-{port}", "/run/gw", False, port))

    first, second = WarmSpec.of(online(41001)), WarmSpec.of(online(41002))

    assert warmable(online(41001))
    assert first == second != WarmSpec.of(spec)
    for asked in (online(41001), spec):
        kept = WarmSpec.of(asked).sandbox_spec()
        assert box_shape(kept, str(layout)) == box_shape(asked, str(layout))
        assert box_volumes(kept) == box_volumes(asked)


def test_a_pool_child_leases_boxes_from_the_keeper_and_its_errors_come_back_typed(
    redis_server: RedisServer, tmp_path: Path, spec: SandboxSpec
) -> None:
    settings = Settings(home=tmp_path / "claudebox", boxlite_image=str(tmp_path / "no-image"))
    keeper = held_keeper(redis_server, settings)
    try:
        runtime = KeptRuntime(BoxliteRuntime, KeeperClient(keeper.address), settings)
        assert (runtime.name, runtime.gateway_host) == ("boxlite", settings.boxlite_host_alias)
        # A child waits for the keeper to import an image and boot a VM, not 15 s.
        assert runtime.start_timeout_s > settings.boxlite_start_timeout_s
        assert runtime.kept() == []
        with pytest.raises(SandboxError, match="no oci-layout file") as refused:
            runtime.open(spec)
        assert "deploy/image/build.sh" in str(refused.value)
        assert runtime.remove(spec.session_id) is False
    finally:
        keeper.close()
    # The keeper's runtime took this host's first slot, and gave it back.
    assert [path.name for path in boxlite_root(settings).iterdir()] == ["slot-0"]


@needs_vm
@pytest.mark.timeout(300)
def test_a_warm_box_serves_the_next_task_without_starting_again(
    redis_server: RedisServer, vm_settings: Settings, spec: SandboxSpec
) -> None:
    settings = vm_settings
    keeper = held_keeper(redis_server, settings)
    try:
        runtime = KeptRuntime(BoxliteRuntime, KeeperClient(keeper.address), settings)
        with runtime.open(spec) as sandbox:
            first = sandbox.exec(["sh", "-c", "echo $$ > /srv/first; cat /proc/uptime"], ENV, 60)
        started = time.monotonic()
        with runtime.open(spec) as sandbox:
            again = sandbox.exec(["cat", "/srv/first"], ENV, 60)
        warm_s = time.monotonic() - started
    finally:
        keeper.close()

    assert first.exit_code == 0 and again.exit_code == 0 and again.stdout.strip()
    assert keeper.created == 1
    assert warm_s < 1.0
