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
    """Whether a CPU is free now: no more runnable tasks on the machine than CPUs this process
    may use, from ``/proc/loadavg`` (its fourth field), read at most every *refresh* seconds
    (threads that race only read it twice). Where the file cannot be read: True.

    The file stays open (close-on-exec) once read, and is read with one ``pread``: the read
    comes before the request is sent, on the path of every execute.
    """

    __slots__ = ("_cpus", "_fd", "_free", "_next", "path", "refresh")

    def __init__(self, refresh: float = 0.01, path: str = "/proc/loadavg") -> None:
        self.refresh = refresh
        self.path = path
        self._cpus = len(os.sched_getaffinity(0))
        self._next = 0.0
        self._free = True
        self._fd = -1

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
        # The caller is one of the runnable tasks; the peer about to answer it may be another.
        self._free = running <= self._cpus
        return self._free
