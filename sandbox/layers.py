"""The protection layers, in the order the child applies them.

One list for the policy schema (host side) and the child's isolation code;
stdlib-free, so both may import it.
"""

from __future__ import annotations

__all__ = ["LAYERS"]

LAYERS: tuple[str, ...] = (
    "no_new_privs",
    "rlimits",
    "cgroup",
    "scratch_fs",
    "network",
    "landlock",
    "identity",
    "seccomp",
)
