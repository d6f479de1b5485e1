"""A sandbox's only way out: the worker's model gateway, for one run of one session.

The claude agent always goes through it (that is where the credential, the metering and the
budget live); the shell agent only when the session may reach some host, since with an empty
allow-list the proxy would refuse everything the sandbox's missing network refuses already.

A sandbox reaches its lease one of two ways (:attr:`Sandbox.gateway_host`): the lease's unix
socket bound in and bridged to loopback by socat (bwrap, local), or, for a micro-VM that no
socket can enter, the lease's TCP port on the host's loopback under the name the VM's network
gives the host (boxlite). The spec carries the way out as a :class:`GatewayMount`, which for
TCP holds the port the runtime must open the sandbox's network to.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

from claudebox_pool.tasks.models import CodeRequest, SessionRecord
from claudebox_pool.tasks.settings import Settings
from claudebox_pool.workers import identity
from claudebox_pool.workers.agents.base import AgentOutcome, Invocation
from claudebox_pool.workers.gateway import (
    DEFAULT_PORT,
    GUEST_SOCKET_DIR,
    Credential,
    Gateway,
    Lease,
    bridged_argv,
    sandbox_env,
)
from claudebox_pool.workers.gateway.bridge import SOCKET_NAME
from claudebox_pool.workers.gateway.policy import RequestPolicy
from claudebox_pool.workers.gateway.pricing import prices_from
from claudebox_pool.workers.runtimes.base import GatewayMount, Runtime, Sandbox

_TCP_HOST = "127.0.0.1"
"""Where a TCP lease listens: boxlite's user-mode network carries the VM's connections to its
host alias to the host's loopback, and nothing outside this host should reach a lease."""


def credential(settings: Settings) -> Credential | None:
    """The worker's model credential: the settings', else the worker's own environment."""
    if settings.anthropic_api_key is not None:
        return Credential.api_key(settings.anthropic_api_key)
    if settings.claude_code_oauth_token is not None:
        return Credential.oauth_token(settings.claude_code_oauth_token)
    if key := os.environ.get("ANTHROPIC_API_KEY"):
        return Credential.api_key(key)
    if token := os.environ.get("CLAUDE_CODE_OAUTH_TOKEN"):
        return Credential.oauth_token(token)
    return None


def start_gateway(settings: Settings) -> Gateway:
    return Gateway(
        settings.model_api_url,
        credential(settings),
        prices_from(settings.model_prices),
        settings.egress_allow,
        policy=RequestPolicy.of(
            settings.gateway_allow_server_tools, settings.gateway_allowed_betas
        ),
    ).start()


@dataclass
class Passage:
    """The gateway lease of one run, and how the sandbox reaches it."""

    lease: Lease
    mount: GatewayMount
    has_credential: bool

    def wrap(self, invocation: Invocation, sandbox: Sandbox) -> Invocation:
        """The agent's command with the gateway's environment, behind the bridge if the
        sandbox reaches the gateway through the lease's socket."""
        if sandbox.gateway_host is not None:
            if self.lease.tcp_address is None:
                raise RuntimeError(
                    f"the sandbox reaches the gateway over TCP at {sandbox.gateway_host} but "
                    "the lease was made without a TCP address"
                )
            port = self.lease.tcp_address[1]
            env = self._env(invocation, sandbox_env(port, sandbox.gateway_host))
            return Invocation(list(invocation.argv), env, invocation.stdin)
        port = DEFAULT_PORT if sandbox.private_network else _free_port()
        guest_socket = f"{sandbox.path_of(self.mount)}/{SOCKET_NAME}"
        env = self._env(invocation, sandbox_env(port))
        return Invocation(bridged_argv(invocation.argv, guest_socket, port), env, invocation.stdin)

    def _env(self, invocation: Invocation, gateway_env: dict[str, str]) -> dict[str, str]:
        env = {**invocation.env, **gateway_env}
        if not self.has_credential:
            # No key anywhere: let the CLI say "Not logged in" instead of calling in vain.
            env.pop("ANTHROPIC_API_KEY", None)
        return env

    def settle(self, outcome: AgentOutcome, session_id: str) -> AgentOutcome:
        """Fold the gateway's metering and events into the agent's outcome."""
        usage = self.lease.usage
        events = [(action, dict(context)) for action, context in self.lease.events]
        outcome.events.extend(events)
        outcome.cost_usd = usage.cost_usd
        outcome.model_requests = usage.requests
        outcome.usage = usage.by_model
        refused = next((ctx for action, ctx in events if action == "budget_exceeded"), None)
        api_error = next((ctx for action, ctx in events if action == "model_error"), None)
        if api_error is not None and not outcome.success:
            detail = f"model API answered {api_error.get('status')}: {api_error.get('message')}"
            outcome.error = f"{outcome.error} ({detail})" if outcome.error else detail
        if refused is not None:
            outcome.success = False
            outcome.error = (
                f"session '{session_id}' reached its model budget of "
                f"${float(refused['budget_usd']):.4f} (spent ${float(refused['spent_usd']):.4f}); "
                "raise it with ClaudeBox(budget_usd=...) on a new session or "
                "CLAUDEBOX_SESSION_BUDGET_USD"
            )
        return outcome


class GatewayOwner(Protocol):
    """What a run needs of its worker: settings, and a gateway started on first use."""

    @property
    def settings(self) -> Settings: ...

    @property
    def gateway(self) -> Gateway: ...

    @property
    def has_credential(self) -> bool: ...

    @property
    def runtime(self) -> Runtime: ...


@contextmanager
def passage(
    owner: GatewayOwner, request: CodeRequest, record: SessionRecord
) -> Iterator[Passage | None]:
    """A lease for this run, or None where the run needs no way out (the gateway then stays
    unstarted in a worker that only ever runs offline shell jobs)."""
    settings = owner.settings
    hosts = [*record.egress_allow]
    if request.agent != "claude" and not (hosts or settings.egress_allow):
        yield None
        return
    budget = record.budget_usd if record.budget_usd is not None else settings.session_budget_usd
    over_tcp = owner.runtime.gateway_host is not None
    lease = owner.gateway.lease(
        record.session_id,
        budget_usd=budget,
        spent_usd=record.total_cost_usd,
        egress_allow=hosts,
        tcp_host=_TCP_HOST if over_tcp else None,
    )
    try:
        sandbox_user = identity.of(record)
        if sandbox_user is not None:
            lease.give_to(sandbox_user.uid, sandbox_user.gid)
        port = lease.tcp_address[1] if lease.tcp_address is not None else None
        mount = GatewayMount(lease.socket_dir, GUEST_SOCKET_DIR, read_only=False, port=port)
        yield Passage(lease, mount, owner.has_credential)
    finally:
        lease.close()


def _free_port() -> int:
    """A loopback port for a bridge that shares the host's network (the local runtime)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
