"""A boxlite micro-VM per session (boxlite 0.10 Python SDK), for hosts with KVM + VT-x/AMD-V.

How it is laid out, and why:

- **With warm sandboxes on (the default), one boxlite runtime per worker**, held by the
  worker's keeper in its main process (:mod:`workers.warm`, ``keeper_holds``): a session's box
  stays running for ``CLAUDEBOX_WARM_IDLE_S`` after a task and the pool children run commands
  in it through the keeper, so that a session has one box and the next task no boot. Below,
  "process" is then that main process; with warm sandboxes off, every pool process opens its
  own runtime and stops the box at the end of each task.
- **One boxlite runtime per process, in a numbered slot.** boxlite locks its home
  directory: a second runtime on the same directory fails ("Another BoxliteRuntime is already
  using directory"), and the lock is only let go when the runtime object is collected. So each
  process takes the lowest free home ``<boxlite_home>/<hostname>/slot-<n>``. Slots rather than
  pids: a restarted worker gets its slot back, with boxlite's image cache (a full image takes
  seconds to import) and the boxes its persistent sessions kept, where a home per pid would
  leave a disk cache behind for every process ever started. The hostname keeps VM disks and
  locks apart when ``CLAUDEBOX_HOME`` is shared storage.
- **A box per session, named** ``claudebox-<session_id>``. The workspace is shared at
  ``/workspace`` and the agent home at ``/root``, so the files that matter live on the host and
  outlive any box; the box's own disk (system packages and the like) is kept between tasks of a
  persistent session (stopped, not deleted) and dropped at the end of each task otherwise.
  A session's next task may run in another process, whose slot has no box for it yet: only
  ``/workspace`` and ``/root`` are certain to carry over.
- **No stale boxes.** A box left in some slot would outlive its session's cleanup (``remove``
  only reaches this process's slot) and be found again if a session of the same id were
  created later; and a box keeps the volumes and size it was created with, though the next
  task may need others (another agent mounts other directories). So the session's home holds
  the id and shape of the box it last used (:data:`MARKER`): a box found under the name that
  is not that one, or not of that shape, is replaced, not reused.
- **No network but the gateway.** Inbound networking is disabled, and so is outbound unless
  the run has a way out (the claude agent, or a shell with egress hosts); the VM dies with the
  worker (``detach=False``). The model gateway's unix socket cannot cross the VM boundary
  through a shared folder, so the lease also listens on TCP on the host's loopback and the VM
  reaches it as ``<boxlite_host_alias>:<port>`` (``host.boxlite.internal``, which boxlite's
  gvproxy resolves to 192.168.127.254 and NATs to the host's 127.0.0.1), with no socat bridge.
  The lease is known by its own port, as a socket lease is by its path. Outbound is then
  enabled with ``allow_net`` holding the alias alone, so nothing beyond the host is reachable
  and the egress allow-list stays the gateway's. boxlite 0.10 refuses a port in an
  ``allow_net`` rule (only hostnames, wildcards, IPv4 and CIDRs), and documents the host
  address as reachable whenever outbound is on: a VM with a way out can reach *every* port on
  the host's loopback, not only its lease's (see the README's security model). The box is
  created with its network, but a port-free allow-list does not change from run to run, so a
  fresh lease (a fresh port) never costs a box; only going from no way out to one, or back, or
  another alias, reshapes it. Rejected: a fixed gateway port per worker with the lease named
  in the request (a path token in the base URL, proxy credentials for egress), which would
  need a secret to strip and check on every request and buys nothing while the port cannot
  be filtered anyway. Not verifiable here (VMs cannot boot on these hosts): that the alias
  resolves and reaches the host's loopback from inside a VM.
- **Sync over async.** boxlite's calls return futures bound to the running asyncio loop of the
  calling thread; the runtime owns a private loop in a daemon thread and every method here
  blocks on it, as the task bodies are synchronous. Output lines reach ``on_line`` on the
  thread that called :meth:`BoxliteSandbox.exec`, never on the private loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import signal
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from claudebox_pool.tasks.errors import RuntimeUnavailableError, SandboxError
from claudebox_pool.tasks.settings import Settings, get_settings
from claudebox_pool.workers.runtimes.auto import hardware_virtualisation
from claudebox_pool.workers.runtimes.base import (
    AGENT_HOME,
    WORKSPACE,
    ExecResult,
    GatewayMount,
    LineSink,
    Probe,
    Runtime,
    Sandbox,
    SandboxSpec,
)
from claudebox_pool.workers.runtimes.supervise import (
    KILL_GRACE_S,
    Command,
    LoopThread,
    Output,
    supervise,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

BOX_PREFIX = "claudebox-"
MARKER = ".claudebox-boxlite-box"
"""File in a session's agent home naming the box the session last used: its id and shape."""
HOST_ALIAS = "host.boxlite.internal"
"""boxlite's name for the host inside a VM (the default of ``CLAUDEBOX_BOXLITE_HOST_ALIAS``)."""
IMAGE_BUILD_HINT = (
    "build a local image with deploy/image/build.sh (it writes the default, "
    "<CLAUDEBOX_HOME>/images/claudebox-sandbox) or point CLAUDEBOX_BOXLITE_IMAGE at an OCI image "
    "layout directory"
)
_LOCKED = "already using directory"
_MAX_SLOTS = 256
_CALL_TIMEOUT_S = 60
_SHUTDOWN_TIMEOUT_S = 30


def box_name(session_id: str) -> str:
    return BOX_PREFIX + session_id


def configured_image(settings: Settings) -> str | None:
    """The image setting, else the default layout directory if it was built, else None."""
    if settings.boxlite_image:
        return settings.boxlite_image
    default = settings.home / "images" / "claudebox-sandbox"
    return str(default) if default.is_dir() else None


def is_local_image(image: str) -> bool:
    """A path (an OCI layout directory) rather than a registry name, which never starts so."""
    return image.startswith(("/", ".", "~")) or Path(image).is_dir()


def image_problem(image: str | None) -> str | None:
    """Why ``image`` cannot be used, or None; registry names are taken on trust."""
    if image is None:
        return f"no sandbox image: {IMAGE_BUILD_HINT}"
    if is_local_image(image) and not (Path(image).expanduser() / "oci-layout").is_file():
        return f"image {image} is not an OCI image layout (no oci-layout file): {IMAGE_BUILD_HINT}"
    return None


def gateway_port(spec: SandboxSpec) -> int | None:
    """The host port of the run's gateway lease, or None if the run has no way out."""
    return next(
        (m.port for m in spec.mounts if isinstance(m, GatewayMount) and m.port is not None),
        None,
    )


def box_volumes(spec: SandboxSpec) -> list[tuple[str, str, bool]]:
    """boxlite volumes, ``(host, guest, read_only)``: workspace, agent home, then extra mounts.

    A gateway reached over TCP is no volume: its lease directory changes every run, and the
    socket in it would be of no use across the VM boundary.
    """
    shared = [m for m in spec.mounts if not (isinstance(m, GatewayMount) and m.port is not None)]
    return [
        (str(spec.workspace), WORKSPACE, False),
        (str(spec.home), AGENT_HOME, False),
        *((str(mount.host), mount.guest, mount.read_only) for mount in shared),
    ]


def box_allow_net(spec: SandboxSpec, gateway_host: str) -> list[str]:
    """What the box may reach: the host the gateway listens on, as the VM names it, or nothing.

    Not ``host:port``: boxlite refuses a port in a rule, so the lease's port is not part of the
    box and a new lease (a new port) does not mean a new box.
    """
    return [] if gateway_port(spec) is None else [gateway_host]


def box_options(spec: SandboxSpec, image: str, gateway_host: str = HOST_ALIAS) -> Any:
    """The ``boxlite.BoxOptions`` of a session's box."""
    sdk = _sdk()
    allow_net = box_allow_net(spec, gateway_host)
    outbound = (
        sdk.OutboundNetworkSpec(mode="enabled", allow_net=allow_net)
        if allow_net
        else sdk.OutboundNetworkSpec(mode="disabled")
    )
    source = (
        {"rootfs_path": str(Path(image).expanduser())}
        if is_local_image(image)
        else {"image": image}
    )
    return sdk.BoxOptions(
        **source,
        cpus=spec.cpus,
        memory_mib=spec.memory_mib,
        disk_size_gb=spec.disk_size_gb,
        working_dir=WORKSPACE,
        volumes=box_volumes(spec),
        network=sdk.NetworkSpec(outbound=outbound, inbound=sdk.InboundNetworkSpec(mode="disabled")),
        # boxlite's default (1) deletes a box when it stops; 0 keeps it until removed. This is
        # what the deprecated ``auto_remove`` flag maps to.
        auto_delete=0 if spec.persistent else 1,
        detach=False,
    )


def box_shape(spec: SandboxSpec, image: str, gateway_host: str = HOST_ALIAS) -> str:
    """A digest of what a box is created with and cannot change later."""
    shape: list[Any] = [image, spec.cpus, spec.memory_mib, spec.disk_size_gb, box_volumes(spec)]
    allow_net = box_allow_net(spec, gateway_host)
    if allow_net:
        # Appended only when set, so boxes made with no network keep the shape they had.
        shape.append(allow_net)
    return hashlib.sha256(json.dumps(shape).encode()).hexdigest()[:16]


def boxlite_root(settings: Settings) -> Path:
    """This host's directory of boxlite homes (one ``slot-<n>`` per worker process)."""
    base = settings.boxlite_home or settings.home / "boxlite"
    return base.expanduser() / socket.gethostname()


def sandbox_error(exc: BaseException, action: str, image: str | None = None) -> SandboxError:
    """Our typed error for a boxlite failure, saying what to do about it."""
    sdk = _sdk()
    what = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, sdk.EngineError):
        host = hardware_virtualisation()
        if not host.ok:
            return RuntimeUnavailableError(
                f"boxlite could not {action}: the micro-VM did not boot ({what}); {host.reason}. "
                "Run boxlite on a host with KVM and VT-x/AMD-V, or set CLAUDEBOX_RUNTIME=bwrap"
            )
        return SandboxError(
            f"boxlite could not {action}: the VM engine failed ({what}); its console log and "
            "stderr are kept under the box's directory in the worker's boxlite home"
        )
    if isinstance(exc, sdk.ImageError | sdk.StorageError) and image is not None:
        return SandboxError(
            f"boxlite could not {action}: image {image} could not be loaded ({what}); "
            + IMAGE_BUILD_HINT
        )
    if isinstance(exc, sdk.ResourceExhaustedError):
        return SandboxError(
            f"boxlite could not {action}: out of resources ({what}); lower CLAUDEBOX_CPUS or "
            "CLAUDEBOX_MEMORY_MIB, or run fewer worker processes on this host"
        )
    return SandboxError(f"boxlite could not {action}: {type(exc).__name__}: {what}")


def _sdk() -> Any:
    try:
        import boxlite
    except ImportError as exc:
        raise RuntimeUnavailableError(
            "boxlite is not installed: pip install 'claudebox-pool[vm]'"
        ) from exc
    # The package swallows a broken native extension with a warning and exports nothing.
    if not hasattr(boxlite, "Boxlite"):
        raise RuntimeUnavailableError(
            "boxlite's native extension did not load on this platform; reinstall boxlite"
        )
    return boxlite


def _acquire_home(sdk: Any, root: Path) -> tuple[Path, Any]:
    root.mkdir(parents=True, exist_ok=True)
    for slot in range(_MAX_SLOTS):
        home = root / f"slot-{slot}"
        try:
            return home, sdk.Boxlite(sdk.Options(home_dir=str(home)))
        except sdk.BoxliteError as exc:
            if _LOCKED not in str(exc):
                raise sandbox_error(exc, f"open its home {home}") from exc
    raise SandboxError(
        f"all {_MAX_SLOTS} boxlite homes under {root} are held by other processes; "
        "run fewer worker processes on this host"
    )


def box_command(
    box: Any, argv: Sequence[str], env: Mapping[str, str], stdin: bytes | None = None
) -> Command:
    """A :data:`Command` running ``argv`` in ``box`` with its cwd at the workspace, ``stdin``
    sent to its standard input (boxlite's ``Execution.stdin()``), then closed."""

    async def feed(execution: Any) -> None:
        if stdin is None:
            return
        # A command that exits before reading it all is no error here; its exit status tells.
        with contextlib.suppress(_sdk().BoxliteError):
            writer = execution.stdin()
            await writer.send_input(stdin)
            await writer.close()

    async def pump(stream: Any, name: str, output: Output) -> None:
        async for chunk in stream:
            output.put(name, chunk)
            await output.room()
        output.end(name)

    async def run(output: Output, stop: asyncio.Event) -> int:
        execution = await box.exec(
            argv[0], args=list(argv[1:]), env=list(env.items()), cwd=WORKSPACE
        )
        # A broken stream must not cost the exit status: its error is logged, not raised.
        pumps = asyncio.gather(
            pump(execution.stdout(), "stdout", output),
            pump(execution.stderr(), "stderr", output),
            feed(execution),
            return_exceptions=True,
        )
        waiter = asyncio.ensure_future(execution.wait())
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if not waiter.done():
            # The process may end on its own between the check and the kill.
            with contextlib.suppress(_sdk().BoxliteError):
                await execution.kill()
        try:
            result = await asyncio.wait_for(waiter, KILL_GRACE_S)
        except TimeoutError:
            pumps.cancel()
            return -signal.SIGKILL
        try:
            # A process the command left behind may hold its pipes open: do not wait for it.
            for failure in await asyncio.wait_for(pumps, KILL_GRACE_S):
                if failure is not None:
                    log.warning("output stream of %r failed: %s", argv[0], failure)
        except TimeoutError:
            pass
        # Set when the process died without an exit status of its own (its init was killed).
        message = getattr(result, "error_message", None)
        if message:
            output.put("stderr", f"boxlite: {message}\n")
        return int(result.exit_code)

    return run


class BoxliteSandbox(Sandbox):
    def __init__(self, spec: SandboxSpec, runtime: BoxliteRuntime, box: Any) -> None:
        super().__init__(spec)
        self.runtime = runtime
        self.box = box
        self.gateway_host = runtime.gateway_host
        self._closed = False

    def exec(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        timeout_s: float,
        on_line: LineSink | None = None,
        cancel: threading.Event | None = None,
        *,
        stdin: bytes | None = None,
    ) -> ExecResult:
        command = box_command(self.box, argv, env, stdin)
        try:
            return supervise(self.runtime.loop, command, timeout_s, on_line, cancel)
        except _sdk().BoxliteError as exc:
            raise sandbox_error(
                exc, f"run {argv[0]!r} in session '{self.spec.session_id}'"
            ) from exc

    def close(self) -> None:
        """Stop the box, keeping its disk, or remove it if the session is not persistent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.runtime.loop.run(self.runtime.release(self.spec, self.box), _CALL_TIMEOUT_S)
        except (TimeoutError, _sdk().BoxliteError) as exc:
            # The task's work is done; a box left running dies with the worker at the latest.
            log.warning("could not stop the box of session %s: %s", self.spec.session_id, exc)


class BoxliteRuntime(Runtime):
    name = "boxlite"
    keeper_holds = True

    @classmethod
    def gateway_host_of(cls, settings: Settings) -> str | None:
        return settings.boxlite_host_alias

    @classmethod
    def start_timeout_of(cls, settings: Settings) -> float:
        # open() waits this long for the VM, then as long again for boxlite's own calls.
        return settings.boxlite_start_timeout_s + 10.0

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()
        self.image = configured_image(self.settings)
        self.gateway_host: str = self.settings.boxlite_host_alias
        sdk = _sdk()
        self.home, self._boxlite = _acquire_home(sdk, boxlite_root(self.settings))
        self.loop = LoopThread()
        log.info("boxlite %s runtime in %s", getattr(sdk, "__version__", "?"), self.home)

    @classmethod
    def probe(cls) -> Probe:
        return probe_host(get_settings())

    def open(self, spec: SandboxSpec) -> Sandbox:
        """Start the session's box (created on first use) with its workspace and home shared."""
        image = self._image(spec)
        action = f"start the sandbox of session '{spec.session_id}'"
        timeout_s = self.settings.boxlite_start_timeout_s
        started = time.monotonic()
        try:
            box, created = self.loop.run(self._start(spec, image, timeout_s), timeout_s + 10)
        except TimeoutError as exc:
            raise SandboxError(
                f"boxlite could not {action}: the micro-VM did not start within {timeout_s}s; "
                "raise CLAUDEBOX_BOXLITE_START_TIMEOUT_S if the host is only slow"
            ) from exc
        except _sdk().BoxliteError as exc:
            raise sandbox_error(exc, action, image) from exc
        log.info(
            "session %s: box %s %s and started in %.1fs",
            spec.session_id,
            box.id,
            "created" if created else "reused",
            time.monotonic() - started,
        )
        return BoxliteSandbox(spec, self, box)

    def prepare(self, spec: SandboxSpec) -> str:
        """Create the session's box, or find its own, without starting it; return its id."""
        image = self._image(spec)
        try:
            box, _ = self.loop.run(self._prepare(spec, image), _CALL_TIMEOUT_S)
        except _sdk().BoxliteError as exc:
            action = f"create the box of session '{spec.session_id}'"
            raise sandbox_error(exc, action, image) from exc
        return str(box.id)

    def remove(self, session_id: str) -> bool:
        """Remove the session's box from this process's home; False if there was none."""
        try:
            return self.loop.run(self._remove(box_name(session_id)), _CALL_TIMEOUT_S)
        except _sdk().BoxliteError as exc:
            raise sandbox_error(exc, f"remove the box of session '{session_id}'") from exc

    def kept(self) -> list[str]:
        """Ids of the sessions with a box in this process's home (the leak sweep's view)."""
        try:
            names = self.loop.run(self._names(), _CALL_TIMEOUT_S)
        except _sdk().BoxliteError as exc:
            raise sandbox_error(exc, "list its boxes") from exc
        return sorted(
            name.removeprefix(BOX_PREFIX) for name in names if name.startswith(BOX_PREFIX)
        )

    def info(self, session_id: str) -> Any:
        """boxlite's ``BoxInfo`` of the session's box in this process's home, or None."""
        return self.loop.run(self._info(box_name(session_id)), _CALL_TIMEOUT_S)

    def close(self) -> None:
        """Stop every box, then let go of the home (boxlite unlocks it when collected)."""
        if self._boxlite is None:
            return
        try:
            self.loop.run(self._shutdown(), _SHUTDOWN_TIMEOUT_S + 5)
        except (TimeoutError, _sdk().BoxliteError) as exc:
            log.warning("boxlite shutdown in %s: %s", self.home, exc)
        self._boxlite = None
        self.loop.close()

    def _image(self, spec: SandboxSpec) -> str:
        image = spec.image or self.image
        problem = image_problem(image)
        if image is None or problem is not None:
            raise RuntimeUnavailableError(
                f"boxlite cannot run session '{spec.session_id}': {problem}"
            )
        return image

    # Everything below runs on the private loop: boxlite's futures need it running.

    async def _prepare(self, spec: SandboxSpec, image: str) -> tuple[Any, bool]:
        name = box_name(spec.session_id)
        options = box_options(spec, image, self.gateway_host)
        shape = box_shape(spec, image, self.gateway_host)
        box, created = await self._boxlite.get_or_create(options, name=name)
        marker = spec.home / MARKER
        if not created and _read(marker) != f"{box.id} {shape}":
            log.info("replacing box %s (%s): not its session's own, or reshaped", name, box.id)
            await self._boxlite.remove(name, force=True)
            box, created = await self._boxlite.create(options, name=name), True
        marker.write_text(f"{box.id} {shape}")
        return box, created

    async def _start(self, spec: SandboxSpec, image: str, timeout_s: float) -> tuple[Any, bool]:
        box, created = await self._prepare(spec, image)
        try:
            info = await box.info()
            if not info.state.running:
                await asyncio.wait_for(box.start(), timeout_s)
        except BaseException:
            # A box made for this task holds nothing yet; a persistent one keeps its disk.
            if created or not spec.persistent:
                with contextlib.suppress(Exception):
                    await self._boxlite.remove(box_name(spec.session_id), force=True)
            raise
        return box, created

    async def release(self, spec: SandboxSpec, box: Any) -> None:
        if spec.persistent:
            await box.stop()
        else:
            await self._boxlite.remove(box_name(spec.session_id), force=True)

    async def _remove(self, name: str) -> bool:
        if await self._boxlite.get_info(name) is None:
            return False
        try:
            await self._boxlite.remove(name, force=True)
        except _sdk().NotFoundError:
            return False
        return True

    async def _info(self, name: str) -> Any:
        return await self._boxlite.get_info(name)

    async def _names(self) -> list[str]:
        return [str(info.name or "") for info in await self._boxlite.list_info()]

    async def _shutdown(self) -> None:
        await self._boxlite.shutdown(_SHUTDOWN_TIMEOUT_S)


def probe_host(settings: Settings) -> Probe:
    """Can boxlite run sessions here: SDK importable, VMs bootable, image there."""
    problems = []
    version = "?"
    try:
        version = getattr(_sdk(), "__version__", version)
    except RuntimeUnavailableError as exc:
        problems.append(str(exc))
    host = hardware_virtualisation()
    if not host.ok:
        problems.append(host.reason)
    image = configured_image(settings)
    problem = image_problem(image)
    if problem is not None:
        problems.append(problem)
    if problems:
        return Probe(False, "; ".join(problems))
    return Probe(True, f"boxlite {version} micro-VMs ({host.reason}), image {image}")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None
