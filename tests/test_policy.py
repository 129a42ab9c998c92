"""Policies: every shipped file loads; every error names the file and the key."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sandbox import Policy, load_policy
from sandbox.errors import PolicyError
from sandbox.policy import LAYERS, shipped_policies
from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parent.parent


def test_every_file_in_policies_loads():
    files = sorted((ROOT / "policies").glob("*.toml"))
    assert {f.stem for f in files} >= {"default", "strict"}
    for f in files:
        policy = load_policy(f)
        assert policy.name == f.stem
        assert policy.schema_version == 1
        assert policy.description
        assert set(policy.isolation.require) <= set(LAYERS)


def test_shipped_names_resolve_from_any_directory(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", "from sandbox import load_policy; print(load_policy('strict').name)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "strict"
    assert set(shipped_policies()) >= {"default", "strict"}


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "p.toml"
    p.write_text(text)
    return p


HEAD = 'schema_version = 1\nname = "t"\ndescription = "d"\n'


@pytest.mark.parametrize(
    ("body", "expect"),
    [
        (HEAD + "[limits]\ncpu_secs = 3\n", "'limits.cpu_secs': unknown key"),
        (HEAD + '[limits]\ncpu_seconds = "fast"\n', "'limits.cpu_seconds'"),
        (HEAD + "[limits]\nmemory_mb = -5\n", "'limits.memory_mb'"),
        (HEAD + '[python]\nguard = "maybe"\n', "'python.guard'"),
        (HEAD + "colour = 1\n", "'colour': unknown key"),
        ('schema_version = 2\nname = "t"\ndescription = "d"\n', "unknown schema_version 2"),
        ('name = "t"\ndescription = "d"\n', "missing key 'schema_version'"),
        ("schema_version = 1\ndescription = 'd'\n", "'name': missing key"),
        (HEAD + '[isolation]\nrequire = ["teleport"]\n', "unknown layer"),
        (HEAD + '[isolation]\nseccomp = false\nrequire = ["seccomp"]\n', "switches off"),
        ("schema_version = = 1", "not valid TOML"),
    ],
)
def test_bad_policies_name_file_and_key(tmp_path, body, expect):
    path = _write(tmp_path, body)
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    assert str(path) in str(err.value)
    assert expect in str(err.value)


def test_unknown_name_and_missing_file():
    with pytest.raises(PolicyError, match="no shipped policy named 'nope'"):
        load_policy("nope")
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy("/nonexistent/p.toml")


def test_a_bare_name_that_is_a_file_here_says_how_to_load_the_file(tmp_path, monkeypatch):
    """``--policy mypolicy`` with a file ``mypolicy`` in the current directory said only "no
    shipped policy named 'mypolicy'"; a bare name is a shipped name, and the error now says how
    to name the file instead. Loading it as a path works."""
    shutil.copy(shipped_policies()["default"], tmp_path / "mypolicy")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PolicyError) as err:
        load_policy("mypolicy")
    assert "no shipped policy named 'mypolicy'" in str(err.value)
    assert "write './mypolicy'" in str(err.value), str(err.value)
    assert load_policy("./mypolicy").name == "default"
    with pytest.raises(PolicyError) as err:  # no such file: no hint
        load_policy("nope")
    assert "./nope" not in str(err.value)


def test_policies_are_frozen_and_hash_what_they_enforce():
    p = load_policy("default")
    with pytest.raises(Exception):
        p.name = "x"  # type: ignore[misc]
    q = p.override({"limits.cpu_seconds": 1})
    assert q.limits.cpu_seconds == 1 and p.limits.cpu_seconds == 10
    assert q.sha256 != p.sha256
    assert load_policy("default").sha256 == p.sha256
    with pytest.raises(PolicyError, match="unknown key"):
        p.override({"limits.nope": 1})
    with pytest.raises(PolicyError, match="limits.cpu_seconds"):
        p.override({"limits.cpu_seconds": -1})


def test_every_field_is_documented_with_a_default():
    def walk(model: type) -> None:
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, Policy.__mro__[1]):  # nested BaseModel
                walk(ann)

    walk(Policy)


def test_cli_policy_show_and_check(tmp_path):
    out = run_cli("policy", "show", "strict")
    assert out.returncode == 0, out.stderr
    assert '"guard": "restricted"' in out.stdout and '"sha256"' in out.stdout
    assert run_cli("policy", "check", str(ROOT / "policies" / "default.toml")).returncode == 0
    bad = _write(tmp_path, HEAD + "[limits]\ncpu_secs = 3\n")
    out = run_cli("policy", "check", str(bad))
    assert out.returncode == 2
    assert "cpu_secs" in out.stderr and str(bad) in out.stderr
    assert "Traceback" not in out.stderr
