"""The syscall filter of the bubblewrap backend: calls untrusted Python never needs fail with EPERM.

Built with libseccomp (through ``pyseccomp``, a ctypes binding to the system's libseccomp2) and
handed to ``bwrap --seccomp FD`` as compiled BPF, which bwrap loads last, just before it execs the
sandboxed command: its own mounts are done by then, and every process of the run inherits the
filter. Everything is allowed except the list below, which returns EPERM (Python sees an
``OSError``, nothing is killed). ``clone3`` answers ENOSYS instead, because its flags sit in
memory a filter cannot read: glibc then falls back to ``clone``, whose namespace flags are checked.

What is blocked, and why: debugging other processes (``ptrace``, ``process_vm_*``), the kernel's
keyring, BPF, perf and io_uring (large attack surfaces), every way to make or enter namespaces and
mounts (``unshare``, ``setns``, ``clone`` with a ``CLONE_NEW*`` flag, the old and new mount APIs),
modules, kexec, reboot, swap, quotas, accounting, the clock, raw I/O ports, and file handles that
bypass path checks (``open_by_handle_at``). Syscalls of other ABIs (i386, x32) are not in the
filter's architecture and kill the caller, libseccomp's default.
"""

from __future__ import annotations

import errno
import functools
import tempfile

import structlog

from exitagent.errors import SandboxUnavailable

log = structlog.get_logger(__name__)

BLOCKED = (
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp",
    "keyctl", "add_key", "request_key",
    "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot",
    "fsopen", "fsconfig", "fsmount", "fspick", "move_mount", "open_tree", "mount_setattr",
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load",
    "reboot", "swapon", "swapoff", "quotactl", "quotactl_fd", "acct", "syslog", "vhangup",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "iopl", "ioperm",
    "open_by_handle_at", "name_to_handle_at", "lookup_dcookie", "uselib",
    "nfsservctl", "_sysctl",
)  # fmt: skip
# CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET, NEWTIME (linux/sched.h)
CLONE_NAMESPACE_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000, 0x80)


@functools.cache
def filter_bpf() -> bytes:
    """The compiled filter (a few hundred bytes), built once per process."""
    try:
        import pyseccomp as seccomp
    except (ImportError, RuntimeError) as err:  # RuntimeError: the binding found no libseccomp
        raise SandboxUnavailable(
            f"the sandbox's syscall filter needs libseccomp ({err}): `apt-get install libseccomp2` "
            "and `pip install pyseccomp`"
        ) from err
    rules = seccomp.SyscallFilter(seccomp.ALLOW)
    deny = seccomp.ERRNO(errno.EPERM)
    unknown = []
    for name in BLOCKED:
        try:
            rules.add_rule(deny, name)
        except OSError:  # not a syscall of this architecture or libseccomp version
            unknown.append(name)
    for flag in CLONE_NAMESPACE_FLAGS:  # rules on one syscall are OR-ed: any namespace flag denies
        rules.add_rule(deny, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
    rules.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    with tempfile.TemporaryFile() as out:
        rules.export_bpf(out)
        out.seek(0)
        program = out.read()
    log.info("sandbox_seccomp_built", blocked=len(BLOCKED) - len(unknown), unknown=unknown, bytes=len(program))
    return program
