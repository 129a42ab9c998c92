"""The protection layers: one record per layer, in the order the child applies them.

Each record names the layer (its ``[isolation]`` switch in a policy, its key
in ``ExecResult.layers``), says what it does (the policy field's description)
and what ``rlm doctor`` prints when it works. The child's code that applies a
layer lives in :mod:`sandbox.isolation` (``_APPLY``, keyed by the same names;
a test checks the two tables match). Stdlib only, so the host's policy schema
and the child may both import it.
"""

from __future__ import annotations

import ctypes
import os
from typing import NamedTuple

__all__ = [
    "HOST_TREES",
    "KERNEL_FS_TYPES",
    "LAYERS",
    "LAYER_TABLE",
    "Layer",
    "Mount",
    "host_object",
    "host_state",
    "host_tree",
    "layer",
    "mount_table",
    "mounts_beneath",
]


class Layer(NamedTuple):
    """One protection layer."""

    name: str
    #: The policy switch's description (what the layer does, with its default).
    policy_doc: str
    #: What ``rlm doctor`` says when the layer works.
    doctor: str


LAYER_TABLE: tuple[Layer, ...] = (
    Layer(
        "no_new_privs",
        "Set PR_SET_NO_NEW_PRIVS. Default true.",
        "no privilege gain through execve",
    ),
    Layer(
        "rlimits",
        "Apply the [limits] as kernel rlimits (and RLIMIT_CORE=0, RLIMIT_RTPRIO=0, RLIMIT_NICE=0). Default true.",
        "CPU, address space, open files, file size, no core dumps, no real-time priority",
    ),
    Layer(
        "cgroup",
        "Put the child in its own pids and memory cgroup. Default true.",
        "pids + memory cgroup per sandbox",
    ),
    Layer(
        "scratch_fs",
        "Mount a private tmpfs of disk_mb MiB as the scratch directory. Default true.",
        "scratch is a private tmpfs bounded in total size and inodes",
    ),
    Layer(
        "network",
        "Move the child into a new, empty network namespace (the fork server's, shared by its children;"
        " one of its own when isolation.allowed_sockets is not empty). Default true.",
        "empty network namespace",
    ),
    Layer(
        "pid",
        "A PID namespace and a session of the child's own: it is pid 1 and sees no other process "
        "(not the host, not another sandbox). Default true.",
        "own PID namespace (the child is pid 1, no other process visible) and session",
    ),
    Layer(
        "ipc",
        "An IPC namespace (SysV shared memory, message queues, semaphores, POSIX message queues) "
        "and a UTS namespace of the child's own, shared with no other sandbox and not the host. Default true.",
        "own IPC and UTS namespaces",
    ),
    Layer(
        "filesystem_view",
        "A mount namespace whose root holds only read-only binds of the Python runtime and "
        "preloaded packages, /etc/localtime and read_paths, plus the scratch directory (read-write); "
        "nothing else exists for the child (no /proc, no /tmp, no other sandbox). Default true.",
        "private root: only Python, read_paths and scratch exist (pivot_root)",
    ),
    Layer(
        "landlock",
        "Landlock: reads only where Python lives, read_paths and scratch; writes only scratch; "
        "no TCP; scoped signals. Default true.",
        "reads only Python + scratch, writes only scratch, no TCP, scoped signals",
    ),
    Layer(
        "identity",
        "Run as an unprivileged identity: a uid/gid no other live sandbox on the machine holds "
        "when started as root, else a user namespace. Default true.",
        "own uid/gid (unique on the machine), no groups, no capabilities",
    ),
    Layer(
        "seccomp",
        "seccomp-bpf filter refusing dangerous system calls. Default true.",
        "system-call filter",
    ),
)

LAYERS: tuple[str, ...] = tuple(entry.name for entry in LAYER_TABLE)
"""The layer names, in the order the child applies them."""

_BY_NAME = {entry.name: entry for entry in LAYER_TABLE}


def layer(name: str) -> Layer:
    """The record of the layer *name* (KeyError for an unknown name)."""
    return _BY_NAME[name]


#: Trees of the host that ``read_paths`` may not bring into a sandbox's view (with "/", which
#: holds them all), and what they would show: the host's, not the sandbox's own (its PID
#: namespace has no /proc of its own mounted, /dev holds the host's devices).
HOST_TREES: dict[str, str] = {
    "/": "whole filesystem",
    "/proc": "processes (every command line, and more of its own uid's)",
    "/sys": "kernel and hardware state",
    "/dev": "device nodes",
}


def host_tree(path: str) -> str | None:
    """The entry of :data:`HOST_TREES` that the absolute, normalized *path* is or lies under
    (a leading ``//``, which POSIX normalization keeps, counts as ``/``), or None. Checked by
    the policy on each ``read_paths`` entry and on where it leads, and by the child again."""
    path = "/" + path.lstrip("/")
    if path == "/":
        return "/"
    top = "/" + path.split("/")[1]
    return top if top in HOST_TREES else None


#: Kernel filesystems (``statfs`` magic numbers) that show the host's state whatever path they
#: are mounted or bound at: a bind of /proc elsewhere, a second ``mount -t proc``, and so on.
_KERNEL_FS: dict[int, str] = {
    0x9FA0: "/proc",  # proc
    0x62656572: "/sys",  # sysfs
    0x27E0EB: "/sys",  # cgroup
    0x63677270: "/sys",  # cgroup2
    0x64626720: "/sys",  # debugfs
    0x74726163: "/sys",  # tracefs
    0x73636673: "/sys",  # securityfs
    0xCAFE4A11: "/sys",  # bpf
    0x62656570: "/sys",  # configfs
    0x6165676C: "/sys",  # pstore
    0xDE5E81E4: "/sys",  # efivarfs
    0x65735543: "/sys",  # fusectl
    0x6E736673: "/proc",  # nsfs
    0x1CD1: "/dev",  # devpts
}

#: Filesystem types (as /proc/self/mountinfo names them) of the same trees: see mounts_beneath.
KERNEL_FS_TYPES = frozenset(
    {"proc", "sysfs", "cgroup", "cgroup2", "debugfs", "tracefs", "securityfs", "bpf", "configfs",
     "pstore", "efivarfs", "fusectl", "nsfs", "devpts", "devtmpfs"}
)  # fmt: skip


#: Mount points of the host's trees (and of their parts mounted apart) -> the tree they belong to.
_TREE_MOUNTS = (
    ("/dev", "/dev"), ("/dev/shm", "/dev"), ("/dev/mqueue", "/dev"), ("/dev/pts", "/dev"),
    ("/proc", "/proc"), ("/sys", "/sys"),
)  # fmt: skip


def host_object(fd: int) -> str | None:
    """The entry of :data:`HOST_TREES` whose content the file open at *fd* shows, whatever its
    name: the host's root itself (a bind of /), anything on the filesystem of the host's /dev,
    /proc or /sys, or on a kernel filesystem mounted anywhere (proc, sysfs, devpts, ...); None
    for an ordinary file or directory. Checked by the policy and, on the very descriptor the
    view binds and Landlock grants, by the child."""
    st = os.fstat(fd)
    try:
        root = os.stat("/")
    except OSError:
        root = None
    if root is not None and (st.st_dev, st.st_ino) == (root.st_dev, root.st_ino):
        return "/"
    for tree, shows in _TREE_MOUNTS:
        try:
            dev = os.stat(tree).st_dev
        except OSError:
            continue
        if dev == st.st_dev and (root is None or dev != root.st_dev):  # only where it is a mount of its own
            return shows
    buf = ctypes.create_string_buffer(256)  # struct statfs: f_type is its first field (a long)
    try:
        if ctypes.CDLL(None, use_errno=True).fstatfs(fd, buf) != 0:
            return None
    except (AttributeError, OSError):  # no C library call of that name: not Linux
        return None
    return _KERNEL_FS.get(ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF)


def _unescape(field: str) -> str:
    """A mountinfo field with its octal escapes (``\\040`` for a space, ``\\134`` for a
    backslash, ...) decoded."""
    raw = os.fsencode(field)
    out = bytearray()
    i = 0
    while i < len(raw):
        if raw[i] == 0x5C and i + 3 < len(raw) and all(0x30 <= b <= 0x37 for b in raw[i + 1 : i + 4]):
            out.append(int(raw[i + 1 : i + 4], 8) & 0xFF)
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return os.fsdecode(bytes(out))


#: A mount: (mount point, major:minor of its filesystem, its root in that filesystem, type).
Mount = tuple[str, str, str, str]


def mount_table(mountinfo: str = "/proc/self/mountinfo") -> list[Mount]:
    """This process's mounts (see :data:`Mount`; none when they cannot be read)."""
    try:
        with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    mounts = []
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, types = left.split(), right.split()[:1]
        if len(fields) >= 5 and types:
            mounts.append((_unescape(fields[4]), fields[2], _unescape(fields[3]), types[0]))
    return mounts


def mounts_beneath(path: str, mounts: list[Mount] | None = None) -> list[tuple[str, str]]:
    """Mounts below *path* (in *mounts*, by default this process's :func:`mount_table`) that
    show the host's state, as (mount point, what): a kernel filesystem
    (:data:`KERNEL_FS_TYPES`), or a bind of the filesystem of the host's /dev, /proc or /sys,
    or of its whole root. Landlock grants what lies beneath a path, mounts included, so a
    chroot with its own /proc mounted shows the host's processes (the view binds without what
    is mounted beneath, and so hides them)."""
    if mounts is None:
        mounts = mount_table()
    trees = {point: (dev, root) for point, dev, root, _ in mounts if point in HOST_TREES}
    host_devs = {dev for point, (dev, _) in trees.items() if point != "/"}
    whole = trees.get("/")
    prefix = path.rstrip("/") + "/"
    found = []
    for point, dev, root, kind in mounts:
        if not point.startswith(prefix):
            continue
        if kind in KERNEL_FS_TYPES:
            found.append((point, f"a {kind} filesystem"))
        elif dev in host_devs:
            found.append(
                (point, "a bind of the host's " + next(p for p, (d, _) in trees.items() if d == dev))
            )
        elif whole is not None and (dev, root) == whole:
            found.append((point, "a bind of the host's /"))
    return found


def host_state(path: str, fd: int | None = None, mounts: list[Mount] | None = None) -> str | None:
    """Why a sandbox may not be shown the file at the absolute *path* (open at *fd*, where it is
    there): it is, or lies in, one of :data:`HOST_TREES` by its name (:func:`host_tree`) or by
    what it is (:func:`host_object`), or holds one mounted beneath it (:func:`mounts_beneath`,
    over *mounts*). Said as the end of a sentence about a ``read_paths`` entry; None when none
    of these holds. The policy asks it when it loads, and the child again before its layers."""
    tree = host_tree(path) or (host_object(fd) if fd is not None else None)
    if tree == "/":
        return "would grant the whole filesystem; name the directories the code needs"
    if tree is not None:
        return (
            f"would show the code the host's {HOST_TREES[tree]}, past the pid and filesystem layers; "
            "copy what it needs elsewhere"
        )
    beneath = mounts_beneath(path, mounts)
    if beneath:
        point, what = beneath[0]
        return (
            f"holds {what} mounted at {point!r}, which shows the host's state; name the directories "
            "the code needs beside it"
        )
    return None
