"""Spin-before-block, adaptively: fast for one busy pair of processes, quiet for many.

A process blocked in ``poll`` or ``recv`` takes 100+ us to wake on a VM, several
times the cost of a small frame, so both ends of a channel poll for a short
while before they block. That pays off only when the answer comes within the
window: with 32 sandboxes on 2 cores every spinning process burns CPU the
others need. So each channel keeps a :class:`Spinner`:

- a spin that got its answer keeps the full window;
- a spin that did not halves the window, down to nothing;
- a wait that blocked reports how long it took in all (:meth:`Spinner.blocked`):
  one that a full window would have caught brings the window back. A channel
  whose answers come quickly again so re-learns to spin at its next wait; one
  whose answers come late (many tenants, long cells) never spins;
- a wait whose answer is known to come late (the first request to a child
  that slept in a pool) does not spin at all (:attr:`Spinner.skip`);
- a spin during which the process lost its CPU (its thread got clearly less
  CPU time than the wall time that passed) means others want the core: the
  window drops to nothing and the next :data:`COOLDOWN` blocked waits cannot
  bring it back, twice as many after each such spin in a row (up to
  :data:`MAX_COOLDOWN`). A spinning process gets no sleeper's credit from the
  scheduler, so on a loaded machine spinning makes both ends slower;
- no ``sched_yield`` in the loop: on a busy machine it hands the CPU to a
  CPU-bound process for a whole time slice (milliseconds), the opposite of
  what a spin is for.

Above the windows, spinning needs a free CPU: the host asks
:class:`CpuSlack` (the kernel's count of runnable tasks) before it spins, and
tells the child in each ``exec`` and ``reply`` frame whether it may spin for
the next request (the child cannot see the machine). On a machine whose cores
are all taken, a spinner only takes CPU from the process it waits for: a
spinning process also gets no sleeper's credit from the scheduler, so both
ends pay for it later.

The host additionally lets only one of its threads spin at a time (the GIL
makes two spinners take turns anyway). Stdlib only: the child imports it.
"""

from __future__ import annotations

import os
import time

__all__ = ["COOLDOWN", "MAX_COOLDOWN", "CpuSlack", "Spinner"]

#: After a spin that lost its CPU, this many blocked waits pass before one may re-enable spinning;
#: doubled for each further such spin in a row, up to MAX_COOLDOWN.
COOLDOWN = 64
MAX_COOLDOWN = 4096
_FLOOR = 0.00002  # windows shorter than 20 us are not worth a spin
_PREEMPTED = 0.0002  # a spin that got 200 us (and half its wall time) less CPU was preempted


class Spinner:
    """The spin window of one channel end, in seconds."""

    __slots__ = (
        "_spin_cpu",
        "_spin_from",
        "_wait_from",
        "cooldown",
        "full",
        "next_cooldown",
        "skip",
        "window",
    )

    def __init__(self, full: float) -> None:
        self.full = full
        self.window = full
        #: The next this many waits block at once (their answer is known to come late).
        self.skip = 0
        #: Blocked waits left before one may re-enable spinning (after a preempted spin).
        self.cooldown = 0
        self.next_cooldown = COOLDOWN
        self._wait_from = 0.0  # when the current wait started (0: no wait, or it blocked already)
        self._spin_from = self._spin_cpu = 0.0  # when the current spin started, in wall and CPU time

    def budget(self) -> float:
        """How long to spin before blocking this time (0: block at once)."""
        if self.skip > 0:
            self.skip -= 1
            return 0.0
        return self.window

    # Both ends call these around a wait; they measure and report to outcome() and blocked().
    def wait_started(self) -> None:
        self._wait_from = time.perf_counter()

    def spin_started(self) -> None:
        self._spin_from, self._spin_cpu = time.perf_counter(), time.thread_time()

    def spin_ended(self, answered: bool) -> None:
        self.outcome(answered, time.perf_counter() - self._spin_from, time.thread_time() - self._spin_cpu)

    def woke(self) -> None:
        """A blocking wait returned: the first time in this wait, it is reported to :meth:`blocked`."""
        if self._wait_from:
            self.blocked(time.perf_counter() - self._wait_from)
            self._wait_from = 0.0

    def outcome(self, answered: bool, wall: float = 0.0, cpu: float = 0.0) -> None:
        """Report whether the answer came while spinning, and the spin's *wall* time and the
        *cpu* time the spinning thread got in it (seconds)."""
        if wall - cpu > max(_PREEMPTED, wall / 2):  # the CPU was taken away: others want it
            self.window = 0.0
            self.cooldown = self.next_cooldown
            self.next_cooldown = min(2 * self.next_cooldown, MAX_COOLDOWN)
            return
        self.next_cooldown = COOLDOWN
        if answered:
            self.window = self.full
        else:
            half = self.window / 2
            self.window = half if half >= _FLOOR else 0.0

    def blocked(self, waited: float) -> None:
        """A wait that ended blocked took *waited* seconds from its start (the wake-up
        included): if a full window would have caught its answer, spin again next time."""
        if self.cooldown > 0:
            self.cooldown -= 1
        elif waited <= self.full:
            self.window = self.full


class CpuSlack:
    """Whether a CPU is free now, for spinning, read at most every *refresh* seconds (threads
    that race only read it twice). Free means all of:

    - this process may use at least two CPUs (a spinner and the peer it waits for): its CPU
      affinity, capped by the CPU quota of its cgroup (``cpu.max`` of cgroup v2,
      ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` of v1, the lowest along the path up), so
      that a container limited to one CPU of a big machine never spins;
    - no more runnable tasks on the machine than those CPUs (``/proc/loadavg``, its fourth
      field; the caller is one of them);
    - the cgroup whose quota caps it was not throttled since the last read (``nr_throttled``
      of its ``cpu.stat`` did not grow): a spin would burn quota the sandboxes need, and a
      throttled cgroup stalls for the rest of its period (100 ms by default).

    A file that cannot be read leaves the last answer (True at first); without a readable
    cgroup the affinity alone counts. The cgroup is looked up once, at the first read: its
    limits are re-read each time, a quota set later on a level that had none is not seen.
    The files stay open (close-on-exec) and are read with one ``pread`` each: the read comes
    before the request is sent, on the path of every execute.
    """

    __slots__ = ("_cgroup", "_cgroup_fs", "_fd", "_free", "_levels", "_next", "path", "refresh")

    def __init__(
        self,
        refresh: float = 0.01,
        path: str = "/proc/loadavg",
        *,
        cgroup: str = "/proc/self/cgroup",
        cgroup_fs: str = "/sys/fs/cgroup",
    ) -> None:
        self.refresh = refresh
        self.path = path
        self._cgroup = cgroup
        self._cgroup_fs = cgroup_fs
        self._next = 0.0
        self._free = True
        self._fd = -1
        #: Per cgroup level with a CPU quota: descriptors of its quota file(s) and cpu.stat.
        self._levels: list[_QuotaLevel] | None = None

    def free(self) -> bool:
        now = time.monotonic()
        if now < self._next:
            return self._free
        self._next = now + self.refresh
        try:
            if self._fd < 0:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            data = os.pread(self._fd, 128, 0)
        except OSError:
            self._fd = -1  # (closed behind our back, or never there): open again next time
            return self._free
        try:
            running = int(data.split()[3].split(b"/")[0])
        except (ValueError, IndexError):
            return self._free
        cpus = len(os.sched_getaffinity(0))
        throttled = False
        if self._levels is None:
            self._levels = _quota_levels(self._cgroup, self._cgroup_fs)
        for level in self._levels:
            allowed = level.cpus()
            if allowed is not None:
                cpus = min(cpus, allowed)
            throttled |= level.throttled_since()
        # The caller is one of the runnable tasks; the peer about to answer it may be another.
        self._free = cpus >= 2 and running <= cpus and not throttled
        return self._free


class _QuotaLevel:
    """One cgroup directory that had a CPU quota when it was found: its open files."""

    __slots__ = ("period", "quota", "stat", "throttled")

    def __init__(self, quota: int, period: int, stat: int) -> None:
        self.quota, self.period, self.stat = quota, period, stat  # descriptors; period -1 on v2
        self.throttled: int | None = None  # nr_throttled at the last read

    def cpus(self) -> int | None:
        """Whole CPUs the quota allows now (None: no quota now, or unreadable)."""
        try:
            if self.period < 0:  # v2 cpu.max: "<quota|max> <period>"
                fields = os.pread(self.quota, 64, 0).split()
                quota, period = fields[0], fields[1]
            else:
                quota, period = os.pread(self.quota, 32, 0), os.pread(self.period, 32, 0)
            if quota.strip() == b"max" or int(quota) < 0:
                return None
            return int(quota) // max(1, int(period))
        except (OSError, ValueError, IndexError):
            return None

    def throttled_since(self) -> bool:
        """The level was throttled since the last call (its ``nr_throttled`` grew); False at
        the first call and when ``cpu.stat`` cannot be read."""
        try:
            data = os.pread(self.stat, 512, 0)
            at = data.index(b"nr_throttled ")
            count = int(data[at + 13 : data.index(b"\n", at)])
        except (OSError, ValueError):
            return False
        grew = self.throttled is not None and count > self.throttled
        self.throttled = count
        return grew


def _quota_levels(cgroup: str, cgroup_fs: str) -> list[_QuotaLevel]:
    """The levels of this process's CPU cgroup, itself and up, that have a quota now."""
    try:
        with open(cgroup, encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    dirs: list[tuple[str, bool]] = []  # (directory, is v2)
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        controllers, rel = parts[1], parts[2].strip("/")
        if controllers == "":  # v2: the unified hierarchy, mounted at cgroup_fs or beneath it
            for root in (cgroup_fs, os.path.join(cgroup_fs, "unified")):
                if os.path.exists(os.path.join(root, "cgroup.controllers")):
                    dirs.append((os.path.join(root, rel), True))
                    break
        elif "cpu" in controllers.split(","):
            for name in (controllers, "cpu,cpuacct", "cpu"):
                root = os.path.join(cgroup_fs, name)
                if os.path.exists(os.path.join(root, "cpu.cfs_quota_us")):
                    dirs.append((os.path.join(root, rel), False))
                    break
    levels: list[_QuotaLevel] = []
    for here, v2 in dirs:
        quota_file = "cpu.max" if v2 else "cpu.cfs_quota_us"
        while os.path.exists(os.path.join(here, quota_file)):  # up to the hierarchy's root
            level = _open_level(here, v2)
            if level is not None:
                levels.append(level)
            here = os.path.dirname(here)
    return levels


def _open_level(directory: str, v2: bool) -> _QuotaLevel | None:
    """*directory*'s quota files and ``cpu.stat``, open, if it has a quota now."""
    names = ("cpu.max",) if v2 else ("cpu.cfs_quota_us", "cpu.cfs_period_us")
    fds: list[int] = []
    try:
        for name in (*names, "cpu.stat"):
            fds.append(os.open(os.path.join(directory, name), os.O_RDONLY | os.O_CLOEXEC))
    except OSError:
        for fd in fds:
            os.close(fd)
        return None
    level = _QuotaLevel(fds[0], -1, fds[1]) if v2 else _QuotaLevel(fds[0], fds[1], fds[2])
    if level.cpus() is None:
        for fd in fds:
            os.close(fd)
        return None
    return level
