"""Hosts that are not clean scripts: daemons, web servers and job runners change process-wide
state (signal dispositions, standard descriptors, ...) before their first sandbox. Each
scenario runs in a host process of its own, since the state it sets is the whole process's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _host(script: str, tmp_path: Path, *args: str) -> str:
    """Run *script* in a host process of its own; what it printed, which ends with "done"
    when every assertion in it held."""
    env = dict(os.environ, TMPDIR=str(tmp_path), PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=180, env=env
    )
    assert proc.returncode == 0 and proc.stdout.endswith("done\n"), proc.stdout + proc.stderr
    return proc.stdout


# A daemon that lets the kernel reap its children: SIG_IGN survives exec, so the fork server
# inherited it, its children vanished before its wait4, and the first sandbox to close took
# the server down with every other sandbox's child.
SIGCHLD_IGNORED = """
import os, signal
signal.signal(signal.SIGCHLD, signal.SIG_IGN)
from sandbox import Sandbox, forkserver
log = os.path.join(os.environ["TMPDIR"], "audit.jsonl")
a = Sandbox("default", audit_log=log, pool=None)
assert a.execute("x = 41").ok
server = forkserver.shared().pid
with Sandbox("default", audit_log=log, pool=None) as b:
    assert b.execute("print(2)").stdout == "2\\n"
r = a.execute("print(x + 1)")
assert r.ok and r.stdout == "42\\n" and not r.state_lost, r
assert forkserver.shared().pid == server
a.close()
print("done")
"""


def test_a_host_that_ignores_sigchld_keeps_its_fork_server(tmp_path):
    _host(SIGCHLD_IGNORED, tmp_path)
