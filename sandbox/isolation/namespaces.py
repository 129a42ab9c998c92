"""Namespaces, mounts and capabilities.

Creating namespaces costs about a millisecond each on this kind of VM, so the
fork server makes the ones its children may share once (:func:`server_setup`);
each child still gets the PID, IPC/UTS and mount namespaces of its own listed
below:

- a private mount namespace, where it mounts each sandbox's scratch tmpfs
  (:func:`mount_scratch`, a size- and inode-bounded tmpfs over the scratch
  directory) and unmounts it when the child is reaped. The host's mount
  table never sees them;
- a new, empty network namespace (only a loopback interface, down): children
  inherit it, so none of them can reach any network (a policy that allows
  sockets gives each child one of its own: :func:`unshare_net`, since
  sockets in a shared one see each other's names and ports). The server keeps a
  descriptor of the host's namespace so a policy with ``network = false``
  can go back to it (as root);
- when not root: first a user namespace (the invoking uid mapped to 0 inside)
  so the two above are allowed at all; the child then drops every
  capability (:func:`drop_capabilities`).

Per child, what must not be shared between sandboxes:

- a PID namespace, made by the server just before the fork
  (:class:`PidNamespaces`): the child is pid 1 and sees no other process;
- IPC and UTS namespaces (:func:`unshare_ipc_uts`), made by the child;
- a mount namespace whose root holds only what the policy grants
  (:func:`enter_view`, ``pivot_root`` as bubblewrap does), made by the child.

Capabilities are read and set through the C library's ``capget``/``capset``
(correct on every architecture glibc supports). Stdlib only (ctypes).
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Mapping

from sandbox import uids
from sandbox.isolation._sys import check, libc, prctl, write_file

__all__ = [
    "PidNamespaces",
    "ServerState",
    "drop_capabilities",
    "enter_view",
    "mount_scratch",
    "server_setup",
    "umount_scratch",
    "unshare_ipc_uts",
]

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
PR_SET_CHILD_SUBREAPER = 36
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
MS_RDONLY = 1
MS_REMOUNT = 32
MS_BIND = 4096
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
#: Per-mount flags a read-only bind keeps from its source (statvfs's ST_* bits equal the MS_* ones);
#: in a user namespace a remount that clears a locked one fails.
_KEPT_MOUNT_FLAGS = (
    1 | 2 | 4 | 8 | 1024 | 2048 | 4096
)  # RDONLY NOSUID NODEV NOEXEC NOATIME NODIRATIME RELATIME


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
        #: Root that can switch children to the sandbox uids (uid 0 of a rootless container
        #: cannot: its children get a user namespace, as any other user's do). A map that cannot
        #: be read leaves it root: the host, which reads the same map, then refuses to start the
        #: sandbox, and a child of root given no uid keeps no capability (isolation._identity).
        try:
            self.root = uids.switchable()
        except OSError:
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
    check(libc().capget(ctypes.byref(header), data), "capget")
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
    check(libc().capset(ctypes.byref(header), data), "capset")


# ------------------------------------------------------------ per child
class PidNamespaces:
    """Fork-server side: a fresh PID namespace for each child.

    ``unshare(CLONE_NEWPID)`` only changes where the caller's *next* child is
    born, and refuses (EINVAL) while that differs from the caller's own
    namespace. Two ways round it:

    - root (``mode == "setns"``): before each fork the server ``setns``-es
      back into its own namespace, then unshares, then forks: the child is
      pid 1 of a namespace nobody else is in. After the fork it resets
      again, so it holds no reference to the child's namespace.
    - in a user namespace (``mode == "helper"``), ``setns`` into the host's
      namespace is refused, so a short-lived helper forked by the server
      unshares and forks the child, then exits; the server, a child
      subreaper meanwhile, adopts the child. The child waits until the
      server has reaped the helper (so that its parent-death signal follows
      the server, and is not fired by the helper's own exit).
    """

    def __init__(self, in_userns: bool, root: bool) -> None:
        self.fd: int | None = None
        self.mode = ""
        self.reason = ""
        if not os.path.exists("/proc/self/ns/pid"):
            self.reason = "no PID namespaces on this system"
        elif in_userns:
            self.mode = "helper"
        elif not root:
            self.reason = "not root and no user namespace"
        else:
            try:
                self.fd = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
                self.reset()
                self.mode = "setns"
            except OSError as exc:
                self.reason = exc.strerror or str(exc)

    def reset(self) -> None:
        """Children of the caller are born in its own PID namespace again."""
        if self.fd is not None:
            check(libc().setns(self.fd, CLONE_NEWPID), "setns(own PID namespace)")

    def fresh(self) -> None:
        """Prepare the next :meth:`fork` to make pid 1 of a new PID namespace."""
        if not self.mode:
            raise OSError(errno.ENOTSUP, self.reason)
        if self.mode == "setns":
            self.reset()
            _unshare(CLONE_NEWPID, "CLONE_NEWPID")

    def fork(self, fresh: bool) -> int:
        """``os.fork()``; with *fresh* (after :meth:`fresh`) the child is pid 1 of its own namespace.

        Returns the child's pid as the server sees it (0 in the child).
        """
        if not fresh or self.mode != "helper":
            return os.fork()
        gate_r, gate_w = os.pipe()  # EOF for the child once the helper has exited
        report_r, report_w = os.pipe()
        prctl(PR_SET_CHILD_SUBREAPER, 1)  # the child, orphaned by the helper, is adopted by the server
        try:
            helper = os.fork()
        except BaseException:
            for fd in (gate_r, gate_w, report_r, report_w):
                os.close(fd)
            prctl(PR_SET_CHILD_SUBREAPER, 0)
            raise
        if helper == 0:
            return self._helper(gate_r, gate_w, report_r, report_w)  # 0, in the sandbox child only
        try:
            for fd in (gate_r, report_w):
                os.close(fd)
            data = b""
            while chunk := os.read(report_r, 64):
                data += chunk
            os.waitpid(helper, 0)
        finally:
            # The gate opens (EOF) only now that the helper is reaped: its exit has handed the
            # child to this server. A child that armed its parent-death signal while the helper
            # was still exiting (its files closed, its children not yet handed on) was killed by
            # that very exit.
            os.close(gate_w)
            os.close(report_r)
            prctl(PR_SET_CHILD_SUBREAPER, 0)
        if not data.isdigit():
            raise OSError(errno.EAGAIN, f"the PID namespace helper failed: {data.decode(errors='replace')}")
        return int(data)

    @staticmethod
    def _helper(gate_r: int, gate_w: int, report_r: int, report_w: int) -> int:
        """In the helper: fork the child into a new PID namespace, report its pid, exit."""
        try:
            os.close(report_r)
            try:
                _unshare(CLONE_NEWPID, "CLONE_NEWPID")
            except OSError:
                pass  # the child then finds it is not pid 1, and says so
            pid = os.fork()
            if pid == 0:  # the sandbox child: wait for the helper's exit, then carry on as a child
                os.close(gate_w)
                os.close(report_w)
                while os.read(gate_r, 1):
                    pass
                os.close(gate_r)
                return 0
            os.write(report_w, str(pid).encode())
        except BaseException as exc:
            try:
                os.write(report_w, f"{type(exc).__name__}: {exc}".encode())
            finally:
                os._exit(0)
        os._exit(0)


def unshare_net() -> None:
    """Child side: an empty network namespace of its own (for a policy that allows sockets)."""
    _unshare(CLONE_NEWNET, "CLONE_NEWNET")


def unshare_ipc_uts() -> None:
    """Child side: SysV IPC, POSIX message queues and the host name of its own."""
    _unshare(CLONE_NEWIPC | CLONE_NEWUTS, "CLONE_NEWIPC|CLONE_NEWUTS")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    check(
        libc().mount(
            None if source is None else os.fsencode(source),
            os.fsencode(target),
            None if fstype is None else fstype.encode(),
            ctypes.c_ulong(flags),
            None if data is None else data.encode(),
        ),
        f"mount {target}",
    )


def _mount_point(path: str, is_dir: bool) -> None:
    """Make *path* (and its parents, traversable by any uid) in the new root's tmpfs."""
    if os.path.lexists(path):
        return
    parent = os.path.dirname(path)
    if parent != path:
        _mount_point(parent, True)
    if is_dir:
        os.mkdir(path, 0o755)
    else:
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o444))


def enter_view(
    read_only: list[str],
    writable: list[str],
    base: str = "/tmp",
    sources: Mapping[str, tuple[str, tuple[int, int]]] | None = None,
) -> None:
    """Child side, as root of its namespaces: a new root holding only the given paths.

    A private mount namespace; a small tmpfs becomes the root (``pivot_root``,
    as bubblewrap does: first pivot, then bind from the old root under
    ``/oldroot``); each path of *read_only* is bound read-only and each of
    *writable* read-write at the same place (a symbolic link such as
    ``/etc/localtime`` is recreated, and where it leads is bound too); the
    old root is detached; the new root itself is made read-only. Paths that
    do not exist are skipped. Afterwards nothing else exists for the caller:
    no /proc, /etc, /dev, no other sandbox's scratch directory.

    *sources*: read-only paths the caller opened and checked: path -> (where that file was, its
    device and inode). Each is bound from there, and the bind is kept only if it shows that
    very file: a path renamed or relinked in between is left out.
    """
    sources = sources or {}
    # Resolved now, in the old root: after the pivot an absolute link would resolve in the new one.
    # where -> (what to bind, read-only, link text, (device, inode) it must show or None)
    plan: dict[str, tuple[str, bool, str | None, tuple[int, int] | None]] = {}
    for paths, ro in ((read_only, True), (writable, False)):
        for path in paths:
            known = sources.get(path) if ro else None
            try:
                real, expect = (os.path.realpath(path), None) if known is None else known
                link = os.readlink(path) if os.path.islink(path) else None
            except OSError:
                continue
            if not real.startswith("/"):  # "(deleted)" and the like: nothing to show
                continue
            plan[path] = ("/oldroot" + real, ro, link, expect)
            if real != path:
                plan.setdefault(real, ("/oldroot" + real, ro, None, expect))
    _unshare(CLONE_NEWNS, "CLONE_NEWNS")
    _mount(None, "/", None, MS_REC | MS_PRIVATE, None)
    _mount("tmpfs", base, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=4096,mode=0755")
    os.chdir(base)
    os.mkdir("oldroot", 0o700)
    check(libc().pivot_root(b".", b"oldroot"), "pivot_root")
    os.chdir("/")
    for path in sorted(plan):
        source, ro, link, expect = plan[path]
        if link is not None:
            if not os.path.lexists(path):
                _mount_point(os.path.dirname(path), True)
                os.symlink(link, path)
            continue
        try:
            st = os.stat(source)
        except OSError:
            continue  # nothing there to show
        _mount_point(path, stat.S_ISDIR(st.st_mode))
        _mount(source, path, None, MS_BIND, None)
        bound = os.stat(path)
        if expect is not None and (bound.st_dev, bound.st_ino) != expect:  # changed since it was checked
            check(libc().umount2(path.encode(), MNT_DETACH), f"umount {path}")
            continue
        if ro:
            kept = os.statvfs(path).f_flag & _KEPT_MOUNT_FLAGS
            _mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | kept, None)
    check(libc().umount2(b"/oldroot", MNT_DETACH), "umount /oldroot")
    os.rmdir("/oldroot")
    _mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV, None)
