"""Errors raised by the ``sandbox`` package (the host side).

An exception raised by the *sandboxed code* is never one of these: it comes
back as an :class:`~sandbox.result.ExecResult` with ``ok=False``. These are
errors of the host: a bad policy, a child that cannot start, a child that
broke the wire protocol, misuse of the API.

The tree::

    SandboxError                      root of everything this package raises
    ├── PolicyError                   policy file/name unknown, bad key, bad type, bad schema_version
    ├── SandboxStartError             the fork server or the child could not be started
    │   └── LayerUnavailableError     a layer the policy requires cannot be applied here
    ├── ProtocolError                 a child sent garbage, an oversized or out-of-turn frame, or hung up
    │   └── ChildTimeoutError         a child did not read or answer within its deadline (it was killed)
    ├── VariableError                 set_variable/get_variable: not plain data, unknown name, too large
    ├── SandboxClosedError            the sandbox was used after close()
    └── AuditError                    the audit log cannot be written or read
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sandbox.result import ExecResult

__all__ = [
    "AuditError",
    "ChildTimeoutError",
    "LayerUnavailableError",
    "PolicyError",
    "ProtocolError",
    "SandboxClosedError",
    "SandboxError",
    "SandboxStartError",
    "VariableError",
]


class SandboxError(Exception):
    """Root of every error raised by the sandbox package."""


class PolicyError(SandboxError):
    """A policy could not be found, parsed or validated.

    The message names the file and, where there is one, the offending key.
    """


class SandboxStartError(SandboxError):
    """The fork server or a sandbox child could not be started."""


class LayerUnavailableError(SandboxStartError):
    """A protection layer listed in ``isolation.require`` cannot be applied.

    ``layer`` is the layer's name, ``reason`` why it is unavailable here.
    """

    def __init__(self, layer: str, reason: str) -> None:
        super().__init__(f"required isolation layer {layer!r} is unavailable: {reason}")
        self.layer = layer
        self.reason = reason


class ProtocolError(SandboxError):
    """A sandbox child violated the wire protocol; that child has been killed."""


class ChildTimeoutError(ProtocolError):
    """A sandbox child did not read a request or answer it within its deadline
    (``set_variable``/``get_variable``'s timeout); that child has been killed."""


class VariableError(SandboxError):
    """A value cannot cross into or out of the sandbox, or the name is unknown."""


class SandboxClosedError(SandboxError):
    """The sandbox was used after ``close()``."""


class AuditError(SandboxError):
    """The audit log cannot be written or read.

    Raised by ``execute`` when the line of a cell that ran cannot be written
    (a full disk, a lock held too long): the cell did run, and ``result``
    holds its :class:`~sandbox.result.ExecResult` (None elsewhere), so a
    caller does not run it again to learn what it did.
    """

    result: ExecResult | None = None
