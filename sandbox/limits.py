"""Resource limits: the kernel rlimits the child applies to itself at start,
and the host's own measurements and enforcement around each ``execute``.

Child side (stdlib only, runs before any model code): :func:`apply_rlimits`.

Host side: the child's CPU time is read from its POSIX process CPU clock
(``clock_gettime`` on ``MAKE_PROCESS_CPUCLOCK(pid)``: kernel accounting,
nanosecond resolution, all threads, no /proc parsing); peak RSS from
``/proc/<pid>/status`` (``VmHWM``, reset per execute through ``clear_refs``);
a per-execute ``RLIMIT_CPU`` backstop is set with ``prlimit``. The host kills
the process group itself at the CPU and wall deadlines; the rlimit only
catches a host that could not.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import signal
import time
from typing import Any

__all__ = [
    "RSSMeter",
    "apply_rlimits",
    "cpu_seconds",
    "set_cpu_backstop",
]

MIB = 1024 * 1024
_CPUCLOCK_SCHED = 2


def apply_rlimits(limits: dict[str, Any], own_uid: bool) -> None:
    """Apply the policy's limits as rlimits to the calling (child) process.

    ``own_uid``: the child runs under a uid of its own, so RLIMIT_NPROC
    counts only its processes and can be set to 1 + max_processes.
    """
    cpu = math.ceil(float(limits["cpu_seconds"])) + 1
    settings = [
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_AS, int(limits["memory_mb"]) * MIB),
        (resource.RLIMIT_NOFILE, int(limits["max_open_files"])),
        (resource.RLIMIT_FSIZE, int(limits["max_file_mb"]) * MIB),
        (resource.RLIMIT_CPU, cpu),
        (resource.RLIMIT_MEMLOCK, 0),
        (resource.RLIMIT_MSGQUEUE, 0),
    ]
    if own_uid:
        settings.append((resource.RLIMIT_NPROC, 1 + int(limits["max_processes"])))
    for which, value in settings:
        resource.setrlimit(which, (value, value))
    # A write over max_file_mb should fail with EFBIG, not kill the child silently.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system, all threads) of a live process, or None if gone."""
    try:
        return time.clock_gettime(((~pid) << 3) | _CPUCLOCK_SCHED)
    except OSError:
        return None


def set_cpu_backstop(pid: int, used: float, budget: float) -> None:
    """Kernel backstop: SIGKILL once the process's total CPU passes used + budget + 1 s."""
    limit = math.ceil(used + budget) + 1
    try:
        resource.prlimit(pid, resource.RLIMIT_CPU, (limit, limit))
    except (OSError, ValueError):
        pass  # the host's own CPU watch still enforces the limit


class RSSMeter:
    """Peak resident memory of one process, per execute.

    Keeps ``/proc/<pid>/status`` and ``/proc/<pid>/clear_refs`` open for the
    child's lifetime; writing ``5`` to ``clear_refs`` resets the peak (VmHWM).
    """

    def __init__(self, pid: int) -> None:
        self._status = self._open(f"/proc/{pid}/status", os.O_RDONLY)
        self._clear = self._open(f"/proc/{pid}/clear_refs", os.O_WRONLY)

    @staticmethod
    def _open(path: str, flags: int) -> int:
        try:
            return os.open(path, flags | os.O_CLOEXEC)
        except OSError:
            return -1

    def reset(self) -> None:
        if self._clear >= 0:
            with contextlib.suppress(OSError):
                os.write(self._clear, b"5")

    def peak(self) -> int | None:
        """Peak RSS in bytes since the last reset, or None if the process is gone."""
        if self._status < 0:
            return None
        try:
            data = os.pread(self._status, 4096, 0)
        except OSError:
            return None
        at = data.find(b"VmHWM:")
        if at < 0:
            return None
        try:
            return int(data[at + 6 : data.index(b"kB", at)]) * 1024
        except ValueError:
            return None

    def close(self) -> None:
        for fd in (self._status, self._clear):
            if fd >= 0:
                os.close(fd)
        self._status = self._clear = -1
