"""The examples a new user runs first: an answer from a model, and one line (not a traceback)
with a non-zero status when the model cannot be reached."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.llm_server import LLMServer

ROOT = Path(__file__).resolve().parent.parent
CLOSED = "http://127.0.0.1:9/v1"  # the discard port: nothing listens there


def _example(name: str, tmp_path: Path, api_base: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    env.update(
        RLM_MODEL="openai/m", RLM_API_BASE=api_base, OPENAI_API_KEY="k-test", HOME=str(tmp_path),
        XDG_STATE_HOME=str(tmp_path / "state"), PYTHONPATH=str(ROOT),
    )  # fmt: skip
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120,
    )  # fmt: skip


def test_simple_qa_answers_through_the_configured_server(tmp_path: Path):
    code = "total = 75000 + 85000 + 92000\nFINAL(str(total))"
    with LLMServer(f"```repl\n{code}\n```") as srv:
        done = _example("simple_qa.py", tmp_path, srv.base_url)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("answer: 252000  (expected $252,000)"), done.stdout


@pytest.mark.parametrize("name", ["simple_qa.py", "long_document.py", "rlm_demo.py"])
def test_an_example_whose_model_cannot_be_reached_says_so_in_one_line_and_fails(tmp_path: Path, name: str):
    done = _example(name, tmp_path, CLOSED)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    said = (done.stderr + done.stdout).strip().splitlines()
    assert any(CLOSED in line and "connection refused" in line for line in said), said
