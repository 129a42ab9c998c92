"""Every attack of :mod:`attacks`, under the default policy and with ``python.guard = "none"``."""

from __future__ import annotations

from typing import Any

import pytest

from sandbox import Sandbox
from tests.security.attacks import ATTACKS, Attack
from tests.security.conftest import Env, assert_contained, everything, policy_for

#: What the allowlist guard raises when it refuses code before the kernel is involved.
GUARD_REFUSALS = {
    "ImportError",
    "ModuleNotFoundError",
    "GuardError",
    "AttributeError",
    "PermissionError",
    "NameError",
}

#: Small limits so resource attacks end quickly. The wall limit of the CPU attacks is only a
#: backstop: their child reaches 1 s of CPU after 1 s on an idle core, but after 3 s and more when
#: it gets a third of a core (two busy processes beside two test workers on two cores), and a
#: 3 s wall limit then ended the loop first (limit="wall").
LIMITS: dict[str, dict[str, Any]] = {
    "cpu": {"limits.cpu_seconds": 1, "limits.wall_seconds": 60},
    "wall": {"limits.cpu_seconds": 1, "limits.wall_seconds": 1},
    "memory": {"limits.memory_mb": 256},
    "disk": {"limits.disk_mb": 16},
    "recursion": {"limits.cpu_seconds": 3, "limits.memory_mb": 512},
    "processes": {"limits.cpu_seconds": 3},
}


def _check(attack: Attack, mode: str, r: Any) -> None:
    kind = attack.expect
    if kind == "contained":
        return
    assert not r.ok, f"{attack.id} succeeded: {r}"
    if kind.startswith("limit:"):
        want = kind.split(":", 1)[1]
        if mode == "guard_none" or r.limit is not None:
            assert r.limit == want, (
                f"{attack.id}: expected limit {want!r}, got {r.limit!r}: {everything(r)[:400]}"
            )
        else:
            assert r.error_type in GUARD_REFUSALS, r
    elif kind == "crash_or_error":
        assert (
            r.crashed
            or r.limit is not None
            or r.error_type in {"RecursionError", "MemoryError", "SyntaxError"} | GUARD_REFUSALS
        ), r
    elif kind == "processes_or_denied":
        assert r.limit == "processes" or r.error_type in GUARD_REFUSALS, r


@pytest.mark.parametrize("attack", ATTACKS, ids=[a.id for a in ATTACKS])
def test_attack_is_contained(attack: Attack, mode: str, env: Env) -> None:
    policy = policy_for(mode, **LIMITS.get(attack.category, {}))
    with Sandbox(policy) as sb:
        assert set(sb.layers.values()) == {"active"}, sb.layers
        r = sb.execute(env.fill(attack.code))
        _check(attack, mode, r)
        assert_contained(env, r, sb)


def test_attack_table_covers_every_category() -> None:
    categories = {a.category for a in ATTACKS}
    wanted = {
        "imports", "module_hops", "subclasses", "frames", "function_internals", "format_strings",
        "indirect_getattr", "native", "gc", "audit_bypass", "debuggers", "loaders", "cpu", "wall",
        "memory", "recursion", "processes", "secrets", "writes", "network", "signals", "disk",
    }  # fmt: skip
    assert wanted <= categories
    assert len(ATTACKS) >= 100
