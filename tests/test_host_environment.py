"""Hosts that are not clean scripts: daemons, web servers and job runners change process-wide
state (signal dispositions, standard descriptors, ...) before their first sandbox. Each
scenario runs in a host process of its own, since the state it sets is the whole process's."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sandbox import uids

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


# A daemon with stdin, stdout and stderr closed: the fork server's control socket could get
# one of 0-2, and the server's own /dev/null on 0-2 replaced it (every start then failed with
# "the fork server died twice in a row", for good: each new server took the same numbers).
# The server starts with 0-2 free when other threads hold the descriptors a start makes first.
STDIO_CLOSED = """
import os, sys, traceback
out, err = os.dup(1), os.dup(2)
for fd in (0, 1, 2):
    os.close(fd)
try:
    from sandbox import Sandbox, forkserver
    server = forkserver.shared()
    assert server.sock.fileno() <= 2, server.sock.fileno()  # the scenario: the host's end is on one of them
    log = os.path.join(os.environ["TMPDIR"], "audit.jsonl")
    with Sandbox("default", audit_log=log, pool=None) as sb:
        r = sb.execute("print(2)")
        assert r.ok and r.stdout == "2\\n", r
    assert forkserver.shared() is server, "the fork server was replaced"
    os.write(out, b"done\\n")
except BaseException:
    os.write(err, traceback.format_exc().encode())
    sys.exit(1)
"""


def test_a_host_with_stdin_stdout_stderr_closed(tmp_path):
    _host(STDIO_CLOSED, tmp_path)


# TMPDIR whose path is not UTF-8 (bytes the host decodes with surrogateescape): the spawn
# request could not carry the scratch path, and msgpack's UnicodeEncodeError escaped Sandbox().
TMPDIR_NOT_UTF8 = """
import os
tmp = os.path.join(os.environ["TMPDIR"], "bad\\udcff")
os.mkdir(tmp)
os.environ["TMPDIR"] = tmp
from sandbox import Sandbox, SandboxError
from sandbox.errors import SandboxStartError
log = os.path.join(os.path.dirname(tmp), "audit.jsonl")
try:
    Sandbox("default", audit_log=log, pool=None)
except SandboxStartError as exc:
    assert "TMPDIR" in str(exc), exc
else:
    raise AssertionError("a sandbox started")
assert os.listdir(tmp) == [], os.listdir(tmp)  # its scratch directory was removed
print("done")
"""


def test_a_tmpdir_that_is_not_utf8_is_a_sandbox_error(tmp_path):
    _host(TMPDIR_NOT_UTF8, tmp_path)


# A job runner's hard limits (ulimit -t, -f, -n; systemd's LimitCPU=) below the policy's: the
# child, which cannot raise a hard limit, died of setrlimit's ValueError and every start failed
# with "the sandbox child did not start: it exited". The host's limit holds for the child instead.
HARD_LIMITS_BELOW_POLICY = """
import os, resource
resource.setrlimit(resource.RLIMIT_CPU, (300, 300))  # the policy's lifetime budget is 600 s
resource.setrlimit(resource.RLIMIT_FSIZE, (20 << 20, 20 << 20))  # max_file_mb is 64
resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))  # max_open_files is 64
from sandbox import Sandbox
log = os.path.join(os.environ["TMPDIR"], "audit.jsonl")
with Sandbox("default", audit_log=log, pool=None) as sb:
    r = sb.execute("print(2)")
    assert r.ok and r.stdout == "2\\n", r
    limits = open(f"/proc/{sb.pid}/limits").read()
    for name, value in (("cpu time", "300"), ("file size", str(20 << 20)), ("open files", "48")):
        line = next(line for line in limits.splitlines() if line.startswith("Max " + name))
        assert line.split()[-3:-1] == [value, value], line
    r = sb.execute("open('big', 'wb').write(b'x' * (30 << 20))")
    assert not r.ok and r.limit == "disk", r
print("done")
"""


def test_host_hard_limits_below_the_policy_hold_for_the_child(tmp_path):
    _host(HARD_LIMITS_BELOW_POLICY, tmp_path)


# SIGPIPE at its default (Python embedded in a C program that did not ignore it, a CLI that
# restored it to behave in a shell pipe): a write to a child that died (killed between calls,
# or in the middle of a streamed value) killed the whole host with SIGPIPE, exit status 141.
SIGPIPE_DEFAULT = """
import os, signal, threading, time
signal.signal(signal.SIGPIPE, signal.SIG_DFL)
from sandbox import Sandbox, SandboxError
log = os.path.join(os.environ["TMPDIR"], "audit.jsonl")
for then in ("execute", "close"):
    sb = Sandbox("default", audit_log=log, pool=None)
    assert sb.execute("x = 1").ok
    os.kill(sb.pid, signal.SIGKILL)
    time.sleep(0.2)
    if then == "execute":
        r = sb.execute("print(x)")
        assert not r.ok and r.crashed, r
        assert sb.execute("print(3)").stdout == "3\\n"
    sb.close()
print("between calls", flush=True)
with Sandbox("default", audit_log=log, pool=None) as sb:
    pid = sb.pid
    os.kill(pid, signal.SIGSTOP)  # it stops reading: the host waits to write the rest of the value
    seen = []
    def put():
        try:
            sb.set_variable("y", "a" * 20_000_000)
            seen.append("set")
        except SandboxError as exc:
            seen.append(type(exc).__name__)
    t = threading.Thread(target=put)
    t.start()
    time.sleep(0.5)
    os.kill(pid, signal.SIGKILL)
    t.join()
    assert seen and seen != ["set"], seen
    assert sb.execute("print(4)").stdout == "4\\n"
print("done")
"""


def test_a_host_with_sigpipe_at_its_default_survives_a_dead_child(tmp_path):
    _host(SIGPIPE_DEFAULT, tmp_path)


# Root of a user namespace that maps only itself (a rootless container; `unshare --user
# --map-root-user` makes one): it cannot switch a child to a sandbox uid, and every start
# failed with "[Errno 22] Invalid argument" (the scratch directory's chown to an unmapped uid).
# Such a host is treated as any user that is not root: each child gets a user namespace of
# its own with every capability dropped, and the identity layer holds that way.
ROOTLESS = """
from sandbox import Sandbox, load_policy, uids
assert not uids.switchable()
code = "import os; from sandbox.isolation import namespaces; print(os.getuid(), namespaces.capabilities())"
for name in ("default", "portable"):
    policy = load_policy(name).override({"python.guard": "none"})
    with Sandbox(policy, pool=None, audit_log=os.path.join(os.environ["TMPDIR"], "audit.jsonl")) as sb:
        r = sb.execute(code)
        assert r.ok and r.stdout == "0 (0, 0, 0)\\n", r
        assert r.layers["identity"] == "active", r.layers
print("done")
"""


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and util-linux's unshare"
)
def test_root_of_a_user_namespace_without_the_sandbox_uids(tmp_path):
    env = dict(os.environ, TMPDIR=str(tmp_path), PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        ["unshare", "--user", "--map-root-user", sys.executable, "-c", "import os\n" + ROOTLESS],
        capture_output=True, text=True, timeout=180, env=env,
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.endswith("done\n"), proc.stdout + proc.stderr


def test_switchable_needs_every_sandbox_uid_and_gid_mapped(tmp_path):
    def maps(uid_map: str, gid_map: str) -> bool:
        (tmp_path / "uid_map").write_text(uid_map)
        (tmp_path / "gid_map").write_text(gid_map)
        return uids.switchable(str(tmp_path / "uid_map"))

    if os.geteuid() != 0:
        assert not maps("0 0 4294967295\n", "0 0 4294967295\n")  # not root: never
        return
    whole = "         0          0 4294967295\n"
    assert maps(whole, whole)
    assert not maps("0 0 1\n", whole)  # a rootless container's
    assert not maps(whole, "0 0 1\n")
    part = f"0 0 1\n{uids.UID_BASE} 100000 {uids.UID_SPAN - 1}\n"  # one uid short
    assert not maps(part, whole)
    assert maps(f"0 0 1\n{uids.UID_BASE - 5} 100000 {uids.UID_SPAN + 5}\n", whole)
    assert not maps("garbage\n", whole)
    # Several extents that meet cover the range as one does (a container runtime may write
    # them so); a gap of one id between them does not.
    split = "0 0 1250000\n1250000 1250000 4000000000\n"
    assert maps(split, split)
    assert maps(f"{uids.UID_BASE + 10} 9 {uids.UID_SPAN}\n0 0 {uids.UID_BASE + 10}\n", whole)
    assert not maps(f"0 0 {uids.UID_BASE + 10}\n{uids.UID_BASE + 11} 9 {uids.UID_SPAN}\n", whole)
    # No map at all: the machine's own namespace (no user namespaces in the kernel).
    (tmp_path / "none").mkdir()
    assert uids.switchable(str(tmp_path / "none" / "uid_map"))
    # A map that is there but cannot be read: an error, never a guess either way.
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "uid_map").mkdir()
    with pytest.raises(OSError):
        uids.switchable(str(tmp_path / "dir" / "uid_map"))


# A root host that could not read its uid map (out of descriptors) once took that as "rootless"
# and reserved no uid, while its fork server, which had read the map when it started, forked
# the child as root: under a policy that does not require identity the child ran as uid 0 with
# every capability (SCHED_FIFO granted). Now the start fails, and a child of root that is given
# no uid drops every capability whatever its policy requires.
UID_MAP_UNREADABLE = """
import builtins, errno, os
import sandbox.sandbox as S
from sandbox import Sandbox, load_policy
from sandbox.errors import SandboxStartError
policy = load_policy("portable").override({"python.guard": "none"})
log = os.path.join(os.environ["TMPDIR"], "audit.jsonl")
code = "import os; from sandbox.isolation import namespaces; print(os.getresuid()[0], namespaces.capabilities())"
with Sandbox(policy, pool=None, audit_log=log) as sb:  # the fork server is up: it read the map
    r = sb.execute(code)
    assert r.ok and not r.stdout.startswith("0 ") and r.stdout.endswith("(0, 0, 0)\\n"), r
real_open = builtins.open
def no_map(path, *args, **kwargs):
    if str(path).endswith("_map"):
        raise OSError(errno.EMFILE, "Too many open files")
    return real_open(path, *args, **kwargs)
builtins.open = no_map
try:
    Sandbox(policy, pool=None, audit_log=log)
except SandboxStartError as exc:
    assert "Too many open files" in str(exc), exc
else:
    raise AssertionError("a start that cannot read the uid map must fail")
finally:
    builtins.open = real_open
S._reserve_identity = lambda: None  # whatever the reason, a child of root given no uid ...
with Sandbox(policy, pool=None, audit_log=log) as sb:
    r = sb.execute(code)
    assert r.ok and r.stdout == "0 (0, 0, 0)\\n", r  # ... keeps no capability
    assert r.layers["identity"].startswith("unavailable"), r.layers
print("done")
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs a root host")
def test_a_root_host_that_cannot_read_its_uid_map_starts_no_child_as_root(tmp_path):
    _host(UID_MAP_UNREADABLE, tmp_path)
