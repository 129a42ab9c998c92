"""ctypes access to the C library, shared by the layers. Stdlib only."""

from __future__ import annotations

import ctypes
import os
from typing import Any

__all__ = ["check", "libc", "prctl", "syscall", "write_file"]

_libc: Any = None


def libc() -> Any:
    """The process's C library (errno-aware)."""
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.syscall.restype = ctypes.c_long
        _libc = lib
    return _libc


def check(rc: int, what: str) -> int:
    """Raise OSError(errno) naming *what* when a C call returned -1."""
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return rc


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return check(
        libc().prctl(
            option, ctypes.c_ulong(arg2), ctypes.c_ulong(arg3), ctypes.c_ulong(arg4), ctypes.c_ulong(arg5)
        ),
        f"prctl({option})",
    )


def syscall(nr: int, *args: Any) -> int:
    return int(libc().syscall(ctypes.c_long(nr), *args))


def write_file(path: str, data: str) -> None:
    """Write *data* to an existing file (a /proc or cgroup control file) in one write."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data.encode())
    finally:
        os.close(fd)
