"""The keeper: a worker's warm sandboxes, held by its main process for all its pool children.

Why the main process: a session's tasks are routed to a worker (its own queue), not to one of
its prefork children, so the sandbox must outlive the child that ran the last task and be
reachable from whichever child takes the next one. The keeper is a thread of the main process
with a unix socket (in a private 0700 directory) that the children call:

- ``acquire`` a session's sandbox of a given shape (:class:`WarmSpec`): the keeper starts one if
  it has none of that shape (a sandbox of another shape, or one still leased by a task that
  died or lost its lock, is stopped first), and hands the child a descriptor of the sandbox's
  control socket (``SCM_RIGHTS``); the child then talks to the sandbox's exec server itself.
- ``release`` it at the end of the task; it stays running for ``CLAUDEBOX_WARM_IDLE_S``.
- ``drop`` it (cleanup, a session moving, the idle time over, another worker taking over).

A sandbox is either a process running our exec server (bwrap: started by ``command``), or, for
a runtime the keeper holds (``held``: boxlite, one runtime per process), that runtime's own
sandbox kept open, with the exec server's protocol served by a keeper thread
(:mod:`workers.warm.held`). Each request is handled on a thread of its own, so that a slow
sandbox start (a VM's boot) does not hold up the others; but bwrap processes are all started
from one long-lived thread, since bwrap's ``--die-with-parent`` is tied to the thread that
started it: with the main process dead (even by SIGKILL) every warm sandbox dies too.

One sandbox per session: within a worker the keeper holds at most one; across workers, the Redis
key ``claudebox:warm:<session>`` names the worker holding it, and a keeper about to start a sandbox
for a session another live worker holds asks that worker to stop its own first (the
``claudebox_drop_warm`` remote-control command) and waits for its answer. A worker that does not
answer is dead or frozen: a dead one's sandboxes are gone, a frozen one's hold an idle exec server
and no command.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import redis
from redis.exceptions import RedisError

from claudebox_pool.tasks import keys, logs
from claudebox_pool.tasks.connections import text
from claudebox_pool.tasks.errors import SandboxError
from claudebox_pool.tasks.settings import Settings
from claudebox_pool.workers import metrics
from claudebox_pool.workers.runtimes import limits, seccomp
from claudebox_pool.workers.runtimes.base import Runtime, Sandbox, SandboxSpec
from claudebox_pool.workers.runtimes.exec_server import recv_frame, send_frame
from claudebox_pool.workers.runtimes.launch import Launch
from claudebox_pool.workers.runtimes.limits import Confinement
from claudebox_pool.workers.runtimes.process import alive
from claudebox_pool.workers.warm.held import serve_sandbox
from claudebox_pool.workers.warm.protocol import Reply, Request, WarmSpec

log = logging.getLogger(__name__)

SandboxCommand = Callable[[SandboxSpec, int, int | None], Launch]
"""How to start a sandbox for a spec, running the exec server on the given fd, with the seccomp
program (:mod:`workers.runtimes.seccomp`) on the other if not None: its command and its child's
setup (the drop to the session's identity last)."""
RemoteDrop = Callable[[str, str], bool]
"""Ask worker ``hostname`` to stop its warm sandbox of session ``session_id``; True if it
answered (whether or not it had one)."""

TICK_S = 0.5
READY_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0
KEY_MARGIN_S = 10
"""How much longer than the idle time the Redis key naming the keeper lives."""
_PEERCRED = struct.Struct("3i")


class WarmError(Exception):
    """A warm sandbox could not be started or reached (the task then runs in a cold one)."""


def identity(spec: WarmSpec) -> tuple[tuple[int, int], ...]:
    """What the sandbox's bind mounts are bound to: a directory replaced under the same path
    (a checkpoint or archive restored, a session removed by hand and made again) is not seen
    by a sandbox started before, which must then be started anew."""
    paths = [spec.workspace, spec.home, *(host for host, _, _ in spec.mounts)]
    found = []
    for path in paths:
        try:
            info = os.stat(path)
        except OSError:
            found.append((-1, -1))
        else:
            found.append((info.st_dev, info.st_ino))
    return tuple(found)


@dataclass
class Warm:
    spec: WarmSpec
    control: socket.socket
    identity: tuple[tuple[int, int], ...]
    process: subprocess.Popen[bytes] | None = None
    """The sandbox's process, running the exec server (``command``)."""
    confinement: Confinement | None = None
    """The process's cgroup and rlimits (:mod:`workers.runtimes.limits`)."""
    sandbox: Sandbox | None = None
    """The held runtime's sandbox, served by a keeper thread on :attr:`server`."""
    server: socket.socket | None = None
    leased_by: int | None = None
    idle_since: float = field(default_factory=time.monotonic)

    def alive(self) -> bool:
        return self.process.poll() is None if self.process is not None else True


class Keeper:
    def __init__(
        self,
        settings: Settings,
        hostname: str,
        client: redis.Redis,
        remote_drop: RemoteDrop,
        heartbeat_age: Callable[[str], float | None],
        *,
        command: SandboxCommand | None = None,
        held: Callable[[], Runtime] | None = None,
    ) -> None:
        if (command is None) == (held is None):
            raise ValueError("a keeper starts sandboxes with a command or holds a runtime's")
        self.settings = settings
        self.hostname = hostname
        self._command = command
        self._held = held
        self._held_runtime: Runtime | None = None
        self._redis = client
        self._remote_drop = remote_drop
        self._heartbeat_age = heartbeat_age
        self._warm: dict[str, Warm] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="warm-spawn")
        self._dir = _private_dir()
        self.address = self._dir / "keeper.sock"
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(self.address))
        self._listener.listen(64)
        self._listener.settimeout(TICK_S)
        self._thread = threading.Thread(target=self._serve, name="warm-keeper", daemon=True)
        self.created = 0
        """Sandboxes started since the keeper started (the tests and benchmarks count them)."""

    def start(self) -> Keeper:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)
        self._listener.close()
        for session_id in list(self._warm):
            self.drop(session_id)
        self._spawner.shutdown(wait=True)
        if self._held_runtime is not None:
            self._held_runtime.close()
        with contextlib.suppress(OSError):
            self.address.unlink()
            self._dir.rmdir()

    def sessions(self) -> list[str]:
        """The sessions with a warm sandbox, and those a held runtime keeps something for."""
        with self._lock:
            warm = set(self._warm)
        if self._held is not None:
            warm.update(self._runtime().kept())
        return sorted(warm)

    def drop(self, session_id: str, remove: bool = False) -> bool:
        """Stop this worker's warm sandbox of ``session_id``; True if there was one. With
        ``remove``, a held runtime also removes what it keeps for the session (a stopped box)."""
        with self._lock:
            warm = self._warm.pop(session_id, None)
        if warm is not None:
            self._stop(warm)
            self._forget(session_id)
            log.debug("warm sandbox of %s stopped", session_id)
        removed = False
        if remove and self._held is not None:
            removed = self._runtime().remove(session_id)
        return warm is not None or removed

    def _stop(self, warm: Warm) -> None:
        if warm.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(warm.process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                warm.process.wait(STOP_TIMEOUT_S)
        if warm.confinement is not None:
            warm.confinement.close()
        if warm.server is not None:
            # Shut down, not only closed: that wakes the thread serving it from its recv.
            with contextlib.suppress(OSError):
                warm.server.shutdown(socket.SHUT_RDWR)
            warm.server.close()
        if warm.sandbox is not None:
            warm.sandbox.close()
        warm.control.close()

    def _runtime(self) -> Runtime:
        with self._lock:
            if self._held_runtime is None:
                assert self._held is not None
                # Made on first use, after the pool forked: a runtime is never shared by a fork.
                self._held_runtime = self._held()
            return self._held_runtime

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                pass
            except OSError:
                return
            else:
                threading.Thread(
                    target=self._handle, args=(conn,), name="warm-request", daemon=True
                ).start()
            self._expire()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            self._answer_on(conn)

    def _answer_on(self, conn: socket.socket) -> None:
        conn.settimeout(READY_TIMEOUT_S)
        fd_to_send: int | None = None
        try:
            pid, uid, _ = _PEERCRED.unpack(
                conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            )
            message, fds = recv_frame(conn)
            for fd in fds:
                os.close(fd)
            if message is None:
                return
            if uid != os.getuid():
                raise WarmError(f"refused: uid {uid} is not the worker's")
            request = Request.model_validate(message)
            reply, fd_to_send = self._answer(request, pid)
        except Exception as exc:  # a bad request must not stop the keeper
            log.warning("warm keeper: %s", exc)
            reply = Reply(error=str(exc) or type(exc).__name__)
        with contextlib.suppress(OSError):
            send_frame(
                conn,
                reply.model_dump(mode="json", exclude_defaults=True),
                [fd_to_send] if fd_to_send is not None else [],
            )

    def _answer(self, request: Request, pid: int) -> tuple[Reply, int | None]:
        if request.op == "acquire":
            if request.spec is None:
                raise WarmError("acquire needs a spec")
            return Reply(), self._acquire(request.spec, pid).control.fileno()
        if request.op == "release":
            self._release(request.session_id, pid, request.healthy)
            return Reply(), None
        if request.op == "drop":
            dropped = self.drop(request.session_id, request.remove)
            if request.everywhere:
                self._take_over(request.session_id)
            return Reply(dropped=dropped), None
        return Reply(sessions=self.sessions()), None

    def held(self) -> dict[str, int]:
        """The warm sandboxes by state: ``leased`` to a task now, or ``idle``."""
        with self._lock:
            leased = sum(warm.leased_by is not None for warm in self._warm.values())
            return {"idle": len(self._warm) - leased, "leased": leased}

    def _acquire(self, spec: WarmSpec, pid: int) -> Warm:
        asked = time.monotonic()
        session_id = spec.session_id
        with self._lock:
            warm = self._warm.get(session_id)
        if warm is not None and (
            warm.spec != spec
            or warm.identity != identity(spec)
            or warm.leased_by is not None
            or not warm.alive()
        ):
            # Another shape or other directories, a sandbox that died, or one still leased: by a
            # task that died or lost its lock, whose command may still run. Never hand it on.
            self.drop(session_id)
            warm = None
        created = warm is None
        if warm is None:
            self._take_over(session_id)
            self._make_room()
            warm = self._start(spec)
            with self._lock:
                self._warm[session_id] = warm
        warm.leased_by = pid
        if created:
            self._claim(session_id)  # a reused one's key was set at its release, and outlives it
        metrics.record_sandbox_start(time.monotonic() - asked, created)
        return warm

    def _release(self, session_id: str, pid: int, healthy: bool) -> None:
        with self._lock:
            warm = self._warm.get(session_id)
        if warm is None or warm.leased_by != pid:
            return
        if not healthy or not warm.alive():
            self.drop(session_id)
            return
        warm.leased_by = None
        warm.idle_since = time.monotonic()
        self._claim(session_id)

    def _start(self, spec: WarmSpec) -> Warm:
        bound = identity(spec)
        keeper_end, server_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        if self._held is not None:
            try:
                sandbox = self._runtime().open(spec.sandbox_spec())
            except BaseException:
                keeper_end.close()
                server_end.close()
                raise
            threading.Thread(
                target=serve_sandbox, args=(server_end, sandbox), name="warm-held", daemon=True
            ).start()
            self.created += 1
            return Warm(spec, keeper_end, bound, sandbox=sandbox, server=server_end)
        try:
            process, confinement = self._spawner.submit(self._spawn, spec, server_end).result()
        except (OSError, SandboxError) as exc:
            keeper_end.close()
            raise WarmError(f"cannot start a warm sandbox: {exc}") from exc
        finally:
            server_end.close()
        keeper_end.settimeout(READY_TIMEOUT_S)
        try:
            ready, _ = recv_frame(keeper_end)
        except (OSError, EOFError, ValueError) as exc:
            ready = None
            log.warning("warm sandbox of %s did not start: %s", spec.session_id, exc)
        if ready is None or "ready" not in ready:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            confinement.close()
            keeper_end.close()
            raise WarmError(
                f"the warm sandbox's exec server did not start (bwrap exit {process.returncode}; "
                "see the worker's log)"
            )
        keeper_end.settimeout(None)
        self.created += 1
        return Warm(spec, keeper_end, bound, process=process, confinement=confinement)

    def _spawn(
        self, spec: WarmSpec, server_end: socket.socket
    ) -> tuple[subprocess.Popen[bytes], Confinement]:
        """Start the sandbox process (always on the spawner's one long-lived thread) in a
        cgroup of its own, which then holds the whole warm sandbox."""
        assert self._command is not None
        sandbox = spec.sandbox_spec()
        confinement = limits.confine(sandbox, self.settings, limits.WARM)
        program = seccomp.program_fd() if self.settings.seccomp else None
        try:
            started = self._command(sandbox, server_end.fileno(), program)
            started.confine(confinement)
            process = subprocess.Popen(
                started.argv,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                cwd="/",
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                # Not the worker's own stderr, which is its log: the sandbox could write there.
                stderr=subprocess.PIPE,
                pass_fds=(server_end.fileno(), *(() if program is None else (program,))),
                start_new_session=True,
                preexec_fn=started.preexec,
            )
            assert process.stderr is not None
            threading.Thread(
                target=logs.sandbox_stderr,
                args=(spec.session_id, process.stderr),
                name=f"stderr-{spec.session_id}",
                daemon=True,
            ).start()
            return process, confinement
        except subprocess.SubprocessError as exc:
            confinement.close()
            raise OSError(f"its setup failed before bwrap started ({exc})") from exc
        except BaseException:
            confinement.close()
            raise
        finally:
            if program is not None:
                os.close(program)

    def _make_room(self) -> None:
        with self._lock:
            idle = sorted(
                (warm.idle_since, session_id)
                for session_id, warm in self._warm.items()
                if warm.leased_by is None
            )
            excess = len(self._warm) - self.settings.warm_max + 1
        for _, session_id in idle[: max(excess, 0)]:
            self.drop(session_id)

    def _expire(self) -> None:
        now = time.monotonic()
        with self._lock:
            items = list(self._warm.items())
        for session_id, warm in items:
            if not warm.alive():
                self._drop_soon(session_id)
            elif warm.leased_by is None:
                if now - warm.idle_since >= self.settings.warm_idle_s:
                    self._drop_soon(session_id)
            elif not alive(warm.leased_by):
                # The pool child running the task died: its command must not run on.
                self._drop_soon(session_id)

    def _drop_soon(self, session_id: str) -> None:
        if self._held is None:
            self.drop(session_id)
        else:
            # Stopping a VM takes a while: not on the thread that accepts requests.
            threading.Thread(target=self.drop, args=(session_id,), daemon=True).start()

    def _claim(self, session_id: str) -> None:
        ttl = self.settings.warm_idle_s + KEY_MARGIN_S
        try:
            self._redis.set(keys.warm(session_id), self.hostname, ex=ttl)
        except RedisError as exc:  # affinity is a preference: the task still runs
            log.warning("cannot record the warm sandbox of %s: %s", session_id, exc)

    def _forget(self, session_id: str) -> None:
        key = keys.warm(session_id)
        try:
            if self._redis.get(key) in (self.hostname, self.hostname.encode()):
                self._redis.delete(key)
        except RedisError as exc:
            log.warning("cannot forget the warm sandbox of %s: %s", session_id, exc)

    def _take_over(self, session_id: str) -> None:
        """Have any other live worker holding a warm sandbox of the session stop it."""
        try:
            owner = self._redis.get(keys.warm(session_id))
        except RedisError:
            return
        other = None if owner is None else text(owner)
        if other is None or other == self.hostname:
            return
        age = self._heartbeat_age(other)
        if age is None or age > self.settings.worker_alive_s:
            return  # dead: its sandboxes died with it
        if not self._remote_drop(other, session_id):
            log.warning(
                "worker %s holds a warm sandbox of %s and did not answer; starting another",
                other,
                session_id,
            )


def _private_dir() -> Path:
    """The keeper's own 0700 directory, ``<tmp>/claudebox-warm-<uid>/<pid>-<random>``; those
    of keepers that died without closing (a SIGKILL) are removed on the way."""
    root = Path(tempfile.gettempdir()) / f"claudebox-warm-{os.getuid()}"
    with contextlib.suppress(FileExistsError):
        root.mkdir(mode=0o700)
    found = root.lstat()
    if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.getuid() or found.st_mode & 0o077:
        # Not ours, or open to others: a directory of our own elsewhere in the temp dir.
        return Path(tempfile.mkdtemp(prefix="claudebox-warm-"))
    for left in root.iterdir():
        pid = left.name.partition("-")[0]
        if pid.isdigit() and not alive(int(pid)):
            shutil.rmtree(left, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=root))
