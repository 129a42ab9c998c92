"""The dependency rules: sandbox never imports rlm or litellm; the child only stdlib and msgpack."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from sandbox import Sandbox
from tests.conftest import policy_with

ROOT = Path(__file__).resolve().parent.parent


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_sandbox_never_imports_rlm_or_litellm():
    for path in (ROOT / "sandbox").rglob("*.py"):
        bad = _imports(path) & {"rlm", "litellm", "openai"}
        assert not bad, f"{path} imports {bad}"


def test_only_one_module_imports_litellm():
    importers = [p for p in (ROOT / "rlm").rglob("*.py") if "litellm" in _imports(p)]
    assert len(importers) <= 1, importers


def test_only_the_mcp_server_module_imports_mcp():
    importers = {p.name for p in (ROOT / "rlm").rglob("*.py") if _imports(p) & {"mcp", "mcp_types"}}
    assert importers <= {"mcp_server.py"}, importers
    probe = "import sys, rlm, rlm.cli; rlm.cli.build_parser(); print(sorted(m for m in sys.modules if m.startswith('mcp')))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


def _child_modules(policy) -> list[str]:
    with Sandbox(policy, audit_log=None) as box:
        r = box.execute("import sys\nmods = sorted({m.split('.')[0] for m in sys.modules})")
        assert r.ok, r
        return box.get_variable("mods")


#: Loaded by msgpack's compiled extension, not imported by anyone.
CYTHON = {"cython_runtime", "_cython_3_3_0", "_cython_3_2_0", "_cython_3_1_0", "_cython_3_0_0"}


def _foreign(mods: list[str], allowed: set[str]) -> set[str]:
    # sysconfig's generated data module is part of the installed stdlib but
    # missing from sys.stdlib_module_names.
    return {m for m in mods if m not in allowed and not m.startswith("_sysconfigdata_")}


def test_the_child_loads_only_stdlib_and_msgpack():
    allowed = set(sys.stdlib_module_names) | {"msgpack", "sandbox", "__main__"} | CYTHON
    mods = _child_modules(policy_with({"python.guard": "none", "audit.enabled": False}))
    assert _foreign(mods, allowed) == set()
    assert "pydantic" not in mods and "rlm" not in mods


def test_restricted_mode_adds_only_restrictedpython():
    allowed = set(sys.stdlib_module_names) | {"msgpack", "sandbox", "__main__", "RestrictedPython"} | CYTHON
    mods = _child_modules(policy_with({"python.guard": "none", "audit.enabled": False}, base="strict"))
    assert _foreign(mods, allowed) == set()


def test_importing_the_child_modules_pulls_in_no_host_dependencies():
    from sandbox.forkserver import _search_path

    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c",
         f"import sys; sys.path[1:1] = {_search_path()!r}; import sandbox.forkserver, sandbox.child, sandbox.isolation\n"
         "print(sorted({m.split('.')[0] for m in sys.modules} - set(sys.stdlib_module_names) - {'__main__'}))"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    extra = set(out.stdout.strip().strip("[]").replace("'", "").split(", ")) - CYTHON
    assert {m for m in extra if not m.startswith("_sysconfigdata_")} == {"msgpack", "sandbox"}


def test_a_restricted_sandbox_does_not_leak_restrictedpython_into_others():
    with Sandbox(policy_with({"audit.enabled": False}, base="strict")) as strict:
        assert strict.execute("x = 1").ok
        mods = _child_modules(policy_with({"python.guard": "none", "audit.enabled": False}))
    assert "RestrictedPython" not in mods
