"""Machine-wide uid reservations for sandbox children (hosts running as root).

A root host gives each sandbox child a uid/gid of its own. "Its own" must
hold on the whole machine, whatever host process started the sandbox: two
tenants under one uid could ``prlimit``, renice or signal each other, and
would share one RLIMIT_NPROC budget. A uid is therefore taken with a lock
file: ``reserve()`` opens ``<directory>/<uid>`` and takes an exclusive
``flock`` on it without blocking, trying the next uid when another process
holds it. The lock belongs to the open file, so the kernel drops it when the
holder closes it or dies: a crashed host never leaves a uid reserved.

The directory (:data:`RUNTIME_DIR`) must be owned by root and writable by
nobody else; a lock file is removed by whoever releases it, under the lock
(a reserver checks, once it holds a lock, that the file it locked is still
the one at that name).

Use::

    lease = reserve()          # UidLease: .uid, .gid
    ...                        # start the child as lease.uid
    lease.release()            # once the child is known to be dead

Whoever owns the child holds the lease for the child's whole life.

Only a root that can *become* those uids reserves them (:func:`switchable`): uid 0 of
a user namespace that does not map the range (a rootless container) cannot, and is
treated as any user that is not root: each child gets a user namespace of its own,
with every capability dropped.

A host that dies without releasing (SIGKILL, an ``os._exit`` of its
own) leaves its lock files behind, unlocked: harmless
(the next reserver of that uid takes the file over) but clutter.
:func:`sweep` removes such files the same way a release does: it takes each
file's lock and, holding it, unlinks it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import stat
import threading
import weakref

__all__ = [
    "RUNTIME_DIR",
    "UID_BASE",
    "UID_SPAN",
    "UidLease",
    "UidReservationError",
    "reserve",
    "sweep",
    "switchable",
]

#: Where the lock files live (root-owned, 0700).
RUNTIME_DIR = "/run/rlm-sandbox/uids"
#: Sandbox uids are UID_BASE .. UID_BASE + UID_SPAN - 1 (above any account's, below 2**31).
UID_BASE = 1_200_000
UID_SPAN = 1 << 20
#: How many uids one call tries before it gives up.
_TRIES = 4096


def switchable(uid_map: str = "/proc/self/uid_map") -> bool:
    """This process is root and its user namespace maps every sandbox uid (and gid) to a real
    one, so a child can switch to one: true for root on the machine itself, false for uid 0 of
    a user namespace that maps only some ids (a rootless container's) and for any other user.

    Raises OSError when a map that is there cannot be read (out of descriptors): guessing
    either way could start a child as root. No map at all (no user namespaces in the kernel,
    no ``/proc``) is the machine's own namespace, where every id is mapped."""
    if os.geteuid() != 0:
        return False
    return all(_maps(path, UID_BASE, UID_SPAN) for path in (uid_map, uid_map.replace("uid_map", "gid_map")))


def _maps(path: str, first: int, count: int) -> bool:
    """The id map at *path* (``inside outside count`` per line) covers first .. first + count - 1,
    in one extent or several that meet."""
    try:
        with open(path, "rb") as f:
            text = f.read()
    except FileNotFoundError:
        return True
    extents = []
    for line in text.split(b"\n"):
        fields = line.split()
        if len(fields) == 3 and all(x.isdigit() for x in fields):
            extents.append((int(fields[0]), int(fields[2])))
    need = first  # the lowest id of the range not yet seen covered
    for inside, length in sorted(extents):
        if inside <= need < inside + length:
            need = inside + length
        if need >= first + count:
            return True
    return False


class UidReservationError(OSError):
    """No uid could be reserved (the directory is unusable, or every uid tried is taken)."""


class UidLease:
    """A uid/gid held for one sandbox child until :meth:`release` (or the holder's death)."""

    __slots__ = ("__weakref__", "_fd", "_lock", "directory", "gid", "uid")

    def __init__(self, uid: int, fd: int, directory: str) -> None:
        self.uid = uid
        self.gid = uid
        self.directory = directory
        self._fd: int | None = fd
        self._lock = threading.Lock()
        _leases.add(self)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Give the uid back: remove the lock file (still under the lock), then unlock. Idempotent."""
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(self.directory, str(self.uid)))
        os.close(fd)

    def forget(self) -> None:
        """In a process forked from the holder: close this process's copy of the descriptor.

        The lock stays with the holder (it belongs to the open file, which the
        holder still has open) and the lock file stays in place.
        """
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> UidLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"UidLease(uid={self.uid}, held={self.held})"


#: Every lease of this process: a forked process closes its copies of them all (see _after_fork).
_leases: weakref.WeakSet[UidLease] = weakref.WeakSet()


def _after_fork() -> None:
    """In a forked process: the leases are the parent's. A copy of a descriptor here would keep
    the uid's lock held after the parent died (it belongs to the open file), for as long as this
    process lives: no sweep could remove the file, and nobody reserve the uid. Without the lease's
    own lock, which another thread of the parent may have held."""
    for lease in list(_leases):
        lease._lock = threading.Lock()
        fd, lease._fd = lease._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


os.register_at_fork(after_in_child=_after_fork)


def _directory(path: str) -> str:
    """Create *path* (0700, parents 0755) if needed and check that only root controls it."""
    try:
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
        st = os.lstat(path)
    except OSError as exc:
        raise UidReservationError(exc.errno, f"uid reservations: {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
        raise UidReservationError(
            errno.EPERM, f"uid reservations: {path} must be a directory owned by root, writable only by root"
        )
    return path


def _try(directory: str, uid: int) -> int | None:
    """The locked descriptor of ``directory/uid``, or None if another holder has it."""
    path = os.path.join(directory, str(uid))
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    try:
        same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        same = False  # its previous holder removed it between our open and our lock
    if not same:
        os.close(fd)
        return None
    return fd


def reserve(directory: str = RUNTIME_DIR) -> UidLease:
    """Reserve a uid no live sandbox on this machine holds (root only; whether a child can switch
    to it is the caller's to ask first: :func:`switchable`)."""
    if os.geteuid() != 0:
        raise UidReservationError(errno.EPERM, "uid reservations need root")
    directory = _directory(directory)
    start = secrets.randbelow(UID_SPAN)
    try:
        for i in range(_TRIES):
            uid = UID_BASE + (start + i) % UID_SPAN
            fd = _try(directory, uid)
            if fd is not None:
                return UidLease(uid, fd, directory)
    except OSError as exc:
        raise UidReservationError(exc.errno, f"uid reservations: {directory}: {exc.strerror}") from None
    raise UidReservationError(errno.EAGAIN, f"uid reservations: {_TRIES} uids tried, all taken")


def in_use(uid: int) -> bool | None:
    """Whether a process of this machine runs as *uid* (real, effective, saved or filesystem id),
    read from ``/proc`` (the host sees the processes of every PID namespace below its own). None:
    not known (``/proc`` or a process's status could not be read: no descriptor free, hidden).
    A process that exits meanwhile is not counted."""
    wanted = str(uid)
    try:
        names = [name for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return None
    for name in names:
        try:
            with open(f"/proc/{name}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"Uid:"):
                        if wanted in line.decode().split()[1:]:
                            return True
                        break
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited meanwhile
        except OSError:
            return None  # (EMFILE: skipping it answered "no" for a process that runs)
    return False


def sweep(directory: str = RUNTIME_DIR, limit: int = 1024) -> int:
    """Remove lock files nobody holds (left by hosts that died); at most *limit* looked at.
    Returns how many were removed. Root only; a directory that is not there is nothing to do."""
    if os.geteuid() != 0:
        return 0
    removed = 0
    try:
        with os.scandir(directory) as entries:
            names = [entry.name for _, entry in zip(range(limit), entries, strict=False)]
    except OSError:
        return 0
    for name in names:
        if not name.isdigit():
            continue
        try:
            fd = _try(directory, int(name))
        except OSError:
            continue
        if fd is not None:  # nobody holds it: released the way a holder releases
            UidLease(int(name), fd, directory).release()
            removed += 1
    return removed
