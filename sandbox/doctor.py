"""Which protection layers work on this machine, and why not (``rlm doctor``)."""

from __future__ import annotations

__all__ = ["layer_report"]


def layer_report() -> dict[str, str]:
    """Each layer -> ``"works"`` or ``"unavailable: <reason>"``, found by starting a real sandbox."""
    from sandbox.policy import LAYERS, load_policy
    from sandbox.sandbox import Sandbox

    policy = load_policy("default").override({"isolation.require": [], "audit.enabled": False})
    with Sandbox(policy) as sb:
        layers = sb.layers
    return {
        layer: "works" if layers.get(layer) == "active" else layers.get(layer, "unknown") for layer in LAYERS
    }
