"""Which protection layers work on this machine, and why not (``rlm doctor``)."""

from __future__ import annotations

import os
import platform

__all__ = ["layer_report"]

_WHAT = {
    "no_new_privs": "no privilege gain through execve; dies with its parent",
    "rlimits": "CPU, address space, open files, file size, no core dumps",
    "cgroup": "pids + memory cgroup per sandbox",
    "scratch_fs": "scratch is a private tmpfs bounded in total size and inodes",
    "network": "empty network namespace",
    "landlock": "reads only Python + scratch, writes only scratch, no TCP, scoped signals",
    "identity": "own uid/gid, no groups, no capabilities",
    "seccomp": "system-call filter",
}


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
    out["identity"] = "root: a fresh uid per sandbox" if os.geteuid() == 0 else "not root: user namespace"
    return out


def layer_report() -> dict[str, str]:
    """Each layer -> ``"works (...)"`` or ``"unavailable: <reason>"``, found by starting a real sandbox.

    Also ``kernel`` and ``verdict``: whether ``default.toml`` (which requires
    every layer) starts here, else which policy to use.
    """
    from sandbox.policy import LAYERS, load_policy
    from sandbox.sandbox import Sandbox

    policy = load_policy("default").override({"isolation.require": [], "audit.enabled": False})
    with Sandbox(policy) as sb:
        layers = sb.layers
    details = _details()
    report: dict[str, str] = {"kernel": f"{platform.system()} {platform.release()}"}
    for layer in LAYERS:
        state = layers.get(layer, "unknown")
        if state == "active":
            extra = details.get(layer)
            report[layer] = f"works: {_WHAT[layer]}" + (f" [{extra}]" if extra else "")
        else:
            report[layer] = state
    missing = [layer for layer in load_policy("default").isolation.require if layers.get(layer) != "active"]
    report["verdict"] = (
        "policy 'default' starts here (every layer it requires works)"
        if not missing
        else f"policy 'default' will refuse to start (missing: {', '.join(missing)}); use 'portable' and read its description"
    )
    return report
