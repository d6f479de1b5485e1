"""Choosing a runtime: the configured one, or for ``auto`` the strongest this host can run."""

from __future__ import annotations

import importlib
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from claudebox_pool.tasks.errors import RuntimeUnavailableError
from claudebox_pool.tasks.settings import RuntimeName
from claudebox_pool.workers.runtimes.base import Probe, Runtime

log = logging.getLogger(__name__)

_MODULES: dict[str, tuple[str, str]] = {
    "boxlite": ("claudebox_pool.workers.runtimes.boxlite", "BoxliteRuntime"),
    "bwrap": ("claudebox_pool.workers.runtimes.bwrap", "BwrapRuntime"),
    "local": ("claudebox_pool.workers.runtimes.local", "LocalRuntime"),
}
_AUTO_ORDER = ("boxlite", "bwrap")


def hardware_virtualisation(cpuinfo: Path = Path("/proc/cpuinfo")) -> Probe:
    """A micro-VM needs KVM backed by VT-x/AMD-V (or macOS's Hypervisor.framework).

    A paravirtual /dev/kvm (no vmx/svm flag) is present on some cloud VMs, yet boxlite's guest
    kernel cannot boot on it.
    """
    if sys.platform == "darwin":
        return Probe(True, "macOS Hypervisor.framework")
    if not Path("/dev/kvm").exists():
        return Probe(False, "no /dev/kvm (no hardware virtualisation exposed to this host)")
    try:
        text = cpuinfo.read_text()
    except OSError as exc:
        return Probe(False, f"cannot read {cpuinfo}: {exc}")
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    if flags & {"vmx", "svm"}:
        return Probe(True, "/dev/kvm with VT-x/AMD-V")
    return Probe(False, "/dev/kvm is paravirtual (no vmx/svm CPU flag); micro-VMs cannot boot")


def runtime_class(name: str) -> type[Runtime]:
    module_name, class_name = _MODULES[name]
    cls: type[Runtime] = getattr(importlib.import_module(module_name), class_name)
    return cls


@dataclass(frozen=True)
class Choice:
    runtime: type[Runtime]
    reason: str


def choose(name: RuntimeName) -> Choice:
    """The runtime to use for ``name``, with a one-line reason; RuntimeUnavailableError if none."""
    if name != "auto":
        probe = runtime_class(name).probe()
        if not probe.ok:
            raise RuntimeUnavailableError(
                f"runtime '{name}' cannot run here: {probe.reason}. "
                "Set CLAUDEBOX_RUNTIME=auto to pick one that can"
            )
        return Choice(runtime_class(name), f"{name} (configured): {probe.reason}")
    refusals: list[str] = []
    for candidate in _AUTO_ORDER:
        probe = runtime_class(candidate).probe()
        if probe.ok:
            why = "; ".join(refusals)
            return Choice(
                runtime_class(candidate),
                f"auto chose {candidate}: {probe.reason}" + (f" ({why})" if why else ""),
            )
        refusals.append(f"{candidate} unavailable: {probe.reason}")
    raise RuntimeUnavailableError(
        "no sandbox can run on this host: "
        + "; ".join(refusals)
        + ". Install bubblewrap, or set CLAUDEBOX_RUNTIME=local for development only"
    )
