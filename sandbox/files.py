"""Reading a file named by the user (a policy file, an audit log to verify) without hanging on
what is not a regular file.

Opening a FIFO for reading waits for a writer, forever when nobody comes, and ``/dev/zero``
never ends. :func:`read_regular` opens non-blocking, checks the descriptor it got, refuses
anything but a regular file, and reads through that descriptor, so a FIFO put at the path
after a check by name cannot hang it either. (``rlm.files`` is the same for ``rlm``, which
this package does not import.)
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import stat
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "LINK_HOPS",
    "NOT_REGULAR",
    "UntrustedLinkError",
    "open_dir",
    "open_through_trusted_links",
    "read_regular",
    "read_trusted_link",
    "remove_tree",
]

#: The strerror of the OSError :func:`read_regular` raises for a path that is not a regular file.
NOT_REGULAR = "not a regular file"


class UntrustedLinkError(Exception):
    """:func:`read_trusted_link` found a symbolic link owned by neither this process's effective
    user nor root (``uid``). Callers turn it into their own error naming the path."""

    def __init__(self, uid: int, link: str = "") -> None:
        super().__init__(f"a symbolic link owned by uid {uid}")
        self.uid = uid
        #: The link refused, where the raiser knows it (:func:`open_through_trusted_links`).
        self.link = link

    def explain(self, path: str | os.PathLike[str], link: str) -> str:
        """Why *path* was not followed, *link* the link found on the way (*path* itself, or a
        target of its links)."""
        where = "" if link == os.fspath(path) else f" leads to {link}, which"
        return (
            f"{path}{where} is a symbolic link owned by uid {self.uid}, neither this process's user"
            " nor root: not followed (whoever may write its directory could point it at any file)"
        )


def read_trusted_link(path: str) -> str | None:
    """The text of the symbolic link at *path*, when the link itself is owned by this process's
    effective user or by root; None when *path* is no link (or nothing is there).

    Owner and text are read from the link's own ``O_PATH | O_NOFOLLOW`` descriptor, so a link
    swapped in after the check is not the one read. A link owned by anyone else raises
    :class:`UntrustedLinkError`: one planted by another user who may write the directory (not
    sticky: ``fs.protected_symlinks`` does not cover it) could point at any file the caller may
    write. Other OSErrors pass."""
    try:
        link = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(link)
        if not stat.S_ISLNK(st.st_mode):
            return None
        if st.st_uid not in (os.geteuid(), 0):
            raise UntrustedLinkError(st.st_uid)
        return os.readlink("", dir_fd=link)
    finally:
        os.close(link)


#: Symbolic links one path may lead through in :func:`open_through_trusted_links` (the kernel's
#: own limit is 40).
LINK_HOPS = 8


def open_through_trusted_links(
    path: str | os.PathLike[str], flags: int, mode: int = 0o600
) -> tuple[int, str]:
    """Open *path* with *flags* (``O_NOFOLLOW`` added) and *mode*; a symbolic link at the path,
    and at each target in turn, is followed only if :func:`read_trusted_link` trusts it (owned by
    this process's effective user or by root). Returns the descriptor and the path opened.

    For a file this process creates or writes where another user may write the directory (not
    sticky: ``fs.protected_symlinks`` does not cover it): a link planted there would make it
    create, truncate or append to any file it may write. Each link is read from its own
    descriptor, and the file opened with ``O_NOFOLLOW``: a link swapped in after the check is
    refused, not followed. :class:`UntrustedLinkError` (its ``link`` set) for another user's
    link; OSError ``ELOOP`` past :data:`LINK_HOPS` links."""
    target = os.fspath(path)
    for _ in range(LINK_HOPS + 1):
        try:
            return os.open(target, flags | os.O_NOFOLLOW, mode), target
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
        try:
            dest = read_trusted_link(target)
        except UntrustedLinkError as exc:
            raise UntrustedLinkError(exc.uid, target) from None
        if dest is None:  # removed, or replaced by a file, meanwhile: open the path again
            continue
        target = os.path.join(os.path.dirname(target), dest)
    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), os.fspath(path))


def read_regular(path: str | Path, limit: int | None = None) -> bytes:
    """The bytes of *path*, a regular file (else OSError, strerror :data:`NOT_REGULAR`); at most
    *limit* bytes when given (the caller tells a file that long from a longer one by asking one
    byte more than it accepts)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO, a device, a directory
            raise OSError(errno.EINVAL, NOT_REGULAR)
        chunks: list[bytes] = []
        size = 0
        while limit is None or size < limit:
            chunk = os.read(fd, 1 << 20 if limit is None else min(1 << 20, limit - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def remove_tree(path: str) -> None:
    """Remove the directory *path* and everything in it, best effort: what cannot be removed is
    skipped, as ``shutil.rmtree(path, ignore_errors=True)`` skips it; never raises.

    The tree is a sandbox's scratch directory, shaped by its code. ``shutil.rmtree`` (before
    Python 3.13) recurses once per level: a directory nested 1,500 deep (where no scratch tmpfs
    hides it from the host) raised RecursionError out of ``Sandbox.close()`` and stayed on disk.
    Here nothing recurses and at most six descriptors are open: each directory's
    subdirectories are renamed up into *path* (a rename moves a link, never what it points
    to), its other entries unlinked, then it is removed. Every step names an entry relative to
    a descriptor opened with ``O_NOFOLLOW``: a symbolic link in the tree is removed, never
    followed. A directory of this process's user that lacks an owner right removal needs (the
    code may ``chmod 000`` its own directories, and a host that is not root has no
    ``CAP_DAC_OVERRIDE``) is given them first, through its descriptor (:func:`open_dir`).

    Entries are removed as they are read, never listed whole first (a scratch of 300,000 files
    took 23 MB of host memory at close, a few million over 100 MB): a pass reads *path* once,
    emptying and removing each directory it meets, and passes repeat while one removes or
    moves anything (a directory moved up during a pass is read in that pass or the next; what
    cannot be removed ends the passes). Each directory is moved at most once and emptied in
    the pass that meets it: the work is linear in the size of the tree, plus one more look
    per pass at what cannot be removed.

    An empty directory (a scratch whose tmpfs lived in the child's namespace, or a start that
    failed) is removed first, with no descriptor: a host out of descriptors (where the start
    failed for want of one, and other threads took each one freed) left it on disk."""
    try:
        os.rmdir(path)
        return
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.EACCES, errno.EPERM, errno.EBUSY):
            return  # gone, or not a directory (a link is never followed)
    try:
        top = open_dir(path)
    except OSError:
        return
    try:
        names = (
            f".rm-{os.urandom(8).hex()}-{n}" for n in itertools.count()
        )  # a name the code cannot have taken
        while _remove_pass(top, names):
            pass
    finally:
        os.close(top)
    with contextlib.suppress(OSError):
        os.rmdir(path)


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_dir(path: str, dir_fd: int | None = None) -> int:
    """A descriptor of the directory *path* (relative to *dir_fd*, if given), opened without
    following a symbolic link, to remove what it holds. If the directory is this process's
    user's and lacks read, write or search for its owner (``chmod 000``, ``0o500``), they are
    added: with ``fchmod`` on the descriptor, or, where it could not be opened for reading,
    through an ``O_PATH`` descriptor's ``/proc/self/fd`` link, which is that very directory
    (never a name the code could swap). OSError when neither open succeeds."""
    try:
        fd = os.open(path, _DIR_FLAGS, dir_fd=dir_fd)
    except PermissionError:
        fd = _open_granted(path, dir_fd)
    try:
        st = os.fstat(fd)
        if st.st_uid == os.geteuid() and st.st_mode & 0o700 != 0o700:
            os.fchmod(fd, stat.S_IMODE(st.st_mode) | 0o700)
    except OSError:
        pass  # what cannot be granted is skipped where it fails
    return fd


def _open_granted(path: str, dir_fd: int | None) -> int:
    """:func:`open_dir` of a directory its owner may not read (``O_RDONLY`` refused): an
    ``O_PATH`` descriptor needs no right on the directory itself; owner rwx is added through
    its ``/proc/self/fd`` link (``fchmod`` refuses an ``O_PATH`` descriptor), and the directory
    reopened through the same link."""
    held = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        st = os.fstat(held)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():  # only a directory of this user
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        link = f"/proc/self/fd/{held}"
        os.chmod(link, stat.S_IMODE(st.st_mode) | 0o700)
        return os.open(link, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    finally:
        os.close(held)


def _entries(fd: int) -> Iterator[tuple[str, bool]]:
    """``(name, is_dir)`` of each entry of the directory *fd* (a link is no directory), as the
    kernel hands them out: nothing is listed whole."""
    try:
        with os.scandir(fd) as entries:
            for entry in entries:
                try:
                    is_dir = entry.is_dir(follow_symlinks=False)
                except OSError:
                    continue  # gone meanwhile
                yield entry.name, is_dir
    except OSError:
        return


def _remove_pass(top: int, names: Iterator[str]) -> bool:
    """One pass of :func:`remove_tree` over the directory *top*: unlink what is not a directory;
    empty each directory (its subdirectories moved up into *top* under a name of *names*, the
    rest unlinked) and remove it. True when anything was removed or moved."""
    progress = False
    for name, is_dir in _entries(top):
        if not is_dir:
            progress |= _unlink(name, top)
            continue
        try:
            fd = open_dir(name, top)
        except OSError:
            continue
        try:
            for entry, sub_is_dir in _entries(fd):
                progress |= _move_up(entry, fd, top, next(names)) if sub_is_dir else _unlink(entry, fd)
        finally:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.rmdir(name, dir_fd=top)
            progress = True
    return progress


def _unlink(name: str, dir_fd: int) -> bool:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        return False
    return True


def _move_up(name: str, dir_fd: int, top: int, new: str) -> bool:
    """Rename the directory *name* of *dir_fd* to *new* in *top*. Moving a directory to another
    parent rewrites its ``..``, which takes write permission on it: one of this user's without
    it is given owner rwx (:func:`open_dir`), then moved."""
    for attempt in range(2):
        try:
            os.rename(name, new, src_dir_fd=dir_fd, dst_dir_fd=top)
            return True
        except PermissionError:
            if attempt:
                return False
            try:
                os.close(open_dir(name, dir_fd))
            except OSError:
                return False
        except OSError:
            return False
    return False
