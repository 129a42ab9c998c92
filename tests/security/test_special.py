"""Attacks that need more than one execute, a second sandbox, or a look at the host afterwards.

Each runs under the default policy and with ``python.guard = "none"``.
"""

from __future__ import annotations

import os
import time

import psutil
import pytest

from sandbox import Sandbox, forkserver
from sandbox.layers import LAYERS
from tests.security.conftest import Env, assert_contained, in_forked_child, policy_for

# ------------------------------------------------------------ the channel fds
CHANNEL_ATTACKS = {
    "close_all_fds": "import os\nfor fd in range(3, 64):\n    try:\n        os.close(fd)\n    except OSError:\n        pass",
    "garbage_to_channel": "import os\nfor fd in range(3, 16):\n    try:\n        os.write(fd, b'\\xff' * 4096)\n    except OSError:\n        pass",
    "oversized_length_prefix": "import os\nfor fd in range(3, 16):\n    try:\n        os.write(fd, b'\\x7f\\xff\\xff\\xff' + b'x' * 16)\n    except OSError:\n        pass",
    "read_channel": "import os\nfor fd in range(3, 16):\n    try:\n        os.set_blocking(fd, False)\n        print(os.read(fd, 65536))\n    except OSError:\n        pass",
    "shutdown_channel": "import socket\nfor fd in range(3, 16):\n    try:\n        socket.socket(fileno=fd).shutdown(socket.SHUT_RDWR)\n    except OSError:\n        pass",
    "fake_done_frame": "import os\nfor fd in range(3, 16):\n    try:\n        os.write(fd, b'\\x00\\x00\\x00\\x05\\x81\\xa1t\\xa3bye')\n    except OSError:\n        pass",
}


@pytest.mark.parametrize("name", sorted(CHANNEL_ATTACKS))
def test_channel_attack(name: str, mode: str, env: Env) -> None:
    with Sandbox(policy_for(mode)) as sb:
        r = sb.execute(CHANNEL_ATTACKS[name])
        # Whatever the child did to its own channel, the host got a result or a clean
        # ProtocolError/ChildExited, and the next execute works in a fresh child.
        assert (
            r.error_type in (None, "ProtocolError", "ChildExited", "ImportError", "OSError") or r.crashed
        ), r
        assert_contained(env, r, sb)


# ------------------------------------------------------------ outliving a run
OUTLIVE_ATTACKS = {
    "background_thread": "import threading, time\nthreading.Thread(target=time.sleep, args=(60,), daemon=True).start()",
    "double_fork_daemon": "import os\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        import time\n        time.sleep(60)\n    os._exit(0)",
    "setsid_child": "import os, time\npid = os.fork()\nif pid == 0:\n    os.setsid(); time.sleep(60)",
}


@pytest.mark.parametrize("name", sorted(OUTLIVE_ATTACKS))
@pytest.mark.parametrize("allow", [0, 4], ids=["no_processes", "4_processes"])
def test_nothing_outlives_the_sandbox(name: str, allow: int, mode: str, env: Env) -> None:
    sb = Sandbox(policy_for(mode, **{"limits.max_processes": allow}))
    pid = sb.pid
    assert pid is not None
    uid = psutil.Process(pid).uids().real
    r = sb.execute(OUTLIVE_ATTACKS[name])
    if allow == 0 and mode == "guard_none":
        assert r.limit == "processes", r
    sb.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        left = [p.pid for p in psutil.process_iter(["uids"]) if p.info["uids"] and p.info["uids"].real == uid]
        if not left:
            break
        time.sleep(0.02)
    assert left == [], f"processes of the sandbox uid {uid} outlived it: {left}"
    assert_contained(env, r)


# ------------------------------------------------------------ state poisoning
POISON = {
    "json_dumps": (
        "import json\njson.dumps = lambda *a, **k: 'EVIL'",
        "import json\nprint(json.dumps([1]))",
        "[1]",
    ),
    "builtins_print": ("import builtins\nbuiltins.len = lambda x: -1", "print(len([1, 2]))", "2"),
    "str_method_cache": ("import re\nre.compile = None", "import re\nprint(re.sub('a', 'b', 'aa'))", "bb"),
    "sys_path": (
        "import sys\nsys.path.insert(0, '/tmp/evil')\nsys.modules['math'] = None",
        "import math\nprint(math.sqrt(4))",
        "2.0",
    ),
}


@pytest.mark.parametrize("name", sorted(POISON))
def test_state_poisoning_does_not_cross_sandboxes(name: str, mode: str, env: Env) -> None:
    evil, probe, want = POISON[name]
    with Sandbox(policy_for(mode)) as a, Sandbox(policy_for(mode)) as b:
        ra = a.execute(evil)
        rb = b.execute(probe)
        assert rb.ok and rb.stdout.strip() == want, (ra, rb)
    with Sandbox(policy_for(mode)) as c:
        rc = c.execute(probe)
        assert rc.ok and rc.stdout.strip() == want, rc
    assert_contained(env, ra)


# ------------------------------------- sibling sandboxes, even with sockets allowed
@pytest.mark.parametrize("network", [True, False], ids=["own-netns", "host-netns"])
def test_abstract_socket_scoping_between_sandboxes(mode: str, env: Env, network: bool) -> None:
    """With unix sockets allowed, one sandbox cannot reach another's abstract socket: each has a
    network namespace of its own (the name does not exist for the other: ECONNREFUSED), and
    where they share one (the network layer off: the host's), Landlock's scoping refuses the
    connection (EPERM)."""
    changes: dict[str, object] = {"isolation.allowed_sockets": ["unix"]}
    if not network:
        changes["isolation.network"] = False
        changes["isolation.require"] = [layer for layer in LAYERS if layer != "network"]
    pol = policy_for(mode, **changes)
    with Sandbox(pol) as a, Sandbox(pol) as b:
        ra = a.execute(
            "import socket\ns = socket.socket(socket.AF_UNIX)\ns.bind('\\0rlm-sibling-test')\ns.listen()\nprint('listening')"
        )
        rb = b.execute(
            "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect('\\0rlm-sibling-test')\nprint('CONNECTED')"
        )
        assert "CONNECTED" not in rb.stdout, rb
        rh = b.execute(
            f"import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect('\\0{env.listener.unix_name}')"
        )
        assert not rh.ok, rh
        if mode == "guard_none":
            assert "listening" in ra.stdout, ra
            assert rb.error_type == ("ConnectionRefusedError" if network else "PermissionError"), rb
        assert_contained(env, rb, b)


def test_signal_to_sibling_sandbox_refused(mode: str, env: Env) -> None:
    with Sandbox(policy_for(mode)) as a, Sandbox(policy_for(mode)) as b:
        r = b.execute(f"import os, signal\nos.kill({a.pid}, signal.SIGKILL)")
        assert not r.ok
        assert a.execute("print(1)").ok
        assert_contained(env, r, b)


def test_fork_server_survives_and_keeps_serving(mode: str, env: Env) -> None:
    server = forkserver.shared()
    with Sandbox(policy_for(mode)) as sb:
        r = sb.execute(
            f"import os, signal\nos.kill({server.pid}, signal.SIGKILL)\nos.kill({os.getpid()}, signal.SIGKILL)"
        )
        assert not r.ok
    assert forkserver.shared() is server and server.proc.poll() is None
    with Sandbox(policy_for(mode)) as sb2:
        assert sb2.execute("print(1)").ok
    assert_contained(env, r)


# ---------------------------------------------- controls: the checks can fail


def _unprotected() -> object:
    return policy_for(
        "guard_none", **{"isolation.require": [], **{f"isolation.{layer}": False for layer in LAYERS}}
    )


def test_control_canary_is_readable_without_the_layers(env: Env) -> None:
    """Proves the canary assertions are not vacuous: with every layer off the attack works."""
    with Sandbox(_unprotected()) as sb:  # type: ignore[arg-type]
        r = sb.execute(env.fill("print(open('{CANARY_FILE}').read())"))
    assert env.canary in r.stdout


def test_control_listener_hears_without_the_layers(env: Env) -> None:
    with Sandbox(_unprotected()) as sb:  # type: ignore[arg-type]
        r = sb.execute(env.fill("import socket\nsocket.create_connection(('127.0.0.1', {TCP_PORT})).close()"))
    assert r.ok, r
    deadline = time.monotonic() + 2
    while not env.listener.events and time.monotonic() < deadline:
        time.sleep(0.01)
    assert env.listener.events, "the control connection did not arrive"
    env.listener.events.clear()


def test_control_marker_is_written_without_the_layers(env: Env) -> None:
    marker = env.root / "control-marker"
    with Sandbox(_unprotected()) as sb:  # type: ignore[arg-type]
        r = sb.execute(f"open({str(marker)!r}, 'w').write('x')")
    assert r.ok and marker.exists(), r
    os.unlink(marker)


def test_required_layer_missing_fails_closed() -> None:
    """A required layer that cannot be applied stops the child before any code runs, naming the layer."""
    import sandbox.isolation as iso

    off = {f"isolation.{layer}": False for layer in LAYERS if layer not in ("no_new_privs", "seccomp")}
    pol = policy_for("default", **off, **{"isolation.require": ["seccomp"]}).model_dump(mode="json")

    def apply(write: int) -> bool:
        prepared = iso.Prepared(pol, {})
        prepared.seccomp_error = "simulated: libseccomp missing"
        try:
            iso.apply(prepared, {"server_pid": os.getppid(), "scratch": "/"}, write)
        except iso.LayerFailure as exc:
            os.write(write, f"{exc.layer}|{exc.reason}".encode())
            return True
        return False

    status, got = in_forked_child(apply)
    assert status == 0
    assert got == "seccomp|simulated: libseccomp missing"
    from sandbox.errors import LayerUnavailableError

    assert "seccomp" in str(LayerUnavailableError("seccomp", "x"))


def test_sandboxes_with_and_without_cgroup_side_by_side(mode: str, env: Env) -> None:
    """A cgroup-less sandbox started next to others neither inherits nor disturbs their cgroups."""
    with Sandbox(policy_for(mode)) as a:
        with Sandbox(policy_for(mode, **{"isolation.cgroup": False, "isolation.require": []})) as b:
            with Sandbox(policy_for(mode)) as c:
                cg = {box.pid: open(f"/proc/{box.pid}/cgroup").read() for box in (a, b, c)}
                assert len(set(cg.values())) == 3, cg
                for box in (a, b, c):
                    assert box.execute("print(1)").ok
                r = c.execute("import os\nos.fork()")
                if mode == "guard_none":
                    assert r.limit == "processes", r
    assert_contained(env, r)
