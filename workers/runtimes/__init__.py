"""Sandboxes a session's agent runs in: boxlite micro-VMs, bubblewrap namespaces, or (dev) none."""
