"""Usage accounting and budgets, shared by a run and every child RLM it starts.

One :class:`Ledger` per root run. Every model call of the tree is recorded in
it (per model: calls, tokens, cost) and asks it first whether a budget still
allows the call. Budgets are enforced here, in the parent process; nothing in
the sandbox can see or change them. It also bounds how many model calls are
in flight at once across the tree (``max_concurrency``). Each child run also
keeps a :class:`Tally` of its own calls and its child runs': what its result
reports.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from rlm.checks import check_int, check_number
from rlm.errors import BudgetExceeded, ConfigurationError
from rlm.llm import Completion
from rlm.result import ModelUsage

__all__ = ["Budgets", "CancelToken", "Ledger", "Tally"]


@dataclass(frozen=True)
class Budgets:
    """Limits of one run, over the whole tree. ``None`` means no limit."""

    max_sub_calls: int | None = None
    max_tokens: int | None = None
    max_cost_usd: float | None = None
    max_time_s: float | None = None

    def __post_init__(self) -> None:
        # None is "no limit"; NaN or infinity would be the same, silently (every comparison with
        # NaN is false): refused, like a bool or a string where a number belongs.
        for name in ("max_sub_calls", "max_tokens"):
            check_int(name, getattr(self, name), minimum=0, optional=True)
        for name in ("max_cost_usd", "max_time_s"):
            check_number(name, getattr(self, name))


class CancelToken:
    """Stops a run from another thread or task: ``token.cancel()``.

    Pass it as ``cancel=`` to :meth:`RLM.completion` (or :func:`rlm.run`). The
    code running in the run's sandboxes is killed at once, and the run ends at
    its next check (before a model call, a code block or a turn) with
    ``stop_reason="cancelled"``. A model call in flight is given up: its answer is unused,
    and a call made through rlm's HTTP client reads its response no further.
    One token may stop several runs; it cannot be reset.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cancelled = False
        self._sandboxes: list[Any] = []

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            sandboxes = list(self._sandboxes)
        for sb in sandboxes:
            sb.kill()

    def watch(self, sb: Any) -> None:
        """Kill *sb*'s code when the token is cancelled (at once if it already is)."""
        with self._lock:
            if not self._cancelled:
                self._sandboxes.append(sb)
                return
        sb.kill()

    def unwatch(self, sb: Any) -> None:
        """Stop watching *sb* (a later :meth:`cancel` leaves it alone). A no-op when it is not watched."""
        with self._lock:
            try:
                self._sandboxes.remove(sb)
            except ValueError:
                pass


class Tally:
    """What a part of a run tree used: one run and its child runs (a child RLM's result counts
    these), or the whole tree (:attr:`Ledger.tally`). Per model: calls, tokens, cost, retries,
    calls given up; sub-calls and tool calls. Thread-safe; it checks no budget."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._usage: dict[str, ModelUsage] = {}
        #: Every known price paid, whatever the model: what max_cost_usd counts. (A model's
        #: ``cost_usd`` in the usage becomes None once one of its calls has no price, and its
        #: earlier spend must not stop counting then.)
        self._priced = 0.0
        self.sub_calls = 0
        self.tool_calls = 0

    def record(self, model_key: str, completion: Completion) -> None:
        with self._lock:
            if completion.cost_usd is not None:
                self._priced += completion.cost_usd
            u = self._usage.get(model_key) or ModelUsage()
            known = u.cost_usd is not None or u.calls == 0
            cost = (
                (u.cost_usd or 0.0) + completion.cost_usd
                if known and completion.cost_usd is not None
                else None
            )
            self._usage[model_key] = u.model_copy(
                update={
                    "calls": u.calls + 1,
                    "input_tokens": u.input_tokens + completion.input_tokens,
                    "output_tokens": u.output_tokens + completion.output_tokens,
                    "cache_read_tokens": u.cache_read_tokens + completion.cache_read_tokens,
                    "cache_write_tokens": u.cache_write_tokens + completion.cache_write_tokens,
                    "cost_usd": cost,
                }
            )

    def record_retry(self, model_key: str) -> None:
        with self._lock:
            u = self._usage.get(model_key) or ModelUsage()
            self._usage[model_key] = u.model_copy(update={"retries": u.retries + 1})

    def record_abandoned(self, model_key: str) -> None:
        with self._lock:
            u = self._usage.get(model_key) or ModelUsage()
            self._usage[model_key] = u.model_copy(update={"abandoned": u.abandoned + 1})

    def add_sub_calls(self, n: int) -> None:
        with self._lock:
            self.sub_calls = max(0, self.sub_calls + n)

    def add_tool_call(self) -> None:
        with self._lock:
            self.tool_calls += 1

    def usage(self) -> dict[str, ModelUsage]:
        with self._lock:
            return dict(self._usage)

    def priced(self) -> float:
        """USD of every call whose price is known (what max_cost_usd counts)."""
        with self._lock:
            return self._priced

    def tokens(self) -> int:
        """Input and output tokens of every call (what max_tokens counts)."""
        with self._lock:
            return sum(u.input_tokens + u.output_tokens for u in self._usage.values())

    def totals(self) -> tuple[int, int, float | None]:
        """(input tokens, output tokens, cost in USD or None when any price is unknown)."""
        with self._lock:
            usage = list(self._usage.values())
        cost: float | None = sum(u.cost_usd or 0.0 for u in usage)
        if any(u.cost_usd is None for u in usage):
            cost = None
        return sum(u.input_tokens for u in usage), sum(u.output_tokens for u in usage), cost


class Ledger:
    """Thread-safe usage totals and budget checks for one run tree."""

    def __init__(
        self, budgets: Budgets, max_concurrency: int = 16, cancel: CancelToken | None = None
    ) -> None:
        if max_concurrency < 1:
            raise ConfigurationError(f"max_concurrency must be >= 1, got {max_concurrency!r}")
        self.budgets = budgets
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_concurrency)
        self.tally = Tally()  # the whole tree's usage: what the budgets count
        self.stopped_by: str | None = None  # the first budget that ran out
        self.cancel = cancel

    @property
    def sub_calls(self) -> int:
        return self.tally.sub_calls

    @property
    def tool_calls(self) -> int:
        return self.tally.tool_calls

    # -- checks ------------------------------------------------------------
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def time_left(self) -> float | None:
        limit = self.budgets.max_time_s
        return None if limit is None else limit - self.elapsed()

    def _over(self, spending: bool = True) -> tuple[str, str] | None:
        """(limit, message) of a token/cost/time budget that is used up, or of a cancel (lock
        held); *spending* False: the token and cost budgets are not looked at."""
        if self.cancel is not None and self.cancel.cancelled:
            return "cancelled", "the run was cancelled"
        b = self.budgets
        if spending:
            tokens = self.tally.tokens()
            if b.max_tokens is not None and tokens >= b.max_tokens:
                return "max_tokens", f"token budget used up ({tokens} of {b.max_tokens})"
            if b.max_cost_usd is not None:
                cost = self.tally.priced()  # a call without a price counts nothing (nothing to count)
                if cost >= b.max_cost_usd:
                    return "max_cost_usd", f"cost budget used up (${cost:.6f} of ${b.max_cost_usd:g})"
        if b.max_time_s is not None and self.elapsed() >= b.max_time_s:
            return "max_time_s", f"time budget used up ({self.elapsed():.1f} s of {b.max_time_s:g} s)"
        return None

    def check(self, *, sub_call: bool) -> None:
        """Allow one model call or raise :class:`BudgetExceeded`. A sub-call is counted here."""
        with self._lock:
            over = self._over()
            if over is None and sub_call:
                limit = self.budgets.max_sub_calls
                if limit is not None and self.sub_calls >= limit:
                    over = "max_sub_calls", f"sub-call budget used up ({self.sub_calls} of {limit})"
                else:
                    self.tally.add_sub_calls(1)
            if over is not None:
                if self.stopped_by is None:
                    self.stopped_by = over[0]
                raise BudgetExceeded(*over)

    def uncount_sub_call(self) -> None:
        """Take back the sub-call :meth:`check` counted for a call then refused before it was sent
        (the run stopped while it waited for a slot): ``sub_calls`` counts the calls made."""
        with self._lock:
            self.tally.add_sub_calls(-1)

    def halted(self) -> tuple[str, str] | None:
        """(limit, message) of a budget that now refuses every call (cancelled, tokens, cost,
        time), or None. Unlike :meth:`exhausted` it does not look at ``max_sub_calls``, which
        refuses only new sub-calls (at :meth:`check`): a call already let through (the closing
        root call of a run out of sub-calls) goes on."""
        return self._stopped(spending=True)

    def interrupted(self) -> tuple[str, str] | None:
        """(limit, message) when the run is cancelled or out of time, else None: what gives up a
        model call in flight. A token or cost budget used up does not: a call under way was let
        through before it ran out, and the provider bills it whether or not its answer is read,
        so it is waited for and counted (the documented slack of those budgets); only the next
        call is refused (:meth:`check`, :meth:`refuse_any`)."""
        return self._stopped(spending=False)

    def _stopped(self, spending: bool) -> tuple[str, str] | None:
        """:meth:`_over`, noted as what stopped the run when it is the first."""
        with self._lock:
            over = self._over(spending)
            if over is not None and self.stopped_by is None:
                self.stopped_by = over[0]
            return over

    def refusal(self) -> BudgetExceeded | None:
        """Once the run has stopped (:attr:`stopped_by` set: every budget that sets it refuses
        sub-calls from then on), the refusal a new sub-call gets, counted nowhere; else None."""
        with self._lock:
            if self.stopped_by is None:
                return None
            over = self._over()
            limit = self.budgets.max_sub_calls
            if over is None and limit is not None and self.sub_calls >= limit:
                over = "max_sub_calls", f"sub-call budget used up ({self.sub_calls} of {limit})"
        return BudgetExceeded(*(over or (self.stopped_by, f"the run has stopped ({self.stopped_by})")))

    def refuse_any(self) -> None:
        """Raise :class:`BudgetExceeded` if :meth:`halted` says a budget refuses every call now;
        unlike :meth:`check` it counts nothing."""
        over = self.halted()
        if over is not None:
            raise BudgetExceeded(*over)

    def exhausted(self) -> str | None:
        """The budget that stops the run, if one does (checked now, so time counts)."""
        with self._lock:
            over = self._over()
            if over is not None and self.stopped_by is None:
                self.stopped_by = over[0]
            return self.stopped_by

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one of the ``max_concurrency`` model-call slots."""
        with self._slots:
            yield

    # -- accounting --------------------------------------------------------
    def record(self, model_key: str, completion: Completion) -> None:
        self.tally.record(model_key, completion)

    def record_retry(self, model_key: str, wait_s: float) -> None:
        """Count one retry of a call to *model_key*, due in *wait_s* seconds.

        Raises :class:`BudgetExceeded` when a budget is already used up, or when
        the wait would end past the time budget: a retry never outlives a budget.
        """
        with self._lock:
            over = self._over()
            limit = self.budgets.max_time_s
            if over is None and limit is not None and self.elapsed() + wait_s >= limit:
                over = "max_time_s", f"a retry in {wait_s:.1f} s would end past the time budget ({limit:g} s)"
            if over is not None:
                if self.stopped_by is None:
                    self.stopped_by = over[0]
                raise BudgetExceeded(*over)
            self.tally.record_retry(model_key)

    def record_abandoned(self, model_key: str) -> None:
        """Count one call to *model_key* given up in flight (its usage will not be known)."""
        self.tally.record_abandoned(model_key)

    def record_tool_call(self) -> None:
        self.tally.add_tool_call()

    def usage(self) -> dict[str, ModelUsage]:
        return self.tally.usage()

    def priced(self) -> float:
        """USD of every call whose price is known (what max_cost_usd counts)."""
        return self.tally.priced()

    def totals(self) -> tuple[int, int, float | None]:
        """(input tokens, output tokens, cost in USD or None when any price is unknown)."""
        return self.tally.totals()
