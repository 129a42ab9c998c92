"""Progress events of a run: what ``RLM(on_event=callback)`` receives.

Every event is a plain dict ``{"type", "run_id", "depth", "t", ...}``, ``t``
being the Unix time in seconds. The types, in the order a run emits them:

================  ==============================================================
``run_start``     model, query, context (its description), max_iterations,
                  parent_run_id (``None`` for the root), session_turn (the
                  completion's number in a ``persistent`` session, else ``None``)
``iteration_start`` iteration
``compaction``    iteration, tokens_before, tokens_after, turns_summarized, summary
``model_reply``   iteration, response, input_tokens, output_tokens
``retry``         model, attempt, delay_s, error (a model call is tried again)
``sub_call``      kind (``"llm"`` or ``"rlm"``), model, prompt, response, error
``tool_call``     name, args, kwargs, result, error, execution_time
``code_result``   iteration, index (of the block in the reply), code, output
                  (as the model sees it), ok, sub_calls, tool_calls
``final_rejected`` iteration, error (the answer failed ``output_type``)
``final``         answer
``iteration_end`` iteration, input_tokens, output_tokens, cost_usd, sub_calls,
                  elapsed_s (usage of the whole tree so far)
``closing_call``  (out of turns: one last call asks for the best answer)
``run_end``       answer, stop_reason, iterations, input_tokens, output_tokens,
                  cost_usd, sub_calls, tool_calls, elapsed_s (usage of this run
                  and its child runs: the root's is the whole tree's)
================  ==============================================================

A child RLM (``rlm_query``) emits its own events through the same callback,
with its own ``run_id`` and ``depth + 1``. Events of one tree are delivered
one at a time, in the order they happen (sub-calls of a batch in the order
they finish). A callback that raises is logged once (logger ``rlm``) and
never stops the run, and neither does its ``SystemExit`` (a tool's is shown to the
model as an error), unless a signal handler of this process raised it: an
embedder's SIGTERM handler calling ``sys.exit()`` while a callback or a tool
runs ends the process as it would anywhere else. A coroutine function is awaited: on the caller's event
loop under ``acompletion``, in a private loop under ``completion``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from types import CodeType
from typing import Any

__all__ = ["Event", "EventCallback", "Events", "call_sync", "raised_by_a_signal_handler"]

Event = dict[str, Any]
EventCallback = Callable[[Event], Any]

log = logging.getLogger("rlm")


def call_sync(fn: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any], loop: Any) -> Any:
    """Call *fn*; when it is a coroutine function, run it to completion and return its value.

    The coroutine runs on *loop* (the caller's event loop under ``acompletion``,
    from a worker thread) or, without one, in a private loop of this thread.
    """
    if not inspect.iscoroutinefunction(fn):
        result = fn(*args, **kwargs)
        if not inspect.isawaitable(result):
            return result
        coro: Any = result
    else:
        coro = fn(*args, **kwargs)
    if loop is not None and loop.is_running():
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        while True:  # never wait forever on a loop that has gone away
            try:
                return future.result(timeout=0.5)
            except concurrent.futures.TimeoutError:
                if loop.is_closed() or not loop.is_running():
                    future.cancel()
                    raise RuntimeError("the caller's event loop stopped before the coroutine ended") from None

    async def wrapper() -> Any:
        return await coro

    return asyncio.run(wrapper())


def raised_by_a_signal_handler(exc: BaseException) -> bool:
    """Whether *exc* came out of a Python signal handler of this process (or a function it called).

    A callback's or a tool's ``SystemExit`` is theirs to report, not the process's end (a tool
    whose argument parser calls ``sys.exit`` on the arguments a model chose must not stop the
    host). But a handler runs in the main thread wherever that thread is: an embedder's SIGTERM
    handler calling ``sys.exit()`` during a tool's ``time.sleep`` raised it inside the tool,
    and the run went on to its end (the process exited 0 once it was done). Such an exception
    has the handler's frame in its traceback."""
    handlers: set[CodeType] = set()
    for sig in signal.valid_signals():
        try:
            handler: Any = signal.getsignal(sig)
        except (OSError, ValueError):
            continue
        for fn in (handler, getattr(handler, "__func__", None), getattr(handler, "func", None)):
            code = getattr(fn, "__code__", None)
            if isinstance(code, CodeType):
                handlers.add(code)
    if not handlers:
        return False
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code in handlers:
            return True
        tb = tb.tb_next
    return False


class Events:
    """Delivers the events of one run tree to its callbacks, one at a time."""

    def __init__(self, callbacks: Sequence[EventCallback], loop: Any = None) -> None:
        self.callbacks = list(callbacks)
        self.loop = loop
        self._lock = threading.RLock()
        self._failed: set[int] = set()

    def __bool__(self) -> bool:
        return bool(self.callbacks)

    def emit(self, kind: str, run_id: str, depth: int, /, **fields: Any) -> None:
        """Deliver the event ``{"type": kind, "run_id", "depth", "t", **fields}`` to every callback."""
        if not self.callbacks:
            return
        event: Event = {"type": kind, "run_id": run_id, "depth": depth, "t": time.time(), **fields}
        with self._lock:
            for i, callback in enumerate(self.callbacks):
                try:
                    call_sync(callback, (event,), {}, self.loop)
                except (Exception, SystemExit) as exc:  # a broken callback never stops the run
                    if isinstance(exc, SystemExit) and raised_by_a_signal_handler(exc):
                        raise  # the process is asked to end, not the callback
                    if i not in self._failed:
                        self._failed.add(i)
                        log.warning(
                            "rlm: the on_event callback %r failed on a %r event (%s: %s); "
                            "later failures of it are not logged",
                            getattr(callback, "__name__", callback),
                            kind,
                            type(exc).__name__,
                            exc,
                        )
