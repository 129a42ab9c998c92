"""The batch's progress line on stderr and its closing summary.

On a terminal one line is redrawn in place: a bar, done / total, failures,
tokens and cost so far, items per second and the time left (ETA). When stderr
is not a terminal nothing is drawn while the batch runs; the summary is
printed either way. Only counts and sums are shown: no id, answer or error
text, so hostile data cannot write terminal escapes here (the summary's OUT
name comes escaped, from the command).
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import TextIO

from rlm.batching.engine import BatchResult

__all__ = ["Progress"]

_BAR = 24


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """Counts results and draws them. *total* is the number of items this run will handle."""

    def __init__(self, total: int, stream: TextIO | None = None, *, live: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.total = total
        self.done = self.failed = self.skipped = 0
        self.input_tokens = self.output_tokens = 0
        self.cost_usd = 0.0
        self.unknown_cost = 0
        self.started = time.monotonic()
        self._last_draw = 0.0
        self._drawn = False

    def add(self, result: BatchResult) -> None:
        self.done += 1
        if result.stop_reason == "skipped":
            self.skipped += 1
        elif not result.ok:
            self.failed += 1
        self.input_tokens += result.input_tokens
        self.output_tokens += result.output_tokens
        if result.cost_usd is None:  # its priced calls count; the rest is unknown
            # priced_usd None: the item never ran (skipped, bad input, a context that could not be
            # read), so it made no call, priced or not.
            self.unknown_cost += result.priced_usd is not None
            self.cost_usd += result.spent_usd
        else:
            self.cost_usd += result.cost_usd
        self.draw()

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        fraction = self.done / self.total if self.total else 1.0
        filled = int(_BAR * fraction)
        bar = "#" * filled + "-" * (_BAR - filled)
        ran = self.done - self.skipped
        rate = ran / elapsed if elapsed > 0 else 0.0
        eta = _clock((self.total - self.done) / rate) if rate > 0 and self.done < self.total else "--:--"
        return (
            f"[{bar}] {self.done}/{self.total} done, {self.failed} failed, "
            f"{self.input_tokens + self.output_tokens:,} tokens, ${self.cost_usd:.4f}, "
            f"{rate:.2f} items/s, ETA {eta}"
        )

    def draw(self, *, force: bool = False) -> None:
        """Redraw the line (at most 10 times a second unless *force*); nothing when not live."""
        if not self.live:
            return
        now = time.monotonic()
        if not force and now - self._last_draw < 0.1:
            return
        self._last_draw = now
        width = shutil.get_terminal_size((100, 20)).columns - 1
        self.stream.write("\r" + self.line()[:width].ljust(width))
        self.stream.flush()
        self._drawn = True

    def summary(
        self,
        out: str,
        *,
        already: int = 0,
        already_failed: int = 0,
        interrupted: bool = False,
        written: bool = True,
    ) -> str:
        """The closing lines (the live line is cleared first). *already*: the items of the input
        answered in OUT by earlier runs; *already_failed* of them have no answer. *written*
        False: OUT holds no line (a batch that made it then removed it), which the last line
        says instead of pointing at results."""
        if self._drawn:
            self.draw(force=True)
            self.stream.write("\n")
        elapsed = time.monotonic() - self.started
        answered = self.done - self.failed - self.skipped
        cost = f"${self.cost_usd:.4f}" + (
            f" (+ calls of unknown price in {self.unknown_cost} run(s))" if self.unknown_cost else ""
        )
        head = "interrupted: " if interrupted else ""
        text = (
            f"rlm batch: {head}{self.done} of {self.total} item(s) in {_clock(elapsed)}: {answered} answered, "
            f"{self.failed} failed, {self.skipped} skipped (budget); "
            f"{self.input_tokens + self.output_tokens:,} tokens, {cost}"
        )
        if already:
            text += f"; {already} already in {out} before this run"
            if already_failed:
                text += f" ({already_failed} of them without an answer: delete their lines to rerun them)"
        if not written:
            return text + f"\nrlm batch: nothing was written to {out}"
        return text + f"\nrlm batch: results in {out}"
