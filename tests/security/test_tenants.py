"""Tenants apart: IPC, uids, the process tree, inotify, the filesystem view, inherited state,
the host's network and lifetime, scheduling, recent system calls.

Each cross-tenant attack runs with two sandboxes alive at once, and where it
matters with a second host process (a subprocess running its own sandbox)
next to them. Every attack runs under the default policy and with
``python.guard = "none"``: the allowlist guard refuses most of these imports
on its own, so the guard-off run is the one that tests the kernel layers.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from sandbox import Sandbox, shutdown
from sandbox.errors import PolicyError
from tests.security.conftest import Env, assert_contained, policy_for

ROOT = Path(__file__).resolve().parents[2]

#: ctypes access to libc with errno, for the attack snippets.
LIBC = "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"


def second_host(code: str, **changes: object) -> str:
    """Run *code* in a sandbox (guard off) of another host process; return its stdout."""
    script = textwrap.dedent(
        """
        import json, sys
        from tests.security.conftest import policy_for
        from sandbox import Sandbox
        with Sandbox(policy_for("guard_none", **json.loads(sys.argv[1]))) as sb:
            r = sb.execute(sys.argv[2])
            print(json.dumps({"stdout": r.stdout, "error": r.error_type}))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script, json.dumps(changes), code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return str(json.loads(out.stdout.strip().splitlines()[-1])["stdout"])


def host_uid_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(f.read().split("Uid:")[1].split()[0])


# ------------------------------------------------------------------ 1. IPC
#: A fresh key per run: a segment left in the host's namespace by an old build is not this run's.
SHM_KEY = 0x10000000 + secrets.randbelow(0x60000000)

SHM_CREATE = LIBC + textwrap.dedent(
    f"""
    libc.shmat.restype = ctypes.c_void_p
    sid = libc.shmget({SHM_KEY}, 1 << 20, 0o1000 | 0o666)
    print("CREATED" if sid >= 0 else f"refused {{ctypes.get_errno()}}")
    if sid >= 0:
        addr = libc.shmat(sid, None, 0)
        ctypes.memmove(addr, b"tenant-a-secret", 15)
    """
)
SHM_PROBE = LIBC + textwrap.dedent(
    f"""
    libc.shmat.restype = ctypes.c_void_p
    sid = libc.shmget({SHM_KEY}, 0, 0)
    if sid >= 0:
        addr = libc.shmat(sid, None, 0)
        print("FOUND", ctypes.string_at(addr, 15))
    else:
        print("absent", ctypes.get_errno())
    """
)
MQ_OPEN = LIBC + (
    "fd = libc.mq_open(b'/rlm-tenant', 0o100 | 2, 0o600, None)\n"
    "print('MQ' if fd >= 0 else f'refused {ctypes.get_errno()}')"
)


def _host_shm_keys() -> set[int]:
    with open("/proc/sysvipc/shm") as f:
        return {int(line.split()[0]) for line in f.readlines()[1:]}


def test_sysv_ipc_and_mqueue_refused_by_default(mode: str, env: Env) -> None:
    with Sandbox(policy_for(mode)) as sb:
        r = sb.execute(SHM_CREATE + "\n" + MQ_OPEN)
        assert "CREATED" not in r.stdout and "MQ" not in r.stdout.split(), r
        if mode == "guard_none":
            assert "refused 1" in r.stdout, r  # EPERM from seccomp
        assert SHM_KEY not in _host_shm_keys()
        assert_contained(env, r, sb)


def test_ipc_namespace_is_per_sandbox(mode: str, env: Env) -> None:
    """Even with IPC allowed, a segment lives in its sandbox's own namespace and dies with it."""
    pol = policy_for(mode, **{"isolation.allow_ipc": True})
    with Sandbox(pol) as a, Sandbox(pol) as b:
        ra = a.execute(SHM_CREATE)
        if mode == "guard_none":
            assert "CREATED" in ra.stdout, ra
        rb = b.execute(SHM_PROBE)
        assert "FOUND" not in rb.stdout, rb
        assert SHM_KEY not in _host_shm_keys(), "the segment is in the host's IPC namespace"
        other = second_host(SHM_PROBE, **{"isolation.allow_ipc": True})
        assert "FOUND" not in other and "absent" in other, other
        assert_contained(env, rb, b)
    assert SHM_KEY not in _host_shm_keys()


# ----------------------------------------------------------- 2. uids, machine-wide
def test_uid_reservation_is_machine_wide(tmp_path: Path) -> None:
    """A uid held by another process is never handed out; its death frees it."""
    from sandbox import uids

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, secrets\nfrom sandbox import uids\nsecrets.randbelow = lambda n: 0\n"
            "lease = uids.reserve(sys.argv[1])\nprint(lease.uid, flush=True)\nsys.stdin.read()",
            str(tmp_path / "uids"),
        ],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    held = int(holder.stdout.readline())
    assert held == uids.UID_BASE
    mp = pytest.MonkeyPatch()
    mp.setattr(uids.secrets, "randbelow", lambda n: 0)
    try:
        with uids.reserve(str(tmp_path / "uids")) as mine, uids.reserve(str(tmp_path / "uids")) as third:
            assert mine.uid != held and third.uid not in (held, mine.uid)
        holder.kill()  # the kernel drops its lock; no clean-up ran
        holder.wait()
        with uids.reserve(str(tmp_path / "uids")) as again:
            assert again.uid == held
    finally:
        mp.undo()
        holder.kill()
        holder.wait()


def test_two_hosts_never_share_a_uid(mode: str, env: Env) -> None:
    """Two host processes whose sandboxes start from the same candidate uid get different ones."""
    from sandbox import uids

    mp = pytest.MonkeyPatch()
    mp.setattr(uids.secrets, "randbelow", lambda n: 0)
    try:
        with Sandbox(policy_for(mode)) as a, Sandbox(policy_for(mode)) as b:
            assert a.pid is not None and b.pid is not None
            mine = {host_uid_of(a.pid), host_uid_of(b.pid)}
            assert len(mine) == 2
            script = (
                "import secrets, sys\nsecrets.randbelow = lambda n: 0\n"
                "from tests.security.conftest import policy_for\nfrom sandbox import Sandbox\n"
                f"with Sandbox(policy_for({mode!r})) as sb:\n"
                "    print(open(f'/proc/{sb.pid}/status').read().split('Uid:')[1].split()[0])"
            )
            out = subprocess.run(
                [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
            )
            assert out.returncode == 0, out.stderr[-2000:]
            assert int(out.stdout.split()[-1]) not in mine
            for uid in mine:  # held while the sandbox lives ...
                assert os.path.exists(os.path.join(uids.RUNTIME_DIR, str(uid)))
        for uid in mine:  # ... and given back once its child is known to be dead
            assert not os.path.exists(os.path.join(uids.RUNTIME_DIR, str(uid)))
    finally:
        mp.undo()


ACT_ON = LIBC + textwrap.dedent(
    """
    import resource
    for what, call in [
        ("prlimit", lambda: resource.prlimit({PID}, resource.RLIMIT_NOFILE, (3, 3))),
        ("renice", lambda: os.setpriority(os.PRIO_PROCESS, {PID}, 19)),
        ("kill", lambda: os.kill({PID}, 0)),
        ("getpgid", lambda: os.getpgid({PID})),
        ("getsid", lambda: os.getsid({PID})),
        ("affinity", lambda: os.sched_getaffinity({PID})),
        ("pidfd", lambda: os.pidfd_open({PID})),
    ]:
        try:
            call()
            print("REACHED", what)
        except OSError as e:
            print(what, e.errno)
    """
)


def test_no_sandbox_reaches_another_process(mode: str, env: Env) -> None:
    """prlimit, renice, signals, getpgid/getsid, affinity, pidfd: another sandbox, the host, its server."""
    with Sandbox(policy_for(mode)) as a, Sandbox(policy_for(mode)) as b:
        assert a.pid is not None
        for target in (a.pid, os.getpid(), b._child.server.pid):
            r = b.execute(ACT_ON.replace("{PID}", str(target)))
            assert "REACHED" not in r.stdout, (target, r)
            if mode == "guard_none":
                assert r.stdout.count(" 3") == 7, r  # ESRCH: the pid does not exist in its namespace
        other = second_host(ACT_ON.replace("{PID}", str(a.pid)))  # a tenant of another host
        assert "REACHED" not in other and other.count(" 3") == 7, other
        assert a.execute("print(1)").ok
        assert_contained(env, r, b)


# --------------------------------------------------------------- 3. process tree
PROCESS_TREE = LIBC + textwrap.dedent(
    """
    print("pid", os.getpid(), "sid", os.getsid(0), "pgid", os.getpgid(0))
    print("proc", os.path.exists("/proc"))
    buf = ctypes.create_string_buffer(512)
    print("sysinfo", libc.sysinfo(buf), ctypes.get_errno())
    try:
        os.setpgid(0, {OTHER})
        print("JOINED")
    except OSError as e:
        print("setpgid", e.errno)
    seen = [p for p in range(2, 4 * 32768) if not libc.kill(p, 0) or ctypes.get_errno() != 3]
    print("visible", seen[:5])
    """
)


def test_process_tree_is_private(mode: str, env: Env) -> None:
    with Sandbox(policy_for(mode)) as a, Sandbox(policy_for(mode)) as b:
        r = b.execute(PROCESS_TREE.replace("{OTHER}", str(a.pid)))
        assert "JOINED" not in r.stdout, r
        if mode == "guard_none":
            assert "pid 1 sid 1 pgid 1" in r.stdout, r
            assert "proc False" in r.stdout, r
            assert "sysinfo -1 1" in r.stdout, r  # EPERM: no host memory or process count
            assert "visible []" in r.stdout, r  # not one other process
        assert_contained(env, r, b)


# ------------------------------------------------------------------- 4. inotify
INOTIFY = LIBC + textwrap.dedent(
    """
    for name, call in [("init", lambda: libc.inotify_init()), ("init1", lambda: libc.inotify_init1(0))]:
        fd = call()
        print(name, "WATCHING" if fd >= 0 else ctypes.get_errno())
        if fd >= 0:
            print("watch", libc.inotify_add_watch(fd, b"/tmp", 0x100), ctypes.get_errno())
    print("add", libc.inotify_add_watch(0, b"/tmp", 0x100), ctypes.get_errno())
    """
)


def test_inotify_refused(mode: str, env: Env) -> None:
    with Sandbox(policy_for(mode)) as sb:
        r = sb.execute(INOTIFY)
        assert "WATCHING" not in r.stdout, r
        if mode == "guard_none":
            assert "init 1" in r.stdout and "init1 1" in r.stdout and "add -1 1" in r.stdout, r
        assert_contained(env, r, sb)


#: Shared state on the read-only runtime: a flock, a lease, a dnotify watch on a stdlib file or
#: directory every sandbox (of every host process) reads.
SHARED_LOCKS = LIBC + textwrap.dedent(
    """
    import fcntl
    fd = os.open(os.__file__, os.O_RDONLY)
    print("flock", libc.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB), ctypes.get_errno())
    print("lease", libc.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK), ctypes.get_errno())
    d = os.open(os.path.dirname(os.__file__), os.O_RDONLY)
    print("notify", libc.fcntl(d, fcntl.F_NOTIFY, fcntl.DN_ACCESS | fcntl.DN_MULTISHOT), ctypes.get_errno())
    print("record", libc.fcntl(fd, fcntl.F_GETFL))  # other fcntl commands still work
    """
)


def test_no_locks_leases_or_watches_on_the_shared_runtime(mode: str, env: Env) -> None:
    """``flock`` needs no write access: a lock on ``os.py`` held by one tenant blocked or signalled
    every other (a covert channel and a stall, across host processes too); ``F_NOTIFY`` told a
    tenant whenever another read a stdlib file. All refused (EPERM); other fcntl calls work."""
    with Sandbox(policy_for(mode)) as a, Sandbox(policy_for(mode)) as b:
        r = a.execute(SHARED_LOCKS)
        if mode == "guard_none":
            assert "flock -1 1\n" in r.stdout and "lease -1 1\n" in r.stdout, r
            assert "notify -1 1\n" in r.stdout and "record 32768\n" in r.stdout, r
        probe = b.execute(LIBC + "import fcntl\nfd = os.open(os.__file__, os.O_RDONLY)\n"
                          "print('probe', libc.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB), ctypes.get_errno())")  # fmt: skip
        if mode == "guard_none":
            assert "probe -1 1\n" in probe.stdout, probe  # refused, not EWOULDBLOCK (11): no signal
        assert_contained(env, r, a)


NET_BIND = textwrap.dedent(
    """
    import socket
    kept = []
    for family, kind, address in ((socket.AF_UNIX, socket.SOCK_DGRAM, "\\0rlm-tenant-name"),
                                  (socket.AF_INET, socket.SOCK_DGRAM, ("0.0.0.0", 40404))):
        s = socket.socket(family, kind)
        try:
            s.bind(address)
            kept.append(s)
            print("BOUND", family)
        except OSError as e:
            print("TAKEN", family, e.errno)
    """
)


def test_sandboxes_that_may_use_sockets_do_not_share_a_network_namespace(mode: str, env: Env) -> None:
    """With socket families allowed, an abstract unix name and a UDP port bound in one sandbox
    are free in another (the fork server's namespace, shared, made the second bind fail: a
    channel between tenants)."""
    policy = policy_for(mode, **{"isolation.allowed_sockets": ["unix", "inet"]})
    with Sandbox(policy) as a, Sandbox(policy) as b:
        first, second = a.execute(NET_BIND), b.execute(NET_BIND)
        if mode == "guard_none":
            assert first.stdout.count("BOUND") == 2, first
            assert second.stdout.count("BOUND") == 2, second
        assert_contained(env, second, b)


CHANNEL_NAMES = textwrap.dedent(
    """
    import errno, socket
    channel = socket.socket(fileno=3)
    for step, call in (("bind", lambda: channel.bind(NAME)), ("connect", lambda: channel.connect(LISTENING))):
        try:
            call()
            print(step, "OK")
        except OSError as e:
            print(step, errno.errorcode[e.errno])
    _ = channel.detach()
    """
)


@pytest.mark.parametrize("sockets", [[], ["unix"]])
def test_the_channel_cannot_take_or_probe_names_in_the_hosts_abstract_namespace(
    mode: str, env: Env, sockets: list[str]
) -> None:
    """The child's end of its channel was made by the host, in the host's network namespace. A
    bind of it took an abstract unix name there (found taken by the host's processes, and by
    another tenant probing with its own channel, across host processes too); a connect looked a
    name up there before it failed (EISCONN for a listening socket, ECONNREFUSED for none: an
    oracle for the host's abstract services). With no socket family allowed the filter refuses
    both (EPERM). With sockets allowed the end comes bound already (EINVAL); the connect oracle
    remains there, as SECURITY.md says."""
    name = "\0rlm-channel-" + secrets.token_hex(8)
    listening = "\0rlm-listening-" + secrets.token_hex(8)
    code = CHANNEL_NAMES.replace("NAME", repr(name)).replace("LISTENING", repr(listening))
    import socket

    service = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # a host service, listening
    service.bind(listening)
    service.listen()
    policy = policy_for(mode, **{"isolation.allowed_sockets": sockets})
    try:
        with Sandbox(policy) as a, Sandbox(policy) as b:
            first, second = a.execute(code), b.execute(code)
            if mode == "guard_none":
                expect = "bind EPERM\nconnect EPERM\n" if not sockets else "bind EINVAL\nconnect EISCONN\n"
                assert first.stdout == expect, first
                assert second.stdout == expect, second
                if not sockets:
                    assert second_host(code) == expect
            # The name is free in the host's namespace while both sandboxes live.
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.bind(name)
            finally:
                probe.close()
            assert_contained(env, first, a)
    finally:
        service.close()


SPLICE = LIBC + textwrap.dedent(
    """
    r, w = os.pipe()
    r2, w2 = os.pipe()
    os.write(w, b"x" * 100)
    try:
        os.splice(r, w2, 10)
        print("splice OK")
    except OSError as e:
        print("splice", e.errno)
    print("tee", libc.tee(r, w2, 10, 0), ctypes.get_errno())
    print("vmsplice", libc.vmsplice(w2, None, 0, 0), ctypes.get_errno())
    print("read", len(os.read(r, 100)))
    """
)


def test_pages_the_host_wrote_cannot_be_pinned_in_pipes(mode: str, env: Env) -> None:
    """``splice`` moved the pages of a memfd the host lent, or of a pipe it streamed a value
    through, into pipes of the child's own: still charged to the host after it truncated its
    memfd (57 MiB per sandbox). ``splice``, ``tee`` and ``vmsplice`` are refused; reads work."""
    with Sandbox(policy_for(mode)) as sb:
        r = sb.execute(SPLICE)
        if mode == "guard_none":
            assert r.stdout == "splice 1\ntee -1 1\nvmsplice -1 1\nread 100\n", r
        assert_contained(env, r, sb)


MACHINE_POOLS = LIBC + textwrap.dedent(
    """
    import mmap
    ctx = ctypes.c_ulong(0)
    print("io_setup", libc.syscall(206, 65536, ctypes.byref(ctx)), ctypes.get_errno())
    libc.mmap.restype = ctypes.c_void_p
    addr = libc.mmap(None, 2 << 20, 3, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x40000, -1, 0)
    print("map_hugetlb", addr == ctypes.c_void_p(-1).value, ctypes.get_errno())
    print("mfd_hugetlb", libc.memfd_create(b"h", 0x4), ctypes.get_errno())
    addr = libc.mmap(None, 1 << 20, 3, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    print("map_plain", addr != ctypes.c_void_p(-1).value)
    print("mfd_plain", libc.memfd_create(b"p", 0) >= 0)
    """
)


@pytest.mark.parametrize("allow_ipc", [False, True])
def test_machine_wide_pools_are_out_of_reach(mode: str, env: Env, allow_ipc: bool) -> None:
    """Native AIO contexts (``fs.aio-max-nr``) and huge pages (``vm.nr_hugepages``) are pools of
    the whole machine: one ``io_setup(65536)`` made every other program's AIO fail, and a sandbox
    could hold every huge page (neither the memory cgroup nor the peak RSS counts them). Refused
    (EPERM, not ENOMEM: the filter, whatever the machine has configured); plain maps stay."""
    with Sandbox(policy_for(mode, **{"isolation.allow_ipc": allow_ipc})) as sb:
        code = MACHINE_POOLS
        if allow_ipc:
            code += (
                "print('shm_hugetlb', libc.shmget(0, 2 << 20, 0o1000 | 0o600 | 0x800), ctypes.get_errno())\n"
            )
        r = sb.execute(code)
        if mode == "guard_none":
            assert "io_setup -1 1\n" in r.stdout, r
            assert "map_hugetlb True 1\n" in r.stdout and "mfd_hugetlb -1 1\n" in r.stdout, r
            assert "map_plain True\n" in r.stdout and "mfd_plain True\n" in r.stdout, r
            if allow_ipc:
                assert "shm_hugetlb -1 1\n" in r.stdout, r
        assert_contained(env, r, sb)


# ------------------------------------------------------- 5. the filesystem view
STAT = textwrap.dedent(
    """
    import os
    for path in {PATHS}:
        try:
            st = os.stat(path)
            print("EXISTS", path, st.st_size)
        except OSError as e:
            print(type(e).__name__, path)
    try:
        print("tmp", sorted(os.listdir("/tmp")))
    except OSError as e:
        print("tmp", type(e).__name__)
    """
)


def test_nothing_outside_the_view_exists(mode: str, env: Env) -> None:
    with Sandbox(policy_for(mode)) as a, Sandbox(policy_for(mode)) as b:
        scratch_a = a._child.scratch if a._child else ""
        paths = ["/etc/shadow", "/etc/passwd", scratch_a, str(env.canary_file), "/proc/1", "/root/.bashrc"]
        r = b.execute(STAT.replace("{PATHS}", repr(paths)))
        assert "EXISTS" not in r.stdout, r
        if mode == "guard_none":
            assert r.stdout.count("FileNotFoundError") == len(paths), r
            scratch_b = b._child.scratch if b._child else ""
            # Landlock refuses the listing; without it only its own scratch would be there.
            assert "tmp PermissionError" in r.stdout or f"tmp {[os.path.basename(scratch_b)]}" in r.stdout, r
            assert b.execute("import time\nprint(time.localtime().tm_year > 2000)").stdout.strip() == "True"
        other = second_host(STAT.replace("{PATHS}", repr(paths)))
        assert "EXISTS" not in other and other.count("FileNotFoundError") == len(paths), other
        assert_contained(env, r, b)


@pytest.mark.parametrize("guard", ["none", "allowlist", "restricted"])
def test_read_paths_are_in_the_view(tmp_path: Path, guard: str) -> None:
    """What the policy grants exists, read-only, whatever the guard (the guard's ``open`` lets
    it be read, not written); what it does not grant stays out of reach."""
    shared = tmp_path / "data"
    shared.mkdir()
    (shared / "f.txt").write_text("granted")
    (tmp_path / "other.txt").write_text("not granted")
    pol = policy_for("default", **{"isolation.read_paths": [str(shared)], "python.guard": guard})
    with Sandbox(pol) as sb:
        r = sb.execute(
            f"print(open({str(shared / 'f.txt')!r}).read())\n"
            f"for path, mode in [({str(shared / 'new')!r}, 'w'), ({str(shared / 'f.txt')!r}, 'r+'),"
            f" ({str(tmp_path / 'other.txt')!r}, 'r')]:\n"
            "    try:\n        open(path, mode)\n    except OSError:\n        print('refused')"
        )
    assert r.ok, r
    assert r.stdout.split() == ["granted", "refused", "refused", "refused"], r
    assert not (shared / "new").exists() and (shared / "f.txt").read_text() == "granted"


# ------------------------------------------------------- 6. inherited Python state
FIND = textwrap.dedent(
    """
    import gc, sys
    needles = [n[::-1] for n in {REVERSED}]  # the cell's own source must not hold them
    found = set()
    seen = {id(needles), *map(id, needles)}
    todo = list(gc.get_objects()) + list(sys.modules.values())
    f = sys._getframe()
    while f is not None:
        todo.append(f)
        todo.append(f.f_locals)
        f = f.f_back
    while todo:
        o = todo.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        if isinstance(o, str):
            found.update(n for n in needles if n in o)
            continue
        if isinstance(o, (bytes, bytearray)):
            found.update(n for n in needles if n.encode() in o)
            continue
        todo.extend(r for r in gc.get_referents(o) if id(r) not in seen)
    print("checked", len(seen), "FOUND", sorted(found))
    """
)


def test_no_inherited_state_about_other_sandboxes(env: Env) -> None:
    """Guard off: walking every reachable object and frame finds nothing of a sibling."""
    secret_name = "tenant-a-policy-7c1f"
    with Sandbox(policy_for("guard_none", name=secret_name)) as a:
        scratch_a = a._child.scratch if a._child else ""
        assert a.execute("x = 1").ok
        with Sandbox(policy_for("guard_none")) as b:
            needles = [secret_name, os.path.basename(scratch_a)]
            r = b.execute(FIND.replace("{REVERSED}", repr([n[::-1] for n in needles])))
    assert "FOUND []" in r.stdout, r
    assert int(r.stdout.split()[1]) > 10_000, r  # the walk really covered the heap
    assert_contained(env, r)


def test_a_read_path_that_comes_to_lead_into_the_hosts_proc_is_left_out(tmp_path: Path) -> None:
    """The policy refuses a read_paths entry that leads into the host's /proc when it loads; a
    link retargeted there afterwards (before the child starts) is left out of the view and of
    Landlock's grant by the child, so the code sees no host process through it."""
    link = tmp_path / "data"
    target = tmp_path / "real"
    target.mkdir()
    (target / "f.txt").write_text("granted")
    link.symlink_to(target)
    pol = policy_for("default", **{"isolation.read_paths": [str(link)], "python.guard": "none"})
    with Sandbox(pol, pool=None) as sb:  # before the swap: the link's target is granted
        assert sb.execute(f"print(open({str(link / 'f.txt')!r}).read())").stdout == "granted\n"
    link.unlink()
    link.symlink_to("/proc")
    with Sandbox(pol, pool=None) as sb:
        r = sb.execute(
            f"import os\nfor p in ({str(link)!r}, '/proc/1/cmdline'):\n"
            f"    try:\n        print(len(os.listdir(p)) if p == {str(link)!r} else open(p, 'rb').read()[:20])\n"
            "    except OSError as e:\n        print(type(e).__name__)"
        )
    assert r.ok and "b'" not in r.stdout and not any(ch.isdigit() for ch in r.stdout), r.stdout


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
def test_a_read_path_that_is_a_mount_of_the_hosts_proc_is_refused_or_left_out(tmp_path: Path) -> None:
    """A read_path is judged by what it is, not only by its name: a bind of /proc, a second
    proc mount, a bind of / elsewhere showed the host's processes (or everything) to the code.
    The policy refuses them, and one that a path has turned into after the policy loaded is
    left out by the child (checked on the descriptor the view binds and Landlock grants). A
    directory with a proc mount beneath (a chroot) is refused too: Landlock grants what is
    mounted beneath a path, when there is no view to hide it."""
    spots = {
        name: tmp_path / name for name in ("procbind", "proc2", "rootbind", "chroot", "chroot2", "later")
    }
    for spot in spots.values():
        spot.mkdir()
    (spots["chroot"] / "proc").mkdir()
    (spots["chroot2"] / "host").mkdir()
    (spots["later"] / "f.txt").write_text("granted")
    mounted: list[Path] = []
    try:
        for args, spot in (
            (("--bind", "/proc"), spots["procbind"]),
            (("-t", "proc", "proc"), spots["proc2"]),
            (("--bind", "/"), spots["rootbind"]),
            (("-t", "proc", "proc"), spots["chroot"] / "proc"),
            (("--bind", "/"), spots["chroot2"] / "host"),
        ):
            _mount(*args, str(spot))
            mounted.append(spot)
        for name in ("procbind", "proc2", "rootbind", "chroot", "chroot2"):
            with pytest.raises(PolicyError, match="read_paths"):
                policy_for("default", **{"isolation.read_paths": [str(spots[name])]})
        pol = policy_for("default", **{"isolation.read_paths": [str(spots["later"])], "python.guard": "none"})
        code = f"import os\ntry:\n    print(sorted(os.listdir({str(spots['later'])!r}))[:3])\nexcept OSError as e:\n    print(type(e).__name__)"
        with Sandbox(pol, pool=None) as sb:
            assert sb.execute(code).stdout == "['f.txt']\n"
        # the view's bind, and Landlock's grant alone (policies made before the path changes)
        pols = {True: pol, False: pol.override({"isolation.filesystem_view": False, "isolation.require": []})}
        _mount("--bind", "/proc", str(spots["later"]))
        mounted.append(spots["later"])
        shutdown()  # the fork server's mount namespace is a copy made when it started: a new one
        for view, each in pols.items():
            with Sandbox(each, pool=None) as sb:
                r = sb.execute(code)
            assert r.ok and r.stdout in ("[]\n", "FileNotFoundError\n", "PermissionError\n"), (view, r.stdout)
    finally:
        for spot in reversed(mounted):
            subprocess.run(["umount", "-l", str(spot)], capture_output=True)


def test_read_paths_cost_the_child_no_descriptor_whatever_their_number(tmp_path: Path) -> None:
    """The child checks each read_path on a descriptor of its own. Kept open through the layers,
    a path given twice (spelt differently) left one to the code (a directory descriptor, from
    which ``os.stat('../../etc/shadow', dir_fd=...)`` reached the host's files), and 80 of them
    ran the later layers out of descriptors (RLIMIT_NOFILE 64): Landlock was lost. Each is
    closed at once now, and the policy keeps a path once."""
    # Beneath a directory every uid may pass (pytest's own is 0700): without the view, the
    # sandbox's uid reaches the paths through the host's directories.
    base = Path(tempfile.mkdtemp(prefix="read-paths-"))
    base.chmod(0o755)
    dirs = []
    for i in range(80):
        d = base / f"d{i}"
        d.mkdir()
        (d / "f.txt").write_text(str(i))
        dirs.append(str(d))
    twice = [dirs[0], dirs[0] + "/", f"{dirs[0]}/../{Path(dirs[0]).name}"]
    assert policy_for("default", **{"isolation.read_paths": twice}).isolation.read_paths == (dirs[0],)
    count = (
        "import os\nopen_fds = []\nfor fd in range(256):\n    try:\n        os.fstat(fd)\n"
        "    except OSError:\n        continue\n    open_fds.append(fd)\nprint(open_fds)\n"
        "print(sum(int(open(os.path.join(d, 'f.txt')).read()) for d in {dirs!r}))"
    )
    try:
        for view in (True, False):
            changes = {"isolation.read_paths": dirs, "python.guard": "none"}
            if not view:
                changes |= {"isolation.filesystem_view": False, "isolation.require": []}
            with Sandbox(policy_for("default", **changes), pool=None) as sb:
                r = sb.execute(count.format(dirs=dirs))
                assert r.ok and r.stdout == f"[0, 1, 2, 3]\n{sum(range(80))}\n", (
                    view,
                    r.stdout,
                    r.error_message,
                )
                assert sb.layers["landlock"] == "active", sb.layers
    finally:
        shutil.rmtree(base, ignore_errors=True)


# ------------------------------------------- 7. the host's network, the host's lifetime
HOST_NET_IOCTLS = textwrap.dedent(
    """
    import array, errno, fcntl, struct
    table = array.array("B", bytes(4096))
    ifreq = lambda name: struct.pack("16s24s", name, b"")
    for what, request, arg in (
        ("SIOCGIFCONF", 0x8912, struct.pack("iL", 4096, table.buffer_info()[0])),  # interfaces, IPv4
        ("SIOCGIFNAME", 0x8910, struct.pack("16si20s", b"", 1, b"")),
        ("SIOCGIFHWADDR", 0x8927, ifreq(b"lo")),  # MAC
        ("SIOCGIFMTU", 0x8921, ifreq(b"lo")),
        ("SIOCETHTOOL", 0x8946, ifreq(b"lo")),  # driver, firmware, bus
        ("SIOCGSTAMP_IOR", 0x80108906, ifreq(b"")),  # the 0x89 type with direction and size bits
        ("SIOCGIWNAME", 0x8B01, ifreq(b"lo")),  # wireless
    ):
        try:
            fcntl.ioctl(3, request, arg)
            print(what, "ANSWERED")
        except OSError as e:
            print(what, errno.errorcode[e.errno])
    print("FIONREAD", struct.unpack("i", fcntl.ioctl(3, 0x541B, bytes(4)))[0])
    """
)


@pytest.mark.parametrize("sockets", [[], ["unix"]])
def test_the_channel_tells_nothing_of_the_hosts_network(mode: str, env: Env, sockets: list[str]) -> None:
    """The channel is a unix socket the host made, so it belongs to the host's network namespace;
    a socket ioctl its family does not handle went to that namespace's devices: SIOCGIFCONF
    listed the host's interfaces and IPv4 addresses, SIOCGIFHWADDR their MACs, SIOCETHTOOL
    their drivers and PCI addresses. The filter refuses every socket (0x89) and wireless (0x8B)
    request type (EPERM); FIONREAD, which the channel's reader may use, still answers."""
    with Sandbox(policy_for(mode, **{"isolation.allowed_sockets": sockets})) as sb:
        r = sb.execute(HOST_NET_IOCTLS)
        assert "ANSWERED" not in r.stdout, r
        if mode == "guard_none":
            lines = r.stdout.splitlines()
            assert lines[:-1] == [f"{what} EPERM" for what in (
                "SIOCGIFCONF", "SIOCGIFNAME", "SIOCGIFHWADDR", "SIOCGIFMTU", "SIOCETHTOOL", "SIOCGSTAMP_IOR",
                "SIOCGIWNAME",
            )], r  # fmt: skip
            assert lines[-1] == "FIONREAD 0", r
        assert_contained(env, r, sb)


#: What a sandbox's code runs to outlive its fork server: disarm the parent-death signal.
DISARM = LIBC + "print(libc.prctl(1, 0, 0, 0, 0), ctypes.get_errno())  # PR_SET_PDEATHSIG, 0"

#: A host process that disarms, then leaves a cell running and says who is who.
OUTLIVING_HOST = textwrap.dedent(
    """
    import json, sys, threading, time
    from tests.security.conftest import policy_for
    from sandbox import Sandbox
    sb = Sandbox(policy_for("guard_none"), pool=None)
    r = sb.execute(sys.argv[1])
    threading.Thread(target=sb.execute, args=("import time\\nwhile True: time.sleep(1)",), daemon=True).start()
    time.sleep(0.5)
    print(json.dumps({"child": sb.pid, "server": sb._child.server.pid, "out": r.stdout}), flush=True)
    time.sleep(120)
    """
)


def test_a_sandbox_dies_with_a_fork_server_and_host_killed_without_clean_up() -> None:
    """The child is armed to die with its fork server (PR_SET_PDEATHSIG). Code that disarmed it
    (prctl(PR_SET_PDEATHSIG, 0)) outlived a fork server and host both SIGKILLed (the OOM
    killer, a supervisor): re-parented to init, with its scratch and cgroup, after its uid
    lease was freed. The filter refuses the prctl (EPERM), and the child dies with them."""
    host = subprocess.Popen(
        [sys.executable, "-c", OUTLIVING_HOST, DISARM], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    child_fd = -1
    try:
        assert host.stdout is not None
        ready, _, _ = select.select([host.stdout], [], [], 60)
        assert ready, "the host process did not start its sandbox"
        info = json.loads(host.stdout.readline())
        child_fd = os.pidfd_open(info["child"])
        os.kill(info["server"], signal.SIGKILL)  # no clean-up, then the host too
        time.sleep(0.2)
        host.kill()
        host.wait(timeout=10)
        gone, _, _ = select.select([child_fd], [], [], 10)  # a pidfd is readable once its process exited
        assert gone, f"the sandbox child {info['child']} outlived its fork server and host: {info}"
        assert info["out"] == "-1 1\n", info  # the prctl was refused (EPERM)
    finally:
        host.kill()
        host.wait(timeout=10)
        if child_fd >= 0:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(child_fd, signal.SIGKILL)
            os.close(child_fd)


def _pids_parent() -> str | None:
    """Where a fork server of this process would make its ``rlm-<pid>`` tree for ``pids``."""
    from sandbox.isolation import cgroups

    v1, v2 = cgroups._mounts()
    own = cgroups._own_paths()
    if "pids" in v1:
        return os.path.normpath(v1["pids"] + own.get("pids", "/"))
    return os.path.normpath(v2 + own.get("", "/")) if v2 is not None else None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs a writable cgroup hierarchy")
def test_the_sweep_kills_what_an_abandoned_cgroup_tree_still_holds() -> None:
    """A tree of a dead fork server that still holds a process (a child that outlived it) was
    left in place: its rmdir failed (EBUSY) and the process kept running. The sweep kills
    what the tree holds, then removes it."""
    from sandbox.isolation import cgroups

    parent = _pids_parent()
    if parent is None or not os.access(parent, os.W_OK):
        pytest.skip("no writable pids cgroup")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tree = os.path.join(parent, f"rlm-{dead.pid}")  # a fork server that died without teardown
    leaf = os.path.join(tree, "1")
    os.makedirs(leaf)
    stray = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with open(os.path.join(leaf, "cgroup.procs"), "w") as f:
            f.write(str(stray.pid))
        cgroups.sweep_abandoned()
        assert stray.wait(timeout=10) == -signal.SIGKILL
        assert not os.path.exists(tree)
    finally:
        stray.kill()
        stray.wait()
        for d in (leaf, tree):
            with contextlib.suppress(OSError):
                os.rmdir(d)


SCHEDULING = textwrap.dedent(
    """
    import os, resource
    for name in ("RLIMIT_RTPRIO", "RLIMIT_NICE", "RLIMIT_SIGPENDING"):
        print(name, resource.getrlimit(getattr(resource, name)))
    for what, call in (
        ("fifo", lambda: os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))),
        ("rr", lambda: os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(1))),
        ("renice", lambda: os.setpriority(os.PRIO_PROCESS, 0, os.getpriority(os.PRIO_PROCESS, 0) - 1)),
    ):
        try:
            call()
            print(what, "TAKEN")
        except OSError as e:
            print(what, e.errno)
    """
)


def test_scheduling_limits_are_the_sandboxs_not_the_hosts(mode: str, env: Env) -> None:
    """RLIMIT_RTPRIO, RLIMIT_NICE and RLIMIT_SIGPENDING were the host's: a host given a real-time
    priority limit (limits.conf, systemd's LimitRTPRIO=, docker --ulimit rtprio=) let the code
    run SCHED_FIFO, holding a CPU between executes when nobody watches. Pinned: no real-time
    policy, no lower nice value, 128 pending signals."""
    with Sandbox(policy_for(mode)) as sb:
        r = sb.execute(SCHEDULING)
        assert "TAKEN" not in r.stdout, r
        if mode == "guard_none":
            assert r.stdout == (
                "RLIMIT_RTPRIO (0, 0)\nRLIMIT_NICE (0, 0)\nRLIMIT_SIGPENDING (128, 128)\nfifo 1\nrr 1\nrenice 13\n"
            ), r
        assert_contained(env, r, sb)


RECENT_CALLS = LIBC + textwrap.dedent(
    """
    libc.syscall.restype = ctypes.c_long
    buf = ctypes.create_string_buffer(4096)
    size = ctypes.c_uint32(4096)
    req = (ctypes.c_uint64 * 4)(24, 2**64 - 1, 0, 0)  # mnt_id_req: the root mount, every field
    import mmap
    region = mmap.mmap(-1, 4 * 4096)
    at = ctypes.c_void_p(ctypes.addressof(ctypes.c_char.from_buffer(region)))
    for what, nr, args in (
        ("statmount", 457, (req, buf, 4096, 0)),
        ("listmount", 458, (req, buf, 64, 0)),
        ("lsm_get_self_attr", 459, (100, buf, ctypes.byref(size), 0)),
        ("lsm_set_self_attr", 460, (100, buf, 4096, 0)),
        ("lsm_list_modules", 461, (buf, ctypes.byref(size), 0)),
        ("open_tree_attr", 467, (-100, b".", 1, None, 0)),
        ("memory_merge", 157, (67, 1, 0, 0, 0)),  # prctl(PR_SET_MEMORY_MERGE)
        ("merge_region", 28, (at, 4 * 4096, 12)),  # madvise(MADV_MERGEABLE): the same, per region
        ("hugepage_region", 28, (at, 4 * 4096, 14)),  # madvise(MADV_HUGEPAGE): allowed
        ("unreviewed_470", 470, ()),
        ("unreviewed_1023", 1023, ()),
    ):
        ctypes.set_errno(0)
        print(what, libc.syscall(nr, *args), ctypes.get_errno())
    ctypes.set_errno(0)
    print("mseal", libc.syscall(462, 0, 0, 0), ctypes.get_errno())
    """
)


def test_recent_system_calls_are_refused(mode: str, env: Env) -> None:
    """The filter is a deny list: calls newer than it went through. listmount/statmount (6.8)
    listed every mount of the view (host paths, the scratch tmpfs with the sandbox's uid,
    machine-wide mount ids), open_tree_attr (6.15) was the open_tree the filter refuses, the
    lsm_* calls and PR_SET_MEMORY_MERGE (KSM) were allowed, and with KSM refused for the whole
    process, madvise(MADV_MERGEABLE) still opted a region into it. Refused (EPERM), and a number
    above the newest reviewed one gets ENOSYS, as from a kernel that lacks it."""
    with Sandbox(policy_for(mode)) as sb:
        r = sb.execute(RECENT_CALLS)
        if mode == "guard_none":
            refused = ("statmount", "listmount", "lsm_get_self_attr", "lsm_set_self_attr",
                       "lsm_list_modules", "open_tree_attr", "memory_merge", "merge_region")  # fmt: skip
            want = [f"{what} -1 1" for what in refused] + ["hugepage_region 0 0"]
            want += ["unreviewed_470 -1 38", "unreviewed_1023 -1 38"]
            assert r.stdout.splitlines()[:-1] == want, r
            assert r.stdout.splitlines()[-1] in ("mseal 0 0", "mseal -1 38"), r  # allowed (or too old)
        assert_contained(env, r, sb)
