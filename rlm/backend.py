"""Model backends: what the loop calls to talk to a model.

:class:`LiteLLMBackend` (the default) calls real models through
:mod:`rlm.llm`. :class:`ScriptedBackend` answers from a script, with no
network: unit tests and examples drive the whole loop with it. Any object
with the three methods of :class:`ModelBackend` can be given to
``RLM(backend=...)``.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from rlm.checks import check_api_base
from rlm.errors import ModelError
from rlm.llm import Completion

__all__ = ["LiteLLMBackend", "ModelBackend", "ScriptedBackend"]

Messages = list[dict[str, Any]]


@runtime_checkable
class ModelBackend(Protocol):
    """How the loop calls models. ``complete`` may be called from several threads at once.

    The loop may pass ``timeout`` (seconds left in the time budget) and
    ``cache_prefix=True`` (the call continues a conversation whose earlier
    messages will be sent again: mark them cacheable if the provider can).
    A backend ignores the keywords it has no use for.

    A backend may also have a ``request_timeout`` attribute (seconds, or
    ``None``): the loop gives up a call still running that long after it
    started (see :meth:`LiteLLMBackend.request_timeout`), and a ``prepare()``
    method: work done once before calls (loading a library), which the loop
    runs before each call's request timeout starts counting. Both are optional,
    so not members of this protocol.
    """

    def complete(self, model: str, messages: Messages, **kwargs: Any) -> Completion: ...

    def count_tokens(self, model: str, messages: Messages) -> int: ...

    def max_input_tokens(self, model: str) -> int | None: ...


_SPACE = re.compile(r"\s")


def _count_words(text: str, step: int = 1 << 16) -> int:
    """``len(text.split())``, a slice of about *step* characters at a time (a reply of millions
    of words made a list of hundreds of megabytes). Each slice ends at white space: no word
    is cut in two."""
    count = pos = 0
    while pos < len(text):
        space = _SPACE.search(text, pos + step)
        end = len(text) if space is None else space.start()
        count += len(text[pos:end].split())
        pos = end
    return count


class LiteLLMBackend:
    """Calls models through litellm; *api_base* and *api_key* apply to every model it calls."""

    def __init__(
        self, *, api_base: str | None = None, api_key: str | None = None, **call_kwargs: Any
    ) -> None:
        check_api_base(api_base)
        self.api_base = api_base
        self._api_key = api_key
        self._kwargs = call_kwargs

    def __repr__(self) -> str:  # never show the key
        return f"LiteLLMBackend(api_base={self.api_base!r}, api_key={'***' if self._api_key else None})"

    def prepare(self) -> None:
        """Load litellm and what its first call loads (once per process; seconds, see
        :func:`rlm.llm.warm`): the loop calls this before a call's request timeout starts, so
        that loading is not counted as the request's time."""
        from rlm import llm

        llm.warm()

    @property
    def request_timeout(self) -> float | None:
        """Seconds a call may take in all: the ``timeout`` given as a number, else
        :data:`rlm.llm.DEFAULT_REQUEST_TIMEOUT_S`; ``None`` for one that is not a number (an
        ``httpx.Timeout``, which bounds each read only) or not finite and positive.

        The HTTP client's timeout is per read: a server that sends its answer a byte at a time
        never trips it. The loop (:meth:`rlm.core._Run._complete`) gives the call up once this
        much time has passed since it started."""
        from rlm import llm

        configured = self._kwargs.get("timeout")
        if configured is None:
            return llm.DEFAULT_REQUEST_TIMEOUT_S
        if isinstance(configured, int | float) and not isinstance(configured, bool):
            value = float(configured)
            return value if math.isfinite(value) and value > 0 else None
        return None

    def complete(self, model: str, messages: Messages, **kwargs: Any) -> Completion:
        from rlm import llm

        call = {**self._kwargs, **kwargs}
        left, configured = kwargs.get("timeout"), self._kwargs.get("timeout")
        # The loop passes the time left of max_time_s: it may shorten the request timeout (the
        # configured one, else the default), never lengthen it. One that is not a number (an
        # httpx.Timeout) is kept as configured: the loop still gives the call up when the run stops.
        if left is not None and configured is not None and not isinstance(configured, int | float):
            call["timeout"] = configured
        elif isinstance(left, int | float):
            call["timeout"] = min(left, llm.DEFAULT_REQUEST_TIMEOUT_S if configured is None else configured)
        return llm.complete(model, messages, api_base=self.api_base, api_key=self._api_key, **call)

    def count_tokens(self, model: str, messages: Messages) -> int:
        from rlm import llm

        return llm.count_tokens(model, messages)

    def max_input_tokens(self, model: str) -> int | None:
        from rlm import llm

        return llm.max_input_tokens(model)


Responder = Callable[[str, Messages], "str | Completion"]


class ScriptedBackend:
    """A model that replies from a script. No network, deterministic.

    *script* is one of:

    - a list of replies, consumed in order by every call whatever the model;
    - a mapping ``model -> list of replies``, one queue per model;
    - a function ``(model, messages) -> str | Completion`` (called from
      several threads during batches: keep it thread-safe).

    A reply that is an exception instance is raised instead of answered.
    Tokens are counted as whitespace-separated words (1 per message extra for
    the input). *price_per_token* gives every call a cost (``None``: unknown
    price). *latency_s* sleeps in each call. ``calls`` records
    ``(model, messages)`` for every call, in order.
    """

    def __init__(
        self,
        script: Sequence[str | BaseException] | Mapping[str, Sequence[str | BaseException]] | Responder,
        *,
        price_per_token: float | None = None,
        latency_s: float = 0.0,
        context_window: int | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._fn: Responder | None = None
        self._queues: dict[str | None, list[str | BaseException]] = {}
        if callable(script):
            self._fn = script
        elif isinstance(script, Mapping):
            self._queues = {k: list(v) for k, v in script.items()}
        else:
            self._queues = {None: list(script)}
        self.price_per_token = price_per_token
        self.latency_s = latency_s
        self.context_window = context_window
        self.calls: list[tuple[str, Messages]] = []

    @staticmethod
    def _words(messages: Messages) -> int:
        return sum(_count_words(str(m.get("content") or "")) + 1 for m in messages)

    def _next(self, model: str, messages: Messages) -> str | Completion | BaseException:
        if self._fn is not None:
            return self._fn(model, messages)
        with self._lock:
            key: str | None = model if model in self._queues else None
            queue = self._queues.get(key)
            if not queue:
                return ModelError(f"scripted model {model!r} has no reply left", model=model)
            return queue.pop(0)

    @property
    def remaining(self) -> int:
        """Replies not used yet (all queues)."""
        with self._lock:
            return sum(len(q) for q in self._queues.values())

    def complete(self, model: str, messages: Messages, **kwargs: Any) -> Completion:
        started = time.perf_counter()
        with self._lock:
            self.calls.append((model, [dict(m) for m in messages]))
        if self.latency_s:
            time.sleep(self.latency_s)
        reply = self._next(model, messages)
        if isinstance(reply, BaseException):
            raise reply
        if isinstance(reply, Completion):
            return reply
        text = str(reply)
        n_in, n_out = self._words(messages), max(1, _count_words(text))
        cost = None if self.price_per_token is None else (n_in + n_out) * self.price_per_token
        return Completion(text, model, n_in, n_out, cost, time.perf_counter() - started)

    def count_tokens(self, model: str, messages: Messages) -> int:
        return self._words(messages)

    def max_input_tokens(self, model: str) -> int | None:
        return self.context_window
