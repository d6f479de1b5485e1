"""Inside the sandbox: the gateway's socket made reachable as ``127.0.0.1:<port>``.

The sandbox has no network but loopback, and the CLI speaks TCP, so ``socat`` listens on
loopback and carries every connection to the lease's socket, bound into the sandbox. The model
base URL and the HTTP(S) proxy are both that one address: the gateway tells a model call
(origin-form) from an egress request (absolute-form or ``CONNECT``) by the request itself.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

GUEST_SOCKET_DIR = "/run/claudebox"
"""Where a sandbox sees the lease's socket directory (bind ``Lease.socket_dir`` here)."""
SOCKET_NAME = "gw.sock"
GUEST_SOCKET = f"{GUEST_SOCKET_DIR}/{SOCKET_NAME}"
DEFAULT_PORT = 3128
PLACEHOLDER_API_KEY = "sk-ant-claudebox-gateway-placeholder"
"""What the sandbox holds instead of a key; the gateway drops it and adds the real one."""
BRIDGE_EXIT_CODE = 70
"""Exit status of a bridged command whose bridge never came up (EX_SOFTWARE)."""

_READY_POLLS = 500
_READY_POLL_S = 0.01
# Polling /proc/net/tcp for the listening port needs nothing but sh and grep, which every
# sandbox image has; the state column 0A is LISTEN, the port is hexadecimal. A listening
# socket is ready before any client connects, so the command starts only once it can be used.
_SCRIPT = f"""
socat TCP-LISTEN:"$1",bind=127.0.0.1,reuseaddr,fork UNIX-CONNECT:"$3" >/dev/null &
bridge=$!
polls=0
until grep -q ":$2 00000000:0000 0A" /proc/net/tcp; do
  if ! kill -0 "$bridge" 2>/dev/null; then
    echo "claudebox: the gateway bridge (socat) exited before listening" >&2
    exit {BRIDGE_EXIT_CODE}
  fi
  polls=$((polls + 1))
  if [ "$polls" -gt {_READY_POLLS} ]; then
    echo "claudebox: the gateway bridge did not listen in {_READY_POLLS * _READY_POLL_S:g} s" >&2
    exit {BRIDGE_EXIT_CODE}
  fi
  sleep {_READY_POLL_S}
done
shift 3
"$@"
status=$?
kill "$bridge" 2>/dev/null
exit "$status"
"""
# socat splits addresses at ':' and ','; a socket path holding either would be misread.
_SAFE_PATH = re.compile(r"/[A-Za-z0-9_./-]+")


def bridged_argv(
    argv: Sequence[str], guest_socket: str = GUEST_SOCKET, port: int = DEFAULT_PORT
) -> list[str]:
    """``argv`` started once the bridge listens on ``127.0.0.1:port``, its exit status kept.

    The bridge is stopped when the command ends rather than left to die with the sandbox: a
    long-lived sandbox (a boxlite VM) would otherwise keep a stale listener on the port, and
    without a pid namespace it would hold the command's output pipes open.
    """
    if not argv:
        raise ValueError("bridged_argv needs a command to run")
    if not _SAFE_PATH.fullmatch(guest_socket):
        raise ValueError(f"guest socket path {guest_socket!r} must match {_SAFE_PATH.pattern}")
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is not a TCP port")
    return [
        "/bin/sh",
        "-c",
        _SCRIPT,
        "claudebox-bridge",
        str(port),
        f"{port:04X}",
        guest_socket,
        *argv,
    ]


def sandbox_env(port: int = DEFAULT_PORT, host: str = "127.0.0.1") -> dict[str, str]:
    """The environment that sends the CLI's model calls and every HTTP client to the bridge
    (or, given ``host``, straight to a lease's TCP address as the sandbox names it)."""
    url = f"http://{host}:{port}"
    loopback = "127.0.0.1,localhost,::1"
    return {
        "ANTHROPIC_BASE_URL": url,
        "ANTHROPIC_API_KEY": PLACEHOLDER_API_KEY,
        "HTTP_PROXY": url,
        "HTTPS_PROXY": url,
        "http_proxy": url,
        "https_proxy": url,
        "NO_PROXY": loopback,
        "no_proxy": loopback,
        "DISABLE_TELEMETRY": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    }
