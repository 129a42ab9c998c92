"""Scheduling a batch: :func:`batch`, the budget, and the ``local`` engine.

The scheduler pulls items one at a time, keeps at most ``workers`` runs in
flight on an engine, and yields each :class:`BatchResult` as it finishes.
Before an item starts it checks the batch budget: once the finished runs
have cost ``budget_usd``, every item not started yet is yielded as
``stop_reason="skipped"``, ``error="skipped: budget"``. A started item may
spend at most what was left of the budget when it started (its own
``max_cost_usd``), so the batch overshoots by at most what the runs in
flight spend.

A failure that would fail every item (see :data:`~rlm.batching.worker.FATAL_ERRORS`)
stops the batch: the generator raises it; results yielded before stay valid.

Engines: ``local`` runs each item in one of ``workers`` threads of this
process, each run with its own sandbox; ``ray`` (:mod:`rlm.batching.ray_engine`)
runs each item as a Ray task on a worker node.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from rlm.batching.items import BatchItem, item_from_mapping
from rlm.batching.outfile import spent_usd
from rlm.batching.worker import RunSettings, check_sandbox, error_record, fatal_error, run_item
from rlm.budget import CancelToken
from rlm.checks import check_int, check_number
from rlm.errors import ConfigurationError

__all__ = ["ENGINES", "BatchResult", "Engine", "LocalEngine", "batch", "schedule"]

ENGINES = ("local", "ray")

#: How long closing the local engine waits for its cancelled runs to end (as ``rlm.core.STOP_WAIT_S``:
#: a cancelled run ends within a fraction of a second).
STOP_WAIT_S = 2.0


@dataclass(frozen=True)
class BatchResult:
    """The outcome of one item: the fields of an output line, in order (see :meth:`record`)."""

    id: str
    answer: str | None
    stop_reason: str
    iterations: int
    sub_calls: int
    input_tokens: int
    output_tokens: int
    cost_usd: float | None
    time_s: float
    error: str | None
    #: USD of the run's calls whose price is known (``cost_usd`` is None when any price is not):
    #: what the batch's budget counts. None for an item that did not run (and in older lines).
    priced_usd: float | None = None
    #: The question the run answered: :meth:`BatchItem.question_sha256` of its query and context
    #: as the run read them. None for an item whose context could not be read or that did not run
    #: (and in older lines). ``rlm batch`` refuses to resume an OUT whose id now asks another one.
    question_sha256: str | None = None

    @property
    def ok(self) -> bool:
        """True when the run gave an answer."""
        return self.answer is not None

    def record(self) -> dict[str, Any]:
        """The output line's JSON object."""
        return asdict(self)

    @property
    def spent_usd(self) -> float:
        """What the run counts towards the batch's budget: its priced calls (see
        :func:`rlm.batching.outfile.spent_usd`)."""
        return spent_usd(self.record())

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> BatchResult:
        return cls(**record)


class Engine(Protocol):
    """Where items run. ``submit`` starts one; ``wait`` returns the ones finished (possibly none)."""

    capacity: int

    def submit(self, item: BatchItem, cost_cap_usd: float | None) -> None: ...

    def wait(self, timeout: float) -> list[tuple[BatchItem, dict[str, Any]]]: ...

    def close(self, *, cancel: bool) -> None: ...


def _execute(
    item: BatchItem,
    settings: RunSettings,
    api_key: str | None,
    cost_cap: float | None,
    cancel: CancelToken | None = None,
) -> dict[str, Any]:
    """Load the item's context and run it (in whatever thread or process the engine chose)."""
    try:
        context, question = item.load()
    except ConfigurationError as exc:
        return {"record": error_record(item.id, "error", str(exc)), "fatal": None}
    return run_item(
        item.id,
        item.query,
        context,
        settings,
        api_key=api_key,
        cost_cap_usd=cost_cap,
        cancel=cancel,
        question_sha256=question,
    )


class LocalEngine:
    """Up to *workers* runs at once in threads of this process, each with its own sandbox.

    Closed before the batch's end (the generator closed early, a fatal failure, Ctrl-C), the
    runs in flight are cancelled through one :class:`~rlm.budget.CancelToken`: their sandboxes'
    code is killed and their model calls given up, so nothing goes on spending after
    :meth:`close`, which waits up to :data:`STOP_WAIT_S` for the threads to end. The threads
    are daemons: one still stuck past that is abandoned (its result dropped).
    """

    def __init__(self, settings: RunSettings, *, workers: int, api_key: str | None = None) -> None:
        self.capacity = workers
        self._settings = settings
        self._api_key = api_key
        self._todo: queue.SimpleQueue[tuple[BatchItem, float | None] | None] = queue.SimpleQueue()
        self._done: queue.SimpleQueue[tuple[BatchItem, dict[str, Any]]] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._cancelled = threading.Event()
        self._stop = CancelToken()  # cancelled by close(cancel=True): stops the runs in flight
        # Start the shared fork server from this thread (and check the policy's layers here, once):
        # a sandbox's helper process must not be tied to a worker thread that ends before it.
        check_sandbox(settings.policy)

    def _work(self) -> None:
        while True:
            job = self._todo.get()
            if job is None or self._cancelled.is_set():
                return
            item, cap = job
            try:
                outcome = _execute(item, self._settings, self._api_key, cap, self._stop)
            except BaseException as exc:  # a bug must not hang the batch: the item records it
                outcome = {"record": error_record(item.id, "error", f"{type(exc).__name__}: {exc}")}
                outcome["fatal"] = None
            if not self._cancelled.is_set():
                self._done.put((item, outcome))

    def submit(self, item: BatchItem, cost_cap_usd: float | None) -> None:
        if len(self._threads) < self.capacity:
            thread = threading.Thread(target=self._work, name=f"rlm-batch-{len(self._threads)}", daemon=True)
            thread.start()
            self._threads.append(thread)
        self._todo.put((item, cost_cap_usd))

    def wait(self, timeout: float) -> list[tuple[BatchItem, dict[str, Any]]]:
        try:
            finished = [self._done.get(timeout=timeout)]
        except queue.Empty:
            return []
        while True:
            try:
                finished.append(self._done.get_nowait())
            except queue.Empty:
                return finished

    def close(self, *, cancel: bool) -> None:
        if cancel:
            self._cancelled.set()
            self._stop.cancel()  # the runs in flight end now, their results dropped
        for _ in self._threads:
            self._todo.put(None)
        deadline = time.monotonic() + STOP_WAIT_S
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))


def _skipped(item: BatchItem) -> BatchResult:
    return BatchResult.from_record(error_record(item.id, "skipped", "skipped: budget"))


def schedule(
    items: Iterable[BatchItem],
    start: Callable[[], Engine],
    *,
    budget_usd: float | None = None,
    on_idle: Callable[[], None] | None = None,
    poll_s: float = 0.25,
) -> Generator[BatchResult, None, None]:
    """Run *items* on the engine *start* returns, at most ``engine.capacity`` at once; yield results
    as they finish. *on_idle* is called each time *poll_s* passes with nothing finished."""
    engine = start()
    source = iter(items)
    in_flight = 0
    spent = 0.0
    exhausted = False
    finished_cleanly = False
    try:
        while True:
            while not exhausted and in_flight < engine.capacity:
                item = next(source, None)
                if item is None:
                    exhausted = True
                    break
                if budget_usd is not None and spent >= budget_usd:
                    yield _skipped(item)
                    continue
                engine.submit(item, None if budget_usd is None else budget_usd - spent)
                in_flight += 1
            if in_flight == 0:
                finished_cleanly = True
                return
            done = engine.wait(poll_s)
            if not done and on_idle is not None:
                on_idle()
            fatal = None
            for _item, outcome in done:
                in_flight -= 1
                if outcome.get("fatal"):
                    fatal = fatal or outcome["fatal"]
                    continue
                result = BatchResult.from_record(outcome["record"])
                spent += result.spent_usd  # its priced calls, also when one call had no price
                yield result  # the runs that finished are kept, even beside a fatal failure
            if fatal:
                raise fatal_error(fatal[0], fatal[1])
    finally:
        engine.close(cancel=not finished_cleanly)


def _items(items: Iterable[BatchItem | dict[str, Any]]) -> Iterator[BatchItem]:
    seen: set[str] = set()
    for index, raw in enumerate(items):
        try:
            item = item_from_mapping(raw, base_dir=Path.cwd())
        except ValueError as exc:
            raise ConfigurationError(f"item {index}: {exc}") from None
        if item.id in seen:
            raise ConfigurationError(f"item {index}: duplicate id {item.id!r}")
        seen.add(item.id)
        yield item


def batch(
    items: Iterable[BatchItem | dict[str, Any]],
    *,
    model: str,
    workers: int | None = None,
    engine: str = "local",
    ray_address: str | None = None,
    budget_usd: float | None = None,
    sub_model: str | None = None,
    api_base: str | None = None,
    api_key: str | None = None,
    policy: Any = "default",
    log_dir: str | os.PathLike[str] | None = None,
    max_iterations: int = 20,
    max_depth: int = 1,
    max_sub_calls: int | None = None,
    max_time_s: float | None = None,
    max_cost_usd: float | None = None,
    on_idle: Callable[[], None] | None = None,
    **rlm_options: Any,
) -> Generator[BatchResult, None, None]:
    """Answer many questions with RLMs, *workers* at a time; yield each :class:`BatchResult` as it finishes.

    *items* are :class:`BatchItem` objects or dicts ``{"id", "query", "context"}``
    / ``{"id", "query", "context_path"}``, consumed as runs start (ids must be
    unique). *engine* is ``"local"`` (threads of this process; *workers*
    defaults to the CPU count) or ``"ray"`` (one Ray task per item; *ray_address*
    ``"auto"`` joins a running cluster, ``None`` starts a local instance;
    *workers* defaults to the cluster's CPUs). *budget_usd* caps the whole
    batch; *max_cost_usd* and the other limits apply to each run, as in
    :class:`~rlm.core.RLM`, as do the remaining keyword arguments. *on_idle*
    is called about every 0.25 s while no run finishes (to redraw a progress display).

    Raises :class:`~rlm.errors.ConfigurationError` for bad arguments or a bad
    item, and the first failure that would fail every item (a rejected key,
    an unknown model, an endpoint that cannot be reached, a missing sandbox layer).
    """
    if engine not in ENGINES:
        raise ConfigurationError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    check_int("workers", workers, minimum=1, optional=True)
    check_number("budget_usd", budget_usd)  # NaN or infinity would mean "no budget", silently
    from rlm.core import RLM

    # Build one RLM now so that a bad model string, endpoint, policy, limit or option fails before
    # anything runs (and, with the local engine, a log directory that cannot be written: with Ray it
    # is a path on the nodes).
    probe = RLM(
        model,
        sub_model=sub_model,
        api_base=api_base,
        log_dir=log_dir if engine == "local" else None,
        policy=policy,
        max_iterations=max_iterations,
        max_depth=max_depth,
        max_sub_calls=max_sub_calls,
        max_time_s=max_time_s,
        max_cost_usd=max_cost_usd,
        **rlm_options,
    )
    settings = RunSettings(
        model=model,
        policy=probe.policy,
        sub_model=sub_model,
        api_base=api_base,
        log_dir=None if log_dir is None else str(Path(log_dir).resolve()),
        max_iterations=max_iterations,
        max_depth=max_depth,
        max_sub_calls=max_sub_calls,
        max_time_s=max_time_s,
        max_cost_usd=max_cost_usd,
        rlm_options=dict(rlm_options),
    )

    def start() -> Engine:  # on the first next(): a batch never iterated starts no thread and no Ray
        if engine == "ray":
            try:
                from rlm.batching.ray_engine import RayEngine
            except ImportError as exc:
                raise ConfigurationError(
                    f"the ray engine needs Ray: pip install 'rlm[ray]' ({exc})"
                ) from None
            return RayEngine(settings, address=ray_address, workers=workers, api_key=api_key)
        return LocalEngine(settings, workers=workers or os.cpu_count() or 1, api_key=api_key)

    return schedule(_items(items), start, budget_usd=budget_usd, on_idle=on_idle)
