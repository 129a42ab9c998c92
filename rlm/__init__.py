"""Recursive Language Models on a hardened sandbox.

``rlm.run(query, context, model=...)`` and ``rlm.RLM(...).completion(context,
root_prompt=...)`` answer a question about a context far longer than a prompt
window: the context lives in a sandboxed REPL, the model explores it with code
and sub-model calls, and ends with ``FINAL(answer)``. ``rlm.batch(items,
model=...)`` runs many such questions at once and yields each result as it
finishes.

Public names are loaded lazily: ``import rlm`` (and ``rlm --help``) does not
import litellm or start anything.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# The error tree is plain classes with no imports: cheap enough to load eagerly.
from rlm.errors import (
    AuthenticationError,
    BudgetExceeded,
    ConfigurationError,
    ContextError,
    ContextWindowExceeded,
    ModelError,
    ModelUnreachable,
    ProviderUnavailable,
    RateLimited,
    RLMError,
    SandboxFailure,
    UnknownModelError,
)

__all__ = [
    "RLM",
    "AuthenticationError",
    "BatchItem",
    "BatchResult",
    "BudgetExceeded",
    "CancelToken",
    "Completion",
    "ConfigurationError",
    "ContextError",
    "ContextWindowExceeded",
    "LiteLLMBackend",
    "ModelBackend",
    "ModelError",
    "ModelUnreachable",
    "ModelUsage",
    "ProviderUnavailable",
    "RLMError",
    "RLMResult",
    "RateLimited",
    "SandboxFailure",
    "ScriptedBackend",
    "UnknownModelError",
    "batch",
    "run",
]

_EXPORTS = {
    "RLM": "rlm.core",
    "run": "rlm.core",
    "RLMResult": "rlm.result",
    "ModelUsage": "rlm.result",
    "Completion": "rlm.llm",
    "LiteLLMBackend": "rlm.backend",
    "ModelBackend": "rlm.backend",
    "ScriptedBackend": "rlm.backend",
    "batch": "rlm.batching",
    "BatchItem": "rlm.batching",
    "BatchResult": "rlm.batching",
    "CancelToken": "rlm.budget",
}

if TYPE_CHECKING:
    from rlm.backend import LiteLLMBackend, ModelBackend, ScriptedBackend
    from rlm.batching import BatchItem, BatchResult, batch
    from rlm.budget import CancelToken
    from rlm.core import RLM, run
    from rlm.llm import Completion
    from rlm.result import ModelUsage, RLMResult


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rlm' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(__all__)
