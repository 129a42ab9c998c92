"""Protection layers the child applies to itself before any model code runs.

:func:`prepare` runs in the fork server once per policy (work that can be
shared by every child: preloading the allowed modules, building filters);
:func:`apply` runs in each freshly forked child and returns each layer's
state, ``"active"``, ``"off"`` (the policy switched it off) or
``"unavailable: <reason>"``. A layer listed in ``isolation.require`` that is
not active raises :class:`LayerFailure`: the sandbox fails closed.

Stdlib only: this runs in the fork server and the child.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import signal
import sys
from typing import Any

from sandbox import limits

__all__ = ["LAYER_ORDER", "LayerFailure", "Prepared", "apply", "prepare"]

LAYER_ORDER = (
    "no_new_privs",
    "rlimits",
    "cgroup",
    "scratch_fs",
    "network",
    "landlock",
    "identity",
    "seccomp",
)

PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38

#: Modules the child needs beyond the policy's allowed imports (lazy imports of the stdlib).
BASE_PRELOAD = (
    "traceback", "linecache", "ast", "io", "codecs", "encodings.utf_8", "encodings.latin_1",
    "encodings.ascii", "encodings.utf_16", "encodings.utf_32", "encodings.cp1252", "encodings.idna",
    "encodings.unicode_escape", "encodings.raw_unicode_escape", "encodings.hex_codec",
    "encodings.base64_codec", "_strptime", "unicodedata",
)  # fmt: skip


class LayerFailure(Exception):
    """A required layer could not be applied in the child."""

    def __init__(self, layer: str, reason: str) -> None:
        super().__init__(f"{layer}: {reason}")
        self.layer = layer
        self.reason = reason


class Prepared:
    """What the fork server computed once for a policy."""

    def __init__(self, policy: dict[str, Any], preload_failures: dict[str, str]) -> None:
        self.policy = policy
        self.preload_failures = preload_failures


_libc: Any = None


def libc() -> Any:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _prctl(option: int, arg: int) -> None:
    if libc().prctl(option, arg, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def prepare(policy: dict[str, Any]) -> Prepared:
    """Fork-server side: preload every module a child of this policy may import."""
    failures: dict[str, str] = {}
    names = list(BASE_PRELOAD) + list(policy["python"]["allowed_imports"])
    if policy["python"]["guard"] == "restricted":
        names += ["RestrictedPython", "RestrictedPython.Guards"]
    for name in names:
        if name in sys.modules:
            continue
        try:
            importlib.import_module(name)
        except Exception as exc:  # a module this Python lacks is simply not importable in the child
            failures[name] = f"{type(exc).__name__}: {exc}"
    return Prepared(policy, failures)


def _process_hygiene(chan_fd: int, parent_pid: int) -> None:
    """New session, die with the fork server, no descriptor but the channel."""
    os.setsid()
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(1)
    os.closerange(3, chan_fd)
    os.closerange(chan_fd + 1, 1 << 20)


def _no_new_privs(prepared: Prepared, config: dict[str, Any]) -> None:
    _prctl(PR_SET_NO_NEW_PRIVS, 1)


def _rlimits(prepared: Prepared, config: dict[str, Any]) -> None:
    limits.apply_rlimits(prepared.policy["limits"], own_uid=config.get("uid") is not None)


def _identity(prepared: Prepared, config: dict[str, Any]) -> None:
    uid, gid = config.get("uid"), config.get("gid")
    if uid is None or gid is None:
        raise OSError("not started as root, and user namespaces are not implemented yet")
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getuid() != uid or os.geteuid() != uid:
        raise OSError("uid did not change")


def _unimplemented(prepared: Prepared, config: dict[str, Any]) -> None:
    raise OSError("not implemented in this version")


_APPLY = {
    "no_new_privs": _no_new_privs,
    "rlimits": _rlimits,
    "cgroup": _unimplemented,
    "scratch_fs": _unimplemented,
    "network": _unimplemented,
    "landlock": _unimplemented,
    "identity": _identity,
    "seccomp": _unimplemented,
}


def apply(prepared: Prepared, config: dict[str, Any], chan_fd: int) -> dict[str, str]:
    """Child side: apply every layer in order; fail closed on required ones."""
    _process_hygiene(chan_fd, config["server_pid"])
    os.chdir(config["scratch"])
    iso = prepared.policy["isolation"]
    required = set(iso["require"])
    states: dict[str, str] = {}
    for layer in LAYER_ORDER:
        if not iso[layer]:
            states[layer] = "off"
            continue
        try:
            _APPLY[layer](prepared, config)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            if layer in required:
                raise LayerFailure(layer, reason) from None
            states[layer] = f"unavailable: {reason}"
        else:
            states[layer] = "active"
    return states
