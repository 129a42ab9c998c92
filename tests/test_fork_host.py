"""A host that forks (pre-fork servers, multiprocessing's fork start method) while its sandbox
machinery is busy in another thread: the forked process keeps nothing of the parent's that
would outlive the parent, and the parent's processes end with the parent."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sandbox import forkserver
from tests.conftest import gone

ROOT = Path(__file__).resolve().parents[1]


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


# The host forks while its fork server starts: an audit hook forks the moment the server's
# Popen is asked for (its control socket is open, the server object not yet made). The forked
# process then waits on stdin, as a pre-fork worker outlives a master that was SIGKILLed.
FORK_WHILE_THE_SERVER_STARTS = """
import os, sys
from sandbox import Sandbox, forkserver

forked = []

def hook(event, args):
    if event == "subprocess.Popen" and not forked and "sandbox.forkserver" in " ".join(map(str, args[1])):
        pid = os.fork()
        if pid == 0:
            os.read(0, 1)  # lives until the test closes our stdin
            os._exit(0)
        forked.append(pid)

sys.addaudithook(hook)
sb = Sandbox("default", audit_log=os.path.join(os.environ["TMPDIR"], "a.jsonl"), pool=None)
assert sb.execute("x = 1").ok
print(forked[0], forkserver.shared().pid, sb.pid, flush=True)
os.read(0, 1)  # SIGKILLed here
"""


def _until_locked(server: forkserver.ForkServer) -> None:
    """Wait (10 s at most) until a thread holds the fork server's lock: a spawn in flight."""
    deadline = time.monotonic() + 10
    while not server._lock.locked() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server._lock.locked()


def _host_env(tmp_path: Path) -> dict[str, str]:
    """A host process's environment: this checkout importable, its temporary files in *tmp_path*."""
    return dict(os.environ, TMPDIR=str(tmp_path), PYTHONPATH=str(ROOT))


def _start_host(tmp_path: Path, script: str) -> subprocess.Popen[bytes]:
    """*script* running as a host process, its standard input and output piped to this test."""
    return subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=_host_env(tmp_path)
    )


def _open_and_run(audit: Path, outcome: list[object]) -> None:
    """Open a sandbox, run one cell and close it, in a thread: what it printed, or the
    SandboxError it raised (allowed; never a raw OSError), goes to *outcome*."""
    from sandbox import Sandbox, SandboxError

    try:
        with Sandbox("default", audit_log=audit, pool=None) as sb:
            outcome.append(sb.execute("print(6 * 7)").stdout)
    except SandboxError as exc:
        outcome.append(exc)


def test_a_fork_while_the_fork_server_starts_does_not_keep_it_alive(tmp_path: Path) -> None:
    host = _start_host(tmp_path, FORK_WHILE_THE_SERVER_STARTS)
    pids: list[int] = []
    try:
        assert host.stdout is not None
        line = host.stdout.readline()
        assert line, "the host did not start its sandbox"
        forked, server, child = pids = [int(x) for x in line.split()]
        host.kill()  # dies without shutdown(): its fork server must see end of file
        host.wait(30)
        assert not gone(forked, 0.5), "the forked process should still be waiting"
        assert gone(server, 15.0), "the dead host's fork server lives on: the forked process holds its socket"
        assert gone(child, 15.0)
    finally:
        host.kill()
        if host.stdin is not None:
            host.stdin.close()  # the forked process exits
        for pid in pids:
            if not gone(pid, 10.0):
                _kill(pid)
        host.wait(30)


# A multiprocessing worker made by fork or forkserver leaves by os._exit (atexit does not run
# there): each used sandboxes and the default pool (ready children, each with a scratch
# directory), then returns normally.
WORKERS_THAT_RETURN = """
import multiprocessing, os, sys
from concurrent.futures import ProcessPoolExecutor

def task(n):
    from sandbox import Sandbox
    from sandbox.pool import default_pool
    for _ in range(3):
        with Sandbox("default", audit_log=os.path.join(os.environ["TMPDIR"], "a.jsonl")) as sb:
            assert sb.execute("x = 1").ok
    assert default_pool().wait_ready(30)  # ready children wait in this worker's pool
    return n

if __name__ == "__main__":
    # The forkserver's socket goes in multiprocessing's temporary directory, under TMPDIR: under
    # pytest's deep tmp_path in a long TMPDIR its path passes AF_UNIX's 108 bytes. Made under
    # /tmp instead; the sandboxes' scratch directories stay under TMPDIR.
    import multiprocessing.util, tempfile
    tempfile.tempdir = "/tmp"
    multiprocessing.util.get_temp_dir()
    tempfile.tempdir = None
    for method in ("fork", "forkserver"):
        ctx = multiprocessing.get_context(method)
        worker = ctx.Process(target=task, args=(1,))
        worker.start()
        worker.join(120)
        assert worker.exitcode == 0, (method, worker.exitcode)
        with ProcessPoolExecutor(1, mp_context=ctx) as executor:
            assert executor.submit(task, 2).result(120) == 2
    left = sorted(d for d in os.listdir(os.environ["TMPDIR"]) if d.startswith("sandbox-"))
    print("left:", left)
    print("done")
"""


def test_multiprocessing_workers_that_return_leave_no_scratch_directory(tmp_path: Path) -> None:
    env = _host_env(tmp_path)
    script = tmp_path / "host.py"  # forkserver workers import the main module from a file
    script.write_text(WORKERS_THAT_RETURN)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0 and proc.stdout.endswith("done\n"), proc.stdout + proc.stderr
    assert "left: []\n" in proc.stdout, proc.stdout


def _wait_status(pid: int, timeout: float) -> int | None:
    """The exit code of child *pid*, or None if it did not exit in time (then it is killed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    _kill(pid)
    os.waitpid(pid, 0)
    return None


def test_a_process_forked_during_other_threads_calls_keeps_none_of_their_state(tmp_path: Path) -> None:
    """Forked while another thread is inside an execute (its host function runs), while a thread
    holds the spin slot and while one makes the process's CPU watch: the forked process is alone
    in its first call (the parent's calls are not its own: it would never spin), and its first
    host function does not wait for a lock nobody there will release."""
    import threading

    import sandbox.sandbox as impl
    from sandbox import Sandbox

    audit = tmp_path / "audit.jsonl"
    inside, leave = threading.Event(), threading.Event()

    def hold() -> int:
        inside.set()
        leave.wait(60)
        return 1

    with Sandbox("default", host_functions={"hold": hold}, audit_log=audit) as busy:
        caller = threading.Thread(target=busy.execute, args=("hold()",))
        caller.start()
        try:
            assert inside.wait(60)
            with impl._SPIN_SLOT, impl._cpu_watch_lock:  # as threads spinning, making the watch
                pid = os.fork()
                if pid == 0:
                    code = 1
                    try:
                        seen: list[tuple[int, bool]] = []

                        def probe() -> None:
                            seen.append((impl._CALLERS.count, impl._SPIN_SLOT.locked()))

                        with Sandbox("default", host_functions={"probe": probe}, audit_log=audit) as sb:
                            r = sb.execute("probe()")
                        code = 0 if r.ok and seen == [(1, False)] else 2
                        if code:
                            print("forked process saw", r, seen, flush=True)
                    finally:
                        os._exit(code)
            assert _wait_status(pid, 60) == 0
        finally:
            leave.set()
            caller.join(60)


def test_closing_a_stopped_fork_server_does_not_wait_out_another_threads_spawn(tmp_path: Path) -> None:
    """A thread starts a sandbox on a fork server that is stopped (SIGSTOP) and waits for its
    answer (SPAWN_TIMEOUT, 30 s) holding the server's lock. ``close(timeout)`` (what
    ``sandbox.shutdown()`` and atexit call) promises to take at most twice *timeout*; it waited
    for that lock first, the whole 30 s. Now it hangs the socket up first, which ends the
    waiting thread's request at once (it starts over on a new server)."""
    import threading

    from sandbox import Sandbox, SandboxError, forkserver

    audit = tmp_path / "audit.jsonl"
    with Sandbox("default", audit_log=audit, pool=None) as sb:
        assert sb.execute("x = 1").ok
    server = forkserver.shared(False)
    outcome: list[object] = []

    os.kill(server.pid, signal.SIGSTOP)
    thread = threading.Thread(target=_open_and_run, args=(audit, outcome))
    try:
        thread.start()
        deadline = time.monotonic() + 10
        while not server._lock.locked() and time.monotonic() < deadline:
            time.sleep(0.01)  # the opener's spawn request is out: it waits holding the lock
        assert server._lock.locked()
        time.sleep(0.2)
        t0 = time.monotonic()
        server.close(timeout=2.0)
        took = time.monotonic() - t0
        thread.join(60)
        assert not thread.is_alive()
        assert took < 12, f"close(timeout=2) took {took:.1f} s"
        assert outcome and (outcome[0] == "42\n" or isinstance(outcome[0], SandboxError)), outcome
        assert gone(server.pid, 10.0)
    finally:
        with contextlib.suppress(OSError):
            os.kill(server.pid, signal.SIGKILL)
            os.kill(server.pid, signal.SIGCONT)
        thread.join(60)


def test_closing_a_sandbox_does_not_wait_out_another_threads_spawn(tmp_path: Path, monkeypatch) -> None:
    """The fork server is stopped (SIGSTOP) while a thread starts a sandbox on it: that thread
    waits for the answer (SPAWN_TIMEOUT) holding the server's lock. Closing another sandbox of
    that server asks it for its child's exit report for at most EXIT_REPORT_WAIT (10 s; 2 s
    here); it waited for the lock first, the whole spawn timeout. Now it gives up on the report
    when the lock does not come in time (its child is known dead by its pidfd, its pid released
    later)."""
    import threading

    import sandbox.sandbox
    from sandbox import Sandbox, SandboxError, forkserver

    monkeypatch.setattr(forkserver, "SPAWN_TIMEOUT", 12.0)
    monkeypatch.setattr(sandbox.sandbox, "EXIT_REPORT_WAIT", 2.0)
    audit = tmp_path / "audit.jsonl"
    first = Sandbox("default", audit_log=audit, pool=None)
    server = forkserver.shared(False)
    outcome: list[object] = []

    thread = threading.Thread(target=_open_and_run, args=(audit, outcome))
    try:
        assert first.execute("x = 1").ok
        child = first.pid
        assert child is not None
        os.kill(server.pid, signal.SIGSTOP)
        thread.start()
        _until_locked(server)  # the opener's spawn waits for the stopped server
        t0 = time.monotonic()
        first.close()
        took = time.monotonic() - t0
        assert took < 8, f"close() took {took:.1f} s"  # the spawn holds the lock for 12 s
        thread.join(60)
        assert outcome and (outcome[0] == "42\n" or isinstance(outcome[0], SandboxError)), outcome
        assert gone(server.pid, 10.0) and gone(child, 10.0)
    finally:
        first.close()
        with contextlib.suppress(OSError):
            os.kill(server.pid, signal.SIGKILL)
            os.kill(server.pid, signal.SIGCONT)
        thread.join(60)


def test_shutdown_does_not_wait_out_a_pool_refill_on_a_stopped_fork_server(tmp_path: Path) -> None:
    """The fork server is stopped (SIGSTOP) while a pool refills: the refill thread's spawn waits
    for its answer (SPAWN_TIMEOUT, 30 s), and ``sandbox.shutdown()`` (the exit hook too) drains
    the pools first, which waits for spawns in flight: it took 30 s. A stopped server, which
    can answer nobody, is now killed first."""
    import sandbox
    from sandbox import Sandbox, forkserver
    from sandbox.pool import SandboxPool

    audit = tmp_path / "audit.jsonl"
    pool = SandboxPool(2)
    server: forkserver.ForkServer | None = None
    try:
        pool.warm("default")
        assert pool.wait_ready(30)
        server = forkserver.shared(False)
        os.kill(server.pid, signal.SIGSTOP)
        with Sandbox("default", audit_log=audit, pool=pool) as sb:  # takes one: the pool refills
            assert sb.execute("x = 1").ok
            _until_locked(server)  # the refill's spawn waits for the stopped server
            t0 = time.monotonic()
            sandbox.shutdown()
            took = time.monotonic() - t0
        assert took < 15, f"shutdown() took {took:.1f} s"
        assert pool.ready_pids() == []
        assert gone(server.pid, 10.0)
    finally:
        if server is not None:
            with contextlib.suppress(OSError):
                os.kill(server.pid, signal.SIGKILL)
                os.kill(server.pid, signal.SIGCONT)
        pool.close()


# The host forks while it has a sandbox open (a multiprocessing Pool made inside `with
# Sandbox()`, a pre-fork master that opened one): the forked process waits on stdin, as a worker
# outlives a master that was SIGKILLed.
FORK_WITH_A_SANDBOX_OPEN = """
import os
from sandbox import Sandbox, forkserver

sb = Sandbox("default", audit_log=os.path.join(os.environ["TMPDIR"], "a.jsonl"), pool=None)
assert sb.execute("x = 1").ok
child = sb._child
pid = os.fork()
if pid == 0:
    os.read(0, 1)  # lives until the test closes our stdin; never touches the inherited sandbox
    os._exit(0)
lease = child.lease.uid if child.lease is not None else -1
print(pid, forkserver.shared().pid, lease, child.scratch, flush=True)
os.read(0, 1)  # SIGKILLed here
"""


def test_a_forked_process_does_not_hold_the_uid_and_scratch_of_its_parents_children(tmp_path: Path) -> None:
    """The uid lock and scratch-directory lock of a child belong to the open file: a copy of the
    descriptor in a forked process kept them held after the host died, so no sweep could remove
    them and the uid stayed reserved for as long as the forked process lived. (The fork server
    removes the directory on its way out once it can take that lock.)"""
    from sandbox import uids

    host = _start_host(tmp_path, FORK_WITH_A_SANDBOX_OPEN)
    forked = server = -1
    try:
        assert host.stdout is not None
        line = host.stdout.readline()
        assert line, "the host did not open its sandbox"
        forked_s, server_s, uid_s, scratch = line.decode().split()
        forked, server, uid = int(forked_s), int(server_s), int(uid_s)
        host.kill()
        host.wait(30)
        assert gone(server, 15.0)  # the host's children are gone with it
        assert not gone(forked, 0.5), "the forked process should still be waiting"
        assert not os.path.exists(scratch), "the forked process holds the scratch directory's lock"
        if uid >= 0:  # a root host: the child had a uid of its own
            held = uids._try(uids.RUNTIME_DIR, uid)
            assert held is not None, "the forked process holds the uid's lock"
            uids.UidLease(uid, held, uids.RUNTIME_DIR).release()
    finally:
        host.kill()
        if host.stdin is not None:
            host.stdin.close()
        for pid in (forked, server):
            if pid > 0 and not gone(pid, 10.0):
                _kill(pid)
        host.wait(30)


@pytest.mark.skipif(os.geteuid() != 0, reason="uid leases are root's")
def test_a_forked_process_closes_its_copies_of_the_parents_uid_leases(tmp_path: Path) -> None:
    """A lease held by the parent but by no child record yet (a reservation while another thread
    forks), or kept for a child whose death was never confirmed: the forked process's copy of
    its descriptor is closed, and the lease is not its own (releasing it there does nothing)."""
    from sandbox import uids

    directory = str(tmp_path / "uids")
    lease = uids.reserve(directory)
    try:
        fd = lease._fd
        assert fd is not None
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                try:
                    os.fstat(fd)
                    code = 2  # still open here
                except OSError:
                    lease.release()  # not ours: must neither unlink the file nor close anything
                    code = (
                        0 if not lease.held and os.path.exists(os.path.join(directory, str(lease.uid))) else 3
                    )
            finally:
                os._exit(code)
        assert _wait_status(pid, 60) == 0
        assert lease.held and uids._try(directory, lease.uid) is None  # still ours, still locked
    finally:
        lease.release()


def test_a_process_forked_by_a_host_function_may_close_the_sandbox_it_inherited(tmp_path: Path) -> None:
    """A host function forks (``os.fork``, a multiprocessing fork worker): the forked process's
    one thread is the one that was running the call, so closing the inherited sandbox there
    was refused as a host function closing its own sandbox. It only forgets it there."""
    from sandbox import Sandbox

    audit = tmp_path / "audit.jsonl"

    def fork_and_close() -> int | None:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                sb.close()  # the parent's: forgotten here, its child left alone
                with Sandbox("default", audit_log=audit, pool=None) as mine:
                    code = 0 if mine.execute("print(3)").stdout == "3\n" else 2
            except BaseException as exc:
                print("forked process:", type(exc).__name__, exc, flush=True)
            finally:
                os._exit(code)
        return _wait_status(pid, 60)

    sb = Sandbox("default", host_functions={"fork_and_close": fork_and_close}, audit_log=audit)
    try:
        r = sb.execute("x = 5\nprint(fork_and_close())")
        assert r.ok and r.stdout == "0\n", r
        r = sb.execute("print(x)")
        assert r.stdout == "5\n" and not r.state_lost, r
    finally:
        sb.close()


def test_a_fork_while_a_fork_server_closes_leaves_the_forked_processs_descriptors_alone() -> None:
    """A fork server is closed (``sandbox.shutdown()``, a dead server replaced) while another
    thread forks: the forked process forgets the server, closing its copies of the pidfds the
    server still held (a spawn whose frame was lost). close() closed each pidfd before it took
    it out of its list, so a fork in between left the number in the forked process's copy of the
    list, and the hook there closed it again: by then it may be another descriptor, opened by a
    third thread of the parent before the fork, which the forked process needs. Here the fork
    comes (from a profiler) the moment that pidfd is closed, a new descriptor taking its number."""
    from types import FrameType

    from sandbox import forkserver

    server = forkserver.ForkServer()
    orphan = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    server._fds.append(orphan)  # a pidfd whose `spawned` frame was lost (a Ctrl-C)
    forked: list[int] = []
    reader = writer = -1

    def profile(frame: FrameType, event: str, arg: object) -> None:
        nonlocal reader, writer
        if event != "c_return" or arg is not os.close or forked:
            return
        if frame.f_code.co_name != "_close_fds":
            return
        sys.setprofile(None)
        reader, writer = os.pipe()
        os.dup2(reader, orphan)  # another thread's new descriptor takes the closed number
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.fstat(orphan)  # still open here: nothing closed it again
                code = 0
            except OSError:
                code = 2
            finally:
                os._exit(code)
        forked.append(pid)

    try:
        sys.setprofile(profile)
        server.close(timeout=5.0)
    finally:
        sys.setprofile(None)
    try:
        assert forked, "the server's close() closed no pidfd"
        assert _wait_status(forked[0], 60) == 0, "the forked process's descriptor was closed at the fork"
    finally:
        for fd in (orphan, reader, writer):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)


def test_a_fork_while_another_thread_starts_a_child_closes_that_starts_descriptors(monkeypatch) -> None:
    """A pre-fork server forks while its pool refills (or another thread opens a sandbox): the
    start's channel ends, scratch-directory lock and pidfd were in no record yet, and each
    forked worker kept its copies (the directory then outlived a host killed before its
    workers). The fork is made at the moment the fork server has answered, with all four held."""
    import json

    import sandbox.sandbox as impl
    from sandbox import Sandbox

    real = impl.forkserver.spawn
    reports: list[list[str]] = []

    def spawn_then_fork(*args, **kwargs):
        got = real(*args, **kwargs)
        held = sys._getframe(1).f_locals  # _spawn_started's: what the start holds now
        fds = {"ours": held["ours"].fileno(), "theirs": held["theirs"].fileno(),
               "scratch lock": held["scratch_lock"], "pidfd": got[2]}  # fmt: skip
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the forked process: which of the start's descriptors it still has
            try:
                still = []
                for name, fd in fds.items():
                    with contextlib.suppress(OSError):
                        os.fstat(fd)
                        still.append(name)
                os.write(w, json.dumps(still).encode())
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as answer:
            reports.append(json.loads(answer.read() or b'["no answer"]'))
        os.waitpid(pid, 0)
        return got

    monkeypatch.setattr(impl.forkserver, "spawn", spawn_then_fork)
    with Sandbox("default", pool=None) as sb:
        assert sb.execute("print(1)").stdout == "1\n"
    assert reports == [[]], reports


def test_a_forked_process_dropping_an_inherited_sandbox_whose_close_was_cut_short_leaves_it_alone(
    tmp_path: Path, monkeypatch
) -> None:
    """The parent's close was cut short (Ctrl-C) and the sandbox is still referenced; a process
    forked then drops its copy: its finalizer must only forget the parent's child (stopping it
    there removed the parent's scratch directory). The parent's next close finishes its own."""
    import gc

    import sandbox.sandbox as impl
    from sandbox import Sandbox

    sb = Sandbox("default", audit_log=tmp_path / "a.jsonl", pool=None)
    assert sb.execute("x = 1").ok
    child = sb._child
    assert child is not None
    real = impl._collect_exit

    def cut(c):
        monkeypatch.setattr(impl, "_collect_exit", real)
        raise KeyboardInterrupt

    monkeypatch.setattr(impl, "_collect_exit", cut)
    with pytest.raises(KeyboardInterrupt):
        sb.close()
    assert sb.closed and sb._child is child and os.path.isdir(child.scratch)
    pid = os.fork()
    if pid == 0:
        try:
            del sb
            gc.collect()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert os.path.isdir(child.scratch), "the forked process removed the parent's scratch directory"
    sb.close()
    assert sb._child is None and not os.path.exists(child.scratch) and child.pidfd == -1
