"""The model gateway and egress proxy a worker runs for the sandboxes of its sessions.

::

    sandbox                                            worker (Gateway, one asyncio thread)
    claude CLI ─▶ 127.0.0.1:3128 ─socat─▶ /run/claudebox/gw.sock ══▶ lease socket
    pip, curl  ─▶ HTTP(S)_PROXY ──┘                                   ├─ origin-form: model API,
                                                                      │  real credential added,
                                                                      │  usage metered, budget
                                                                      └─ CONNECT / absolute-form:
                                                                         allow-listed hosts only

A task takes a :class:`Lease` for its session, binds ``lease.socket_dir`` into the sandbox at
:data:`GUEST_SOCKET_DIR`, runs the agent under :func:`bridged_argv` with :func:`sandbox_env`,
then reads ``lease.usage`` and ``lease.events`` and closes the lease.
"""

from claudebox_pool.workers.gateway.bridge import (
    DEFAULT_PORT,
    GUEST_SOCKET,
    GUEST_SOCKET_DIR,
    PLACEHOLDER_API_KEY,
    bridged_argv,
    sandbox_env,
)
from claudebox_pool.workers.gateway.credential import Credential
from claudebox_pool.workers.gateway.gateway import Gateway
from claudebox_pool.workers.gateway.lease import Event, Lease
from claudebox_pool.workers.gateway.pricing import DEFAULT_PRICES, Price
from claudebox_pool.workers.gateway.usage import Usage

__all__ = [
    "DEFAULT_PORT",
    "DEFAULT_PRICES",
    "GUEST_SOCKET",
    "GUEST_SOCKET_DIR",
    "PLACEHOLDER_API_KEY",
    "Credential",
    "Event",
    "Gateway",
    "Lease",
    "Price",
    "Usage",
    "bridged_argv",
    "sandbox_env",
]
