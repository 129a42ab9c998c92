"""Namespaces, mounts and capabilities.

Creating namespaces costs about a millisecond each on this kind of VM, so the
fork server pays once (:func:`server_setup`), not each sandbox:

- a private mount namespace, where it mounts each sandbox's scratch tmpfs
  (:func:`mount_scratch`, a size- and inode-bounded tmpfs over the scratch
  directory) and unmounts it when the child is reaped. The host's mount
  table never sees them;
- a new, empty network namespace (only a loopback interface, down): children
  inherit it, so none of them can reach any network. The server keeps a
  descriptor of the host's namespace so a policy with ``network = false``
  can go back to it (as root);
- when not root: first a user namespace (the invoking uid mapped to 0 inside)
  so the two above are allowed at all; the child then drops every
  capability (:func:`drop_capabilities`).

Stdlib only (ctypes).
"""

from __future__ import annotations

import ctypes
import errno
import os

from sandbox.isolation._sys import check, libc, prctl, write_file

__all__ = ["ServerState", "drop_capabilities", "mount_scratch", "server_setup", "umount_scratch"]

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
SYS_capget = 125
SYS_capset = 126


def _last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 63


#: Read once in the fork server, before any child needs it.
_LAST_CAP = _last_cap()


class ServerState:
    """What the fork server set up once; shared by every child it forks."""

    def __init__(self) -> None:
        self.root = os.geteuid() == 0
        self.userns: str | None = None  # None: not needed (root) / "active" / reason
        self.mountns: str = "not attempted"
        self.netns: str = "not attempted"
        self.host_netns_fd: int | None = None
        self.host_netns_ino: int | None = None

    @property
    def mount_ok(self) -> bool:
        return self.mountns == "active"

    @property
    def net_ok(self) -> bool:
        return self.netns == "active"


def _unshare(flags: int, what: str) -> None:
    check(libc().unshare(ctypes.c_int(flags)), f"unshare({what})")


def _enter_userns() -> None:
    uid, gid = os.geteuid(), os.getegid()
    _unshare(CLONE_NEWUSER, "CLONE_NEWUSER")
    write_file("/proc/self/setgroups", "deny")
    write_file("/proc/self/uid_map", f"0 {uid} 1")
    write_file("/proc/self/gid_map", f"0 {gid} 1")


def server_setup(network: bool = True, mounts: bool = True) -> ServerState:
    """Move the calling (fork server) process into its private namespaces."""
    state = ServerState()
    if not state.root:
        try:
            _enter_userns()
            state.userns = "active"
        except OSError as exc:
            state.userns = f"no user namespace: {exc.strerror or exc}"
            state.mountns = state.netns = f"not root and {state.userns}"
            return state
    if mounts:
        try:
            _unshare(CLONE_NEWNS, "CLONE_NEWNS")
            check(
                libc().mount(b"none", b"/", None, ctypes.c_ulong(MS_REC | MS_PRIVATE), None),
                "mount(MS_PRIVATE)",
            )
            state.mountns = "active"
        except OSError as exc:
            state.mountns = exc.strerror or str(exc)
    if network:
        try:
            state.host_netns_ino = os.stat("/proc/self/ns/net").st_ino
            state.host_netns_fd = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            _unshare(CLONE_NEWNET, "CLONE_NEWNET")
            state.netns = "active"
        except OSError as exc:
            state.netns = exc.strerror or str(exc)
    return state


def current_netns() -> int:
    return os.stat("/proc/self/ns/net").st_ino


def return_to_host_netns(state: ServerState) -> None:
    """For a policy with network = false: leave the server's empty namespace (root only)."""
    if state.host_netns_fd is not None:
        check(libc().setns(state.host_netns_fd, CLONE_NEWNET), "setns(host network namespace)")


def mount_scratch(path: str, size_mb: int, uid: int | None, gid: int | None) -> None:
    """Mount a bounded tmpfs over *path* (fork server, in its mount namespace)."""
    inodes = min(65536, max(1024, size_mb * 64))
    opts = f"size={size_mb}m,nr_inodes={inodes},mode=0700"
    if uid is not None and gid is not None:
        opts += f",uid={uid},gid={gid}"
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
    check(
        libc().mount(b"tmpfs", os.fsencode(path), b"tmpfs", ctypes.c_ulong(flags), opts.encode()),
        f"mount tmpfs on {path}",
    )


def umount_scratch(path: str) -> None:
    if libc().umount2(os.fsencode(path), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            raise OSError(err, f"umount {path}: {os.strerror(err)}")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def capabilities() -> tuple[int, int, int]:
    """(effective, permitted, inheritable) of the calling thread, as 64-bit masks."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    check(libc().syscall(ctypes.c_long(SYS_capget), ctypes.byref(header), data), "capget")
    return (
        data[0].effective | data[1].effective << 32,
        data[0].permitted | data[1].permitted << 32,
        data[0].inheritable | data[1].inheritable << 32,
    )


def drop_bounding_set() -> None:
    """Empty the capability bounding set (needs CAP_SETPCAP, i.e. before dropping privileges)."""
    for cap in range(_LAST_CAP + 1):
        if libc().prctl(PR_CAPBSET_DROP, ctypes.c_ulong(cap), 0, 0, 0) != 0:
            err = ctypes.get_errno()
            if err != errno.EINVAL:
                raise OSError(err, f"PR_CAPBSET_DROP({cap}): {os.strerror(err)}")


def drop_capabilities(bounding: bool = True) -> None:
    """Clear every capability set of the calling thread (bounding, ambient, effective, permitted, inheritable)."""
    if bounding:
        drop_bounding_set()
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    check(libc().syscall(ctypes.c_long(SYS_capset), ctypes.byref(header), data), "capset")
