"""Run RLM and (optionally) a direct call on the same generated tasks; one record per run.

The record of one (task, size, repeat) has exactly the fields of
:data:`RECORD_FIELDS`. Nothing here imports litellm: the model calls go
through ``rlm.run`` and ``rlm.llm`` (imported on first use), so building the
command line, generating tasks and printing help stay fast.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.tasks.generators import Task, generate

__all__ = [
    "DIRECT_STATUSES",
    "RECORD_FIELDS",
    "SYSTEM_PROMPT",
    "BenchAborted",
    "BenchConfig",
    "DirectOutcome",
    "RLMOutcome",
    "append_jsonl",
    "decide_winner",
    "direct_messages",
    "make_record",
    "run_benchmark",
    "run_direct",
    "run_rlm",
    "run_rlm_all",
]

#: The fields of a JSONL record, in order (pinned: tests outside this repo read them).
RECORD_FIELDS: tuple[str, ...] = (
    "task",
    "size",
    "seed",
    "context_chars",
    "question",
    "expected",
    "rlm_answer",
    "rlm_correct",
    "rlm_cost_usd",
    "rlm_time_s",
    "direct_answer",
    "direct_correct",
    "direct_cost_usd",
    "direct_time_s",
    "direct_status",
    "winner",
)

#: ``direct_status`` values.
DIRECT_STATUSES: tuple[str, ...] = ("ok", "does not fit", "error", "skipped")

SYSTEM_PROMPT = (
    "You are given a document and a question about it. Read the whole document carefully, "
    "then reply with the final answer only, in the format the question asks for."
)

Progress = Callable[[str], None]


class BenchAborted(Exception):
    """The run cannot go on (bad key, unknown model): the message says what to fix."""


@dataclass(frozen=True)
class BenchConfig:
    """Everything one benchmark run needs; built by the CLI, usable from Python."""

    task: str
    sizes: Sequence[int]
    model: str
    direct_model: str | None = None
    sub_model: str | None = None
    repeats: int = 1
    seed: int = 0
    depth: float = 0.5
    api_base: str | None = None
    api_key: str | None = None
    log_dir: Path = Path("bench-logs")
    out: Path | None = None
    max_iterations: int = 20
    #: Further keywords for ``rlm.run`` (``max_depth``, ``policy``, ``max_cost_usd``, ...).
    rlm_options: dict[str, Any] = field(default_factory=dict)
    #: RLM runs at once, and where they run: the engines of ``rlm.batch`` ("local" or "ray").
    workers: int = 1
    engine: str = "local"
    ray_address: str | None = None

    def tasks(self) -> Iterator[Task]:
        """The generated tasks in run order: every size, repeat i with seed ``seed + i``."""
        for size in self.sizes:
            for i in range(self.repeats):
                yield generate(self.task, size, self.seed + i, depth=self.depth)


@dataclass(frozen=True)
class RLMOutcome:
    answer: str | None
    cost_usd: float | None
    time_s: float
    error: str | None = None
    stop_reason: str | None = None
    log_path: str | None = None


@dataclass(frozen=True)
class DirectOutcome:
    status: str  # one of DIRECT_STATUSES
    answer: str | None = None
    cost_usd: float | None = None
    time_s: float | None = None
    error: str | None = None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _rlm_kwargs(cfg: BenchConfig) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(cfg.rlm_options)
    kwargs.update(model=cfg.model, log_dir=str(cfg.log_dir), max_iterations=cfg.max_iterations)
    if cfg.sub_model:
        kwargs["sub_model"] = cfg.sub_model
    if cfg.api_base:
        kwargs["api_base"] = cfg.api_base
    if cfg.api_key:
        kwargs["api_key"] = cfg.api_key
    return kwargs


def run_rlm(task: Task, cfg: BenchConfig) -> RLMOutcome:
    """Run the RLM on *task*. Errors of one run are recorded; a bad key, model or setting aborts the bench."""
    import rlm
    from rlm.errors import AuthenticationError, ConfigurationError, UnknownModelError

    kwargs = _rlm_kwargs(cfg)
    start = time.perf_counter()
    try:
        result = rlm.run(task.question, task.context, **kwargs)
    except (AuthenticationError, UnknownModelError) as exc:
        raise BenchAborted(f"RLM model {cfg.model!r}: {exc}") from exc
    except ConfigurationError as exc:  # e.g. an unknown --policy: every run would fail the same way
        raise BenchAborted(f"RLM settings: {exc}") from exc
    except Exception as exc:  # one failed run must not lose the others
        return RLMOutcome(None, None, time.perf_counter() - start, error=_one_line(exc))
    elapsed = time.perf_counter() - start
    answer = None if result.answer is None else str(result.answer)
    log_path = getattr(result, "log_path", None)
    run_error = getattr(result, "error", None)
    return RLMOutcome(
        answer,
        result.cost_usd,
        elapsed,
        error=str(run_error) if run_error and answer is None else None,
        stop_reason=getattr(result, "stop_reason", None),
        log_path=None if log_path is None else str(log_path),
    )


def run_rlm_all(tasks: Sequence[Task], cfg: BenchConfig) -> Iterator[tuple[int, RLMOutcome]]:
    """Run the RLM on every task through ``rlm.batch`` (``cfg.workers`` at once on ``cfg.engine``);
    yield ``(index in tasks, outcome)`` as each run finishes. A failure that would fail every run
    (bad key, unknown model, unreachable endpoint, unusable setting) raises BenchAborted."""
    import rlm
    from rlm.errors import ConfigurationError, RLMError

    items = [rlm.BatchItem(str(i), task.question, context=task.context) for i, task in enumerate(tasks)]
    try:
        runs = rlm.batch(
            items, workers=cfg.workers, engine=cfg.engine, ray_address=cfg.ray_address, **_rlm_kwargs(cfg)
        )
        for result in runs:
            answer = None if result.answer is None else str(result.answer)
            error = result.error if answer is None else None
            yield (
                int(result.id),
                RLMOutcome(answer, result.cost_usd, result.time_s, error, result.stop_reason),
            )
    except ConfigurationError as exc:  # e.g. an unknown --policy: every run would fail the same way
        raise BenchAborted(f"RLM settings: {exc}") from exc
    except RLMError as exc:
        raise BenchAborted(f"RLM model {cfg.model!r}: {exc}") from exc


def direct_messages(task: Task) -> list[dict[str, str]]:
    """The prompt of the direct call: the whole context, then the question."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": f"{task.context}\n\nQuestion: {task.question}"},
    ]


def run_direct(task: Task, cfg: BenchConfig) -> DirectOutcome:
    """Feed the whole context to ``cfg.direct_model`` in one call.

    "does not fit" when litellm's token count of the prompt is over the model's
    ``max_input_tokens`` (no call is made), or, for a model whose window is
    unknown, when the provider answers with a context-length error. Any other
    failure is "error"; nothing here raises.
    """
    if not cfg.direct_model:
        return DirectOutcome("skipped")
    from rlm import llm
    from rlm.errors import ContextWindowExceeded

    messages = direct_messages(task)
    try:
        window = llm.max_input_tokens(cfg.direct_model)
        if window is not None:
            tokens = llm.count_tokens(cfg.direct_model, messages)
            if tokens > window:
                return DirectOutcome("does not fit", error=f"{tokens:,} prompt tokens > {window:,} window")
    except Exception:  # no window or no tokenizer for this model: try the call
        pass
    start = time.perf_counter()
    try:
        completion = llm.complete(cfg.direct_model, messages, api_base=cfg.api_base, api_key=cfg.api_key)
    except ContextWindowExceeded as exc:
        return DirectOutcome("does not fit", time_s=time.perf_counter() - start, error=_one_line(exc))
    except Exception as exc:
        return DirectOutcome("error", time_s=time.perf_counter() - start, error=_one_line(exc))
    return DirectOutcome("ok", completion.text, completion.cost_usd, time.perf_counter() - start)


def decide_winner(
    rlm_correct: bool,
    rlm_cost: float | None,
    rlm_time: float | None,
    direct_status: str,
    direct_correct: bool | None,
    direct_cost: float | None,
    direct_time: float | None,
) -> str:
    """``"rlm"``, ``"direct"``, ``"none"`` (both wrong) or ``"-"`` (no direct model).

    The correct one wins; when both are correct the cheaper one (a cost that is
    unknown for either side does not decide), then the faster one.
    """
    if direct_status == "skipped":
        return "-"
    direct_ok = bool(direct_correct) and direct_status == "ok"
    if rlm_correct != direct_ok:
        return "rlm" if rlm_correct else "direct"
    if not rlm_correct:
        return "none"
    if rlm_cost is not None and direct_cost is not None and rlm_cost != direct_cost:
        return "rlm" if rlm_cost < direct_cost else "direct"
    if rlm_time is not None and direct_time is not None and rlm_time != direct_time:
        return "rlm" if rlm_time < direct_time else "direct"
    return "rlm"


def make_record(task: Task, rlm_out: RLMOutcome, direct: DirectOutcome) -> dict[str, Any]:
    """The JSONL record of one run, with exactly :data:`RECORD_FIELDS`."""
    rlm_correct = task.is_correct(rlm_out.answer)
    direct_correct: bool | None
    if direct.status == "skipped":
        direct_correct = None
    else:
        direct_correct = direct.status == "ok" and task.is_correct(direct.answer)
    expected = [list(p) for p in task.expected] if isinstance(task.expected, list) else task.expected
    record = {
        "task": task.name,
        "size": task.size,
        "seed": task.seed,
        "context_chars": len(task.context),
        "question": task.question,
        "expected": expected,
        "rlm_answer": rlm_out.answer,
        "rlm_correct": rlm_correct,
        "rlm_cost_usd": rlm_out.cost_usd,
        "rlm_time_s": round(rlm_out.time_s, 3),
        "direct_answer": direct.answer,
        "direct_correct": direct_correct,
        "direct_cost_usd": direct.cost_usd,
        "direct_time_s": None if direct.time_s is None else round(direct.time_s, 3),
        "direct_status": direct.status,
        "winner": decide_winner(
            rlm_correct,
            rlm_out.cost_usd,
            rlm_out.time_s,
            direct.status,
            direct_correct,
            direct.cost_usd,
            direct.time_s,
        ),
    }
    assert tuple(record) == RECORD_FIELDS
    return record


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one record as a JSON line (the file and its folder are created if needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, ensure_ascii=False) + "\n")


def _describe(answer: str | None, correct: bool | None, task: Task) -> str:
    if answer is None:
        return "no answer"
    shown = " ".join(answer.split())
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    verdict = "correct" if correct else "wrong"
    if task.name == "pairs":
        verdict += f", F1 {task.score(answer):.2f}"
    return f"{shown!r} ({verdict})"


def _warm_up(cfg: BenchConfig) -> None:
    """Import litellm before the first timed call, so the first row's time is not its import time."""
    from rlm import llm

    try:
        llm.max_input_tokens(cfg.model)
    except Exception:  # only a warm-up: the real calls report their own errors
        pass


def run_benchmark(cfg: BenchConfig, progress: Progress | None = None) -> list[dict[str, Any]]:
    """Run every (size, repeat) of *cfg*; each record is appended to ``cfg.out`` as soon as it exists.

    The RLM runs go through ``rlm.batch`` (``cfg.workers`` at once, on ``cfg.engine``); each direct
    call is made here when its task's RLM run has finished. Records are appended in the order runs
    finish and returned in task order.

    Raises :class:`BenchAborted` when the RLM model cannot be used at all (the
    records finished before that are already written).
    """
    say = progress or (lambda _msg: None)
    _warm_up(cfg)
    tasks = list(cfg.tasks())
    done: dict[int, dict[str, Any]] = {}
    total = len(tasks)
    for n, (index, rlm_out) in enumerate(run_rlm_all(tasks, cfg), start=1):
        task = tasks[index]
        say(f"[{n}/{total}] {task.name} size={task.size:,} seed={task.seed} ({len(task.context):,} chars)")
        if rlm_out.error:
            say(f"  RLM: failed in {rlm_out.time_s:.1f}s: {rlm_out.error}")
        else:
            extra = (
                f", stop_reason={rlm_out.stop_reason}" if rlm_out.stop_reason not in (None, "final") else ""
            )
            say(
                f"  RLM: {_describe(rlm_out.answer, task.is_correct(rlm_out.answer), task)} "
                f"in {rlm_out.time_s:.1f}s{extra}"
            )
        direct = run_direct(task, cfg)
        if direct.status == "ok":
            say(
                f"  direct: {_describe(direct.answer, task.is_correct(direct.answer), task)} "
                f"in {direct.time_s or 0.0:.1f}s"
            )
        elif direct.status != "skipped":
            say(f"  direct: {direct.status}" + (f" ({direct.error})" if direct.error else ""))
        record = make_record(task, rlm_out, direct)
        done[index] = record
        if cfg.out is not None:
            append_jsonl(cfg.out, record)
    return [done[i] for i in sorted(done)]
