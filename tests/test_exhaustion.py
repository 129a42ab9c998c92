"""A host short of descriptors, threads or processes: starting a sandbox fails with a
SandboxError that says why, leaves nothing behind (no descriptor, uid reservation or scratch
directory held until the host exits), and works again once the resource is back."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Prepended to the scripts below: uses up every descriptor but *free*.
_FILL = """
import os

def fill(free=0):
    pads = []
    while True:
        try:
            pads.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            break
    for _ in range(free):
        os.close(pads.pop())
    return pads
"""

# With exactly `free` descriptors left, open a sandbox: each step of a start (uid lease,
# scratch directory, channel, the pidfd the fork server sends, the audit log) runs out in turn.
OUT_OF_FDS = _FILL + """
import os, resource, sys
from sandbox import Sandbox, SandboxError, forkserver

def fds():
    return len(os.listdir("/proc/self/fd"))

def scratch():
    return sorted(d for d in os.listdir(os.environ["TMPDIR"]) if d.startswith("sandbox-"))

log = os.path.join(os.environ["TMPDIR"], "audit.jsonl")
with Sandbox("default", audit_log=log, pool=None) as sb:  # the fork server is up
    assert sb.execute("1").ok
before = fds()
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
seen = []
for free in range(0, 9):
    pads = fill(free)
    try:
        sb = Sandbox("default", audit_log=log, pool=None)
        outcome = "opened"
    except SandboxError as exc:
        outcome = f"{type(exc).__name__}: {exc}"
        sb = None
    finally:
        for fd in pads:
            os.close(fd)
    if sb is not None:
        assert sb.execute("x = 1").ok
        sb.close()
    assert fds() == before, (free, outcome, fds(), before)
    assert scratch() == [], (free, outcome, scratch())
    seen.append(outcome)
    print(free, outcome, flush=True)
server = forkserver.shared(False)
kids = open(f"/proc/{server.pid}/task/{server.pid}/children").read().split()
assert kids == [], kids  # the child whose pidfd was dropped was stopped and reaped
assert seen[-1] == "opened" and any("out of file descriptors" in s for s in seen), seen
with Sandbox("default", audit_log=log, pool=None) as sb:
    assert sb.execute("y = 2").ok
print("done")
"""


def _host(script: str, tmp_path: Path, *args: str) -> str:
    """Run *script* in a host process of its own (its limits are its own); what it printed,
    which ends with "done" when every assertion in it held."""
    env = dict(os.environ, TMPDIR=str(tmp_path), PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=180, env=env
    )
    assert proc.returncode == 0 and proc.stdout.endswith("done\n"), proc.stdout + proc.stderr
    return proc.stdout


def test_out_of_descriptors_each_start_failure_is_a_sandbox_error_and_leaks_nothing(tmp_path):
    _host(OUT_OF_FDS, tmp_path)


PIDS = Path("/sys/fs/cgroup/pids")

# In a pids cgroup allowing few processes and threads: no RuntimeError("can't start new thread")
# from a helper thread (the leftover sweep, the pool's refill); SandboxError or a sandbox.
FEW_PIDS = """
import os, sys
from sandbox import Sandbox, SandboxError
cg = sys.argv[1]
for limit in ("1", "2", "3", "4"):
    with open(os.path.join(cg, "pids.max"), "w") as f:
        f.write(limit)
    for attempt in range(2):
        try:
            with Sandbox("default", audit_log=os.path.join(os.environ["TMPDIR"], "a.jsonl")) as sb:
                sb.execute("1")
            print(limit, "opened", flush=True)
        except SandboxError as exc:
            print(limit, type(exc).__name__, flush=True)
with open(os.path.join(cg, "pids.max"), "w") as f:
    f.write("max")
with Sandbox("default", audit_log=os.path.join(os.environ["TMPDIR"], "a.jsonl")) as sb:
    assert sb.execute("x = 1").ok
print("done")
"""


@pytest.mark.skipif(
    os.geteuid() != 0 or not (PIDS / "cgroup.procs").exists(), reason="needs root and the cgroup v1 pids controller"
)
def test_a_host_out_of_processes_gets_sandbox_errors_not_runtime_errors(tmp_path):
    cg = PIDS / f"rlm-test-{uuid.uuid4().hex[:8]}"
    cg.mkdir()
    try:
        script = f"import os, sys\nopen({str(cg / 'cgroup.procs')!r}, 'w').write(str(os.getpid()))\n" + FEW_PIDS
        assert "SandboxStartError" in _host(script, tmp_path, str(cg))  # the low limits did bite
    finally:
        for pid in (cg / "cgroup.procs").read_text().split():  # a fork server left behind
            with open(PIDS / "cgroup.procs", "w") as f:
                f.write(pid)
        cg.rmdir()


# The host has no descriptor free when the child sends a large value through a pipe: the kernel
# drops the pipe. That value is lost (VariableError); the child and its variables are not.
VALUE_WITHOUT_FDS = _FILL + """
import os, resource, sys
from sandbox import Sandbox
from sandbox.errors import VariableError
with Sandbox("default", audit_log=os.path.join(os.environ["TMPDIR"], "a.jsonl"), pool=None) as sb:
    sb.execute("big = 'a' * 3_000_000\\nsmall = 5")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    pads = fill()
    try:
        sb.get_variable("big")
        print("got it?")
    except VariableError as exc:
        print("VariableError:", exc)
    finally:
        for fd in pads:
            os.close(fd)
    assert sb.get_variable("small") == 5 and len(sb.get_variable("big")) == 3_000_000
    r = sb.execute("print(small)")
    assert r.ok and not r.state_lost and r.stdout == "5\\n", r
print("done")
"""


def test_a_value_whose_pipe_the_kernel_dropped_is_lost_but_not_the_child(tmp_path):
    out = _host(VALUE_WITHOUT_FDS, tmp_path)
    assert "VariableError: cannot get the value" in out and "out of file descriptors" in out


# The host has no descriptor free for the pipe or memfd a large value travels in, to the child:
# a set_variable, or the result of a host function. Nothing has been sent: the value is refused
# (VariableError; the code's call raises HostFunctionError), the child and its variables stay.
SEND_WITHOUT_FDS = _FILL + """
import os, resource, sys
from sandbox import Sandbox, SandboxError
from sandbox.errors import VariableError
big = {"big": lambda: "\\xe9" * 2_000_000}
with Sandbox("default", audit_log=os.path.join(os.environ["TMPDIR"], "a.jsonl"), pool=None, host_functions=big) as sb:
    sb.execute("small = 5")
    before = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    for value in (b"b" * 3_000_000, "\\xe9" * 2_000_000, list(range(300_000))):  # a pipe, then memfds
        pads = fill()
        try:
            sb.set_variable("v", value)
            print("set it?")
        except VariableError as exc:
            print("VariableError:", exc)
        except SandboxError as exc:
            print("other SandboxError:", type(exc).__name__, exc)
        finally:
            for fd in pads:
                os.close(fd)
    pads = fill()
    try:
        r = sb.execute("try:\\n    big()\\nexcept HostFunctionError as e:\\n    print(e)")
    finally:
        for fd in pads:
            os.close(fd)
    print("host function:", r.ok, r.stdout.strip())
    assert r.ok and "big()" in r.stdout, r
    assert len(os.listdir("/proc/self/fd")) == before
    r = sb.execute("print(small, 'v' in dir())")
    assert r.ok and not r.state_lost and r.stdout == "5 False\\n", r
    sb.set_variable("v", b"b" * 3_000_000)
    assert sb.get_variable("v") == b"b" * 3_000_000
print("done")
"""


def test_a_value_the_host_has_no_descriptor_to_send_is_refused_and_the_child_lives_on(tmp_path):
    """pipe2 or memfd_create failing with EMFILE in set_variable raised a raw OSError from the
    public API (and, not being a SandboxError, stopped the child: the next call lost the
    variables); in a host function's reply it escaped from execute."""
    out = _host(SEND_WITHOUT_FDS, tmp_path)
    assert out.count("VariableError: cannot set 'v'") == 3 and "out of file descriptors" in out, out
