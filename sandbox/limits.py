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

import math
import os
import resource
import signal
import time
from typing import Any

__all__ = [
    "apply_rlimits",
    "cpu_seconds",
    "peak_rss_bytes",
    "reset_peak_rss",
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


def reset_peak_rss(pid: int) -> None:
    try:
        fd = os.open(f"/proc/{pid}/clear_refs", os.O_WRONLY)
    except OSError:
        return
    try:
        os.write(fd, b"5")
    except OSError:
        pass
    finally:
        os.close(fd)


def peak_rss_bytes(pid: int) -> int | None:
    """Peak resident set of a live process since the last reset, or None if gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
