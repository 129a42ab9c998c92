"""tests/warm_cli.py runs ``rlm`` as ``python -m rlm`` does: the same output, status and stdio, cold or warm."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import warm_cli

ROOT = Path(__file__).resolve().parent.parent


def _cold(argv: list[str], **kw: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "rlm", *argv], capture_output=True, cwd=ROOT, timeout=120, **kw
    )  # type: ignore[call-overload, no-any-return]


@pytest.mark.parametrize(
    ("argv", "stdin"),
    [
        (["run", "--context"], None),  # a usage error: exit 2, one line
        (
            ["exec", "-"],
            b"import sys\nprint(sys.argv[0] == '-c', 'caf\\u00e9')\nprint('\\udcff')",
        ),  # a surrogate
        (["exec", "-", "--json"], b"print(1)\nraise SystemExit(3)"),
        (["policy", "show", "nope"], None),
    ],
)
def test_warm_and_cold_give_the_same_status_and_bytes(
    tmp_path: Path, argv: list[str], stdin: bytes | None
) -> None:
    env = dict(os.environ, TMPDIR=str(tmp_path))
    cold = _cold(argv, input=stdin, env=env)
    warm = warm_cli.run(argv, input=stdin, capture_output=True, cwd=ROOT, env=env, timeout=120)
    assert (warm.returncode, _stable(warm.stdout), warm.stderr) == (
        cold.returncode,
        _stable(cold.stdout),
        cold.stderr,
    )


def _stable(out: bytes) -> object:
    """*out*, with an ExecResult's measurements (time, CPU, memory) left out."""
    if not out.startswith(b"{"):
        return out
    return {k: v for k, v in json.loads(out).items() if k not in ("duration_s", "cpu_s", "max_rss_bytes")}


def test_a_warm_process_is_real_signals_reach_it() -> None:
    proc = warm_cli.Process(
        ["exec", "-"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdin is not None
    proc.stdin.write(b"import time\ntime.sleep(60)\n")
    proc.stdin.close()
    time.sleep(1.0)
    assert proc.poll() is None
    proc.send_signal(signal.SIGINT)  # the CLI's Ctrl-C: exit 130, as cold
    assert proc.wait(60) == 130
    proc = warm_cli.Process(["exec", "-"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    proc.kill()
    assert proc.wait(60) == -signal.SIGKILL


def test_an_environment_that_would_start_another_interpreter_is_refused() -> None:
    with pytest.raises(ValueError, match="PYTHONPATH"):
        warm_cli.run(["--help"], env=dict(os.environ, PYTHONPATH="/elsewhere"))


def _catches(pid: int, sig: int) -> bool:
    """Whether process *pid* has a handler for *sig* (``SigCgt`` of its status)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


def test_the_launcher_hands_over_its_stdio_passes_signals_on_and_exits_as_the_process_did() -> None:
    argv = warm_cli.command(["exec", "-"])
    done = subprocess.run(argv, input=b"print(6 * 7)", capture_output=True, cwd=ROOT, timeout=120)
    assert (done.returncode, done.stdout, done.stderr) == (0, b"42\n", b"")
    usage = subprocess.run(warm_cli.command(["run"]), capture_output=True, cwd=ROOT, timeout=120)
    assert usage.returncode == 2 and b"--context" in usage.stderr
    launcher = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT)
    assert launcher.stdin is not None
    launcher.stdin.write(b"import time\ntime.sleep(60)\n")
    launcher.stdin.close()
    # Once the launcher passes signals on (it installs SIGUSR2's handler last): a SIGINT before,
    # while its interpreter still started (over a second on a loaded machine), ended it alone.
    deadline = time.monotonic() + 60
    while not _catches(launcher.pid, signal.SIGUSR2):
        assert time.monotonic() < deadline, "the launcher never passed signals on"
        time.sleep(0.02)
    time.sleep(0.5)  # the warm process into its cell
    launcher.send_signal(signal.SIGINT)  # passed on: the CLI's Ctrl-C, exit 130
    assert launcher.wait(60) == 130
    refused = subprocess.run(
        argv, env=dict(os.environ, PYTHONPATH="/elsewhere"), capture_output=True, cwd=ROOT
    )
    assert refused.returncode != 0 and b"PYTHONPATH differs" in refused.stderr
