"""Reading a file named by the user (a policy file, an audit log to verify) without hanging on
what is not a regular file.

Opening a FIFO for reading waits for a writer, forever when nobody comes, and ``/dev/zero``
never ends. :func:`read_regular` opens non-blocking, checks the descriptor it got, refuses
anything but a regular file, and reads through that descriptor, so a FIFO put at the path
after a check by name cannot hang it either. (``rlm.files`` is the same for ``rlm``, which
this package does not import.)
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

__all__ = ["NOT_REGULAR", "read_regular"]

#: The strerror of the OSError :func:`read_regular` raises for a path that is not a regular file.
NOT_REGULAR = "not a regular file"


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
