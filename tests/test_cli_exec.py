"""`rlm exec`: JSON on stdout, exit codes, variables from files, nothing left running."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parent.parent


def test_json_result_and_exit_zero(tmp_path):
    code = tmp_path / "ok.py"
    code.write_text("print(len(context))\n")
    ctx = tmp_path / "ctx.txt"
    ctx.write_text("x" * 12345)
    log = tmp_path / "audit.jsonl"
    out = run_cli("exec", "--json", "--audit-log", str(log), "--set", f"context=@{ctx}", str(code))
    assert out.returncode == 0, out.stderr
    payload = json.loads(out.stdout)  # stdout is exactly one JSON object
    assert payload["ok"] is True and payload["stdout"] == "12345\n"
    assert payload["policy_name"] == "default" and payload["layers"]["rlimits"] == "active"
    for key in (
        "error_type",
        "limit",
        "crashed",
        "state_lost",
        "output_truncated",
        "duration_s",
        "cpu_s",
        "max_rss_bytes",
        "policy_sha256",
    ):
        assert key in payload
    assert payload["audit_log"] == str(log) and log.read_text().count("\n") == 1


@pytest.mark.parametrize(
    ("source", "expect"),
    [("1/0", {"error_type": "ZeroDivisionError"}), ("import os", {"error_type": "ImportError"})],
)
def test_failures_exit_one_with_json(tmp_path, source, expect):
    out = run_cli("exec", "--json", "--audit-log", str(tmp_path / "a.jsonl"), "-", stdin=source)
    assert out.returncode == 1
    payload = json.loads(out.stdout)
    assert payload["ok"] is False
    for k, v in expect.items():
        assert payload[k] == v


def test_limit_exits_one(tmp_path):
    policy = tmp_path / "fast.toml"
    policy.write_text('schema_version = 1\nname = "fast"\ndescription = "d"\n[limits]\nwall_seconds = 0.5\n')
    out = run_cli(
        "exec",
        "--json",
        "--policy",
        str(policy),
        "--audit-log",
        str(tmp_path / "a.jsonl"),
        "-",
        stdin="import time\ntime.sleep(30)",
    )
    assert out.returncode == 1
    assert json.loads(out.stdout)["limit"] == "wall"


def test_plain_output_mode(tmp_path):
    out = run_cli("exec", "--audit-log", str(tmp_path / "a.jsonl"), "-", stdin="print('hello')\n1/0")
    assert out.returncode == 1
    assert out.stdout == "hello\n"
    assert "ZeroDivisionError" in out.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["exec", "--policy", "nope", "-"],
        ["exec", "/does/not/exist.py"],
        ["exec", "--set", "bad", "-"],
        ["exec", "--set", "x=@/does/not/exist", "-"],
        ["exec"],
        ["frobnicate"],
    ],
)
def test_usage_and_policy_errors_exit_two_without_traceback(args):
    out = run_cli(*args, stdin="print(1)")
    assert out.returncode == 2
    assert out.stdout == ""
    assert "Traceback" not in out.stderr and out.stderr.strip()


def test_bad_policy_file_exits_two_naming_the_key(tmp_path):
    policy = tmp_path / "bad.toml"
    policy.write_text('schema_version = 1\nname = "bad"\ndescription = "d"\n[limits]\ncpu = 3\n')
    out = run_cli("exec", "--policy", str(policy), "-", stdin="print(1)")
    assert out.returncode == 2 and "limits.cpu" in out.stderr and str(policy) in out.stderr


def test_errors_name_what_is_wrong_in_one_line(tmp_path):
    bad = tmp_path / "latin1.py"
    bad.write_bytes(b"print('caf\xe9')\n")
    out = run_cli("exec", str(bad))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert str(bad) in out.stderr and "not UTF-8" in out.stderr
    for user_path in (["--policy", "~no-such-user-here/p.toml"], ["--audit-log", "~no-such-user-here/a.jsonl"]):
        out = run_cli("exec", *user_path, "-", stdin="print(1)")
        assert out.returncode == 2 and "Traceback" not in out.stderr and "cannot expand" in out.stderr, out
    # an audit log asked for where the policy writes none: refused, not silently dropped
    policy = tmp_path / "quiet.toml"
    policy.write_text((ROOT / "policies" / "default.toml").read_text().replace("enabled = true", "enabled = false"))
    log = tmp_path / "a.jsonl"
    out = run_cli("exec", "--policy", str(policy), "--audit-log", str(log), "-", stdin="print(1)")
    assert out.returncode == 2 and "audit.enabled = false" in out.stderr and not log.exists()


def _descendants(pid: int) -> set[int]:
    """The processes *pid* started (its fork server and that server's sandbox children)."""
    try:
        return {c.pid for c in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.add(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def test_no_process_outlives_the_command(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlm", "exec", "--audit-log", str(tmp_path / "a.jsonl"), "-"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    seen_during = set()
    proc.stdin.write("import time\ntime.sleep(0.5)\nprint('x')")
    proc.stdin.close()
    deadline = time.monotonic() + 30
    while proc.poll() is None and time.monotonic() < deadline:
        seen_during |= _descendants(proc.pid)
        time.sleep(0.05)
    assert proc.wait(30) == 0
    assert seen_during, "the command's fork server and sandbox were never seen running"
    # Only this command's own processes count: other hosts on the machine may run fork servers too.
    assert not _alive(seen_during), "a process of the command outlived it"


def test_exec_and_help_do_not_import_litellm(tmp_path):
    probe = (
        "import sys, io, contextlib\n"
        "from rlm.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n        main(['--help'])\n    except SystemExit:\n        pass\n"
        f"    main(['exec', '--audit-log', {str(tmp_path / 'a.jsonl')!r}, {str(tmp_path / 'c.py')!r}])\n"
        "print('litellm' in sys.modules, 'openai' in sys.modules)\n"
    )
    (tmp_path / "c.py").write_text("x = 1\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False False"


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_a_file_too_large_for_one_request_exits_two_in_one_line(tmp_path, json_flag):
    policy = tmp_path / "small.toml"
    policy.write_text(
        (ROOT / "policies" / "default.toml").read_text().replace("max_message_mb = 256", "max_message_mb = 1")
    )
    big = tmp_path / "big.py"
    big.write_text("#" + "x" * 3_000_000 + "\nprint(1)\n")
    out = run_cli("exec", "--policy", str(policy), *json_flag, str(big))
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and str(big) in lines[0] and "a request may carry" in lines[0], lines
    assert out.stdout == ""
