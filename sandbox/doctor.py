"""Which protection layers work on this machine, and why not (``rlm doctor``)."""

from __future__ import annotations

import platform

from sandbox import uids

__all__ = ["layer_report"]


def _details() -> dict[str, str]:
    """Facts about the machine that explain the layers (best effort, never raises)."""
    out: dict[str, str] = {}
    try:
        from sandbox.isolation import landlock

        abi = landlock.abi_version()
        out["landlock"] = f"ABI {abi}" + (" (TCP rules, signal/abstract-socket scoping)" if abi >= 6 else "")
    except Exception:
        pass
    try:
        from sandbox.isolation import seccomp

        out["seccomp"] = f"libseccomp {seccomp.libseccomp_version()}"
    except Exception:
        pass
    try:
        out["identity"] = (
            "root: a uid per sandbox, reserved machine-wide under /run/rlm-sandbox/uids"
            if uids.switchable()
            else "not root (or root of a user namespace without the sandbox uids): user namespace"
        )
    except OSError as exc:
        out["identity"] = f"cannot read this process's uid map: {exc.strerror or exc}"
    return out


def layer_report(policy_name: str = "default") -> dict[str, str]:
    """Each layer -> ``"works (...)"`` or ``"unavailable: <reason>"``, found by starting a real sandbox.

    Also ``kernel`` and ``verdict``: whether the policy *policy_name* (a shipped name or a path;
    ``default`` requires every layer) starts here, else which policy to use. Raises
    :class:`~sandbox.errors.PolicyError` for a policy that does not load.
    """
    from sandbox.layers import LAYER_TABLE
    from sandbox.policy import load_policy
    from sandbox.sandbox import Sandbox

    judged = load_policy(policy_name)
    policy = load_policy("default").override({"isolation.require": [], "audit.enabled": False})
    with Sandbox(policy) as sb:
        layers = sb.layers
    details = _details()
    report: dict[str, str] = {"kernel": f"{platform.system()} {platform.release()}"}
    for entry in LAYER_TABLE:
        state = layers.get(entry.name, "unknown")
        if state == "active":
            extra = details.get(entry.name)
            report[entry.name] = f"works: {entry.doctor}" + (f" [{extra}]" if extra else "")
        else:
            report[entry.name] = state
    missing = [layer for layer in judged.isolation.require if layers.get(layer) != "active"]
    report["verdict"] = (
        f"policy {judged.name!r} starts here (every layer it requires works)"
        if not missing
        else f"policy {judged.name!r} will refuse to start (missing: {', '.join(missing)}); use 'portable' and read its description"
    )
    return report
