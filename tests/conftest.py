"""Shared fixtures: real sandboxes with their audit log in a temporary directory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import psutil
import pytest

from sandbox import Policy, Sandbox, load_policy
from tests.viewer_schema import problems_in_file

# The tests of Ctrl-C send SIGINT to this process or to the programs it starts. A suite started
# with SIGINT ignored (`make test &` from a script: a shell without job control makes its
# background commands ignore it) passed that on: Python then installs no KeyboardInterrupt
# handler, here or in any program started from here, and seven tests failed for nothing.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# `rlm run`, `rlm batch` and `rlm mcp --model` take their --api-base from RLM_API_BASE: one left in
# a developer's shell (by `make demo`'s hint, say) would send the tests' runs there. The tests that
# are about it set it themselves.
os.environ.pop("RLM_API_BASE", None)


@pytest.fixture(scope="session", autouse=True)
def trajectories_load_in_the_reference_viewer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """After the session: every trajectory any test wrote under pytest's temp dirs passes
    tests/viewer_schema.py (what the official RLM viewer reads from each line)."""
    yield
    base = tmp_path_factory.getbasetemp()
    bad = [problem for path in sorted(base.rglob("rlm_*.jsonl")) for problem in problems_in_file(path)]
    assert not bad, "trajectories the reference viewer cannot read:\n" + "\n".join(bad[:50])


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


def run_cli(
    *args: str,
    stdin: str | None = None,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m rlm ARGS`` as a user would; output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "rlm", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=cwd,
        env=None if env is None else dict(env),
        timeout=timeout,
    )


def gone(pid: int, timeout: float = 10.0) -> bool:
    """True once process *pid* has exited (a zombie counts: its parent reaps it) within *timeout* s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.02)
    return False


def within(seconds: float, fn: Callable[[], Any]) -> Any:
    """Run *fn* in a thread; fail (instead of hanging) if it has not returned after *seconds*."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    start = time.monotonic()
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"the host was still blocked after {seconds:.0f} s"
    box["elapsed"] = time.monotonic() - start
    if "error" in box:
        raise box["error"]
    return box["value"], box["elapsed"]
