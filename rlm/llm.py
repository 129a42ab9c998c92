"""Model calls through litellm: the only module of the project that imports it.

litellm is imported lazily, on the first call of a function below (importing
it takes seconds), after ``LITELLM_LOCAL_MODEL_COST_MAP`` is set so that it
reads its bundled price map instead of fetching one over the network.

- :func:`complete` / :func:`acomplete`: one chat call, returning a
  :class:`Completion` (text, token counts, cost in USD or ``None`` when the
  model is missing from litellm's price map);
- :func:`count_tokens`, :func:`max_input_tokens`: tokenizer and context window;
- litellm's exceptions are mapped onto :mod:`rlm.errors` (``ModelError`` and
  its subclasses), with any API key scrubbed from the messages; a call that
  could not connect at all is :class:`~rlm.errors.ModelUnreachable`, naming
  the URL and why (connection refused, unknown host ...).

API keys are passed straight to litellm and kept nowhere else.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from rlm.errors import (
    AuthenticationError,
    ContextWindowExceeded,
    ModelError,
    ModelUnreachable,
    RateLimited,
    UnknownModelError,
)

__all__ = [
    "Completion",
    "acomplete",
    "complete",
    "count_tokens",
    "max_input_tokens",
]

#: Sent to an OpenAI-compatible ``api_base`` when no key is configured (local servers ignore it).
_PLACEHOLDER_KEY = "no-key-configured"

_litellm: ModuleType | None = None
_import_lock = threading.Lock()


@dataclass(frozen=True)
class Completion:
    """The outcome of one model call."""

    text: str
    model: str
    input_tokens: int
    output_tokens: int
    cost_usd: float | None  # None when the model's price is unknown
    duration_s: float = 0.0


def _lib() -> ModuleType:
    """Import and quiet litellm once (thread-safe)."""
    global _litellm
    if _litellm is not None:
        return _litellm
    with _import_lock:
        if _litellm is None:
            os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
            os.environ.setdefault("LITELLM_TELEMETRY", "False")
            import litellm

            litellm.telemetry = False
            litellm.suppress_debug_info = True
            litellm.drop_params = True  # a parameter a provider lacks is dropped, not an error
            _litellm = litellm
    return _litellm


def _scrub(text: str, api_key: str | None) -> str:
    if api_key and len(api_key) >= 4:
        text = text.replace(api_key, "[REDACTED]")
    return text


def _prepare(
    model: str,
    messages: list[dict[str, Any]],
    api_base: str | None,
    api_key: str | None,
    kwargs: dict[str, Any],
) -> dict[str, Any]:
    """The litellm keyword arguments for one call; raises UnknownModelError / AuthenticationError early."""
    if not isinstance(model, str) or not model.strip():
        raise UnknownModelError("no model given", model=model)
    litellm = _lib()
    try:
        litellm.get_llm_provider(model=model, api_base=api_base)
    except Exception as exc:
        raise UnknownModelError(
            f"litellm cannot route model {model!r}; prefix it with a provider, e.g. 'openai/{model}'"
            f" or 'anthropic/{model}' ({type(exc).__name__})",
            model=model,
        ) from None
    if api_key is None:
        try:
            env = litellm.validate_environment(model=model, api_base=api_base)
        except Exception:
            env = {"missing_keys": []}
        missing = [k for k in env.get("missing_keys") or [] if k.endswith("_KEY")]
        if missing and api_base:
            api_key = _PLACEHOLDER_KEY  # an OpenAI-compatible local server needs some key
        elif missing:
            raise AuthenticationError(
                f"no API key for model {model!r}: set {' or '.join(missing)} in the environment", model=model
            )
    call = dict(kwargs)
    call.update(model=model, messages=messages)
    if api_base:
        call["api_base"] = api_base
    if api_key:
        call["api_key"] = api_key
    return call


#: Exceptions (by class name, so that httpx and openai need not be imported) that mean no connection was made.
_NO_CONNECTION = {
    "ConnectionRefusedError": "connection refused",
    "gaierror": "unknown host",
    "ConnectTimeout": "connection timed out",
    "ConnectError": "cannot connect",
}


def _no_connection(exc: BaseException) -> str | None:
    """Why no connection to the endpoint could be made, found in the exception's chain; None otherwise.

    A connection that was made and then broke (a read error, a reset) is not one of these.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    found: str | None = None
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        why = _NO_CONNECTION.get(type(current).__name__)
        text = str(current).lower()
        if why is None and ("connection refused" in text or "errno 111" in text):
            why = "connection refused"
        if why is not None and (found is None or found == "cannot connect"):
            found = why  # keep looking for the most precise reason down the chain
        current = current.__cause__ or current.__context__
    return found


def _map_error(exc: Exception, model: str, api_key: str | None, api_base: str | None = None) -> ModelError:
    litellm = _lib()
    why = _no_connection(exc)
    if why is not None:
        where = api_base or "the provider's API endpoint"
        return ModelUnreachable(_scrub(f"{model}: cannot connect to {where}: {why}", api_key), model=model)
    message = _scrub(str(exc), api_key).strip() or type(exc).__name__
    if len(message) > 600:
        message = message[:600] + " ..."
    lowered = message.lower()
    if (
        isinstance(exc, litellm.AuthenticationError)
        or "missing credentials" in lowered
        or "api_key client option" in lowered
    ):
        return AuthenticationError(f"{model}: authentication failed: {message}", model=model)
    if isinstance(exc, litellm.ContextWindowExceededError):
        return ContextWindowExceeded(
            f"{model}: the prompt does not fit the context window: {message}", model=model
        )
    if isinstance(exc, litellm.NotFoundError) or "llm provider not provided" in lowered:
        return UnknownModelError(f"{model}: unknown model: {message}", model=model)
    if isinstance(exc, litellm.RateLimitError):
        return RateLimited(f"{model}: rate limited: {message}", model=model)
    return ModelError(f"{model}: {type(exc).__name__}: {message}", model=model)


def _completion_from(response: Any, model: str, messages: list[dict[str, Any]], started: float) -> Completion:
    litellm = _lib()
    try:
        text = response.choices[0].message.content or ""
    except (AttributeError, IndexError):
        text = ""
    usage = getattr(response, "usage", None)
    input_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
    output_tokens = int(getattr(usage, "completion_tokens", 0) or 0)
    if usage is None:
        input_tokens = count_tokens(model, messages)
        output_tokens = count_tokens(model, [{"role": "assistant", "content": text}])
    cost: float | None = None
    hidden = getattr(response, "_hidden_params", None) or {}
    raw_cost = hidden.get("response_cost") if isinstance(hidden, dict) else None
    if raw_cost is not None:
        cost = float(raw_cost)
    else:
        try:
            cost = float(litellm.completion_cost(completion_response=response, model=model))
        except Exception:
            cost = None  # not in the price map: a local server, a new model ...
    return Completion(
        text=text,
        model=model,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cost_usd=cost,
        duration_s=time.perf_counter() - started,
    )


def complete(
    model: str,
    messages: list[dict[str, Any]],
    *,
    api_base: str | None = None,
    api_key: str | None = None,
    **kwargs: Any,
) -> Completion:
    """One chat completion through litellm.

    *model* is any litellm model string; extra keyword arguments (``timeout``,
    ``temperature``, ``num_retries`` ...) go to ``litellm.completion``.
    Raises :class:`~rlm.errors.ModelError` (or a subclass) on failure.
    """
    call = _prepare(model, messages, api_base, api_key, kwargs)
    litellm = _lib()
    started = time.perf_counter()
    try:
        response = litellm.completion(**call)
    except ModelError:
        raise
    except Exception as exc:
        raise _map_error(exc, model, call.get("api_key"), call.get("api_base")) from None
    return _completion_from(response, model, messages, started)


async def acomplete(
    model: str,
    messages: list[dict[str, Any]],
    *,
    api_base: str | None = None,
    api_key: str | None = None,
    **kwargs: Any,
) -> Completion:
    """The asyncio twin of :func:`complete` (``litellm.acompletion``)."""
    call = _prepare(model, messages, api_base, api_key, kwargs)
    litellm = _lib()
    started = time.perf_counter()
    try:
        response = await litellm.acompletion(**call)
    except ModelError:
        raise
    except Exception as exc:
        raise _map_error(exc, model, call.get("api_key"), call.get("api_base")) from None
    return _completion_from(response, model, messages, started)


def count_tokens(model: str, messages: list[dict[str, Any]]) -> int:
    """Tokens of *messages* for *model* (litellm's tokenizer; a generic one for unknown models)."""
    litellm = _lib()
    try:
        return int(litellm.token_counter(model=model, messages=messages))
    except Exception:
        chars = sum(len(str(m.get("content") or "")) for m in messages)
        return chars // 4 + 4 * len(messages)


def max_input_tokens(model: str) -> int | None:
    """The model's input window in tokens, or ``None`` when litellm does not know the model."""
    litellm = _lib()
    try:
        info = litellm.get_model_info(model=model)
    except Exception:
        return None
    value = info.get("max_input_tokens") or info.get("max_tokens")
    return int(value) if value else None
