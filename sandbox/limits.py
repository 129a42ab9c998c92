"""Resource limits: the kernel rlimits the child applies to itself at start,
and the host's own measurements and enforcement around each ``execute``.

Child side (stdlib only, runs before any model code): :func:`apply_rlimits`.

Host side: the child's CPU time is read from its POSIX process CPU clock
(``clock_gettime`` on ``MAKE_PROCESS_CPUCLOCK(pid)``: kernel accounting,
nanosecond resolution, all threads, no /proc parsing); peak RSS from
``/proc/<pid>/status`` (``VmHWM``, reset per execute through ``clear_refs``);
``RLIMIT_CPU`` is the child's lifetime budget, tightened to one execute's
budget with ``prlimit`` when the host may do that. The host kills
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
    "CUT_MARKER_BYTES",
    "CpuMeter",
    "RSSMeter",
    "apply_rlimits",
    "cap_texts",
    "cgroup_cpu_seconds",
    "cpu_seconds",
    "set_cpu_backstop",
    "utf8_size",
]

MIB = 1024 * 1024
_CPUCLOCK_SCHED = 2
#: RLIMIT_SIGPENDING of a child: real-time signals (and other queued ones) it may have pending.
SIGPENDING = 128


def apply_rlimits(limits: dict[str, Any], own_uid: bool) -> None:
    """Apply the policy's limits as rlimits to the calling (child) process (each one, or the
    process's hard limit where that is lower).

    ``own_uid``: the child runs under a uid of its own, so RLIMIT_NPROC
    counts only its processes and can be set to 1 + max_processes.
    """
    # The CPU limit is the child's lifetime budget: the host charges each execute (and the CPU
    # used between executes) itself, and moving a limit later may not be allowed (see set_cpu_backstop).
    cpu = math.ceil(float(limits["lifetime_cpu_seconds"]))
    settings = [
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_AS, int(limits["memory_mb"]) * MIB),
        (resource.RLIMIT_NOFILE, int(limits["max_open_files"])),
        (resource.RLIMIT_FSIZE, int(limits["max_file_mb"]) * MIB),
        (resource.RLIMIT_CPU, cpu),
        (resource.RLIMIT_MEMLOCK, 0),
        (resource.RLIMIT_MSGQUEUE, 0),
    ]
    # Not the host's: no real-time scheduling (a host with a raised RLIMIT_RTPRIO, from
    # limits.conf or a container's --ulimit, let the code take SCHED_FIFO), no nice value
    # below the one inherited, and a small queue of pending signals (Python queues none).
    for name, value in (("RLIMIT_RTPRIO", 0), ("RLIMIT_NICE", 0), ("RLIMIT_SIGPENDING", SIGPENDING)):
        which = getattr(resource, name, None)  # Linux only
        if which is not None:
            settings.append((which, value))
    if own_uid:
        settings.append((resource.RLIMIT_NPROC, 1 + int(limits["max_processes"])))
    for which, value in settings:
        # A hard limit the host already holds lower (a job runner's ulimit) cannot be raised
        # here: it holds for the child instead of the policy's, which is never exceeded.
        hard = resource.getrlimit(which)[1]
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(which, (value, value))
    # A write over max_file_mb should fail with EFBIG, not kill the child silently.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system, all threads) of a live process, or None if gone."""
    try:
        return time.clock_gettime(((~pid) << 3) | _CPUCLOCK_SCHED)
    except OSError:
        return None


def set_cpu_backstop(
    pid: int, used: float, budget: float, lifetime: float, current: int | None = None
) -> int:
    """Kernel backstop: SIGKILL once the process's total CPU passes used + budget + 1 s,
    never later than its lifetime budget (the limit it started with).

    Returns the limit asked for (whole seconds). *current*: what the previous call for *pid*
    returned; when it is the same limit, no system call is made: that limit is in place, or
    setting it was refused and would be again (changing the limit of a process of another
    uid takes CAP_SYS_RESOURCE, which containers often lack: then the lifetime budget the
    child set itself is the backstop).
    """
    limit = min(math.ceil(used + budget) + 1, math.ceil(lifetime))
    if limit == current:
        return limit
    with contextlib.suppress(OSError, ValueError):  # the host's own CPU watch still enforces it
        resource.prlimit(pid, resource.RLIMIT_CPU, (limit, limit))
    return limit


def cgroup_cpu_seconds(fd: int) -> float:
    """CPU seconds of every process of a cgroup, from its accounting file open at *fd*
    (cgroup v1 ``cpuacct.usage``: nanoseconds; v2 ``cpu.stat``: ``usage_usec``; see
    :func:`sandbox.isolation.cgroups.cpu_file`). Raises OSError or ValueError."""
    data = os.pread(fd, 4096, 0)
    if data[:1].isdigit():
        return int(data) / 1e9
    at = data.find(b"usage_usec ")
    if at < 0:
        raise ValueError("no usage_usec in cpu.stat")
    return int(data[at + 11 : data.index(b"\n", at)]) / 1e6


class CpuMeter:
    """CPU seconds of a sandbox: of every process in its cgroup where the fork server gave the
    cgroup's accounting file (forked processes, and those that exited, included), else of the
    child process itself (its CPU clock, all threads)."""

    __slots__ = ("_fd", "pid")

    def __init__(self, pid: int, cgroup_file: str | None) -> None:
        self.pid = pid
        self._fd = -1
        if cgroup_file is not None:
            with contextlib.suppress(OSError):
                self._fd = os.open(cgroup_file, os.O_RDONLY | os.O_CLOEXEC)

    @property
    def whole_cgroup(self) -> bool:
        return self._fd >= 0

    def seconds(self) -> float | None:
        """CPU seconds so far, or None once the process is gone."""
        if self._fd >= 0:
            try:
                return cgroup_cpu_seconds(self._fd)
            except (OSError, ValueError):
                return None
        return cpu_seconds(self.pid)

    def close(self) -> None:
        """Idempotent."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


class RSSMeter:
    """Peak resident memory of one process, per execute.

    Keeps ``/proc/<pid>/status`` and ``/proc/<pid>/clear_refs`` open for the
    child's lifetime (from :meth:`open`); writing ``5`` to ``clear_refs`` resets
    the peak (VmHWM) to the resident size of the moment. When :meth:`peak` finds
    the peak equal to the resident size, the reset would change nothing and is
    skipped (one system call less per execute in the common case of a cell that
    leaves its memory as it found it or grew it).
    """

    def __init__(self) -> None:
        self._status = self._clear = -1
        #: The peak is the resident size (reset, or read so by peak()): reset() has nothing to do.
        self._clean = False

    def open(self, pid: int) -> None:
        """Open process *pid*'s files (one that cannot be opened: no measure). Not done by
        ``__init__``: the owner holds the meter first, so that :meth:`close` closes what was
        opened also when an exception (Ctrl-C) cut this or the owner's making short."""
        self._status = self._open(f"/proc/{pid}/status", os.O_RDONLY)
        self._clear = self._open(f"/proc/{pid}/clear_refs", os.O_WRONLY)

    @staticmethod
    def _open(path: str, flags: int) -> int:
        try:
            return os.open(path, flags | os.O_CLOEXEC)
        except OSError:
            return -1

    def reset(self) -> None:
        if self._clear >= 0 and not self._clean:
            with contextlib.suppress(OSError):
                os.write(self._clear, b"5")
                self._clean = True

    def peak(self) -> int | None:
        """Peak RSS in bytes since the last reset, or None if the process is gone."""
        self._clean = False
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
            hwm = int(data[at + 6 : data.index(b"kB", at)])
            at = data.find(b"VmRSS:", at)
            self._clean = at >= 0 and int(data[at + 6 : data.index(b"kB", at)]) == hwm
        except ValueError:
            return None
        return hwm * 1024

    def close(self) -> None:
        """Idempotent, also when a previous call was cut short (Ctrl-C)."""
        status, self._status = self._status, -1
        clear, self._clear = self._clear, -1
        for fd in (status, clear):
            if fd >= 0:
                os.close(fd)


def utf8_size(text: str) -> int:
    """Bytes of *text* in UTF-8 (lone surrogates counted as 3, as ``surrogatepass`` writes them)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _cut(text: str, size: int, cap: int) -> str:
    """*text* (of *size* bytes) cut to about *cap* bytes: its head and its tail, with a marker between."""
    head = cap * 3 // 5
    tail = cap - head
    if text.isascii():
        first, last = text[:head], text[len(text) - tail :] if tail else ""
    else:
        data = text.encode("utf-8", "surrogatepass")
        first = data[:head].decode("utf-8", "ignore")
        last = data[len(data) - tail :].decode("utf-8", "ignore") if tail else ""
    return f"{first}\n[... {size - cap:,} bytes cut by max_output_bytes ...]\n{last}"


#: What :func:`cap_texts` may add beyond the limit: one marker per cut text.
CUT_MARKER_BYTES = 80


def cap_texts(texts: list[str], limit: int) -> tuple[list[str], list[bool]]:
    """Cut *texts* so that together they hold at most *limit* UTF-8 bytes
    (plus at most :data:`CUT_MARKER_BYTES` per text that was cut).

    Each text gets a fair share: the largest cap ``c`` with
    ``sum(min(size, c)) <= limit``, so a short error message is never squeezed
    out by a long traceback or a print loop. A cut text keeps its head and its
    tail (where a traceback names the exception). Returns the texts and, for
    each, whether it was cut.
    """
    if sum(len(t) for t in texts) * 4 <= limit:  # cheap bound: nothing to measure
        return texts, [False] * len(texts)
    sizes = [utf8_size(t) for t in texts]
    if sum(sizes) <= limit:
        return texts, [False] * len(texts)
    remaining, left, cap = limit, len(texts), 0
    for size in sorted(sizes):
        share = remaining // left
        if size > share:
            cap = share
            break
        remaining -= size
        left -= 1
    cut = [size > cap for size in sizes]
    return [_cut(t, s, cap) if c else t for t, s, c in zip(texts, sizes, cut, strict=True)], cut
