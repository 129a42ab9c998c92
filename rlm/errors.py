"""Errors raised by the ``rlm`` package.

An exception raised by *model-written code* is never one of these: it is
shown to the model as the output of its code block. These are failures of
the run itself: a model that cannot be called, a sandbox that cannot start,
bad arguments. Budgets reached during a run are not raised to the caller
either: the run stops cleanly and says why in ``RLMResult.stop_reason``.

The tree::

    RLMError                        root of everything this package raises
    ├── ConfigurationError          bad arguments: context type, policy, limits (also a ValueError)
    │   └── ContextError            this context cannot be loaded into the sandbox (not plain data, too large)
    ├── ModelError                  a model call failed (root of model-call failures)
    │   ├── AuthenticationError     no API key for the provider, or the key was rejected
    │   ├── UnknownModelError       litellm cannot route the model string to a provider
    │   ├── ContextWindowExceeded   the prompt does not fit the model's context window
    │   ├── RateLimited             the provider refused the call for rate or quota reasons (retried)
    │   ├── ProviderUnavailable     a timeout, a dropped connection or a 5xx from the provider (retried)
    │   └── ModelUnreachable        no connection to the model's endpoint at all (refused, unknown host, ...)
    ├── BudgetExceeded              a budget (sub-calls, tokens, cost, time) is used up
    └── SandboxFailure              the sandbox could not be started or used
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "BudgetExceeded",
    "ConfigurationError",
    "ContextError",
    "ContextWindowExceeded",
    "ModelError",
    "ModelUnreachable",
    "ProviderUnavailable",
    "RLMError",
    "RateLimited",
    "SandboxFailure",
    "UnknownModelError",
]


class RLMError(Exception):
    """Root of every error raised by the rlm package.

    ``priced_cost_usd`` is set on the error a run raises (``RLM.completion``,
    ``rlm.run``): USD of the run's model calls with a known price, made before
    it failed (``0.0`` when none were). ``None`` on an error raised before any
    run started, or by anything but a run. ``spent`` is set with it: ``(input
    tokens, output tokens, cost in USD)`` of those calls, the cost ``None`` when
    any of their prices is unknown.
    """

    priced_cost_usd: float | None = None
    spent: tuple[int, int, float | None] | None = None


class ConfigurationError(RLMError, ValueError):
    """An argument cannot be used: unsupported context type, unknown policy, bad limit."""


class ContextError(ConfigurationError):
    """The context cannot be loaded into the sandbox: a dict key that is not plain data, a lone
    surrogate in its text, nesting too deep, more bytes than the policy's ``max_message_mb``.

    Raised before the run's first model call. A fault of this one context, not of the
    configuration: a batch records it as the item's error and goes on."""


class ModelError(RLMError):
    """A model call failed. ``model`` is the model string as the caller gave it.

    ``retry_after`` is the wait in seconds the provider asked for (its
    ``Retry-After`` header), when it sent one.
    """

    def __init__(self, message: str, *, model: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.model = model
        self.retry_after = retry_after


class AuthenticationError(ModelError):
    """No API key is configured for the model's provider, or the provider rejected it."""


class UnknownModelError(ModelError):
    """litellm cannot route this model string to any provider (or the provider does not know it)."""


class ContextWindowExceeded(ModelError):
    """The messages are longer than the model's context window."""


class RateLimited(ModelError):
    """The provider refused the call: rate limit or exhausted quota. The loop retries it."""


class ProviderUnavailable(ModelError):
    """The call timed out, its connection dropped, the provider answered 5xx, or its response could
    not be read. The loop retries it. (An endpoint that cannot be reached at all is
    :class:`ModelUnreachable`, not retried.)"""


class ModelUnreachable(ModelError):
    """The model's endpoint could not be reached: connection refused, unknown host, no route.

    On a run's first call this is a configuration error (a wrong ``api_base``,
    a server that is down), like a bad key: the CLI exits 2 and a batch stops.
    """


class BudgetExceeded(RLMError):
    """A budget of the run is used up. ``limit`` names it (``"max_tokens"``, ``"max_cost_usd"`` ...)."""

    def __init__(self, limit: str, message: str) -> None:
        super().__init__(message)
        self.limit = limit


class SandboxFailure(RLMError):
    """The sandbox could not be started, or refused the context."""
