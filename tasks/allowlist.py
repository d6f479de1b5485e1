"""Which hosts a sandbox may reach through the egress proxy (the workers' gateway enforces it;
the producer reads it too, to refuse an MCP server it would not let through before queueing).

An entry is ``host:port`` (that port only) or a bare ``host`` (its scheme's default port: 443
for ``CONNECT`` and ``https://``, 80 for ``http://``). Hosts match exactly, case-insensitively;
there are no wildcards, so every host an agent needs is named.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

DEFAULT_PORTS = {"http": 80, "https": 443}
"""The port of a URL that names none, by scheme."""


@dataclass(frozen=True)
class Target:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_authority(authority: str, default_port: int) -> Target | None:
    """``host[:port]`` (IPv6 in brackets) as a target, or None if it is not one."""
    split = _split(authority)
    if split is None:
        return None
    host, port = split
    return Target(host, port if port is not None else default_port)


def _split(authority: str) -> tuple[str, int | None] | None:
    try:
        parts = urlsplit(f"//{authority}")
        port = parts.port
    except ValueError:
        return None
    host = (parts.hostname or "").rstrip(".")
    if not host or parts.username is not None or parts.path or parts.query or port == 0:
        return None
    return host, port


@dataclass(frozen=True)
class AllowList:
    exact: frozenset[Target]
    default_port_hosts: frozenset[str]

    @classmethod
    def of(cls, *groups: Iterable[str]) -> AllowList:
        """The union of entries; raises ValueError naming an entry that is not ``host[:port]``."""
        exact: set[Target] = set()
        hosts: set[str] = set()
        for entry in (e.strip() for group in groups for e in group):
            split = _split(entry)
            if split is None:
                raise ValueError(f"egress allow-list entry {entry!r} is not host or host:port")
            host, port = split
            if port is None:
                hosts.add(host)
            else:
                exact.add(Target(host, port))
        return cls(frozenset(exact), frozenset(hosts))

    def union(self, other: AllowList) -> AllowList:
        return AllowList(
            self.exact | other.exact, self.default_port_hosts | other.default_port_hosts
        )

    def allows(self, target: Target, default_port: int) -> bool:
        if target in self.exact:
            return True
        return target.port == default_port and target.host in self.default_port_hosts

    def allows_url(self, url: str) -> bool:
        """Whether an ``http://`` or ``https://`` URL's host and port are on the list."""
        parts = urlsplit(url)
        default_port = DEFAULT_PORTS.get(parts.scheme.lower())
        target = None if default_port is None else parse_authority(parts.netloc, default_port)
        return target is not None and self.allows(target, default_port or 0)
