"""Opening a file named by the user (a batch's input and output, a log ``rlm view`` reads, a
trajectory, the page ``rlm view`` writes) without hanging on what is not a regular file.

Opening a FIFO for reading waits for a writer, and for writing waits for a
reader: forever, when nobody comes. :func:`open_regular` opens non-blocking,
checks the descriptor it got, and refuses anything but a regular file; the
caller reads or writes through that descriptor, so a FIFO put at the path
after a check by name cannot hang it either.

Writers: :func:`write_regular` replaces the contents of a regular file in place
(a FIFO, a device or a directory at the path is refused, nothing written);
:func:`replace_file` writes a new file beside the path and renames it over it.
Its temporary file is made with ``O_CREAT | O_EXCL`` under a name nobody can
guess, so a FIFO or a symbolic link planted at a temporary name is never
opened, written through or renamed into place.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Iterable
from pathlib import Path

from sandbox.files import UntrustedLinkError, open_through_trusted_links

__all__ = ["NOT_REGULAR", "open_regular", "read_regular", "replace_file", "write_regular"]

#: The strerror of the OSError for a path that is not a regular file.
NOT_REGULAR = "not a regular file"


def _not_regular(path: str | os.PathLike[str]) -> OSError:
    return OSError(errno.EINVAL, NOT_REGULAR, os.fspath(path))


def open_regular(path: str | os.PathLike[str], flags: int = os.O_RDONLY, mode: int = 0o644) -> int:
    """A descriptor of *path* opened with *flags* (``O_RDONLY`` by default), which must be a
    regular file: OSError otherwise, with the strerror ``"not a regular file"``. O_NONBLOCK
    changes nothing for a regular file's reads and writes; it is left set. Pass no ``O_TRUNC``:
    it would act before the check (truncate with :func:`os.ftruncate` after, as
    :func:`write_regular` does).

    Opened for writing, without ``O_NOFOLLOW``, *path* leads through a symbolic link only when
    the link is owned by this process's effective user or by root
    (:func:`sandbox.files.open_through_trusted_links`): another user who may write the directory
    (a shared log directory, not sticky) could otherwise point the name of a trajectory, or of
    the page ``rlm view`` writes beside a log, at any file this user may write. Such a link is
    an OSError (``EPERM``) naming it, and nothing is opened."""
    flags |= os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        if flags & (os.O_WRONLY | os.O_RDWR) and not flags & os.O_NOFOLLOW:
            fd, _ = open_through_trusted_links(path, flags, mode)
        else:
            fd = os.open(path, flags, mode)
    except UntrustedLinkError as exc:
        where = "" if exc.link == os.fspath(path) else f"leads to {exc.link}, "
        raise OSError(
            errno.EPERM,
            f"{where}a symbolic link owned by uid {exc.uid}, neither this process's user nor root:"
            " not followed (whoever may write its directory could point it at any file)",
            os.fspath(path),
        ) from None
    except OSError as exc:
        if exc.errno in (errno.ENXIO, errno.EISDIR):  # a FIFO opened for writing with no reader, a
            raise _not_regular(path) from None  # socket; a directory opened for writing
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO, a device, a directory
            raise _not_regular(path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: str | os.PathLike[str]) -> bytes:
    """All the bytes of *path*, a regular file (OSError otherwise: see :func:`open_regular`)."""
    with open(open_regular(path), "rb") as f:
        return f.read()


def _write_all(fd: int, chunks: Iterable[bytes]) -> None:
    for chunk in chunks:
        view = memoryview(chunk)
        while view:  # a short write only on a full disk or a signal: finish or fail loudly
            view = view[os.write(fd, view) :]


def write_regular(path: str | os.PathLike[str], data: bytes, mode: int = 0o666) -> None:
    """Make *data* the whole contents of *path*, created if missing (*mode*, less the umask), which
    must be a regular file: OSError otherwise (``"not a regular file"``: a FIFO, a device or a
    directory there is refused before anything is written, and never waited on). An OSError of the
    write itself (a full disk) names *path*."""
    fd = open_regular(path, os.O_WRONLY | os.O_CREAT, mode)
    try:
        os.ftruncate(fd, 0)  # after the check: a device is never truncated
        _write_all(fd, [data])
    except OSError as exc:  # (a write on a descriptor names no file: say which, not the caller's input)
        raise OSError(exc.errno, exc.strerror, os.fspath(path)) from None
    finally:
        os.close(fd)


def replace_file(
    path: str | os.PathLike[str], data: bytes | Iterable[bytes], *, mode: int = 0o666, fsync: bool = False
) -> None:
    """Put a file holding *data* at *path* at once: written to a new temporary file beside it,
    then renamed over it, so a reader (or a crash) sees the old file or the new one, never half.

    The temporary file is created, never opened: ``.<name>.<random>.tmp`` with ``O_CREAT |
    O_EXCL`` (no symbolic link followed, nothing that exists reused), so a FIFO or a link planted
    beside *path* is neither waited on, written through nor renamed into place. *mode* (less the
    umask) is the new file's; with *fsync* its data reach the disk before the rename. OSError
    when it cannot be done (the temporary file removed)."""
    target = Path(path)
    chunks = [data] if isinstance(data, bytes) else data
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    for _ in range(100):
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
        try:
            fd = os.open(tmp, flags, mode)
            break
        except FileExistsError:  # 2**64 names: only someone who fills the directory on purpose
            continue
    else:
        raise OSError(errno.EEXIST, "cannot make a temporary file", os.fspath(target.parent))
    try:
        try:
            _write_all(fd, chunks)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
