"""Running one item of a batch, wherever an engine runs it (a thread here, a Ray task on another node).

:func:`run_item` builds an :class:`~rlm.core.RLM` from :class:`RunSettings`,
answers one question and returns a plain dict: the output record, and
``fatal`` when the failure says the whole batch cannot work (a rejected or
missing key, an unknown model, an endpoint that refuses connections, also
when it goes away after the run's first turn, a sandbox layer missing on
this machine). Everything it returns is plain data
that crosses a process boundary unchanged, and none of it holds a key.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rlm.errors import (
    AuthenticationError,
    ConfigurationError,
    ContextError,
    ModelUnreachable,
    RLMError,
    SandboxFailure,
    UnknownModelError,
)
from rlm.llm import redact, secret_values

if TYPE_CHECKING:
    from rlm.budget import CancelToken

__all__ = ["FATAL_ERRORS", "RunSettings", "check_sandbox", "error_record", "fatal_error", "run_item"]

#: Failures of one item that would fail every item the same way: the batch stops at the first.
FATAL_ERRORS: tuple[type[RLMError], ...] = (
    AuthenticationError,
    UnknownModelError,
    ModelUnreachable,
    ConfigurationError,
)


@dataclass(frozen=True)
class RunSettings:
    """What every run of a batch gets: models, sandbox policy, per-run limits. Never a key.

    ``policy`` is a loaded :class:`sandbox.Policy` (plain data: it crosses to
    Ray workers as is). ``log_dir`` is a path on the machine that runs the item.
    ``max_cost_usd`` is the per-run cost limit (``None``: only the batch budget).
    """

    model: str
    policy: Any
    sub_model: str | None = None
    api_base: str | None = None
    log_dir: str | None = None
    max_iterations: int = 20
    max_depth: int = 1
    max_sub_calls: int | None = None
    max_time_s: float | None = None
    max_cost_usd: float | None = None
    rlm_options: dict[str, Any] = field(default_factory=dict)


def error_record(
    item_id: str,
    stop_reason: str,
    error: str,
    time_s: float = 0.0,
    priced_usd: float | None = None,
    question_sha256: str | None = None,
    spent: tuple[int, int, float | None] | None = None,
) -> dict[str, Any]:
    """The output record of an item that did not run to a result (*priced_usd*: what a run that
    failed spent on priced calls first; it counts towards the batch's budget; *question_sha256*:
    the question it was asked, when its context was read; *spent*: that run's input tokens,
    output tokens and cost, as :attr:`rlm.errors.RLMError.spent`)."""
    input_tokens, output_tokens, cost_usd = spent if spent is not None else (0, 0, None)
    return {
        "id": item_id,
        "answer": None,
        "stop_reason": stop_reason,
        "iterations": 0,
        "sub_calls": 0,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cost_usd": cost_usd,
        "time_s": round(time_s, 3),
        "error": error,
        "priced_usd": priced_usd,
        "question_sha256": question_sha256,
    }


def check_sandbox(policy: Any, where: str = "") -> None:
    """Start and close one sandbox with *policy*: a layer the policy requires but this machine lacks
    raises SandboxFailure naming the layer (and *where*, e.g. the node)."""
    from sandbox import Sandbox
    from sandbox.errors import SandboxError

    try:
        with Sandbox(policy.override({"audit.enabled": False})) as sb:
            sb.execute("pass")
    except SandboxError as exc:
        place = f" on {where}" if where else ""
        raise SandboxFailure(f"cannot start the sandbox{place}: {exc}") from None


def run_item(
    item_id: str,
    query: str,
    context: str,
    settings: RunSettings,
    *,
    api_key: str | None = None,
    cost_cap_usd: float | None = None,
    cancel: CancelToken | None = None,
    question_sha256: str | None = None,
) -> dict[str, Any]:
    """Run one item. Returns ``{"record": {...}, "fatal": None | [error class name, message]}``.
    *cancel* stops the run (its sandbox's code killed, its model call given up): the engine's
    token, cancelled when the batch is closed before its end. *question_sha256* (see
    :meth:`~rlm.batching.items.BatchItem.question_sha256`) goes into the record as it is."""
    from rlm.core import RLM

    started = time.perf_counter()
    caps = [c for c in (settings.max_cost_usd, cost_cap_usd) if c is not None]
    try:
        rlm = RLM(
            settings.model,
            sub_model=settings.sub_model,
            api_base=settings.api_base,
            api_key=api_key,
            policy=settings.policy,
            log_dir=settings.log_dir,
            max_iterations=settings.max_iterations,
            max_depth=settings.max_depth,
            max_sub_calls=settings.max_sub_calls,
            max_time_s=settings.max_time_s,
            max_cost_usd=min(caps) if caps else None,
            **settings.rlm_options,
        )
        result = rlm.completion(context, root_prompt=query, cancel=cancel)
    except ContextError as exc:  # this item's context (a ConfigurationError, but not one of the batch's)
        message = redact(str(exc), secret_values(api_key))
        return {
            "record": error_record(
                item_id, "error", message, time.perf_counter() - started, None, question_sha256, exc.spent
            ),
            "fatal": None,
        }
    except FATAL_ERRORS as exc:
        message = redact(str(exc), secret_values(api_key))
        record = error_record(
            item_id,
            "error",
            message,
            time.perf_counter() - started,
            exc.priced_cost_usd,
            question_sha256,
            exc.spent,
        )
        return {"record": record, "fatal": [type(exc).__name__, message]}
    except (RLMError, OSError, ValueError, RuntimeError) as exc:
        message = redact(f"{type(exc).__name__}: {exc}", secret_values(api_key))
        # An RLMError's: what the run spent first
        priced, spent = getattr(exc, "priced_cost_usd", None), getattr(exc, "spent", None)
        return {
            "record": error_record(
                item_id, "error", message, time.perf_counter() - started, priced, question_sha256, spent
            ),
            "fatal": None,
        }
    record = {
        "id": item_id,
        "answer": result.answer,
        "stop_reason": result.stop_reason,
        "iterations": result.iterations,
        "sub_calls": result.sub_calls,
        "input_tokens": result.total_input_tokens,
        "output_tokens": result.total_output_tokens,
        "cost_usd": result.cost_usd,
        "time_s": round(time.perf_counter() - started, 3),
        "error": None if result.error is None else redact(result.error, secret_values(api_key)),
        "priced_usd": result.priced_cost_usd,
        "question_sha256": question_sha256,
    }
    if result.stop_reason == "model_error" and result.error_type == ModelUnreachable.__name__:
        # The endpoint went away mid-run (a later turn: the first turn's raises): as at the first
        # turn, the batch stops and the item is not recorded, so the next invocation runs it again.
        return {"record": record, "fatal": [result.error_type, record["error"]]}
    return {"record": record, "fatal": None}


def fatal_error(kind: str, message: str) -> RLMError:
    """The exception a worker's ``fatal`` stands for, rebuilt in the driver."""
    classes: dict[str, type[RLMError]] = {cls.__name__: cls for cls in (*FATAL_ERRORS, SandboxFailure)}
    return classes.get(kind, RLMError)(message)
