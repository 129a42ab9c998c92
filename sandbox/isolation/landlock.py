"""The Landlock layer: unprivileged, kernel-enforced access control for the child.

After :func:`restrict` the child may

- read (files and directories, nothing else) only beneath the read roots the
  fork server computed (where the interpreter and the preloaded modules live)
  and the policy's ``read_paths``;
- read and write only beneath its scratch directory;
- neither bind nor connect TCP sockets (ABI >= 4);
- neither signal nor connect to abstract unix sockets of any process outside
  its own Landlock domain (ABI >= 6): not its fork server, not the host, not
  a sibling sandbox, even under the same uid.

Every right the running kernel knows is handled, so anything not granted
above is denied (``EACCES``). Landlock also forbids ``ptrace`` of processes
outside the domain. Stdlib only (ctypes); runs in the child.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Iterable

from sandbox.isolation._sys import check, syscall

__all__ = ["abi_version", "enforce", "restrict", "ruleset"]

SYS_create_ruleset = 444
SYS_add_rule = 445
SYS_restrict_self = 446
CREATE_RULESET_VERSION = 1
RULE_PATH_BENEATH = 1

FS_EXECUTE = 1 << 0
FS_WRITE_FILE = 1 << 1
FS_READ_FILE = 1 << 2
FS_READ_DIR = 1 << 3
FS_REMOVE_DIR = 1 << 4
FS_REMOVE_FILE = 1 << 5
FS_MAKE_CHAR = 1 << 6
FS_MAKE_DIR = 1 << 7
FS_MAKE_REG = 1 << 8
FS_MAKE_SOCK = 1 << 9
FS_MAKE_FIFO = 1 << 10
FS_MAKE_BLOCK = 1 << 11
FS_MAKE_SYM = 1 << 12
FS_REFER = 1 << 13  # ABI 2
FS_TRUNCATE = 1 << 14  # ABI 3
FS_IOCTL_DEV = 1 << 15  # ABI 5
NET_BIND_TCP = 1 << 0  # ABI 4
NET_CONNECT_TCP = 1 << 1  # ABI 4
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1  # ABI 6

_FS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1, 5: (1 << 16) - 1}
#: Rights that may be granted on a file (the rest only make sense on directories).
_FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV

READ = FS_READ_FILE | FS_READ_DIR
WRITE = (
    READ | FS_WRITE_FILE | FS_REMOVE_DIR | FS_REMOVE_FILE | FS_MAKE_DIR | FS_MAKE_REG | FS_MAKE_SYM
    | FS_REFER | FS_TRUNCATE
)  # fmt: skip


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def abi_version() -> int:
    """The kernel's Landlock ABI version; 0 when Landlock is missing or disabled."""
    rc = syscall(SYS_create_ruleset, None, ctypes.c_size_t(0), ctypes.c_uint32(CREATE_RULESET_VERSION))
    return rc if rc > 0 else 0


def unavailable_reason() -> str:
    rc = syscall(SYS_create_ruleset, None, ctypes.c_size_t(0), ctypes.c_uint32(CREATE_RULESET_VERSION))
    if rc > 0:
        return ""
    err = ctypes.get_errno()
    if err == errno.ENOSYS:
        return "the kernel has no Landlock (ENOSYS)"
    if err == errno.EOPNOTSUPP:
        return "Landlock is built in but not enabled (add landlock to the lsm= boot parameter)"
    return os.strerror(err)


def restrict(abi: int, read_roots: Iterable[str | int], write_roots: Iterable[str | int]) -> None:
    """Enforce the ruleset on the calling process (needs no_new_privs); irreversible."""
    enforce(ruleset(abi, read_roots, write_roots))


def enforce(fd: int) -> None:
    """Enforce the ruleset open at *fd* (see :func:`ruleset`) on the calling process (needs
    no_new_privs; irreversible), and close it."""
    try:
        check(syscall(SYS_restrict_self, ctypes.c_int(fd), ctypes.c_uint32(0)), "landlock_restrict_self")
    finally:
        os.close(fd)


def ruleset(abi: int, read_roots: Iterable[str | int], write_roots: Iterable[str | int]) -> int:
    """A ruleset granting reads beneath *read_roots* and writes beneath *write_roots*, not yet
    enforced (:func:`enforce`): a descriptor. A root is a path, or a descriptor (``O_PATH``) of
    what to grant, which stays the caller's to close. Rules hold on the files themselves, so a
    ruleset made before the filesystem view holds in it."""
    if abi < 1:
        raise OSError(errno.ENOSYS, unavailable_reason() or "Landlock is unavailable")
    handled_fs = _FS_BY_ABI.get(abi, (1 << 16) - 1)
    attr = _RulesetAttr(handled_fs, 0, 0)
    size = 8
    if abi >= 4:
        attr.handled_access_net = NET_BIND_TCP | NET_CONNECT_TCP
        size = 16
    if abi >= 6:
        attr.scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL
        size = 24
    fd = check(
        syscall(SYS_create_ruleset, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0)),
        "landlock_create_ruleset",
    )
    try:
        for rights, roots in ((READ & handled_fs, read_roots), (WRITE & handled_fs, write_roots)):
            for path in roots:
                _add_path(fd, path, rights)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _add_path(ruleset: int, path: str | int, rights: int) -> None:
    if isinstance(path, int):
        fd = os.dup(path)  # closed below, like one opened here
    else:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except FileNotFoundError:
            return  # nothing there to grant
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            rights &= _FILE_RIGHTS
        rule = _PathBeneath(rights, fd)
        check(
            syscall(
                SYS_add_rule,
                ctypes.c_int(ruleset),
                ctypes.c_int(RULE_PATH_BENEATH),
                ctypes.byref(rule),
                ctypes.c_uint32(0),
            ),
            f"landlock_add_rule({path})",
        )
    finally:
        os.close(fd)
