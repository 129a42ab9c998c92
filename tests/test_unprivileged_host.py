"""The sandbox started by an unprivileged host: the user-namespace path most users take.

The test suite runs as root here, so this test runs a host program as
``nobody`` (``setpriv``) with a world-readable Python 3.11 (Debian's own)
and the project's dependencies on its path. Without a writable cgroup the
default policy must refuse to start, naming the layer; the portable policy
must start with every other layer active and contain the attacks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import msgpack
import pytest

ROOT = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = Path("/usr/bin/python3.11")
SITE = Path(msgpack.__file__).resolve().parent.parent

HOST_PROGRAM = r"""
import json, os, sys
from sandbox import Sandbox, load_policy
from sandbox.errors import LayerUnavailableError

out = {"uid": os.getuid()}
try:
    Sandbox(load_policy("default"), audit_log=sys.argv[1] + "/a.jsonl").close()
    out["default"] = "started"
except LayerUnavailableError as exc:
    out["default"] = "refused:" + exc.layer
policy = load_policy("portable").override({"python.guard": "none"})
with Sandbox(policy, audit_log=sys.argv[1] + "/b.jsonl") as sb:
    out["layers"] = sb.layers
    r = sb.execute('''
import os, socket
seen = []
for attempt in (
    lambda: open(CANARY).read(),
    lambda: socket.socket(),
    lambda: os.kill(HOST_PID, 0),
    lambda: open(OUTSIDE, "w").write("x"),
):
    try:
        seen.append(repr(attempt()))
    except OSError as exc:
        seen.append(type(exc).__name__)
print(seen)
'''.replace("CANARY", repr(sys.argv[2])).replace("OUTSIDE", repr(sys.argv[3])).replace("HOST_PID", str(os.getpid())))
    out["attacks"] = r.stdout
    out["fork"] = sb.execute("import os\nos.fork()").limit
print(json.dumps(out))
"""


def _usable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to start a host as another user"
    if not SYSTEM_PYTHON.exists() or shutil.which("setpriv") is None:
        return "needs /usr/bin/python3.11 and setpriv"
    probe = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", str(SYSTEM_PYTHON), "-c",
         f"import os; os.listdir({str(ROOT)!r}); os.listdir({str(SITE)!r})"],
        capture_output=True,
    )  # fmt: skip
    if probe.returncode != 0:
        return "the checkout or its site-packages is not readable by nobody"
    return None


@pytest.fixture
def shared_dir():
    """A directory nobody can reach (pytest's tmp_path lives under a 0700 directory)."""
    path = Path(tempfile.mkdtemp(prefix="rlm-unprivileged-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(_usable() is not None, reason=str(_usable()))
def test_an_unprivileged_host_gets_every_layer_but_the_cgroup(shared_dir):
    tmp_path = shared_dir
    secret = tmp_path / "canary"
    secret.write_text("CANARY-nonroot-5d2c")
    os.chown(secret, 65534, 65534)
    secret.chmod(0o600)  # readable by nobody's uid: only Landlock stands in the way
    outside = tmp_path / "written-from-the-sandbox"
    env = {
        "PYTHONPATH": f"{ROOT}:{SITE}",
        "HOME": str(tmp_path),
        "PATH": "/usr/bin:/bin",
        "TMPDIR": str(tmp_path),
    }
    out = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", str(SYSTEM_PYTHON), "-c", HOST_PROGRAM,
         str(tmp_path), str(secret), str(outside)],
        capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["uid"] == 65534
    assert report["default"] == "refused:cgroup"  # fails closed, naming the layer
    layers = report["layers"]
    assert layers["cgroup"].startswith("unavailable:")
    for layer in ("no_new_privs", "rlimits", "scratch_fs", "network", "pid", "ipc", "filesystem_view",
                  "landlock", "identity", "seccomp"):  # fmt: skip
        assert layers[layer] == "active", (layer, layers[layer])
    assert "CANARY" not in out.stdout
    # The canary is not in the child's filesystem view, the host's pid not in its PID
    # namespace; its root is read-only (EROFS).
    assert (
        report["attacks"].strip()
        == "['FileNotFoundError', 'PermissionError', 'ProcessLookupError', 'OSError']"
    )
    assert not outside.exists()
    assert report["fork"] == "processes"


# Starts under load: the default policy must be refused for its cgroup every time, never lost.
STARTS_UNDER_LOAD = r"""
import sys
from sandbox import Sandbox, load_policy
from sandbox.errors import LayerUnavailableError
try:
    Sandbox(load_policy("default"), audit_log=sys.argv[1] + "/a.jsonl", pool=None).close()
    print("started")
except LayerUnavailableError as exc:
    print("refused:" + exc.layer)
"""


@pytest.mark.skipif(_usable() is not None, reason=str(_usable()))
def test_a_child_born_through_the_pid_helper_survives_the_helper_exit_under_load(shared_dir):
    """Without root the child is forked by a short-lived helper (the PID namespace's way in a
    user namespace). A child that armed its parent-death signal while the helper was still
    exiting was killed by that exit: on a busy machine a fresh host's first sandbox failed with
    "the sandbox child did not start: it exited" (SIGKILL)."""
    env = {"PYTHONPATH": f"{ROOT}:{SITE}", "HOME": str(shared_dir), "PATH": "/usr/bin:/bin",
           "TMPDIR": str(shared_dir)}  # fmt: skip
    burners = [subprocess.Popen([SYSTEM_PYTHON, "-c", "while True: pass"]) for _ in range(2)]
    try:
        outcomes = []
        for _ in range(10):  # a fresh host (and fork server) each time: the first start raced
            out = subprocess.run(
                ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", str(SYSTEM_PYTHON), "-c",
                 STARTS_UNDER_LOAD, str(shared_dir)],
                capture_output=True, text=True, env=env, timeout=120, cwd=shared_dir,
            )  # fmt: skip
            outcomes.append(out.stdout.strip() or out.stderr.strip().splitlines()[-1])
    finally:
        for p in burners:
            p.kill()
            p.wait()
    assert outcomes == ["refused:cgroup"] * 10, outcomes


# A read path under a directory closed to the host's user: the start must stop, naming it.
CLOSED_READ_PATH = r"""
import json, sys
from sandbox import Sandbox, load_policy
from sandbox.errors import SandboxStartError
out = {}
custom = load_policy("default").override({"isolation.require": []})
for name, base in (("portable", load_policy("portable")), ("custom", custom)):
    policy = base.override({"isolation.read_paths": [sys.argv[2]]})
    try:
        with Sandbox(policy, audit_log=sys.argv[1] + "/a.jsonl", pool=None) as sb:
            out[name] = "started: " + sb.layers["filesystem_view"] + " / " + sb.layers["landlock"]
    except SandboxStartError as exc:
        out[name] = type(exc).__name__ + ": " + str(exc)
print(json.dumps(out))
"""


@pytest.mark.skipif(_usable() is not None, reason=str(_usable()))
def test_a_read_path_closed_to_an_unprivileged_host_stops_the_start(shared_dir):
    """A ``read_paths`` entry under a directory closed to the host's user (EACCES when the child
    opens it) made the child report the filesystem view and Landlock "unavailable", and
    portable.toml (or any policy that does not require them) started without either. The start
    stops now with a SandboxStartError naming the key, the path and the errno."""
    closed = shared_dir / "closed"
    (closed / "data").mkdir(parents=True)
    closed.chmod(0o700)  # root's: nobody may not pass it
    env = {"PYTHONPATH": f"{ROOT}:{SITE}", "HOME": str(shared_dir), "PATH": "/usr/bin:/bin",
           "TMPDIR": str(shared_dir)}  # fmt: skip
    out = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", str(SYSTEM_PYTHON), "-c",
         CLOSED_READ_PATH, str(shared_dir), str(closed / "data")],
        capture_output=True, text=True, env=env, timeout=120, cwd=shared_dir,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    for name in ("portable", "custom"):
        said = report[name]
        assert said.startswith("SandboxStartError: "), (name, said)
        assert f"isolation.read_paths entry '{closed / 'data'}' cannot be opened" in said, said
        assert "EACCES" in said, said


# remove_tree as a user without CAP_DAC_OVERRIDE, over a tree whose directories lack owner rights.
REMOVE_LOCKED_TREE = r"""
import os, sys
from sandbox.files import remove_tree
tree, outside = sys.argv[1], sys.argv[2]
os.makedirs(tree + "/a/b/c")
for d in ("/a", "/a/b", "/a/b/c"):
    open(tree + d + "/f", "w").close()
os.makedirs(tree + "/e")
open(tree + "/e/f", "w").close()
os.makedirs(outside)
open(outside + "/kept", "w").close()
os.symlink(outside, tree + "/a/b/link")  # a link to a directory of the same user, locked too
os.chmod(outside, 0o500)
os.chmod(tree + "/a/b/c", 0)
os.chmod(tree + "/a/b", 0o500)
os.chmod(tree + "/a", 0o300)
os.chmod(tree + "/e", 0o100)
os.chmod(tree, 0)
remove_tree(tree)
print(os.path.lexists(tree), oct(os.stat(outside).st_mode & 0o777), os.listdir(outside))
# What a killed host left, locked by its code, the scratch itself included: the next host's sweep.
from sandbox.sandbox import _sweep_scratch
leftover = sys.argv[3] + "/sandbox-abcd1234"
os.makedirs(leftover + "/d")
open(leftover + "/d/f", "w").close()
os.chmod(leftover + "/d", 0)
os.chmod(leftover, 0)
os.utime(leftover, (0, 0))  # old enough to be swept
print(_sweep_scratch(sys.argv[3]), os.path.lexists(leftover))
"""


@pytest.mark.skipif(_usable() is not None, reason=str(_usable()))
def test_remove_tree_removes_directories_their_owner_locked_and_follows_no_link(shared_dir):
    """A sandbox's code may ``chmod 000`` (or 0o500) a directory of its scratch: on disk (no
    scratch tmpfs) and for a host that is not root, the host, the same user without
    CAP_DAC_OVERRIDE, could neither list nor empty it, and the scratch stayed after close and
    after every later sweep. remove_tree gives the directories of its user owner rwx through
    their descriptors; a link in the tree to another locked directory of that user is removed,
    not followed: that directory keeps its mode and its file. The sweep of what a killed host
    left could not even lock such a scratch, and skipped it for good: it removes it now."""
    env = {"PYTHONPATH": f"{ROOT}:{SITE}", "HOME": str(shared_dir), "PATH": "/usr/bin:/bin",
           "TMPDIR": str(shared_dir)}  # fmt: skip
    out = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", str(SYSTEM_PYTHON), "-c",
         REMOVE_LOCKED_TREE, str(shared_dir / "tree"), str(shared_dir / "outside"), str(shared_dir)],
        capture_output=True, text=True, env=env, timeout=60, cwd=shared_dir,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "0o500", "['kept']", "1", "False"], out.stdout


# A sandbox whose code locks directories of its on-disk scratch: they must go at close.
LOCKED_SCRATCH = r"""
import json, os, sys
from sandbox import Sandbox, load_policy
policy = load_policy("portable").override(
    {"python.guard": "none", "isolation.scratch_fs": False, "audit.enabled": False}
)
with Sandbox(policy, pool=None) as sb:
    layers = sb.layers
    r = sb.execute('''
import os
os.makedirs("a/b/c")
open("a/b/c/f", "w").close()
os.chmod("a/b/c", 0)
os.chmod("a/b", 0o500)
os.makedirs("d")
open("d/f", "w").close()
os.chmod("d", 0)
print(os.getcwd())
os.chmod(".", 0)
''')
print(json.dumps({"layers": layers, "ok": r.ok, "error": r.error_message, "scratch": r.stdout.strip()}))
"""


@pytest.mark.skipif(_usable() is not None, reason=str(_usable()))
def test_an_unprivileged_host_removes_a_scratch_its_code_locked(shared_dir):
    """With the filesystem view on and ``scratch_fs`` off (the scratch on disk), the code of a
    sandbox started by a host that is not root owns its scratch as that host's user: it could
    ``chmod 000`` directories there, the scratch itself included, and the host could not remove
    them at close (nor could a later sweep). They are removed now."""
    env = {"PYTHONPATH": f"{ROOT}:{SITE}", "HOME": str(shared_dir), "PATH": "/usr/bin:/bin",
           "TMPDIR": str(shared_dir)}  # fmt: skip
    out = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", str(SYSTEM_PYTHON), "-c",
         LOCKED_SCRATCH],
        capture_output=True, text=True, env=env, timeout=120, cwd=shared_dir,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["layers"]["filesystem_view"] == "active", report
    assert report["layers"]["scratch_fs"] == "off", report
    assert report["ok"], report
    scratch = Path(report["scratch"])
    assert scratch.parent == shared_dir, report
    assert not os.path.lexists(scratch), sorted(str(p) for p in scratch.rglob("*"))
