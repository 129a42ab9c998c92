"""Spin-before-block, adaptively: fast for one busy pair of processes, quiet for many.

A process blocked in ``poll`` or ``recv`` takes 100+ us to wake on a VM, several
times the cost of a small frame, so both ends of a channel poll for a short
while before they block. That pays off only when the answer comes within the
window: with 32 sandboxes on 2 cores every spinning process burns CPU the
others need. So each channel keeps a :class:`Spinner`:

- a spin that got its answer keeps the full window;
- a spin that did not halves the window, down to nothing;
- with nothing left it probes again every :data:`PROBE_EVERY` waits, so a
  channel that becomes busy again re-learns to spin;
- a wait whose answer is known to come late (the first request to a child
  that slept in a pool) does not spin at all (:attr:`Spinner.skip`);
- no ``sched_yield`` in the loop: on a busy machine it hands the CPU to a
  CPU-bound process for a whole time slice (milliseconds), the opposite of
  what a spin is for.

The host additionally lets only one of its threads spin at a time (the GIL
makes two spinners take turns anyway). Stdlib only: the child imports it.
"""

from __future__ import annotations

__all__ = ["PROBE_EVERY", "Spinner"]

#: With a window of zero, spin again (a quarter window) once every this many waits.
PROBE_EVERY = 16
_FLOOR = 0.00002  # windows shorter than 20 us are not worth a spin


class Spinner:
    """The spin window of one channel end, in seconds."""

    __slots__ = ("full", "skip", "waits", "window")

    def __init__(self, full: float) -> None:
        self.full = full
        self.window = full
        self.waits = 0
        #: The next this many waits block at once (their answer is known to come late).
        self.skip = 0

    def budget(self) -> float:
        """How long to spin before blocking this time (0: block at once)."""
        if self.skip > 0:
            self.skip -= 1
            return 0.0
        if self.window > 0:
            return self.window
        self.waits += 1
        if self.waits >= PROBE_EVERY:
            self.waits = 0
            return self.full / 4
        return 0.0

    def outcome(self, answered: bool) -> None:
        """Report whether the answer came while spinning."""
        if answered:
            self.window = self.full
        else:
            half = self.window / 2
            self.window = half if half >= _FLOOR else 0.0
