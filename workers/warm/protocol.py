"""What a pool child and its worker's keeper say to each other, one request per connection."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from claudebox_pool.workers.runtimes.base import GatewayMount, Identity, Mount, SandboxSpec


class WarmSpec(BaseModel):
    """A sandbox's shape: a warm sandbox is reused only by a task asking for the same one."""

    model_config = ConfigDict(frozen=True)

    session_id: str
    workspace: str
    home: str
    cpus: int
    memory_mib: int
    disk_size_gb: int
    image: str | None
    mounts: tuple[tuple[str, str, bool], ...]
    tcp_gateway: str | None = None
    """Where a TCP gateway lease is seen (it is no mount: a run has a way out to the host's
    loopback, at a port its own environment names); the port is not part of the shape."""
    persistent: bool
    identity: tuple[int, int] | None = None
    """(uid, gid) the sandbox runs as, where the worker is root."""

    @classmethod
    def of(cls, spec: SandboxSpec) -> WarmSpec:
        tcp = [m for m in spec.mounts if isinstance(m, GatewayMount) and m.port is not None]
        shared = [m for m in spec.mounts if m not in tcp]
        return cls(
            session_id=spec.session_id,
            workspace=str(spec.workspace),
            home=str(spec.home),
            cpus=spec.cpus,
            memory_mib=spec.memory_mib,
            disk_size_gb=spec.disk_size_gb,
            image=spec.image,
            mounts=tuple((str(m.host), m.guest, m.read_only) for m in shared),
            tcp_gateway=tcp[0].guest if tcp else None,
            persistent=spec.persistent,
            identity=(spec.identity.uid, spec.identity.gid) if spec.identity else None,
        )

    def sandbox_spec(self) -> SandboxSpec:
        return SandboxSpec(
            session_id=self.session_id,
            workspace=Path(self.workspace),
            home=Path(self.home),
            cpus=self.cpus,
            memory_mib=self.memory_mib,
            disk_size_gb=self.disk_size_gb,
            image=self.image,
            mounts=(
                *(Mount(Path(host), guest, ro) for host, guest, ro in self.mounts),
                *(
                    (GatewayMount(Path(), self.tcp_gateway, read_only=False, port=0),)
                    if self.tcp_gateway is not None
                    else ()
                ),
            ),
            persistent=self.persistent,
            identity=Identity(*self.identity) if self.identity else None,
        )


def warmable(spec: SandboxSpec) -> bool:
    """Whether a run can use a warm sandbox: not one with a gateway lease reached through its
    socket, whose directory is new for every run and is bound in when a sandbox starts."""
    return not any(isinstance(mount, GatewayMount) and mount.port is None for mount in spec.mounts)


class Request(BaseModel):
    op: Literal["acquire", "release", "drop", "list"]
    session_id: str = ""
    spec: WarmSpec | None = None
    healthy: bool = True
    everywhere: bool = False
    """For ``drop``: also have another worker holding one stop it."""
    remove: bool = False
    """For ``drop``: also remove what a held runtime keeps for the session (a stopped box)."""


class Reply(BaseModel):
    error: str | None = None
    dropped: bool = False
    sessions: list[str] = []
