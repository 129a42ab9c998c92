"""Opening a file named by the user (a batch's input and output, a log ``rlm view`` reads)
without hanging on what is not a regular file.

Opening a FIFO for reading waits for a writer, and for writing waits for a
reader: forever, when nobody comes. :func:`open_regular` opens non-blocking,
checks the descriptor it got, and refuses anything but a regular file; the
caller reads or writes through that descriptor, so a FIFO put at the path
after a check by name cannot hang it either.
"""

from __future__ import annotations

import errno
import os
import stat

__all__ = ["open_regular", "read_regular"]


def _not_regular(path: str | os.PathLike[str]) -> OSError:
    return OSError(errno.EINVAL, "not a regular file", os.fspath(path))


def open_regular(path: str | os.PathLike[str], flags: int = os.O_RDONLY, mode: int = 0o644) -> int:
    """A descriptor of *path* opened with *flags* (``O_RDONLY`` by default), which must be a
    regular file: OSError otherwise, with the strerror ``"not a regular file"``. O_NONBLOCK
    changes nothing for a regular file's reads and writes; it is left set."""
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # a FIFO opened for writing with no reader, a socket
            raise _not_regular(path) from None
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
