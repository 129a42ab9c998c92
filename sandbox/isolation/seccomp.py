"""The seccomp-bpf layer: a system-call filter built with libseccomp, loaded raw.

:func:`build` runs in the fork server, once per policy: it drives libseccomp
(through ctypes) to compile the policy's filter and exports the BPF program
as bytes. :func:`load` runs in each child: one ``prctl(PR_SET_SECCOMP)`` with
those bytes. The child never touches libseccomp, and no filter is compiled
per sandbox.

The filter allows everything except:

- kernel-attack surface and namespace/mount/tracing calls -> ``EPERM``
  (a readable ``PermissionError`` in Python);
- loading kernel code, kexec and reboot -> the process is killed (``SIGSYS``):
  no legitimate Python code makes them, a kill is the safer answer;
- ``execve``/``execveat`` -> ``EPERM`` (the child never needs to exec);
- process creation: ``fork``/``vfork``/``clone`` -> ``EAGAIN`` unless the
  policy allows processes (so a fork or thread bomb reads as the
  ``processes`` limit); ``clone3`` -> ``ENOSYS`` so glibc falls back to
  ``clone``, whose flags a filter can inspect (its arguments live in memory
  a filter cannot read); with processes allowed, ``clone`` that would create
  namespaces -> ``EPERM``;
- ``socket``/``socketpair`` -> ``EPERM`` for every address family the policy
  does not list in ``isolation.allowed_sockets`` (default: all of them);
- ``ioctl(TIOCSTI/TIOCLINUX)`` -> ``EPERM`` (typing into a terminal); socket
  and wireless ioctls (request types 0x89 and 0x8B) -> ``EPERM``: on the
  channel, a socket the host made, they described the host's network
  namespace (interfaces, addresses, MACs, drivers);
- ``prctl(PR_SET_PDEATHSIG)`` (it would disarm the signal that kills the
  child with its fork server), ``prctl(PR_SET_MEMORY_MERGE)`` and
  ``madvise(MADV_MERGEABLE)`` (KSM, for the process or a region) -> ``EPERM``;
- SysV IPC and POSIX message queues -> ``EPERM`` unless the policy sets
  ``isolation.allow_ipc``; ``inotify_*`` and ``fcntl(F_NOTIFY)`` (they name
  files in directories the code may not list, or tell when others read them)
  and ``sysinfo`` (host memory and process count) -> ``EPERM``;
- ``flock`` and ``fcntl(F_SETLEASE)`` -> ``EPERM``: locks and leases on the
  read-only runtime every sandbox shares would block other tenants;
- setting the set-user-ID or set-group-ID bit of a file (``chmod`` and the calls that create
  files, with either bit in their mode) -> ``EPERM``, and ``openat2`` (its mode lives in memory
  a filter cannot read) -> ``ENOSYS`` (glibc and Python use ``openat``): where the scratch
  directory is on the host's disk, such a file is there for every local user to run as the
  child's uid (the host's own user, for a host that is not root);
- with ``metadata`` (a child whose uid may own host files it can reach: no filesystem view, no
  uid of its own) every change of a file's mode, owner, times or extended attributes ->
  ``EPERM``: Landlock governs none of them;
- machine-wide pools: native AIO (``io_setup`` ...) and huge pages
  (``MAP_HUGETLB``, ``MFD_HUGETLB``, ``SHM_HUGETLB``) -> ``EPERM``; so are
  ``splice``/``tee``/``vmsplice`` (they pin pages the host wrote);
- with no socket family allowed, ``bind``/``connect``/``listen``/``accept*``
  -> ``EPERM``: the channel, the only socket, never needs them;
- any system call of another ABI (i386 ``int 0x80``, x32) -> killed;
- any system call number above the newest this list was reviewed against
  (:data:`NEWEST_REVIEWED`, up to 1023), where the architecture numbers new
  calls as the kernel's unified table does (x86_64, aarch64, ...) ->
  ``ENOSYS``, as on a kernel that lacks it (glibc falls back on ``ENOSYS``):
  a call a later kernel adds is refused until it is reviewed, not allowed by
  default.

A name libseccomp does not know is an error when the filter is built (a typo
must not drop a rule), unless it is one of the recent calls of
:data:`RECENT_NUMBERS` (older libseccomp releases know none of them), which
are refused by number; a call the running architecture lacks is skipped.

Stdlib only (ctypes); :func:`load` runs in the child.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
from typing import Any

from sandbox.isolation._sys import libc

__all__ = ["SeccompError", "build", "libseccomp_version", "load", "rule_names"]

SCMP_ACT_KILL_PROCESS = 0x80000000
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_FLTATR_ACT_BADARCH = 2
SCMP_CMP_MASKED_EQ = 7
#: What libseccomp's name resolver returns for a name it does not know on any architecture.
NR_SCMP_ERROR = -1


def _errno_action(err: int) -> int:
    """libseccomp's SCMP_ACT_ERRNO(err)."""
    return 0x00050000 | (err & 0xFFFF)


PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2

#: Refused with EPERM: namespaces, mounts, tracing and other processes' memory,
#: kernel interfaces with a long CVE history, privileged administration.
EPERM_SYSCALLS = (
    "execve", "execveat",
    "ptrace", "process_vm_readv", "process_vm_writev", "process_madvise", "pidfd_getfd", "kcmp",
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns",
    "move_mount", "open_tree", "open_tree_attr", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    "listmount", "statmount",
    "bpf", "userfaultfd", "perf_event_open", "keyctl", "add_key", "request_key",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "swapon", "swapoff", "name_to_handle_at", "open_by_handle_at", "acct", "quotactl", "quotactl_fd",
    "syslog", "vhangup", "iopl", "ioperm", "settimeofday", "clock_settime", "adjtimex", "clock_adjtime",
    "sethostname", "setdomainname", "lookup_dcookie", "uselib", "fanotify_init",
    "migrate_pages", "move_pages", "mbind", "set_mempolicy", "set_mempolicy_home_node",
    "lsm_get_self_attr", "lsm_set_self_attr", "lsm_list_modules",
)  # fmt: skip

#: System calls of the list above that libseccomp releases before 2.6 do not know (2.5.4 knows
#: none of them), by number. ``listmount`` and ``statmount`` (6.8) describe every mount of the
#: child's view: host paths, the scratch path and its tmpfs options with the sandbox's uid,
#: machine-wide mount ids; ``open_tree_attr`` (6.15) is ``open_tree`` with attributes;
#: ``lsm_*`` (6.8) read and set the process's LSM attributes. Since Linux 5.1
#: (``pidfd_send_signal``, 424) every architecture numbers a new call alike (alpha and mips with
#: an offset): these numbers hold where libseccomp gives ``pidfd_send_signal`` 424
#: (:func:`_unified_table`); elsewhere a name libseccomp does not know still stops the build.
RECENT_NUMBERS = {
    "statmount": 457, "listmount": 458, "lsm_get_self_attr": 459, "lsm_set_self_attr": 460,
    "lsm_list_modules": 461, "setxattrat": 463, "removexattrat": 466, "open_tree_attr": 467,
    "file_setattr": 469,
}  # fmt: skip

#: The newest system call the lists here were reviewed against: ``file_setattr`` (469, Linux
#: 6.17; 6.18 adds none). Where the table is the unified one (see :data:`RECENT_NUMBERS`), every
#: number above it up to :data:`NUMBER_SPAN` gets ``ENOSYS`` (what a kernel without the call
#: answers, so that glibc falls back) until someone reviews it and moves this line. Allowed
#: among 457-469: ``mseal`` (462), ``getxattrat``/``listxattrat`` (464-465), ``file_getattr``
#: (468): the calls they extend are allowed; ``setxattrat``, ``removexattrat`` and
#: ``file_setattr`` go with :data:`METADATA_SYSCALLS`.
NEWEST_REVIEWED = 469
#: Room of the system call tables: numbers above it are no call on any architecture here
#: (x86_64's x32 numbers, 0x40000000 and up, are another ABI: killed).
NUMBER_SPAN = 1023

#: Refused with EPERM unless the policy sets ``isolation.allow_ipc``: SysV IPC and
#: POSIX message queues (each sandbox also has its own IPC namespace).
IPC_SYSCALLS = (
    "shmget", "shmat", "shmctl", "shmdt", "msgget", "msgsnd", "msgrcv", "msgctl",
    "semget", "semop", "semtimedop", "semctl", "ipc",
    "mq_open", "mq_unlink", "mq_timedsend", "mq_timedreceive", "mq_notify", "mq_getsetattr",
)  # fmt: skip

#: Refused with EPERM: they reveal what the other layers hide. inotify reports the
#: names of files created in directories Landlock does not let the code list;
#: sysinfo reports the host's memory and process count.
OBSERVE_SYSCALLS = ("inotify_init", "inotify_init1", "inotify_add_watch", "sysinfo")

#: Refused with EPERM: state every sandbox shares. ``flock`` needs no write access, so a lock on a
#: read-only runtime file (``os.py``) blocks or signals every other tenant (and a lock on a
#: readable audit log would stall the host). POSIX record locks stay (SQLite in scratch needs
#: them): a write lock needs a file opened for writing, which only scratch holds. Native AIO
#: contexts count against one machine-wide pool (``fs.aio-max-nr``): one ``io_setup(65536)``
#: took all of it, and every other program's AIO failed until the sandbox closed.
#: ``splice``, ``tee`` and ``vmsplice`` move page references into pipes of the child's own: the
#: pages of a value the host wrote (a memfd it lends, a pipe it streams through) stayed pinned,
#: charged to the host, after the host truncated its memfd (57 MiB per sandbox, measured).
SHARED_STATE_SYSCALLS = (
    "flock", "io_setup", "io_destroy", "io_submit", "io_cancel", "io_getevents", "io_pgetevents",
    "splice", "tee", "vmsplice",
)  # fmt: skip

#: Refused with EPERM when the policy allows no socket family: the channel (made by the host, so
#: in the host's network namespace) is then the child's only socket, and it never binds, connects,
#: listens or accepts. ``connect`` on it looked the name up in the host's namespace before it
#: failed: EISCONN for a listening abstract socket there, ECONNREFUSED for none, an oracle for
#: the host's abstract services.
CHANNEL_ONLY_SYSCALLS = ("bind", "connect", "listen", "accept", "accept4")

#: Huge pages come from the machine's one pool (``vm.nr_hugepages``), which the memory cgroup does
#: not charge and the peak RSS does not show: a sandbox could take every one. Refused with EPERM:
#: ``mmap`` with ``MAP_HUGETLB``, ``memfd_create`` with ``MFD_HUGETLB`` and (with IPC allowed)
#: ``shmget`` with ``SHM_HUGETLB``, as (system call, flags argument, flag). Transparent huge
#: pages (``madvise``) are ordinary memory and stay.
HUGETLB_FLAGS = (("mmap", 3, 0x40000), ("memfd_create", 1, 0x4), ("shmget", 2, 0x800))

#: The set-user-ID and set-group-ID bits of a mode.
SETID_BITS = (0o4000, 0o2000)
#: Calls that take a file mode, with the index of that argument: refused with EPERM when it carries
#: a set-id bit, whatever the policy. Without the ``scratch_fs`` tmpfs (turned off, or no user
#: namespaces) the scratch directory is on the host's disk, and the child owns it: it made a copy
#: of the interpreter there set-user-ID (``chmod 4755``), opened the directory to all (``chmod
#: 755``), and any local user could run that copy as the child's uid, which for a host that is
#: not root is the host's own user. No code in a sandbox needs such a file.
MODE_ARGUMENTS = (
    ("chmod", 1), ("fchmod", 1), ("fchmodat", 2), ("fchmodat2", 2),
    ("open", 2), ("openat", 3), ("creat", 1), ("mknod", 1), ("mknodat", 2),
)  # fmt: skip
#: Refused with EPERM when the filter is built with ``metadata``: a file's mode, owner, times and
#: extended attributes. Landlock governs none of them (it knows reads, writes, creations, renames
#: and removals), so where no filesystem view hides the host's files and the child's uid is not one
#: of its own (a host that is not root, or root without the identity layer) the code changed its
#: user's files: ``chmod 644`` on a 0600 key file for every local user to read, ``chmod 777`` on a
#: directory of the interpreter's (a virtual environment in the home directory) for any of them to
#: write code into, extended attributes, times. In a filesystem view these reach only the scratch
#: directory (every other file there is a read-only bind), and under a uid of its own only files
#: of that uid.
METADATA_SYSCALLS = (
    "chmod", "fchmod", "fchmodat", "fchmodat2", "chown", "fchown", "lchown", "fchownat",
    "utime", "utimes", "futimesat", "utimensat",
    "setxattr", "lsetxattr", "fsetxattr", "removexattr", "lremovexattr", "fremovexattr",
    "setxattrat", "removexattrat", "file_setattr",
)  # fmt: skip

#: fcntl commands refused with EPERM: ``F_NOTIFY`` (dnotify: a signal each time anyone, another
#: tenant or the host, reads a file in a shared directory, the inotify the filter refuses) and
#: ``F_SETLEASE`` (a lease on a file the child's uid owns, as for a non-root host whose runtime
#: it shares, holds every other opener up for the lease-break time, 45 s by default).
F_SETLEASE = 1024
F_NOTIFY = 1026

#: Killed: no Python code has a reason to make these.
KILL_SYSCALLS = (
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot",
    "create_module", "nfsservctl",
)  # fmt: skip

#: clone flags that create namespaces (refused even when processes are allowed).
CLONE_NS_FLAGS = (
    0x00020000,  # CLONE_NEWNS
    0x02000000,  # CLONE_NEWCGROUP
    0x04000000,  # CLONE_NEWUTS
    0x08000000,  # CLONE_NEWIPC
    0x10000000,  # CLONE_NEWUSER
    0x20000000,  # CLONE_NEWPID
    0x40000000,  # CLONE_NEWNET
    0x00000080,  # CLONE_NEWTIME
)

#: Address family numbers are below this on every kernel (AF_MAX is 46 on 6.x).
_FAMILY_SPAN = 64
_FAMILIES = {"unix": socket.AF_UNIX, "inet": socket.AF_INET, "inet6": socket.AF_INET6}

TIOCSTI = 0x5412
TIOCLINUX = 0x541C
#: ioctl request types (bits 8-15 of the request) refused: 0x89 the socket requests
#: (``SIOCGIFCONF``, ``SIOCGIFHWADDR``, ``SIOCGIFNAME``, ``SIOCETHTOOL``, ``SIOCGSKNS`` ...: the
#: kernel sends a request of this type that the socket's family does not handle to the network
#: devices of the socket's namespace) and 0x8B the wireless ones (``SIOCGIW*``). The channel is
#: a unix socket the host made, in the host's network namespace: these described the host's
#: interfaces, addresses, MACs and drivers. What the child uses is elsewhere: ``FIONREAD``,
#: ``FIONBIO``, ``FIOCLEX``, ``TCGETS`` (type 0x54).
IOCTL_TYPE_MASK = 0xFF00
SOCKET_IOCTL_TYPES = (0x89, 0x8B)

#: prctl options refused: ``PR_SET_PDEATHSIG`` (the fork server and the identity layer arm it
#: before the filter loads; disarmed, a child outlived a fork server and host killed without
#: their clean-up, re-parented to init, its uid lease freed) and ``PR_SET_MEMORY_MERGE``
#: (KSM for the whole process: a page-deduplication timing channel where ksmd runs).
PR_SET_PDEATHSIG = 1
PR_SET_MEMORY_MERGE = 67
#: ``madvise`` advice refused: ``MADV_MERGEABLE`` opts one region into the KSM merging that
#: ``PR_SET_MEMORY_MERGE`` asks for the whole process (the same timing channel).
MADV_MERGEABLE = 12

#: Classic BPF opcodes, for the prefix of :func:`_unknown_numbers_prefix`.
_BPF_LD_W_ABS = 0x20
_BPF_JEQ_K = 0x15
_BPF_JGT_K = 0x25
_BPF_JGE_K = 0x35
_BPF_RET_K = 0x06


class SeccompError(OSError):
    """libseccomp is missing or refused to build the filter."""


class _ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


_lib: Any = None


def _libseccomp() -> Any:
    global _lib
    if _lib is None:
        lib = None
        for name in ("libseccomp.so.2", "libseccomp.so"):
            try:
                lib = ctypes.CDLL(name, use_errno=True)
                break
            except OSError:
                continue
        if lib is None:
            raise SeccompError(errno.ENOENT, "libseccomp is not installed (libseccomp.so.2 not found)")
        lib.seccomp_init.restype = ctypes.c_void_p
        lib.seccomp_init.argtypes = [ctypes.c_uint32]
        lib.seccomp_release.argtypes = [ctypes.c_void_p]
        lib.seccomp_rule_add_array.argtypes = [
            ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(_ArgCmp),
        ]  # fmt: skip
        lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
        lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
        lib.seccomp_arch_native.restype = ctypes.c_uint32
        _lib = lib
    return _lib


def libseccomp_version() -> str:
    lib = _libseccomp()
    fn = lib.seccomp_version
    fn.restype = ctypes.POINTER(ctypes.c_uint * 3)
    return ".".join(str(v) for v in fn().contents)


class _Filter:
    def __init__(self) -> None:
        self.lib = _libseccomp()
        self.ctx = self.lib.seccomp_init(SCMP_ACT_ALLOW)
        if not self.ctx:
            raise SeccompError(errno.ENOMEM, "seccomp_init failed")
        self._check(
            self.lib.seccomp_attr_set(self.ctx, SCMP_FLTATR_ACT_BADARCH, SCMP_ACT_KILL_PROCESS), "badarch"
        )

    def _check(self, rc: int, what: str) -> None:
        if rc < 0:
            raise SeccompError(-rc, f"libseccomp: {what}: {os.strerror(-rc)}")

    def rule(self, action: int, name: str, *cmps: tuple[int, int, int, int]) -> None:
        nr = self.lib.seccomp_syscall_resolve_name(name.encode())
        if nr == NR_SCMP_ERROR and name in RECENT_NUMBERS and _unified_table(self.lib):
            nr = RECENT_NUMBERS[name]  # newer than this libseccomp: by number (native arch only)
        if nr == NR_SCMP_ERROR:  # a typo would silently drop a rule: refuse to build the filter
            raise SeccompError(errno.EINVAL, f"libseccomp knows no system call named {name!r}")
        # A negative number other than that is a call this architecture lacks
        # (fork on aarch64): libseccomp accepts the rule and emits nothing.
        arr = (_ArgCmp * max(1, len(cmps)))(*[_ArgCmp(*c) for c in cmps])
        self._check(self.lib.seccomp_rule_add_array(self.ctx, action, nr, len(cmps), arr), name)

    def export(self) -> bytes:
        fd = os.memfd_create("seccomp-bpf", os.MFD_CLOEXEC)
        try:
            self._check(self.lib.seccomp_export_bpf(self.ctx, fd), "export")
            size = os.lseek(fd, 0, os.SEEK_END)
            return os.pread(fd, size, 0)
        finally:
            os.close(fd)

    def release(self) -> None:
        self.lib.seccomp_release(self.ctx)


def _unified_table(lib: Any) -> bool:
    """The native architecture numbers system calls from 424 on as the kernel's unified table
    does (x86_64, aarch64, riscv64, ppc64, s390x, ...; not alpha, not mips)."""
    return bool(lib.seccomp_syscall_resolve_name(b"pidfd_send_signal") == 424)


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def _unknown_numbers_prefix(lib: Any) -> bytes:
    """Classic BPF run before libseccomp's program: on the native architecture, a number in
    ``NEWEST_REVIEWED + 1 .. NUMBER_SPAN`` returns ``ENOSYS``; anything else goes on to the
    program (libseccomp's jumps are relative: a prefix leaves them right). Empty where the
    table is not the unified one."""
    if not _unified_table(lib):
        return b""
    return b"".join(
        (
            _insn(_BPF_LD_W_ABS, 0, 0, 4),  # seccomp_data.arch
            _insn(_BPF_JEQ_K, 0, 4, lib.seccomp_arch_native()),  # another arch: to the program
            _insn(_BPF_LD_W_ABS, 0, 0, 0),  # seccomp_data.nr
            _insn(_BPF_JGE_K, 0, 2, NEWEST_REVIEWED + 1),  # reviewed: to the program
            _insn(_BPF_JGT_K, 1, 0, NUMBER_SPAN),  # beyond the tables (x32): to the program
            _insn(_BPF_RET_K, 0, 0, _errno_action(errno.ENOSYS)),
        )
    )


def rule_names(allow_ipc: bool = False) -> tuple[str, ...]:
    """Every system call name a filter built with these settings names (``metadata`` included)."""
    names: tuple[str, ...] = (
        *EPERM_SYSCALLS, *OBSERVE_SYSCALLS, *SHARED_STATE_SYSCALLS, *KILL_SYSCALLS,
        "clone3", "fork", "vfork", "clone", "socket", "socketpair", "ioctl", "fcntl", "mmap", "memfd_create",
        "prctl", "openat2",
        *CHANNEL_ONLY_SYSCALLS, *(name for name, _ in MODE_ARGUMENTS), *METADATA_SYSCALLS,
    )  # fmt: skip
    return names if allow_ipc else (*names, *IPC_SYSCALLS)


def build(
    allowed_sockets: list[str] | tuple[str, ...],
    max_processes: int,
    allow_ipc: bool = False,
    metadata: bool = False,
) -> bytes:
    """Compile the filter for a policy; returns the raw BPF program (8-byte instructions). With
    *metadata*, changes of files' mode, owner, times and extended attributes are refused too
    (:data:`METADATA_SYSCALLS`), for a child that has neither a filesystem view nor a uid of its
    own."""
    f = _Filter()
    try:
        eperm = _errno_action(errno.EPERM)
        for name in EPERM_SYSCALLS + OBSERVE_SYSCALLS + SHARED_STATE_SYSCALLS:
            f.rule(eperm, name)
        if metadata:
            for name in METADATA_SYSCALLS:
                f.rule(eperm, name)
        for name, arg in MODE_ARGUMENTS:
            if metadata and name in METADATA_SYSCALLS:
                continue  # refused whatever the mode
            for bit in SETID_BITS:
                f.rule(eperm, name, (arg, SCMP_CMP_MASKED_EQ, bit, bit))
        f.rule(_errno_action(errno.ENOSYS), "openat2")
        for command in (F_SETLEASE, F_NOTIFY):
            f.rule(eperm, "fcntl", (1, SCMP_CMP_MASKED_EQ, 0xFFFFFFFF, command))
        if not allow_ipc:
            for name in IPC_SYSCALLS:
                f.rule(eperm, name)
        for name, arg, flag in HUGETLB_FLAGS:
            if allow_ipc or name not in IPC_SYSCALLS:  # else refused whatever its flags
                f.rule(eperm, name, (arg, SCMP_CMP_MASKED_EQ, flag, flag))
        for name in KILL_SYSCALLS:
            f.rule(SCMP_ACT_KILL_PROCESS, name)
        # Process creation.
        f.rule(_errno_action(errno.ENOSYS), "clone3")
        if max_processes <= 0:
            eagain = _errno_action(errno.EAGAIN)
            for name in ("fork", "vfork", "clone"):
                f.rule(eagain, name)
        else:
            for flag in CLONE_NS_FLAGS:
                f.rule(eperm, "clone", (0, SCMP_CMP_MASKED_EQ, flag, flag))
        # Sockets: refuse every family not allowed. The comparison masks the
        # upper 32 bits the kernel ignores, so junk there cannot dodge a rule;
        # a family >= AF_MAX is refused by the kernel itself.
        allowed = {_FAMILIES[name] for name in allowed_sockets}
        if not allowed:
            for name in CHANNEL_ONLY_SYSCALLS:
                f.rule(eperm, name)
        for name in ("socket", "socketpair"):
            if not allowed:
                f.rule(eperm, name)
                continue
            for family in range(_FAMILY_SPAN):
                if family not in allowed:
                    f.rule(eperm, name, (0, SCMP_CMP_MASKED_EQ, 0xFFFFFFFF, family))
        for request in (TIOCSTI, TIOCLINUX):
            f.rule(eperm, "ioctl", (1, SCMP_CMP_MASKED_EQ, 0xFFFFFFFF, request))
        for kind in SOCKET_IOCTL_TYPES:  # whatever the direction and size bits say
            f.rule(eperm, "ioctl", (1, SCMP_CMP_MASKED_EQ, IOCTL_TYPE_MASK, kind << 8))
        for option in (PR_SET_PDEATHSIG, PR_SET_MEMORY_MERGE):
            f.rule(eperm, "prctl", (0, SCMP_CMP_MASKED_EQ, 0xFFFFFFFF, option))
        f.rule(eperm, "madvise", (2, SCMP_CMP_MASKED_EQ, 0xFFFFFFFF, MADV_MERGEABLE))
        return _unknown_numbers_prefix(f.lib) + f.export()
    finally:
        f.release()


def load(program: bytes) -> None:
    """Install *program* (from :func:`build`) on the calling thread; irreversible."""
    if not program or len(program) % 8:
        raise OSError(errno.EINVAL, "empty or malformed seccomp program")
    buf = ctypes.create_string_buffer(program, len(program))
    prog = _SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    if libc().prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_SECCOMP): {os.strerror(err)}")
