"""The Recursive Language Model loop: :class:`RLM` and :func:`run`.

A run puts the context in a fresh sandbox as the variable ``context`` and
gives the root model only the question and a description of the context.
Each turn the model's ```repl blocks run in the sandbox, in order, and their
output (or error) is fed back, until the model gives ``FINAL``/``FINAL_VAR``
or a limit stops the run.

``llm_query``, ``llm_query_batched``, ``rlm_query``, ``rlm_query_batched``
and ``rlm_submit_final`` are *host functions*: the sandboxed code calls them,
this process services them. The child never holds a key or a client. Depth,
iterations and every budget are enforced here (see :mod:`rlm.budget`).
``FINAL`` and ``FINAL_VAR`` are defined in the sandbox by a small prelude
(run again whenever the sandbox restarts) that resolves the variable in the
child and hands its value to ``rlm_submit_final``.
"""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import dataclasses
import itertools
import json
import math
import os
import random
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from datetime import datetime
from pathlib import Path
from typing import Any

from rlm.backend import LiteLLMBackend, ModelBackend
from rlm.budget import Budgets, CancelToken, Ledger, Tally
from rlm.checks import check_api_base, check_int, check_log_dir, check_number, check_text
from rlm.errors import (
    AuthenticationError,
    BudgetExceeded,
    ConfigurationError,
    ContextError,
    ModelError,
    ProviderUnavailable,
    RateLimited,
    RLMError,
    SandboxFailure,
    UnknownModelError,
)
from rlm.events import EventCallback, Events, call_sync, raised_by_a_signal_handler
from rlm.final import count_code_blocks, extract_code_blocks, find_final
from rlm.llm import CALL_STOP, CallStop, Completion, close_client, redact, secret_values
from rlm.result import RLMResult
from rlm.tools import Tool, describe_tools, tool_table
from rlm.trajectory import (
    LOG_TEXT_CHARS,
    REPEAT_CHARS,
    TrajectoryLogger,
    clip_text,
    nested_deeper,
    new_run_id,
)
from rlm.typed import AnswerType, AnswerTypeError
from sandbox.protocol import clean_text

__all__ = ["RLM", "run"]

Context = str | list[Any] | dict[str, Any]
Messages = list[dict[str, Any]]

PREVIEW_CHARS = 300
LISTED_ITEMS = 20

#: Defined in the sandbox at start and after every restart. Only plain
#: identifiers not starting with "_", so it also compiles under RestrictedPython.
PRELUDE = '''
def FINAL(answer):
    """Submit the final answer; the task ends after this block."""
    try:
        rlm_submit_final(answer, "value")
    except TypeError:
        rlm_submit_final(str(answer), "value")


def FINAL_VAR(name):
    """Submit the value of the variable called name (or name itself if there is no such variable)."""
    try:
        scope = globals()
    except NameError:
        rlm_submit_final(name if isinstance(name, str) else str(name), "name" if isinstance(name, str) else "value")
        return
    key = name.strip().strip("\\"'") if isinstance(name, str) else None
    value = scope[key] if key and key in scope else name
    try:
        rlm_submit_final(value, "value")
    except TypeError:
        rlm_submit_final(str(value), "value")


def rlm_describe_vars():
    import json
    hidden = ("FINAL", "FINAL_VAR", "rlm_describe_vars")
    try:
        scope = globals()
    except NameError:
        scope = {}
    out = {}
    for key in list(scope):
        if key.startswith("_") or key in hidden or len(out) >= 50:
            continue
        value = scope[key]
        kind = str(type(value))[8:-2]
        if callable(value):
            out[key] = "<" + kind + " " + key + ">"
            continue
        if isinstance(value, (str, bytes, list, dict, tuple, set)) and len(value) > 200:
            out[key] = "<" + kind + " of length " + str(len(value)) + ">"
            continue
        try:
            text = repr(value)
        except Exception:
            text = "<" + kind + ">"
        out[key] = text[:200]
    print(json.dumps(out))
'''

CLOSING_PROMPT = (
    "You have used all your turns. Reply now with your best final answer to the question, "
    "as plain text, with no code."
)


def system_prompt() -> str:
    """The system prompt shipped as package data (``rlm/prompts/system.md``)."""
    return (Path(__file__).resolve().parent / "prompts" / "system.md").read_text(encoding="utf-8")


def compaction_prompt() -> str:
    """The request for a summary of the earlier turns (``rlm/prompts/compaction.md``)."""
    return (Path(__file__).resolve().parent / "prompts" / "compaction.md").read_text(encoding="utf-8")


def _item_length(item: Any) -> int:
    if isinstance(item, str):
        return len(item)
    try:
        return len(json.dumps(item, ensure_ascii=False, default=str))
    except (TypeError, ValueError):
        return len(repr(item))


def _preview(context: Context) -> str:
    if isinstance(context, str):
        return context[:PREVIEW_CHARS]
    parts: list[str] = []
    size = 0
    items = context.items() if isinstance(context, dict) else enumerate(context)
    for key, value in items:
        piece = json.dumps(
            {str(key): value} if isinstance(context, dict) else value, ensure_ascii=False, default=str
        )
        parts.append(piece)
        size += len(piece) + 2
        if size > PREVIEW_CHARS:
            break
    return ", ".join(parts)[:PREVIEW_CHARS]


def describe_context(context: Context) -> str:
    """What the root model is told about the context: type, sizes, a short preview. Nothing more."""
    if isinstance(context, str):
        head = f"`context` is a str of {len(context):,} characters."
    else:
        lengths = [_item_length(v) for v in (context.values() if isinstance(context, dict) else context)]
        kind = "dict" if isinstance(context, dict) else "list"
        shown = ", ".join(f"{n:,}" for n in lengths[:LISTED_ITEMS])
        more = f", ... ({len(lengths) - LISTED_ITEMS} more)" if len(lengths) > LISTED_ITEMS else ""
        head = (
            f"`context` is a {kind} of {len(lengths):,} items, {sum(lengths):,} characters in total. "
            f"Item lengths in characters: [{shown}{more}]."
        )
    preview = _preview(context)
    cut = " (cut)" if len(preview) >= PREVIEW_CHARS else ""
    return f"{head}\nIts beginning{cut}:\n<<<\n{preview}\n>>>"


def _clip(text: str, cap: int) -> str:
    """*text* with its middle cut out when it is longer than *cap* characters (head and tail kept)."""
    if cap <= 0 or len(text) <= cap:
        return text
    head = cap * 3 // 5
    tail = cap - head
    omitted = len(text) - head - tail
    return f"{text[:head]}\n[... {omitted:,} characters omitted ...]\n{text[len(text) - tail :]}"


def _as_answer(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


#: What each prompt of a batch not yet sent gets once the code that asked for it was stopped.
STOPPED_TEXT = "Error: not sent: the code that asked for it was stopped (its sandbox child was killed)"


def _error_text(exc: BaseException) -> str:
    return f"Error: {type(exc).__name__}: {exc}"


#: Compaction (and, without it, eliding old outputs) starts above this share of the input window.
DEFAULT_COMPACTION_THRESHOLD = 0.85

#: The longest wait a retry accepts; a provider asking for more fails the call.
MAX_RETRY_WAIT_S = 120.0

#: How long a stopped run is waited for: by a cancelled ``acompletion`` task, and by Ctrl-C in a
#: batch of child RLMs. A run that is stopped ends within a fraction of a second (its code is
#: killed, its model calls given up); past this the caller gets control back anyway.
STOP_WAIT_S = 2.0

#: How long past a backend's request timeout a call still running is given up (see
#: :meth:`_Run._complete`): a server that sends nothing at all is reported by the HTTP client's own
#: (per-read) timeout first, as a call that ended; only one that keeps sending is abandoned.
REQUEST_GRACE_S = 0.5

#: Set, in the context a run starts from, to an object with ``enter()`` and ``leave()`` (both
#: thread-safe): each backend call that runs in a thread of its own (:meth:`_Run._complete`)
#: enters before that thread starts and leaves when it ends, also one the run gave up on and left
#: running. ``rlm mcp`` holds an ``rlm_query``'s slot until its calls have all ended with it.
MODEL_CALLS: contextvars.ContextVar[Any] = contextvars.ContextVar("rlm_model_calls", default=None)

#: The longest the loop lets its own helpers run in the model's sandbox (``rlm_describe_vars()``
#: after each block, ``FINAL_VAR`` from the reply's text), within the time budget: the model may
#: redefine them or give its objects a slow ``__repr__``. Past it, the child is killed.
HELPER_TIMEOUT_S = 10.0

#: The most prompts one ``llm_query_batched`` / ``rlm_query_batched`` call takes. Each prompt costs
#: the host a few KB while its batch runs (a task, a log entry, an answer), and a list of empty
#: strings packs at one byte each: ``llm_query_batched([""] * 50_000_000)`` fits one message.
MAX_BATCH = 10_000

#: The most ```repl blocks of one model reply that run; the rest are reported as not run. Without a
#: bound, one reply of a thousand blocks ran for a thousand wall limits in one turn, and kept every
#: block's output in the run's history (gigabytes of host memory).
MAX_BLOCKS_PER_REPLY = 50

#: Characters of sub-call and tool-call text (prompts, responses, errors) that the log entries of
#: one block keep at up to LOG_TEXT_CHARS each; past them, each text of a later call of the block
#: keeps REPEAT_CHARS (head and tail). A block of 2,000 sub-calls that the provider refused kept
#: 100 MB (and wrote a 100 MB trajectory line) for 0.4 s of the child's CPU.
BLOCK_CALL_LOG_CHARS = 2_000_000

#: Sub-call and tool-call log entries one block keeps (a full batch of MAX_BATCH prompts); the
#: calls past them are counted (``rlm_calls_omitted`` in the block's result), not kept. Each
#: entry costs the host about 3 KB and the trajectory about 430 bytes however short its texts:
#: a block of ten ``llm_query_batched([""] * 10_000)`` against a server that answers at once
#: kept 320 MB and wrote a 43 MB trajectory line, and host time spent serving calls counts
#: towards no limit of the sandbox's.
BLOCK_CALL_ENTRIES = 10_000


#: The model calls running in threads of their own (see :meth:`_Run._complete`), each with its
#: :class:`~rlm.llm.CallStop`: told to stop and waited for when the interpreter exits.
_IN_FLIGHT: dict[threading.Thread, CallStop] = {}
_in_flight_lock = threading.Lock()
_exit_hook: list[bool] = []  # [True] once the exit hook is registered


def _stop_calls_at_exit() -> None:
    """At interpreter exit, stop the model calls still in flight and wait for their threads, at
    most STOP_WAIT_S in all. A call given up runs on in a daemon thread while it winds down
    (litellm maps the error of a call whose connection was shut, and imports modules to do so);
    frozen there by the interpreter's exit, it held the import lock, and the interpreter's last
    imports (a litellm client's ``__del__``) waited for it for ever: a program that exited after
    a run stopped by a cancel, the time budget or Ctrl-C (``rlm run``) could hang. Then the HTTP
    client of litellm's calls is closed (:func:`rlm.llm.close_client`, which its own exit hook
    left open while these calls used it)."""
    with _in_flight_lock:
        calls = list(_IN_FLIGHT.items())
    for _, stop in calls:
        stop.stop()
    deadline = time.monotonic() + STOP_WAIT_S
    for thread, _ in calls:
        thread.join(max(0.0, deadline - time.monotonic()))
    close_client()


def _track(thread: threading.Thread, stop: CallStop) -> None:
    with _in_flight_lock:
        _IN_FLIGHT[thread] = stop
        if not _exit_hook:
            atexit.register(_stop_calls_at_exit)
            _exit_hook.append(True)


def _untrack(thread: threading.Thread) -> None:
    with _in_flight_lock:
        _IN_FLIGHT.pop(thread, None)


def retry_wait(attempt: int, retry_after: float | None, backoff_s: float) -> float | None:
    """Seconds to wait before retry *attempt* + 1, or None when the wait is longer than we accept.

    The provider's ``Retry-After`` when it gave one, else exponential backoff
    (``backoff_s * 2**attempt``) times a random factor in [0.5, 1.5].
    """
    if retry_after is not None:
        return retry_after if retry_after <= MAX_RETRY_WAIT_S else None
    wait: float = backoff_s * 2.0**attempt * random.uniform(0.5, 1.5)
    return min(MAX_RETRY_WAIT_S, wait)


def _request_timeout(backend: Any) -> float | None:
    """The backend's ``request_timeout`` (see :class:`~rlm.backend.ModelBackend`): seconds after
    which the loop gives up a call, or None (no such attribute, or not a finite positive number)."""
    try:
        value = getattr(backend, "request_timeout", None)
    except Exception:  # a property of a caller's backend that fails: no request timeout
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) and value > 0 else None


def _check_context(context: Any) -> Context:
    if isinstance(context, (str, list, dict)):
        return context
    if isinstance(context, tuple):
        return list(context)
    raise ConfigurationError(f"context must be a str, a list or a dict, not {type(context).__name__}")


class RLM:
    """A Recursive Language Model.

    ``RLM(model, sub_model=..., max_depth=1, max_iterations=20, ...).completion(context, root_prompt=...)``
    runs one task and returns an :class:`~rlm.result.RLMResult`. The object
    holds configuration only: it may run many tasks, one after another or at
    the same time (with ``persistent=True`` they run one at a time, sharing
    one sandbox).

    *model* and *sub_model* are litellm model strings (``sub_model`` defaults
    to *model*); *api_base* and *api_key* apply to both and to child RLMs.
    Budgets (``max_sub_calls``, ``max_tokens``, ``max_cost_usd``,
    ``max_time_s``) cover the whole tree of calls; when one runs out the run
    stops and ``stop_reason`` names it. *max_output_chars* caps the output of
    a block shown to the model (head and tail kept). *backend* replaces
    litellm (see :mod:`rlm.backend`). *on_event* is called with every
    progress event of the run tree (see :mod:`rlm.events`); ``verbose=True``
    is one such consumer, printing them on stderr. *tools* (a dict
    ``{name: callable}`` or a list of callables) are host functions of
    yours that the model's code may call (see :mod:`rlm.tools`).
    *max_errors* stops the run (``stop_reason="max_errors"``) after that many
    code blocks in a row raised or were stopped by a limit. A call refused
    for rate limits, timed out or answered 5xx is tried again up to
    *max_retries* times, after the provider's ``Retry-After`` or an
    exponential backoff from *retry_backoff_s* seconds with jitter; retries
    count in ``usage`` and never wait past the time budget. *output_type*
    (a pydantic model or a type pydantic validates) makes the answer typed:
    ``RLMResult.parsed`` holds the validated value, ``answer`` its JSON.
    With *persistent*, successive completions share one sandbox: the new
    context is ``context``, earlier ones stay as ``context_0``, ``context_1``
    ... and ``history`` lists the earlier ``{query, answer}`` turns;
    :meth:`close` (or leaving a ``with`` block) closes it. *prompt_caching*
    marks the stable prefix of each root conversation cacheable for
    providers that take markers (Anthropic); cached tokens are in ``usage``.
    When the root conversation outgrows *compaction_threshold* of the
    model's input window, its older turns are replaced by a summary the
    model writes (``None``: never; old outputs are elided instead).
    """

    def __init__(
        self,
        model: str = "gpt-4o-mini",
        *,
        sub_model: str | None = None,
        max_depth: int = 1,
        max_iterations: int = 20,
        policy: Any = "default",
        log_dir: str | os.PathLike[str] | None = None,
        verbose: bool = False,
        api_base: str | None = None,
        api_key: str | None = None,
        max_sub_calls: int | None = None,
        max_tokens: int | None = None,
        max_cost_usd: float | None = None,
        max_time_s: float | None = None,
        max_concurrency: int = 16,
        max_output_chars: int = 20_000,
        backend: ModelBackend | None = None,
        model_kwargs: dict[str, Any] | None = None,
        on_event: EventCallback | None = None,
        tools: dict[str, Any] | list[Any] | None = None,
        max_errors: int | None = None,
        max_retries: int = 3,
        retry_backoff_s: float = 1.0,
        output_type: Any = None,
        persistent: bool = False,
        prompt_caching: bool = True,
        compaction_threshold: float | None = DEFAULT_COMPACTION_THRESHOLD,
    ) -> None:
        if not isinstance(model, str) or not model.strip():
            raise ConfigurationError("model must be a non-empty model string")
        check_int("max_depth", max_depth, minimum=1)
        check_int("max_iterations", max_iterations, minimum=1)
        check_int("max_concurrency", max_concurrency, minimum=1)
        check_int("max_output_chars", max_output_chars, minimum=0)
        if on_event is not None and not callable(on_event):
            raise ConfigurationError("on_event must be a callable taking one event dict")
        check_int("max_errors", max_errors, minimum=1, optional=True)
        self.max_errors = max_errors
        check_int("max_retries", max_retries, minimum=0)
        check_number("retry_backoff_s", retry_backoff_s, optional=False)
        self.max_retries = max_retries
        check_api_base(api_base)
        for flag, value in (
            ("verbose", verbose),
            ("persistent", persistent),
            ("prompt_caching", prompt_caching),
        ):
            if not isinstance(value, bool):  # "yes" or "no" would both be taken for True
                raise ConfigurationError(
                    f"{flag} must be True or False, not {type(value).__name__} {value!r}"
                )
        self.output_type = output_type
        self.persistent = persistent
        self.prompt_caching = prompt_caching
        check_number("compaction_threshold", compaction_threshold)
        if compaction_threshold is not None and not 0 < compaction_threshold <= 1:
            raise ConfigurationError(
                f"compaction_threshold must be in (0, 1] or None, got {compaction_threshold!r}"
            )
        self.compaction_threshold = compaction_threshold
        self._session: _Session | None = None
        self._session_lock = threading.Lock()
        self.answer_type = AnswerType(output_type) if output_type is not None else None
        self.retry_backoff_s = retry_backoff_s
        self.on_event = on_event
        self.tools: dict[str, Tool] = tool_table(tools)
        self.model = model
        self.sub_model = sub_model or model
        self.max_depth = max_depth
        self.max_iterations = max_iterations
        self.policy = self._load_policy(policy)
        self.budgets = Budgets(max_sub_calls, max_tokens, max_cost_usd, max_time_s)
        # Created and checked last, once every other argument is good: a log directory that cannot
        # be written is a bad argument, not an OSError when the run starts.
        self.log_dir = check_log_dir(log_dir) if log_dir is not None else None
        self.verbose = verbose
        self.api_base = api_base
        self._api_key = api_key
        self.max_concurrency = max_concurrency
        self.max_output_chars = max_output_chars
        self.backend: ModelBackend = backend or LiteLLMBackend(
            api_base=api_base, api_key=api_key, **(model_kwargs or {})
        )

    @staticmethod
    def _load_policy(policy: Any) -> Any:
        from sandbox import Policy, load_policy
        from sandbox.errors import PolicyError

        if isinstance(policy, Policy):
            return policy
        try:
            return load_policy(policy)
        except PolicyError as exc:
            raise ConfigurationError(str(exc)) from None

    def __repr__(self) -> str:
        return f"RLM(model={self.model!r}, sub_model={self.sub_model!r}, max_depth={self.max_depth}, max_iterations={self.max_iterations})"

    def completion(
        self, context: Any, root_prompt: str | None = None, *, cancel: CancelToken | None = None
    ) -> RLMResult:
        """Answer *root_prompt* about *context* (str, list or dict; it goes into the REPL, never the prompt).

        *cancel*: a :class:`~rlm.budget.CancelToken`; cancelling it from another
        thread kills the code running in the run's sandbox and ends the run with
        ``stop_reason="cancelled"``.
        """
        return self._complete(context, root_prompt, None, cancel)

    async def acompletion(
        self, context: Any, root_prompt: str | None = None, *, cancel: CancelToken | None = None
    ) -> RLMResult:
        """The asyncio twin of :meth:`completion`.

        The run happens in a worker thread; coroutine callbacks (``on_event``)
        are awaited on the caller's event loop.
        """
        loop = asyncio.get_running_loop()
        stop = CancelToken()  # the run's own token: cancelling this task cancels it
        done: asyncio.Future[RLMResult] = loop.create_future()

        def settle(outcome: Future[RLMResult]) -> None:  # on the loop
            if done.done():
                return
            error = outcome.exception()
            if error is not None:
                done.set_exception(error)
            else:
                done.set_result(outcome.result())

        def work() -> None:
            outcome: Future[RLMResult] = Future()
            try:
                outcome.set_result(self._complete(context, root_prompt, loop, cancel, stop))
            except BaseException as exc:  # handed to the awaiting task
                outcome.set_exception(exc)
            try:
                loop.call_soon_threadsafe(settle, outcome)
            except RuntimeError:  # the loop is closed: nobody awaits the run any more
                pass

        # A daemon thread of its own, not the loop's default executor: asyncio.run() waits for
        # that one at exit, and must not wait for a run whose task was cancelled.
        runner = contextvars.copy_context()
        threading.Thread(target=runner.run, args=(work,), name="rlm-acompletion", daemon=True).start()
        try:
            return await asyncio.shield(done)
        except asyncio.CancelledError:
            # The task was cancelled (task.cancel(), asyncio.timeout): stop the run as a CancelToken
            # does, and give it a short while to end (its sandboxes closed) before giving up on it.
            stop.cancel()
            done.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved, never logged
            await asyncio.wait({done}, timeout=STOP_WAIT_S)
            raise

    def _events(self, loop: Any) -> Events:
        callbacks: list[EventCallback] = []
        if self.verbose:
            from rlm.display import VerboseView

            callbacks.append(VerboseView().handle)
        if self.on_event is not None:
            callbacks.append(self.on_event)
        return Events(callbacks, loop)

    def _complete(
        self,
        context: Any,
        root_prompt: str | None,
        loop: Any,
        cancel: CancelToken | None = None,
        stop: CancelToken | None = None,
    ) -> RLMResult:
        """One run. Its ledger holds the run's own token *stop* (new when not given): the caller's
        *cancel* cancels it, and so do a cancelled ``acompletion`` task and Ctrl-C during a batch of
        child RLMs. Linked for this run only: a late ``cancel.cancel()`` touches nothing after it."""
        context = _check_context(context)
        if isinstance(root_prompt, str) and isinstance(self.backend, LiteLLMBackend):
            # Refused before anything starts: litellm's client cannot encode it, and each retry
            # of the first call (about 12 s of them) failed the same way. A backend of the
            # caller's own decides for itself what it can send.
            check_text("root_prompt", root_prompt)
        stop = stop if stop is not None else CancelToken()
        link = _Link(stop)
        if cancel is not None:
            cancel.watch(link)  # cancels *stop* at once when *cancel* already is
        ledger: Ledger | None = None
        try:
            ledger = Ledger(self.budgets, self.max_concurrency, stop)
            run = _Run(self, ledger, self._events(loop), depth=0, model=self.model)
            if not self.persistent:
                return run.execute(context, root_prompt)
            # One completion at a time in a session. Waiting for it, this one still stops when it is
            # cancelled or out of time: it waited for the whole other completion, then stopped.
            while not self._session_lock.acquire(timeout=0.05):
                over = ledger.halted()
                if over is not None:
                    return run.stopped_before_start(context, root_prompt, over[0])
            session: _Session | None = None
            try:
                if self._session is None:
                    self._session = _Session()
                session = self._session
                return run.execute(context, root_prompt, session)
            finally:
                if session is not None:  # the run is over: the session keeps none of it (see _Session)
                    session.handlers.clear()
                self._session_lock.release()
        except RLMError as exc:
            # What the run spent before it failed stays known: a batch's budget counts it.
            if ledger is not None:
                exc.priced_cost_usd = ledger.priced()
                exc.spent = ledger.totals()
            raise
        finally:
            if cancel is not None:
                cancel.unwatch(link)

    def close(self) -> None:
        """Close the session's sandbox (``persistent=True``); a later completion starts a new session."""
        with self._session_lock:
            session, self._session = self._session, None
        if session is not None:
            session.close()

    def __enter__(self) -> RLM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def run(
    query: str | None,
    context: Any,
    model: str = "gpt-4o-mini",
    *,
    cancel: CancelToken | None = None,
    **kwargs: Any,
) -> RLMResult:
    """Answer *query* about *context* with a Recursive Language Model; *kwargs* are those of :class:`RLM`
    (*cancel* as for :meth:`RLM.completion`)."""
    with RLM(model=model, **kwargs) as rlm:  # closes the sandbox of a (pointless) one-question session
        return rlm.completion(context, root_prompt=query, cancel=cancel)


class _Link:
    """Watched by a caller's :class:`CancelToken` in place of a sandbox: its cancellation cancels *token*."""

    def __init__(self, token: CancelToken) -> None:
        self.token = token

    def kill(self) -> None:
        self.token.cancel()


class _Session:
    """The state ``RLM(persistent=True)`` keeps between completions: one sandbox, the contexts, the turns.

    The sandbox's host functions dispatch to the current run's (``handlers``),
    so each completion's sub-calls, tools and FINAL reach that completion. They hold the
    ``handlers`` dict, not the session, and it is emptied when the completion ends: a run's
    functions hold the run, the run holds its RLM, and the RLM its session, a reference
    cycle that kept the sandbox of a persistent RLM dropped unclosed (its child process,
    scratch directory and uid) until the garbage collector's next pass.
    """

    def __init__(self) -> None:
        self.sandbox: Any = None
        self.audit_path: Path | None = None
        self.contexts: list[Context] = []
        self.history: list[dict[str, Any]] = []
        self.handlers: dict[str, Any] = {}  # changed in place only: the sandbox's functions hold it
        self.loaded = 0  # contexts present in the live child
        self.restarted = False  # the child was replaced since the last completion (its variables lost)

    def host_functions(self, names: dict[str, Any]) -> dict[str, Any]:
        handlers = self.handlers

        def route(name: str) -> Any:
            return lambda *args, **kwargs: handlers[name](*args, **kwargs)

        return {name: route(name) for name in names}

    def close(self) -> None:
        sandbox, self.sandbox = self.sandbox, None
        if sandbox is not None:
            sandbox.close()


def _as_text(value: Any) -> str:
    """A tool's value as log text: strings as they are, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)


def _call_text(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """``name(arg, key=value)`` with every argument written as JSON (never ``repr``: they came from the child)."""
    as_json = [json.dumps(a, ensure_ascii=False, default=str) for a in args]
    as_json += [f"{k}={json.dumps(v, ensure_ascii=False, default=str)}" for k, v in kwargs.items()]
    return f"{name}({', '.join(as_json)})"


class _Run:
    """One run of the loop (the root, or a child RLM started by ``rlm_query``)."""

    def __init__(
        self,
        cfg: RLM,
        ledger: Ledger,
        events: Events,
        *,
        depth: int,
        model: str,
        parent_id: str | None = None,
        parent: _Run | None = None,
    ) -> None:
        self.cfg = cfg
        self.ledger = ledger
        # What this run and its child runs used, for its result: the root's is the ledger's (the
        # whole tree), a child's its own. A child's calls are also recorded in the tallies of the
        # child runs above it (``_tallies``, nearest first); the ledger records every call itself.
        self.tally = ledger.tally if parent is None else Tally()
        self._tallies: list[Tally] = [] if parent is None else [self.tally, *parent._tallies]
        self.events = events
        self.depth = depth
        self.model = model
        self.parent_id = parent_id
        self.run_id = new_run_id()
        self.logger = (
            TrajectoryLogger(cfg.log_dir, self.run_id, secrets=[cfg._api_key])
            if cfg.log_dir is not None
            else None
        )
        self.context: Context = ""
        self.session: _Session | None = None
        self.final: str | None = None
        self.final_value: Any = None
        self.parsed: Any = None
        self.answer_type = cfg.answer_type if depth == 0 else None  # child RLMs answer in text
        self.pending_name: str | None = None
        self.fatal: ModelError | None = None
        self.calls: list[tuple[tuple[int, int], dict[str, Any]]] = []  # (order key, log entry)
        self.call_chars = 0  # characters of text the block's entries keep (see BLOCK_CALL_LOG_CHARS)
        self.calls_omitted = [0, 0]  # the block's sub-calls and tool calls past BLOCK_CALL_ENTRIES
        self.helper: str | None = None  # the loop's own code running in the sandbox (see _execute)
        self.running: Any = None  # the sandbox an execute of this run waits for now (see _execute)
        self._log_lock = threading.Lock()
        self._order = threading.local()  # set by _batch: the key of the prompt being served
        self._seq = itertools.count()
        self.tokens = [0, 0]  # input, output tokens of this run's calls and of its child runs
        self._tokens_lock = threading.Lock()
        self.code_executions = 0
        self.errors_in_a_row = 0  # consecutive blocks that raised (for max_errors)
        self.compactions = 0
        self.first_message = ""
        self.root_calls = 0

    def emit(self, kind: str, /, **fields: Any) -> None:
        """Send one progress event of this run (see :mod:`rlm.events`)."""
        self.events.emit(kind, self.run_id, self.depth, **fields)

    # ------------------------------------------------------------ model calls
    def _call(self, model: str, messages: Messages, *, sub: bool) -> Completion:
        """One model call: budgets checked, usage recorded, transient failures retried."""
        counted = sub or self.depth > 0
        self.ledger.check(sub_call=counted)
        # A child run's own turns are sub-calls of the runs above it, not of itself.
        tallies = self._tallies if sub else self._tallies[1:]
        for tally in tallies:
            tally.add_sub_calls(1)
        attempt = 0
        while True:
            kwargs: dict[str, Any] = {"cache_prefix": True} if not sub and self.cfg.prompt_caching else {}
            left = self.ledger.time_left()
            if left is not None:
                kwargs["timeout"] = max(1.0, left)
            try:
                with self.ledger.slot():
                    # Checked again once a slot is free: the run may have stopped while this call
                    # waited for one (the calls it stopped free their slots for the next waiter).
                    # Refused before it was ever sent, it is no sub-call (a retry's first try was).
                    try:
                        self.ledger.refuse_any()
                    except BudgetExceeded:
                        if counted and attempt == 0:
                            self.ledger.uncount_sub_call()
                            for tally in tallies:
                                tally.add_sub_calls(-1)
                        raise
                    completion = self._complete(model, messages, kwargs)
            except (RateLimited, ProviderUnavailable) as exc:
                wait = retry_wait(attempt, exc.retry_after, self.cfg.retry_backoff_s)
                if attempt >= self.cfg.max_retries or wait is None:
                    raise
                attempt += 1
                self.ledger.record_retry(model, wait)  # BudgetExceeded when the wait would outlive a budget
                for tally in self._tallies:
                    tally.record_retry(model)
                self.emit("retry", model=model, attempt=attempt, delay_s=wait, error=str(exc))
                self._pause(wait)
                continue
            self.ledger.record(model, completion)
            for tally in self._tallies:
                tally.record(model, completion)
            self._add_tokens(completion.input_tokens, completion.output_tokens)
            # A server's JSON may spell a lone surrogate ("\ud800"): as it is, the text could cross
            # neither into the sandbox (llm_query raised UnicodeEncodeError in the code) nor back to
            # the model with the next turn (every retry failed to encode it: model_error). Written
            # as a backslash escape, as the sandbox writes what code prints.
            text = clean_text(completion.text)
            return completion if text is completion.text else dataclasses.replace(completion, text=text)

    def _pause(self, seconds: float) -> None:
        """Wait *seconds* before a retry, or raise :class:`BudgetExceeded` as soon as the run is
        stopped (cancelled, a budget used up): checked again right before returning. The wait
        never outlives the time budget (:meth:`Ledger.record_retry` refused a longer one)."""
        end = time.monotonic() + seconds
        while True:
            self.ledger.refuse_any()
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(0.05, left))

    def _complete(self, model: str, messages: Messages, kwargs: dict[str, Any]) -> Completion:
        """The backend's call, given up when the time budget runs out, the run is cancelled, or
        the backend's request timeout has passed since the call started.

        A server that answers a byte at a time never trips the HTTP client's timeout (it is per
        read), and a call cannot be interrupted: with a time budget, a cancel token (every run
        has one of its own: see :meth:`RLM._complete`) or a request timeout (the backend's
        ``request_timeout``: see :meth:`LiteLLMBackend.request_timeout`), the call runs in a daemon
        thread, left to finish on its own once given up; it is counted in
        ``usage[model].abandoned``, and what it returns or raises later is dropped (it is handed
        over only through this call's own ``box``, read once ``done`` is set, never after giving
        up). Past the request timeout (and :data:`REQUEST_GRACE_S`, so that the HTTP client's
        own timeout reports a server that sends nothing) it is a :class:`ProviderUnavailable`,
        retried like the HTTP client's timeout. The request timeout counts from the end of the
        backend's ``prepare()``, when it has one (litellm's first import takes seconds: a short
        timeout gave up the first call while litellm loaded, and the call then went out anyway,
        beside its retry). Without any of them, it runs here."""
        limit = _request_timeout(self.cfg.backend)
        if self.ledger.budgets.max_time_s is None and self.ledger.cancel is None and limit is None:
            return self.cfg.backend.complete(model, messages, **kwargs)
        box: dict[str, Any] = {}
        done = threading.Event()
        backend = self.cfg.backend
        watch = MODEL_CALLS.get()
        # Given up, the call is told so (litellm's: its response stops being read, its connection
        # is shut): one left reading a server that streams without end read on for ever.
        stop = CallStop()
        unwatched = threading.Lock()  # taken by whichever leaves first: the call leaves once

        def leave() -> None:
            if watch is not None and unwatched.acquire(blocking=False):
                watch.leave()

        def call() -> None:
            try:
                prepare = getattr(backend, "prepare", None)
                if callable(prepare):  # (litellm's first import: seconds, not the request's time)
                    prepare()
                box["started"] = time.monotonic()  # the request timeout counts from here
                CALL_STOP.set(stop)  # in this thread's own context
                box["value"] = backend.complete(model, messages, **kwargs)
            except BaseException as exc:  # handed to the caller below
                box["error"] = exc
            finally:
                done.set()
                leave()
                _untrack(threading.current_thread())

        context = contextvars.copy_context()
        if watch is not None:
            watch.enter()
        thread = threading.Thread(target=context.run, args=(call,), name="rlm-model-call", daemon=True)
        try:
            _track(thread, stop)
            thread.start()
        except BaseException:  # not started (or a Ctrl-C as it started: then it leaves once)
            leave()
            if not thread.is_alive():  # (one that started untracks itself when it ends)
                _untrack(thread)
            raise
        try:
            while not done.wait(0.05):
                # Cancelled or out of time only: a call under way was let through, and a token
                # or cost budget that runs out meanwhile lets it end and counts it (it is paid for)
                over = self.ledger.interrupted()
                if over is not None:
                    self._record_abandoned(model)
                    raise BudgetExceeded(
                        over[0], f"a call to {model} was still running when the run stopped ({over[0]})"
                    )
                started = box.get("started")
                if (
                    limit is not None
                    and started is not None
                    and time.monotonic() >= started + limit + REQUEST_GRACE_S
                    and not done.is_set()
                ):
                    self._record_abandoned(model)
                    where = getattr(self.cfg.backend, "api_base", None) or "the provider's API endpoint"
                    raise ProviderUnavailable(
                        redact(
                            # the HTTP client's own message for a server that sends nothing: the same to the user
                            f"{model}: no answer from {where} within {limit:g} s (request timeout)",
                            secret_values(self.cfg._api_key),
                        ),
                        model=model,
                    )
        finally:
            if not done.is_set():  # given up (a cancel, max_time_s, the request timeout, Ctrl-C): told to end
                stop.stop()
        if "error" in box:
            raise box["error"]
        completion: Completion = box["value"]
        return completion

    def _record_abandoned(self, model: str) -> None:
        self.ledger.record_abandoned(model)
        for tally in self._tallies:
            tally.record_abandoned(model)

    def _add_tokens(self, input_tokens: int, output_tokens: int) -> None:
        with self._tokens_lock:
            self.tokens[0] += input_tokens
            self.tokens[1] += output_tokens

    def _log_call(self, entry: dict[str, Any]) -> None:
        # Kept for the whole run (its history, the trajectory): the texts cut as the trajectory cuts
        # them. A prompt comes from the code: whole, a block looping on a 5 MB prompt that the
        # provider refused (a ContextWindowExceeded, free) kept 5 MB of the host per call. Past
        # BLOCK_CALL_LOG_CHARS in one block, each text is cut to REPEAT_CHARS.
        with self._log_lock:
            if len(self.calls) >= BLOCK_CALL_ENTRIES:
                self.calls_omitted[entry.get("type") == "tool"] += 1
                return
            cap = LOG_TEXT_CHARS if self.call_chars < BLOCK_CALL_LOG_CHARS else REPEAT_CHARS
            for name in ("prompt", "response", "error"):
                text = entry.get(name)
                if isinstance(text, str):
                    if len(text) > cap:
                        entry[name] = text = clip_text(text, cap)
                        # a tool's arguments or value as data only when their text is kept whole
                        for data in {"prompt": ("args", "kwargs"), "response": ("result",)}.get(name, ()):
                            if data in entry:
                                entry[data] = None
                    self.call_chars += len(text)
            # Entries of a batch arrive in completion order; the key puts them back in prompt order.
            key = getattr(self._order, "key", None) or (next(self._seq), 0)
            self.calls.append((key, entry))

    def _model(self, model: Any, default: str, fn: str) -> str:
        """The model a call from the code asked for: *default* for None (or ""), else one of the
        models the caller configured. Any other litellm string is refused, never called: it may
        name an endpoint (``oobabooga/http://host``, ``huggingface/https://host``) that litellm
        posts the prompt, and for some providers the key, to, whatever ``api_base`` says."""
        if model is None or model == "":
            return default
        allowed = dict.fromkeys((self.cfg.model, self.cfg.sub_model))
        if isinstance(model, str) and model in allowed:
            return model
        names = " or ".join(repr(m) for m in allowed)
        shown = repr(model) if isinstance(model, str) else f"a {type(model).__name__}"
        raise ValueError(f"{fn}(): model must be None or {names}, not {_clip(shown, 200)}")

    def _refused(self, raise_errors: bool) -> str | None:
        """After the run stopped, a sub-call is refused here at once: no log entry, no event, no
        child run (a block looping on a refused call cost the host a log entry with its prompt,
        or a sandbox and three log files, per call). The refusal that stopped the run is logged
        where it happened. Returns the error text for the code, or None when the run goes on."""
        refusal = self.ledger.refusal()
        if refusal is None:
            return None
        if raise_errors:
            raise refusal
        return _error_text(refusal)

    def _sub_query(self, prompt: Any, model: Any, *, raise_errors: bool) -> str:
        text = prompt if isinstance(prompt, str) else _as_answer(prompt)
        name = self._model(model, self.cfg.sub_model, "llm_query")
        refused = self._refused(raise_errors)
        if refused is not None:
            return refused
        started = time.perf_counter()
        entry: dict[str, Any] = {"root_model": name, "prompt": text, "timestamp": datetime.now().isoformat()}
        try:
            completion = self._call(name, [{"role": "user", "content": text}], sub=True)
        except (BudgetExceeded, ModelError) as exc:
            if isinstance(exc, (AuthenticationError, UnknownModelError)) and self.fatal is None:
                self.fatal = exc
            entry.update(response="", error=str(exc), error_type=type(exc).__name__)
            entry.update(prompt_tokens=0, completion_tokens=0)
            entry["execution_time"] = time.perf_counter() - started
            entry["usage_summary"] = {"model_usage_summaries": {}}
            self._log_call(entry)
            self.emit("sub_call", kind="llm", model=name, prompt=text, response=None, error=str(exc))
            if raise_errors:
                raise
            return _error_text(exc)
        entry["response"] = completion.text
        entry["prompt_tokens"] = completion.input_tokens
        entry["completion_tokens"] = completion.output_tokens
        entry["usage_summary"] = {
            "model_usage_summaries": {
                name: {
                    "total_calls": 1,
                    "total_input_tokens": completion.input_tokens,
                    "total_output_tokens": completion.output_tokens,
                    "cost_usd": completion.cost_usd,
                }
            }
        }
        entry["execution_time"] = time.perf_counter() - started
        self._log_call(entry)
        self.emit("sub_call", kind="llm", model=name, prompt=text, response=completion.text, error=None)
        return completion.text

    def _batch(self, fn: Any, items: list[Any]) -> list[str]:
        if not items:
            return []
        refused = self._refused(raise_errors=False)
        if refused is not None:  # every prompt would be refused: no thread, no entry each
            return [refused] * len(items)
        batch = next(self._seq)

        def one(pair: tuple[int, Any]) -> str:
            # The code that asked was stopped (a limit, the time budget, a crash killed its child):
            # nobody will read this answer, so it is not paid for (a batch of 10,000 prompts went
            # on for minutes after its cell had ended). Not logged, as a refused call.
            sb = self.running
            if sb is not None and not sb.alive:
                return STOPPED_TEXT
            self._order.key = (batch, pair[0])
            try:
                return fn(pair[1])  # type: ignore[no-any-return]
            finally:
                self._order.key = None

        workers = min(self.cfg.max_concurrency, len(items))
        if workers == 1:
            return [one(pair) for pair in enumerate(items)]
        pool = ThreadPoolExecutor(workers, thread_name_prefix="rlm-batch")
        futures: list[Future[str]] = []
        stopping = False
        try:
            for pair in enumerate(items):
                # in the run's context (MODEL_CALLS): a pool thread starts with an empty one
                futures.append(pool.submit(contextvars.copy_context().run, one, pair))
            return [future.result() for future in futures]
        except BaseException as exc:
            if not isinstance(exc, Exception):
                # Ctrl-C reaches only this thread, not the prompts served in the pool: stop the
                # whole run tree (sandboxes killed, model calls given up), wait a short while
                # for the pool to wind down, and let the interrupt through.
                stopping = True
                self._stop_tree()
                pool.shutdown(wait=False, cancel_futures=True)
                # queued ones are cancelled now, and wait() would count them as never done
                wait_futures([f for f in futures if not f.cancelled()], timeout=STOP_WAIT_S)
            raise
        finally:
            if not stopping:
                pool.shutdown(wait=True)

    def _stop_tree(self) -> None:
        """Cancel the run tree this run belongs to, as its cancel token would."""
        if self.ledger.cancel is not None:
            self.ledger.cancel.cancel()

    @staticmethod
    def _prompt_list(prompts: Any, fn: str) -> list[Any]:
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, list):
            raise TypeError(f"{fn}() takes a list of prompts, not {type(prompts).__name__}")
        if len(prompts) > MAX_BATCH:
            raise ValueError(
                f"{fn}() takes at most {MAX_BATCH:,} prompts per call, not {len(prompts):,}: "
                "split them into several calls"
            )
        return prompts

    def _tool_call(self, tool: Tool, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run one of the caller's tools here; its failure is raised in the child, never here."""
        self._no_calls_in_helper(tool.name)
        started = time.perf_counter()
        if self.ledger.stopped_by is not None:  # refused at once, unlogged, like a sub-call (_refused)
            raise RuntimeError(f"tool {tool.name}() not run: the run has stopped ({self.ledger.stopped_by})")
        self.ledger.record_tool_call()
        for tally in self._tallies:
            tally.add_tool_call()
        stopped = self.ledger.exhausted()  # a loop of tool calls must not outlive the budgets
        entry: dict[str, Any] = {
            "type": "tool",
            "name": tool.name,
            "args": list(args),  # (None once _log_call cuts the call's text)
            "kwargs": kwargs,
            # what trajectory viewers show of a call: the call as text, no tokens spent
            "root_model": f"tool:{tool.name}",
            "prompt": _call_text(tool.name, args, kwargs),
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "timestamp": datetime.now().isoformat(),
        }
        error: str | None = None
        value: Any = None
        try:
            if stopped is not None:
                raise RuntimeError(f"not run: the run is stopping ({stopped})")
            value = call_sync(tool.fn, args, kwargs, self.events.loop)
        except (Exception, SystemExit) as exc:  # the model sees it; this process never raises it ...
            if isinstance(exc, SystemExit) and raised_by_a_signal_handler(exc):
                raise  # ... unless a signal handler of the embedder's raised it: the process is to end
            try:
                error = f"{type(exc).__name__}: {exc}"
            except Exception:
                error = type(exc).__name__
        entry.update(
            result=value,  # (None once _log_call cuts its text)
            response=_as_text(value) if error is None else "",
            error=error,
            execution_time=time.perf_counter() - started,
        )
        self._log_call(entry)
        self.emit(
            "tool_call",
            name=tool.name,
            args=list(args),
            kwargs=kwargs,
            result=value,
            error=error,
            execution_time=entry["execution_time"],
        )
        if error is not None:
            raise RuntimeError(f"tool {tool.name}() failed: {error}")
        return value

    # -------------------------------------------------------- host functions
    def _no_calls_in_helper(self, fn: str) -> None:
        """Refuse a model or tool call made while the loop runs its own helper in the sandbox
        (``rlm_describe_vars()`` after each block, ``FINAL_VAR`` from the reply's text: the model
        may redefine either, and a thread the code left running may call at any time). Refused
        at once, counted and logged nowhere. Served, such a call ran past the helper's
        HELPER_TIMEOUT_S (the child was killed on time, but the host waited for the model's
        answer, up to its request timeout), and its entry was logged nowhere."""
        if self.helper is not None:
            raise RuntimeError(f"{fn}() is refused while the loop runs {self.helper}")

    def host_functions(self) -> dict[str, Any]:
        def llm_query(prompt: Any, model: Any = None) -> str:
            self._no_calls_in_helper("llm_query")
            return self._sub_query(prompt, model, raise_errors=True)

        def llm_query_batched(prompts: Any, model: Any = None) -> list[str]:
            self._no_calls_in_helper("llm_query_batched")
            items = self._prompt_list(prompts, "llm_query_batched")
            self._model(model, self.cfg.sub_model, "llm_query_batched")  # refused before any call
            return self._batch(lambda p: self._sub_query(p, model, raise_errors=False), items)

        def rlm_query(prompt: Any, context: Any = None, model: Any = None) -> str:
            self._no_calls_in_helper("rlm_query")
            return self._rlm_query(prompt, context, model, raise_errors=True)

        def rlm_query_batched(prompts: Any, contexts: Any = None, model: Any = None) -> list[str]:
            self._no_calls_in_helper("rlm_query_batched")
            items = self._prompt_list(prompts, "rlm_query_batched")
            self._model(model, self.cfg.model, "rlm_query_batched")
            if contexts is not None and (not isinstance(contexts, list) or len(contexts) != len(items)):
                raise ValueError("rlm_query_batched(): contexts must be a list as long as prompts")
            pairs = list(zip(items, contexts if contexts is not None else [None] * len(items), strict=True))
            return self._batch(lambda pc: self._rlm_query(pc[0], pc[1], model, raise_errors=False), pairs)

        def rlm_submit_final(value: Any, mode: Any = "value") -> None:
            if mode == "name":
                if self.final is None and self.pending_name is None:
                    self.pending_name = _as_answer(value)
            elif self.final is None:
                self._set_final(value)

        def bind(tool: Tool) -> Any:
            return lambda *args, **kwargs: self._tool_call(tool, args, kwargs)

        return {
            **{name: bind(tool) for name, tool in self.cfg.tools.items()},
            "llm_query": llm_query,
            "llm_query_batched": llm_query_batched,
            "rlm_query": rlm_query,
            "rlm_query_batched": rlm_query_batched,
            "rlm_submit_final": rlm_submit_final,
        }

    def _rlm_query(self, prompt: Any, context: Any, model: Any, *, raise_errors: bool) -> str:
        text = prompt if isinstance(prompt, str) else _as_answer(prompt)
        self._model(model, self.cfg.model, "rlm_query")  # refused before anything runs
        refused = self._refused(raise_errors)
        if refused is not None:
            return refused
        if self.depth + 1 >= self.cfg.max_depth:  # no child RLM allowed: a plain sub-call
            if context is not None:
                body = (
                    context
                    if isinstance(context, str)
                    else json.dumps(context, ensure_ascii=False, default=str)
                )
                text = f"{text}\n\n{body}"
            return self._sub_query(text, model, raise_errors=raise_errors)
        name = self._model(model, self.cfg.model, "rlm_query")
        started = time.perf_counter()
        entry: dict[str, Any] = {
            "root_model": name,
            "prompt": text,
            "type": "rlm",
            "depth": self.depth + 1,
            "timestamp": datetime.now().isoformat(),
        }
        child = _Run(
            self.cfg,
            self.ledger,
            self.events,
            depth=self.depth + 1,
            model=name,
            parent_id=self.run_id,
            parent=self,
        )
        try:
            self.ledger.refuse_any()  # a run out of tokens, cost or time starts no child (a sandbox, files)
            result = child.execute(_check_context(context if context is not None else text), text)
        except (RLMError, ValueError) as exc:
            if isinstance(exc, (AuthenticationError, UnknownModelError)) and self.fatal is None:
                self.fatal = exc
            entry.update(response="", error=str(exc), error_type=type(exc).__name__)
            entry.update(prompt_tokens=child.tokens[0], completion_tokens=child.tokens[1])
            self._add_tokens(*child.tokens)
            entry["execution_time"] = time.perf_counter() - started
            self._log_call(entry)
            self.emit("sub_call", kind="rlm", model=name, prompt=text, response=None, error=str(exc))
            if raise_errors:
                raise
            return _error_text(exc)
        entry.update(
            response=result.answer or "",
            stop_reason=result.stop_reason,
            iterations=result.iterations,
            trajectory=result.log_path,
            run_id=result.run_id,
            prompt_tokens=child.tokens[0],
            completion_tokens=child.tokens[1],
            usage_summary={"model_usage_summaries": {}},
            execution_time=time.perf_counter() - started,
        )
        self._add_tokens(*child.tokens)
        self._log_call(entry)
        self.emit("sub_call", kind="rlm", model=name, prompt=text, response=result.answer, error=None)
        if result.answer is None:
            message = f"the sub-RLM stopped without an answer (stop_reason={result.stop_reason})"
            if raise_errors:
                raise RuntimeError(message)
            return f"Error: {message}"
        return result.answer

    # ---------------------------------------------------------------- sandbox
    def _new_sandbox(self, host_functions: dict[str, Any]) -> Any:
        from sandbox import Sandbox
        from sandbox.errors import SandboxError

        audit = self.logger.audit_path if self.logger is not None else None
        try:
            sb = Sandbox(self.cfg.policy, host_functions=host_functions, audit_log=audit)
        except SandboxError as exc:
            raise SandboxFailure(f"cannot start the sandbox: {exc}") from None
        if self.ledger.cancel is not None:
            self.ledger.cancel.watch(sb)
        return sb

    def _open_sandbox(self) -> Any:
        sb = self._new_sandbox(self.host_functions())
        try:
            self._load(sb)
        except BaseException:
            sb.close()
            raise
        return sb

    def _attach(self, session: _Session) -> Any:
        """Make this run the session's current one: its sandbox, with this run's context added."""
        session.handlers.clear()
        session.handlers.update(self.host_functions())
        session.contexts.append(self.context)
        try:
            if session.sandbox is None:
                session.sandbox = self._new_sandbox(session.host_functions(session.handlers))
                session.audit_path = session.sandbox.audit_path
                session.loaded = 0
            elif self.ledger.cancel is not None and not self.ledger.cancel.cancelled:
                # The sandbox of an earlier run: this run's token watches it too. A run cancelled
                # before it began (queued behind another completion) must not kill it: watch()
                # would, at once.
                self.ledger.cancel.watch(session.sandbox)
            self._load(session.sandbox)
        except BaseException:
            # A context that never reached the sandbox is not the session's: kept, it was loaded
            # again by every later completion, and one that cannot be (a dict with tuple keys)
            # made each of them fail as this one did, for the rest of the session.
            if len(session.contexts) > session.loaded and session.contexts[-1] is self.context:
                session.contexts.pop()
            raise
        return session.sandbox

    def _load(self, sb: Any) -> None:
        """Put ``context`` (in a session also ``context_0``..., ``history``) and the prelude into the sandbox.

        A fresh child gets everything; a session's live child only what it lacks.
        """
        from sandbox.errors import SandboxError, VariableError

        session = self.session
        for attempt in (1, 2):
            live = session is not None and session.loaded > 0 and sb.alive
            try:
                if session is None:
                    sb.set_variable("context", self.context)
                    result = sb.execute(PRELUDE)
                else:
                    fresh = session.loaded == 0 or not sb.alive
                    session.restarted = session.loaded > 0 and fresh  # told in _session_note
                    first = 0 if fresh else session.loaded
                    for i in range(first, len(session.contexts)):
                        sb.set_variable(f"context_{i}", session.contexts[i])
                    sb.set_variable("history", [dict(turn) for turn in session.history])
                    session.loaded = len(session.contexts)
                    last = len(session.contexts) - 1
                    result = sb.execute((PRELUDE if fresh else "") + f"\ncontext = context_{last}\n")
                break
            except VariableError as exc:  # the context is no plain data, or too large: the caller's
                raise ContextError(f"the context cannot be loaded into the sandbox: {exc}") from None
            except SandboxError as exc:
                # A session's live child that broke the protocol (a thread its code left running
                # called a host function between executes, where the host expected an ack) was
                # killed: loaded once more, into a fresh child, as after a limit. It made the next
                # completion of the session raise SandboxFailure.
                if attempt == 1 and live and not sb.alive:
                    continue
                raise SandboxFailure(f"cannot load the context into the sandbox: {exc}") from None
        if not result.ok:
            raise SandboxFailure(
                f"the sandbox refused the RLM prelude: {result.error_type}: {result.error_message}"
            )

    def _execute(self, sb: Any, code: str, cap: float | None = None, helper: str | None = None) -> Any:
        """``sb.execute(code)``, its child killed when the time budget runs out (or after *cap* s).

        Every execute the loop makes in the model's sandbox goes through here: the policy's
        ``wall_seconds`` alone would let a block run past the budget, and host functions are
        not counted there at all. *helper* names the loop's own code being run (``rlm_describe_vars()``,
        ``FINAL_VAR``): while it runs, the code's model and tool calls are refused (see
        :meth:`_no_calls_in_helper`)."""
        limit = self._time_cap(cap)
        timer = None
        # A budget past threading.TIMEOUT_MAX (some 292 years: max_time_s=1e10, a finite number like
        # any other) cannot run out in this process's life, and its wait would overflow: the timer's
        # thread died with an OverflowError traceback on stderr.
        if limit is not None and limit < threading.TIMEOUT_MAX:
            timer = threading.Timer(max(0.0, limit), sb.kill)
            timer.daemon = True
            timer.start()
        self.helper, self.running = helper, sb
        try:
            return sb.execute(code)
        except ValueError as exc:  # code too large for one request (a tiny max_message_mb): the
            # model sees why, like an error of its code; nothing ran, the variables stay
            from sandbox import ExecResult

            return ExecResult(ok=False, error_type="ValueError", error_message=str(exc))
        finally:
            self.helper = self.running = None
            if timer is not None:
                timer.cancel()

    def _time_cap(self, cap: float | None) -> float | None:
        """Seconds the loop's next step in the sandbox may take: the time budget left, at most
        *cap* (None: no limit either way)."""
        left = self.ledger.time_left()
        return left if cap is None else cap if left is None else min(cap, left)

    def _may_run_code(self) -> bool:
        """False once the run is out of time or cancelled: then the loop runs no more code of its own."""
        return self.ledger.exhausted() not in ("max_time_s", "cancelled")

    def _describe_vars(self, sb: Any) -> dict[str, Any]:
        """The model's variables for the trajectory, by the prelude's ``rlm_describe_vars()``: code
        the model may have redefined, so bounded like a block (and by :data:`HELPER_TIMEOUT_S`)."""
        try:
            result = self._execute(sb, "rlm_describe_vars()", HELPER_TIMEOUT_S, helper="rlm_describe_vars()")
            # A redefined helper may print up to the policy's output cap: a description that long is
            # not kept (the run's history holds one per block, for the whole run).
            if result.ok and len(result.stdout) <= LOG_TEXT_CHARS:
                value = json.loads(result.stdout.strip() or "{}")
                # Nested past MAX_JSON_DEPTH (a redefined helper): the walks over the trajectory's
                # entries and the result's texts are recursive, and would raise RecursionError.
                return value if isinstance(value, dict) and not nested_deeper(value) else {}
        except Exception:
            pass
        return {}

    def _run_block(self, sb: Any, code: str) -> tuple[dict[str, Any], str, bool]:
        """Run one block; return (log entry, text for the model, ok).

        With a time budget, the block's child is killed when the budget runs out (the policy's
        ``wall_seconds`` alone would let a block run past it, and host functions are not counted
        there at all); the loop then stops with ``stop_reason="max_time_s"``."""
        self.calls = []
        self.call_chars = 0
        self.calls_omitted = [0, 0]
        result = self._execute(sb, code)
        self.code_executions += 1
        calls = [entry for _, entry in sorted(self.calls, key=lambda pair: pair[0])]
        pieces: list[str] = []
        if result.stdout:
            pieces.append(result.stdout.rstrip("\n"))
        if result.stderr:
            pieces.append("[stderr]\n" + result.stderr.rstrip("\n"))
        if not result.ok:
            if result.limit or result.crashed:
                pieces.append(f"[the sandbox stopped this block] {result.error_type}: {result.error_message}")
            else:
                pieces.append(
                    (result.traceback or f"{result.error_type}: {result.error_message}").rstrip("\n")
                )
        text = _clip("\n".join(pieces), self.cfg.max_output_chars) or "(no output)"
        if result.state_lost:
            text = (
                "[note: the sandbox had restarted before this block; variables from earlier blocks were gone]\n"
                + text
            )
        local_vars: dict[str, Any] = {}
        if sb.alive and self._may_run_code():
            local_vars = self._describe_vars(sb)  # may kill the child (too slow): reloaded below
        dead = not sb.alive
        if dead and self.ledger.exhausted():  # stopped by a budget: the run ends, nothing to reload
            text += f"\n[the run stopped: {self.ledger.stopped_by}]"
        elif dead:
            self._load(sb)
            reloaded = (
                "`context`"
                if self.session is None
                else f"`context`, `context_0` to `context_{len(self.session.contexts) - 1}` and `history`"
            )
            text += (
                f"\n[the sandbox was restarted: all your variables are gone, those of earlier turns too. "
                f"{reloaded} {'was' if self.session is None else 'were'} loaded again and the REPL functions "
                "are available; everything else was lost.]"
            )
        if self.pending_name is not None and self.final is None:
            self._resolve_name(sb, self.pending_name)
        # Kept for the whole run (its history, the trajectory): cut as the trajectory cuts any text.
        entry: dict[str, Any] = {
            "code": code,
            "result": {
                "stdout": clip_text(result.stdout),
                "stderr": clip_text(
                    result.stderr
                    if result.ok
                    else result.stderr + (result.traceback or f"{result.error_type}: {result.error_message}")
                ),
                "locals": local_vars,
                "execution_time": result.duration_s,
                "rlm_calls": calls,
            },
        }
        if any(self.calls_omitted):
            subs, tools = self.calls_omitted
            entry["result"]["rlm_calls_omitted"] = {"sub_calls": subs, "tool_calls": tools}
        return entry, text, result.ok

    def _set_final(self, value: Any) -> None:
        self.final_value = value  # as given, for output_type
        self.final = _as_answer(value)

    def _check_final(self) -> str | None:
        """Validate the final answer against ``output_type``; the reason when it is rejected."""
        if self.final is None or self.answer_type is None:
            return None
        try:
            self.parsed = self.answer_type.validate(self.final_value)
        except AnswerTypeError as exc:
            self.final = self.final_value = None
            return str(exc)
        self.final = self.answer_type.dump(self.parsed)
        return None

    def _resolve_name(self, sb: Any, name: str) -> None:
        """FINAL_VAR by name, resolved from the host (RestrictedPython has no globals())."""
        from sandbox.errors import SandboxError

        self.pending_name = None
        key = name.strip().strip("\"'")
        if not key.isidentifier():
            self._set_final(name)
            return
        if sb.alive:
            timeout = max(0.1, self._time_cap(HELPER_TIMEOUT_S) or 0.0)  # a timeout must be > 0
            try:
                self._set_final(sb.get_variable(key, timeout=timeout))
                return
            except SandboxError:
                pass
        # The value is gone (a dead child's variables are). After a limit or a crash the name
        # stands for the answer, as for a missing variable; a run that was stopped (cancelled,
        # out of time) has no answer, and ends with that reason.
        if self._may_run_code():
            self._set_final(name)

    def _resolve_text_final(self, sb: Any, response: str) -> None:
        directive = find_final(response)
        if directive is None or self.final is not None:
            return
        if directive.kind == "FINAL":
            self._set_final(directive.argument)
            return
        if not directive.argument.strip().strip("\"'").isidentifier():
            # Names no variable: the argument is the answer, as FINAL_VAR (and _resolve_name) would
            # give it. Not written into code for the sandbox: a 4 MB argument of control
            # characters was a 16 MB literal there, a 20 MB audit line, 121 MB of host memory.
            self._set_final(directive.argument)
            return
        if sb.alive and self._may_run_code():
            try:
                self._execute(sb, f"FINAL_VAR({directive.argument!r})", HELPER_TIMEOUT_S, helper="FINAL_VAR")
            except Exception:
                pass
        else:  # the value straight from the child, as FINAL_VAR would give it
            self.pending_name = directive.argument
        if self.pending_name is not None and self.final is None:
            self._resolve_name(sb, self.pending_name)
        if self.final is None and self._may_run_code():
            self._set_final(directive.argument)

    # ------------------------------------------------------------------ loop
    def _compact(self, messages: Messages, turn: int) -> Messages:
        """Replace the older turns by a summary the model writes, when the conversation outgrows its window.

        Above ``compaction_threshold`` of the model's input window, every
        exchange but the last is summarized by the root model; the summary is
        appended to the first user message, so roles still alternate. The REPL
        is untouched. Without a window, a threshold or older turns, or when
        the summary call fails, the messages are returned as they were.
        """
        threshold = self.cfg.compaction_threshold
        window = self.cfg.backend.max_input_tokens(self.model)
        older = messages[2:-2]
        if threshold is None or not window or not older:
            return messages
        before = self.cfg.backend.count_tokens(self.model, messages)
        if before <= window * threshold:
            return messages
        request = [*messages, {"role": "user", "content": compaction_prompt()}]
        try:
            summary = self._call(self.model, self._fit(request), sub=False).text.strip()
        except (BudgetExceeded, ModelError):
            return messages
        if not summary:
            return messages
        self.compactions += 1
        first = dict(messages[1])
        first["content"] = (
            f"{self.first_message}\n\n## Your progress so far\n\nYour earlier turns were replaced by this "
            f"summary, written by you (compaction {self.compactions}); the REPL still holds every variable.\n\n"
            f"{summary}"
        )
        compacted = [messages[0], first, *messages[-2:]]
        after = self.cfg.backend.count_tokens(self.model, compacted)
        fields = {
            "iteration": turn,
            "tokens_before": before,
            "tokens_after": after,
            "turns_summarized": sum(1 for m in older if m.get("role") == "assistant"),
            "summary": summary,
        }
        self.emit("compaction", **fields)
        if self.logger is not None:
            self.logger.compaction(**fields)
        return compacted

    def _fit(self, messages: Messages) -> Messages:
        """Elide the oldest REPL outputs when the messages would not fit the model's window."""
        window = self.cfg.backend.max_input_tokens(self.model)
        if not window:
            return messages
        budget = int(window * (self.cfg.compaction_threshold or DEFAULT_COMPACTION_THRESHOLD))
        count = self.cfg.backend.count_tokens
        total = count(self.model, messages)
        if total <= budget:
            return messages
        fitted = [dict(m) for m in messages]
        for i in range(2, len(fitted) - 1):
            if fitted[i]["role"] == "user":
                # The total changes by what this message's own count changes by: the conversation
                # is not counted again after each elision (the square of its length: a hostile
                # server's replies, which are never elided, made each turn count them all again
                # for every earlier turn).
                before = count(self.model, [fitted[i]])
                fitted[i]["content"] = "[output of this turn elided to fit the context window]"
                total += count(self.model, [fitted[i]]) - before
                if total <= budget:
                    break
        return fitted

    def _system_prompt(self) -> str:
        parts = [system_prompt().rstrip("\n"), describe_tools(self.cfg.tools)]
        if self.answer_type is not None:
            parts.append(self.answer_type.prompt())
        return "\n\n".join(p for p in parts if p) + "\n"

    def _first_message(self, query: str | None) -> str:
        question = (
            f"Question: {query}"
            if query
            else "The task is described inside the context itself: read its beginning first."
        )
        return (
            f"{question}\n\n{describe_context(self.context)}\n\n{self._session_note()}"
            f"You have {self.cfg.max_iterations} turns. You have not looked at the context yet: "
            "start by exploring it in a ```repl block."
        )

    def _session_note(self) -> str:
        """What a session's root model is told about the earlier contexts and turns ("" outside sessions)."""
        session = self.session
        if session is None:
            return ""
        last = len(session.contexts) - 1
        if last == 0:
            return (
                "This is the first question of a session: your variables stay in the REPL for later questions. "
                "`context` is also `context_0`.\n\n"
            )
        kept = (
            "the REPL was restarted since the last question (a limit, a crash or a cancel stopped it): the "
            "variables you made earlier are gone, the contexts and `history` were loaded again"
            if session.restarted
            else "the REPL still holds your variables from earlier questions"
        )
        lines = [
            f"This is question {last + 1} of a session: {kept}. `context` is the new context "
            f"(also `context_{last}`); the earlier ones are:"
        ]
        for i, (earlier, turn) in enumerate(zip(session.contexts[:-1], session.history, strict=False)):
            head = describe_context(earlier).split("\n", 1)[0].replace("`context`", f"`context_{i}`", 1)
            asked = _clip(str(turn.get("query") or "(in the context)"), 200)
            answered = _clip(str(turn.get("answer")), 200)
            lines.append(f"- {head} Question: {asked} Answer: {answered}")
        lines.append("`history` is the list of those earlier turns as {'query': ..., 'answer': ...} dicts.")
        return "\n".join(lines) + "\n\n"

    def stopped_before_start(self, context: Context, query: str | None, stop_reason: str) -> RLMResult:
        """The result of a session's completion stopped (cancelled, out of time) while it waited for
        the session: logged and reported as a run of no turn, the session left untouched."""
        self.context = context
        started = self._start(context, query, None)
        result = self._result(None, stop_reason, 0, [], started, None)
        self._finish(result, None)
        return result

    def execute(self, context: Context, query: str | None, session: _Session | None = None) -> RLMResult:
        self.context = context
        self.session = session
        started = self._start(context, query, session)
        try:
            if session is not None:
                answer: str | None = None
                try:
                    result = self._loop(self._attach(session), query, started)
                    answer = result.answer
                    return result
                finally:
                    session.history.append({"query": query, "answer": answer})
                    if self.ledger.cancel is not None and session.sandbox is not None:
                        self.ledger.cancel.unwatch(session.sandbox)  # later runs use it
            sb = self._open_sandbox()
            try:
                return self._loop(sb, query, started)
            finally:
                sb.close()
                if self.ledger.cancel is not None:
                    self.ledger.cancel.unwatch(sb)
        except BaseException as exc:
            self.emit("run_end", answer=None, stop_reason="error", error=f"{type(exc).__name__}: {exc}")
            if isinstance(exc, RLMError) and self.logger is not None:
                # the run's outcome, so a viewer can tell "failed" from "cut off"
                self.logger.result(
                    run_id=self.run_id, stop_reason="error", error=f"{type(exc).__name__}: {exc}"
                )
            raise

    def _start(self, context: Context, query: str | None, session: _Session | None) -> float:
        """Log the run's metadata and emit ``run_start``; returns when the run started."""
        started = time.perf_counter()
        description = describe_context(context)
        if self.logger is not None:
            self.logger.metadata(
                run_id=self.run_id,
                parent_run_id=self.parent_id,
                root_model=self.model,
                sub_model=self.cfg.sub_model,
                depth=self.depth,
                max_depth=self.cfg.max_depth,
                max_iterations=self.cfg.max_iterations,
                backend="litellm"
                if isinstance(self.cfg.backend, LiteLLMBackend)
                else type(self.cfg.backend).__name__,
                backend_kwargs={"model_name": self.model, "api_base": self.cfg.api_base},
                environment_type="sandbox",
                environment_kwargs={"policy": self.cfg.policy.name, "policy_sha256": self.cfg.policy.sha256},
                other_backends=[self.cfg.sub_model] if self.cfg.sub_model != self.model else None,
                budgets={k: v for k, v in vars(self.cfg.budgets).items() if v is not None},
                query=query,
                context_description=description,
                audit_log=str(self.logger.audit_path),
                **({} if session is None else {"session_turn": len(session.history) + 1}),
            )
        self.emit(
            "run_start",
            model=self.model,
            query=query,
            context=description,
            max_iterations=self.cfg.max_iterations,
            parent_run_id=self.parent_id,
            session_turn=None if session is None else len(session.history) + 1,
        )
        return started

    def _loop(self, sb: Any, query: str | None, started: float) -> RLMResult:
        self.first_message = self._first_message(query)
        messages: Messages = [
            {"role": "system", "content": self._system_prompt()},
            {"role": "user", "content": self.first_message},
        ]
        history: list[dict[str, Any]] = []
        stop_reason: str | None = None
        error: str | None = None
        error_type: str | None = None
        iterations = 0
        for turn in range(1, self.cfg.max_iterations + 1):
            if self.ledger.exhausted():
                stop_reason = self.ledger.stopped_by
                break
            turn_started = time.perf_counter()
            self.emit("iteration_start", iteration=turn)
            messages = self._compact(messages, turn)
            sent = self._fit(messages)
            try:
                completion = self._call(self.model, sent, sub=False)
            except BudgetExceeded as exc:
                stop_reason = exc.limit
                break
            except ModelError as exc:
                if isinstance(exc, (AuthenticationError, UnknownModelError)) or turn == 1:
                    raise
                stop_reason, error, error_type = "model_error", str(exc), type(exc).__name__
                break
            iterations = turn
            response = completion.text
            self.emit(
                "model_reply",
                iteration=turn,
                response=response,
                input_tokens=completion.input_tokens,
                output_tokens=completion.output_tokens,
            )
            # Only the blocks that may run are copied out; the others are counted (a reply of a
            # million blocks kept them all, and the host's memory with them).
            blocks = extract_code_blocks(response, limit=MAX_BLOCKS_PER_REPLY)
            found = len(blocks) if len(blocks) < MAX_BLOCKS_PER_REPLY else count_code_blocks(response)
            code_entries: list[dict[str, Any]] = []
            outputs: list[str] = []
            for index, code in enumerate(blocks, 1):
                entry, text, ok = self._run_block(sb, code)
                code_entries.append(entry)
                outputs.append(text)
                omitted = entry["result"].get("rlm_calls_omitted", {})
                self.emit(
                    "code_result",
                    iteration=turn,
                    index=index,
                    code=code,
                    output=text,
                    ok=ok,
                    sub_calls=sum(1 for c in entry["result"]["rlm_calls"] if c.get("type") != "tool")
                    + omitted.get("sub_calls", 0),
                    tool_calls=sum(1 for c in entry["result"]["rlm_calls"] if c.get("type") == "tool")
                    + omitted.get("tool_calls", 0),
                )
                self.errors_in_a_row = 0 if ok else self.errors_in_a_row + 1
                if self.fatal is not None:
                    raise self.fatal
                if self.final is not None or self.ledger.stopped_by is not None or self._too_many_errors():
                    break
            self._resolve_text_final(sb, response)
            rejected = self._check_final()
            if rejected is not None:
                self.emit("final_rejected", iteration=turn, error=rejected)
            record = {
                "response": response,
                "code_blocks": code_entries,
                "final_answer": self.final,
                "iteration_time": time.perf_counter() - turn_started,
            }
            if rejected is not None:
                record["final_rejected"] = rejected
            history.append({"iteration": turn, **record})
            if self.logger is not None:
                usage = {
                    "model": self.model,
                    "prompt_tokens": completion.input_tokens,
                    "completion_tokens": completion.output_tokens,
                    "cost_usd": completion.cost_usd,
                }
                self.logger.iteration(prompt=sent, usage=usage, **record)
            if self.final is not None:
                self.emit("final", answer=self.final)
            tokens_in, tokens_out, cost = self._totals()
            self.emit(
                "iteration_end",
                iteration=turn,
                input_tokens=tokens_in,
                output_tokens=tokens_out,
                cost_usd=cost,
                sub_calls=self.ledger.sub_calls,
                elapsed_s=self.ledger.elapsed(),
            )
            if self.final is not None:
                stop_reason = "final"
                break
            if self._too_many_errors():
                stop_reason = "max_errors"
                break
            messages.append({"role": "assistant", "content": response})
            feedback = self._feedback(found, outputs, turn)
            if rejected is not None:
                feedback = (
                    f"Your final answer was rejected: it does not match the required answer format "
                    f"({rejected}). Correct it and give the final answer again.\n\n{feedback}"
                )
            messages.append({"role": "user", "content": feedback})
            if self.ledger.exhausted():
                stop_reason = self.ledger.stopped_by
                break
        answer = self.final
        closing: str | None = None
        if stop_reason is None or stop_reason == "max_sub_calls":
            stop_reason = stop_reason or "max_iterations"
            answer, closing = self._closing_answer(sb, messages)
        result = self._result(answer, stop_reason, iterations, history, started, error, error_type)
        self._finish(result, closing)
        return result

    def _finish(self, result: RLMResult, closing: str | None) -> None:
        """Write the run's outcome to its log and emit ``run_end``."""
        if self.logger is not None:
            self.logger.result(
                closing_response=closing, **result.model_dump(mode="json", exclude={"history"})
            )
        self.emit(
            "run_end",
            answer=result.answer,
            stop_reason=result.stop_reason,
            iterations=result.iterations,
            input_tokens=result.total_input_tokens,
            output_tokens=result.total_output_tokens,
            cost_usd=result.cost_usd,
            sub_calls=result.sub_calls,
            tool_calls=result.tool_calls,
            elapsed_s=result.execution_time,
        )

    def _too_many_errors(self) -> bool:
        limit = self.cfg.max_errors
        return limit is not None and self.errors_in_a_row >= limit

    def _feedback(self, found: int, outputs: list[str], turn: int) -> str:
        """The next user message: each run block's output, for *found* blocks in the reply."""
        left = self.cfg.max_iterations - turn
        if not found:
            body = (
                "Your reply had no ```repl block and no FINAL(...). Write code in a ```repl block to make "
                "progress, or give your final answer."
            )
        else:
            body = "\n\n".join(
                f"Output of block {i} of {found}:\n{text}" for i, text in enumerate(outputs, 1)
            )
            if len(outputs) < found:
                why = (
                    f": at most {MAX_BLOCKS_PER_REPLY} blocks of a reply run"
                    if len(outputs) == MAX_BLOCKS_PER_REPLY
                    else ""
                )
                body += f"\n\n[blocks {len(outputs) + 1} to {found} were not run{why}]"
        return f"{body}\n\n[{left} turn{'s' if left != 1 else ''} left]"

    def _closing_answer(self, sb: Any, messages: Messages) -> tuple[str | None, str | None]:
        """One last call for the best answer when the run stops without FINAL."""
        closing = [*messages[:-1], dict(messages[-1])]
        closing[-1]["content"] = f"{closing[-1]['content']}\n\n{CLOSING_PROMPT}"
        self.emit("closing_call")
        try:
            completion = self._call(self.model, self._fit(closing), sub=False)
        except (BudgetExceeded, ModelError):
            return None, None
        text = completion.text
        if find_final(text) is not None:
            self._resolve_text_final(sb, text)
        elif text.strip():
            self._set_final(text.strip())
        if self._check_final() is not None:
            return None, text
        return self.final, text

    def _audit_log_path(self) -> str | None:
        if self.session is not None:  # a session's sandbox keeps the audit log of its first run
            return str(self.session.audit_path) if self.session.audit_path is not None else None
        return str(self.logger.audit_path) if self.logger is not None else None

    def _totals(self) -> tuple[int, int, float | None]:
        return self.ledger.totals()

    def _result(
        self,
        answer: str | None,
        stop_reason: str,
        iterations: int,
        history: list[dict[str, Any]],
        started: float,
        error: str | None,
        error_type: str | None = None,
    ) -> RLMResult:
        # This run's calls and its child runs' (the root's: the whole tree's)
        input_tokens, output_tokens, cost = self.tally.totals()
        return RLMResult(
            answer=answer,
            stop_reason=stop_reason,
            iterations=iterations,
            code_executions=self.code_executions,
            sub_calls=self.tally.sub_calls,
            tool_calls=self.tally.tool_calls,
            parsed=self.parsed,
            total_input_tokens=input_tokens,
            total_output_tokens=output_tokens,
            cost_usd=cost,
            priced_cost_usd=self.tally.priced(),
            execution_time=time.perf_counter() - started,
            usage=self.tally.usage(),
            history=history,
            root_model=self.model,
            run_id=self.run_id,
            log_path=str(self.logger.path) if self.logger is not None else None,
            audit_log_path=self._audit_log_path(),
            error=error,
            error_type=error_type,
        )
