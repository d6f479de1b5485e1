"""The seccomp filter of a bwrap sandbox: the system calls an agent never needs, denied.

Built with libseccomp (its Python binding ``pyseccomp``), exported as BPF and handed to bwrap
as ``--seccomp FD``; bwrap loads it just before it executes the sandbox's first command, so the
sandbox's own setup (its mounts) is done first. Everything not listed is allowed: the aim is
the kernel's attack surface, in the spirit of Anthropic's sandbox-runtime (srt) and of the
list flatpak and Sandstorm share, not a full allow-list. A system call of another ABI than the
host's (a 32-bit ``int 0x80`` that would slip past the numbers below) kills the process.

=================================================  ======  ======================================
system calls                                       answer  why an agent never needs them
=================================================  ======  ======================================
mount umount2 pivot_root chroot open_tree          EPERM   remounting a read-only bind writable,
move_mount fsopen fsconfig fsmount fspick                  or leaving the sandbox's root
mount_setattr
unshare setns; clone with a CLONE_NEW* flag        EPERM   new namespaces (a new user namespace
                                                           gives back every capability inside)
clone3                                             ENOSYS  its flags sit in memory seccomp cannot
                                                           read; libc falls back to clone
ptrace process_vm_readv process_vm_writev          EPERM   reading or steering another process
kexec_load kexec_file_load reboot                  EPERM   replacing or stopping the kernel
init_module finit_module delete_module             EPERM   loading kernel code
bpf perf_event_open userfaultfd                    EPERM   kernel attack surface used by exploits
io_uring_setup io_uring_enter io_uring_register    ENOSYS  the same; programs fall back to
                                                           plain reads and writes
keyctl add_key request_key                         EPERM   the kernel keyring is not namespaced
open_by_handle_at name_to_handle_at                EPERM   opening files by handle escapes binds
                                                           ("shocker")
syslog acct quotactl swapon swapoff uselib         EPERM   host administration
iopl ioperm settimeofday clock_settime             EPERM   hardware ports, the host's clock
clock_adjtime adjtimex lookup_dcookie vhangup
personality (but PER_LINUX)                        EPERM   turns off address randomisation
ioctl TIOCSTI, TIOCLINUX                           EPERM   typing into a terminal outside
=================================================  ======  ======================================

Not denied, unlike srt's own filter: ``socket(AF_UNIX)``. srt blocks it so that no process can
reach a host service except through its proxies; here the only unix sockets inside are the ones
bound in on purpose (the model gateway's, bridged by socat) and the sandbox sees no host path
that holds another.
"""

from __future__ import annotations

import errno
import os
from functools import cache

import pyseccomp

DENIED = [
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "open_tree",
    "move_mount",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    "unshare",
    "setns",
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "kexec_load",
    "kexec_file_load",
    "reboot",
    "init_module",
    "finit_module",
    "delete_module",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "keyctl",
    "add_key",
    "request_key",
    "open_by_handle_at",
    "name_to_handle_at",
    "syslog",
    "acct",
    "quotactl",
    "swapon",
    "swapoff",
    "uselib",
    "iopl",
    "ioperm",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "lookup_dcookie",
    "vhangup",
]
"""Denied whatever their arguments, with EPERM."""
UNSUPPORTED = ("clone3", "io_uring_setup", "io_uring_enter", "io_uring_register")
"""Answered ENOSYS, so that programs take their older way."""

CLONE_NEW_FLAGS = (
    0x00020000,  # CLONE_NEWNS
    0x02000000,  # CLONE_NEWCGROUP
    0x04000000,  # CLONE_NEWUTS
    0x08000000,  # CLONE_NEWIPC
    0x10000000,  # CLONE_NEWUSER
    0x20000000,  # CLONE_NEWPID
    0x40000000,  # CLONE_NEWNET
)
TERMINAL_IOCTLS = (0x5412, 0x541C)  # TIOCSTI, TIOCLINUX
PER_LINUX = 0
LOW_32_BITS = 0xFFFFFFFF


def build() -> pyseccomp.SyscallFilter:
    found = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    deny, absent = pyseccomp.ERRNO(errno.EPERM), pyseccomp.ERRNO(errno.ENOSYS)
    for name in DENIED:
        found.add_rule(deny, name)
    for name in UNSUPPORTED:
        found.add_rule(absent, name)
    for flag in CLONE_NEW_FLAGS:
        found.add_rule(deny, "clone", pyseccomp.Arg(0, pyseccomp.MASKED_EQ, flag, flag))
    for request in TERMINAL_IOCTLS:
        # Only the low 32 bits are the request: compared masked, so high bits cannot hide it.
        found.add_rule(deny, "ioctl", pyseccomp.Arg(1, pyseccomp.MASKED_EQ, LOW_32_BITS, request))
    found.add_rule(deny, "personality", pyseccomp.Arg(0, pyseccomp.NE, PER_LINUX))
    return found


@cache
def program() -> bytes:
    """The filter as the BPF program bwrap loads (built once per process)."""
    fd = os.memfd_create("claudebox-seccomp", os.MFD_CLOEXEC)
    try:
        with os.fdopen(os.dup(fd), "wb") as out:
            build().export_bpf(out)
        return os.pread(fd, os.fstat(fd).st_size, 0)
    finally:
        os.close(fd)


def program_fd() -> int:
    """A new descriptor to read the program from, from its start, for one bwrap (``--seccomp``
    reads it to its end); not inheritable: pass it with ``pass_fds`` and close it after."""
    fd = os.memfd_create("claudebox-seccomp", os.MFD_CLOEXEC)
    os.write(fd, program())
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def report(on: bool) -> str:
    """What `claudebox-pool doctor` says of the filter (``on``: CLAUDEBOX_SECCOMP)."""
    if not on:
        return "seccomp: off (CLAUDEBOX_SECCOMP=false)"
    try:
        size = len(program())
    except (OSError, RuntimeError) as exc:
        return f"seccomp: cannot be built here ({exc}); is libseccomp2 installed?"
    return (
        f"seccomp: {len(DENIED) + len(UNSUPPORTED) + 3} system calls denied or restricted "
        f"(libseccomp, {size // 8} BPF instructions; the list: workers/runtimes/seccomp.py)"
    )
