"""Shared fixtures: real sandboxes with their audit log in a temporary directory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox import Policy, Sandbox, load_policy


@pytest.fixture
def audit_path(tmp_path: Path) -> Path:
    return tmp_path / "audit.jsonl"


@pytest.fixture
def default_policy() -> Policy:
    return load_policy("default")


@pytest.fixture
def sb(audit_path: Path) -> Iterator[Sandbox]:
    with Sandbox("default", audit_log=audit_path) as box:
        yield box


def policy_with(changes: dict[str, object], base: str = "default") -> Policy:
    """The shipped policy *base* with dotted keys overridden."""
    return load_policy(base).override(changes)
