"""A security-hardened sandbox for running untrusted Python.

Each :class:`Sandbox` is a persistent REPL in its own child process, locked
down by kernel layers and bounded by the limits of a :class:`Policy`; the
host talks to it over msgpack frames and alone holds anything secret.

Exports are loaded lazily so that the child process, which imports
``sandbox.child`` and ``sandbox.protocol``, never pays for (or exposes)
pydantic and the host-side modules.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "AsyncSandbox",
    "ExecResult",
    "Policy",
    "Sandbox",
    "SandboxError",
    "SandboxPool",
    "load_policy",
    "shutdown",
]

_EXPORTS = {
    "AsyncSandbox": "sandbox.sandbox",
    "Sandbox": "sandbox.sandbox",
    "ExecResult": "sandbox.result",
    "Policy": "sandbox.policy",
    "load_policy": "sandbox.policy",
    "SandboxError": "sandbox.errors",
    "SandboxPool": "sandbox.pool",
    "shutdown": "sandbox.forkserver",
}

if TYPE_CHECKING:
    from sandbox.errors import SandboxError
    from sandbox.forkserver import shutdown
    from sandbox.policy import Policy, load_policy
    from sandbox.pool import SandboxPool
    from sandbox.result import ExecResult
    from sandbox.sandbox import AsyncSandbox, Sandbox


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sandbox' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(__all__)
