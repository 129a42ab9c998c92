"""How a host process that embeds sandboxes ends: each way out leaves nothing behind (scratch
directories, uid lock files, processes) and does not hang. Each case runs in a host process of
its own, under a timeout, with its temporary directory in the test's own."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest

from sandbox import AsyncSandbox, Sandbox, forkserver, protocol, uids
from sandbox.audit import verify
from sandbox.isolation import cgroups
from sandbox.policy import load_policy
from sandbox.pool import SandboxPool
from sandbox.sandbox import _spec_for

ROOT = Path(__file__).resolve().parents[1]


def _host(
    tmp_path: Path, script: str, timeout: float = 30.0
) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run *script* as ``__main__`` of a host process (TMPDIR in *tmp_path*); its result and the
    ``time.monotonic()`` it had ended by (the clock is the machine's: a script that prints its own
    ``time.monotonic()`` at a point tells how long its exit took from there, without its start-up,
    which takes seconds on a loaded machine)."""
    env = dict(os.environ, TMPDIR=str(tmp_path), PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "audit.jsonl")],
        capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip
    return proc, time.monotonic()


def _since(proc: subprocess.CompletedProcess[str], mark: str, ended: float) -> float:
    """Seconds from the ``time.monotonic()`` the host printed after *mark* (on stderr) to its end."""
    [line] = [line for line in proc.stderr.splitlines() if line.startswith(mark + " ")]
    return ended - float(line.split()[-1])


def _left(proc: subprocess.CompletedProcess[str]) -> list[str]:
    """What the host's ``left <scratch> <uid>`` lines name that is still there."""
    left = []
    for line in proc.stdout.splitlines():
        if line.startswith("left "):
            _, scratch, uid = line.split()
            left += [scratch] if os.path.exists(scratch) else []
            lock = os.path.join(uids.RUNTIME_DIR, uid)
            left += [lock] if uid != "-1" and os.path.exists(lock) else []
    return left


_REPORT = (
    "def report(sb):\n"
    "    c = sb._child\n"
    "    print('left', c.scratch, c.lease.uid if c.lease else -1, flush=True)\n"
)

# A server's worker: a daemon thread that runs a function of __main__ (its frame holds __main__'s
# globals, so the interpreter never frees them) and is inside a host function at exit.
DAEMON_THREAD_AT_EXIT = (
    "import sys, threading\n"
    "from sandbox import Sandbox\n" + _REPORT + "inside = threading.Event()\n"
    "def wait():\n"
    "    inside.set()\n"
    "    threading.Event().wait()\n"
    "busy = Sandbox('default', audit_log=sys.argv[1], host_functions={'wait': wait})\n"
    "idle = Sandbox('default', audit_log=sys.argv[1])\n"
    "report(busy)\n"
    "report(idle)\n"
    "threading.Thread(target=lambda: busy.execute('wait()'), daemon=True).start()\n"
    "inside.wait()\n"
    "print('exiting', flush=True)\n"
)


def test_sandboxes_a_daemon_thread_holds_at_exit_leave_no_scratch_or_uid(tmp_path: Path) -> None:
    """Unclosed sandboxes are closed by their ``__del__``, but the interpreter frees nothing a
    daemon thread's frame holds at exit: both sandboxes (the one the thread runs a cell in, and a
    global of ``__main__``) left their scratch directories and uid lock files."""
    proc, _ = _host(tmp_path, DAEMON_THREAD_AT_EXIT)
    assert proc.returncode == 0 and proc.stdout.endswith("exiting\n"), proc.stdout + proc.stderr
    assert proc.stdout.count("left ") == 2
    assert _left(proc) == []
    assert proc.stderr == ""


# A job runner's SIGTERM handler: stop the sandboxes, then exit. The signal lands while the main
# thread waits for the fork server's answer to a spawn (holding the server's lock; the server is
# stopped here so that the wait lasts), and while the pool's refill thread waits for that lock.
SHUTDOWN_IN_A_SIGNAL_HANDLER = (
    "import os, signal, sys, threading, time\n"
    "import sandbox\n"
    "from sandbox import Sandbox, forkserver\n"
    "from sandbox.pool import SandboxPool\n" + _REPORT + "def on_term(sig, frame):\n"
    "    print('term', flush=True)\n"
    "    started = time.monotonic()\n"
    "    sandbox.shutdown()\n"
    "    print('shut down in', time.monotonic() - started, flush=True)\n"
    "    sys.exit(3)\n"
    "signal.signal(signal.SIGTERM, on_term)\n"
    "first = Sandbox('default', audit_log=sys.argv[1], pool=None)\n"
    "report(first)\n"
    "server = forkserver.shared(False)\n"
    "print('server', server.pid, flush=True)\n"
    "pool = SandboxPool(1)\n"
    "def signal_when_waiting():\n"
    "    while not server._lock.locked():\n"
    "        time.sleep(0.005)\n"
    "    pool.warm('default')\n"
    "    while not any(slot.pending for slot in pool._slots.values()):\n"
    "        time.sleep(0.005)\n"
    "    os.kill(os.getpid(), signal.SIGTERM)\n"
    "os.kill(server.pid, signal.SIGSTOP)\n"
    "threading.Thread(target=signal_when_waiting, daemon=True).start()\n"
    "Sandbox('default', audit_log=sys.argv[1], pool=None)\n"
)


def test_shutdown_from_a_signal_handler_that_interrupted_a_spawn_returns_at_once(tmp_path: Path) -> None:
    """``sandbox.shutdown()`` from a signal handler that runs while the main thread holds a fork
    server's lock (in the middle of a ``Sandbox()``, or of a close) hung for ever: closing the
    server waited for that lock, which only the interrupted thread could release; and before
    that, draining the pool waited 30 s for a refill that waited for the same lock."""
    try:
        proc, _ = _host(tmp_path, SHUTDOWN_IN_A_SIGNAL_HANDLER, timeout=60)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        for line in out.splitlines():  # the stopped server would outlive its host
            if line.startswith("server "):
                os.kill(int(line.split()[1]), signal.SIGKILL)
        raise AssertionError(f"the host hung: {out!r}") from None
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "term\nshut down in " in proc.stdout
    # The shutdown's own time (some 10 ms), not the host's: its start-up (an interpreter, a
    # first sandbox, a pool) took 5.2 s of a 5 s bound on a loaded machine.
    assert float(proc.stdout.split("shut down in ")[1].split()[0]) < 5.0, proc.stdout
    assert _left(proc) == []


def _cgroup_trees(server_pid: int) -> list[str]:
    """Where the fork server *server_pid* made its ``rlm-<pid>`` trees (those that exist)."""
    v1, v2 = cgroups._mounts()
    own = cgroups._own_paths()
    tops = [v1[c] + own.get(c, "/") for c in (*cgroups.CONTROLLERS, cgroups.ACCOUNTING) if c in v1]
    tops += [v2 + own.get("", "/")] if v2 is not None and not v1 else []
    return [tree for top in tops if os.path.isdir(tree := os.path.join(top, f"rlm-{server_pid}"))]


def test_a_fork_server_hung_up_on_in_the_middle_of_a_spawn_exits_at_once_and_leaves_no_cgroup(
    tmp_path: Path,
) -> None:
    """``sandbox.shutdown()`` (or the exit) while another thread's sandbox was being forked: the
    server could not tell the host of the child, so its main thread stayed in the child's cgroup
    (cgroup v1), which then could not be removed. The server took 1.7 s to exit, retrying, and
    left its ``rlm-<pid>`` trees behind for a later host's sweep."""
    spec, _ = _spec_for(load_policy("default"))
    for attempt in range(3):
        scratch = tmp_path / f"scratch{attempt}"
        scratch.mkdir()
        server = forkserver.ForkServer()
        config = {
            "policy": spec.policy,
            "policy_sha256": spec.policy_sha256,
            "scratch": str(scratch),
            "uid": None,
            "gid": None,
        }
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with ours, theirs:
            protocol.send_message(
                server.sock, {"t": "spawn", "request": 1, "config": config}, theirs.fileno()
            )
            start = time.monotonic()
            server.close()  # hung up at once: the server is forking the child now
            took = time.monotonic() - start
        assert server.proc.returncode is not None
        assert took < 1.0, f"the server took {took:.2f} s to exit"
        assert _cgroup_trees(server.pid) == []


# A service that leaves its event loop open at exit, an AsyncSandbox's execute still running on it.
ASYNC_EXECUTE_LEFT_ON_AN_OPEN_LOOP = (
    "import asyncio, sys\n"
    "from sandbox import AsyncSandbox\n" + _REPORT + "loop = asyncio.new_event_loop()\n"
    "sb = AsyncSandbox('default', audit_log=sys.argv[1])\n"
    "loop.run_until_complete(sb.start())\n"
    "report(sb._sync)\n"
    "task = loop.create_task(sb.execute('import time\\nwhile True: time.sleep(0.01)'))\n"
    "while not sb._sync._lock.locked():  # the execute holds the sandbox\n"
    "    loop.run_until_complete(asyncio.sleep(0.01))\n"
    "import time\n"
    "print('exiting at', time.monotonic(), file=sys.stderr, flush=True)\n"
    "print('exiting', flush=True)\n"
)


def test_an_async_execute_left_running_on_an_open_loop_does_not_hang_the_exit(tmp_path: Path) -> None:
    """At exit the garbage collector finalizes the pending execute's coroutine and its sandbox
    in any order. The sandbox's ``__del__`` came first: ``close()`` waited for the lock the
    coroutine held, for ever (the host never ended)."""
    try:
        proc, ended = _host(tmp_path, ASYNC_EXECUTE_LEFT_ON_AN_OPEN_LOOP, timeout=60)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        raise AssertionError(f"the host hung: {out!r}") from None
    assert proc.returncode == 0 and proc.stdout.endswith("exiting\n"), proc.stdout + proc.stderr
    assert _since(proc, "exiting at", ended) < 5.0  # the exit's own time, not the start-up's
    assert _left(proc) == []


# An event loop in a daemon thread, an execute running on it at exit. The embedder's own exit
# handler (registered before sandbox was imported: it runs after ours) waits for the execute's end.
ASYNC_EXECUTE_IN_A_DAEMON_THREAD_AT_EXIT = (
    "import asyncio, atexit, sys, threading\n"
    "ended = threading.Event()\n"
    "atexit.register(ended.wait, 10)\n"
    "from sandbox import AsyncSandbox\n"
    "running = threading.Event()\n"
    "def serve():\n"
    "    async def go():\n"
    "        sb = AsyncSandbox('default', audit_log=sys.argv[1])\n"
    "        await sb.start()\n"
    "        running.set()\n"
    "        try:\n"
    "            r = await sb.execute('import time\\nwhile True: time.sleep(0.01)')\n"
    "            print('result', r.error_type, flush=True)\n"
    "        except BaseException as exc:\n"
    "            print('raised', repr(exc), flush=True)\n"
    "        finally:\n"
    "            ended.set()\n"
    "    asyncio.run(go())\n"
    "threading.Thread(target=serve, daemon=True).start()\n"
    "running.wait()\n"
    "print('exiting', flush=True)\n"
)


def test_an_async_execute_in_a_daemon_threads_loop_at_exit_ends_with_a_result_and_its_audit_line(
    tmp_path: Path,
) -> None:
    """The exit stops the children; the execute then builds its result in the loop's executor,
    which takes no more work once the interpreter exits: ``run_in_executor`` raised RuntimeError
    ("cannot schedule new futures after shutdown") out of ``execute``, and the cell that ran had
    no audit line."""
    proc, _ = _host(tmp_path, ASYNC_EXECUTE_IN_A_DAEMON_THREAD_AT_EXIT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "exiting\nresult ChildExited\n" in proc.stdout, proc.stdout + proc.stderr
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    assert len(lines) == 1 and '"outcome":"crashed"' in lines[0]


def test_an_async_execute_dropped_with_its_closed_loop_still_writes_its_audit_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A loop closed without cancelling an execute on it, then dropped (a framework's shutdown):
    the garbage collector finalizes the coroutine, the sandbox and its audit log in any order.
    The log's finalizer closed it first, and the coroutine's "cancelled" line was lost, with an
    "Exception ignored ... AuditError: audit log ... is closed" traceback."""
    unraisable: list[str] = []
    monkeypatch.setattr(
        sys, "unraisablehook", lambda u: unraisable.append(f"{u.exc_type.__name__}: {u.exc_value}")
    )
    audit = tmp_path / "audit.jsonl"

    def abandon() -> None:
        loop = asyncio.new_event_loop()
        sb = AsyncSandbox("default", audit_log=audit)
        loop.run_until_complete(sb.start())
        task = loop.create_task(sb.execute("import time\nwhile True: time.sleep(0.01)"))
        while sb._sync is None or not sb._sync._lock.locked():  # the execute holds the sandbox
            loop.run_until_complete(asyncio.sleep(0.01))
        assert not task.done()
        loop.close()  # the task neither awaited nor cancelled

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        abandon()
        gc.collect()
    assert [u for u in unraisable if "AuditError" in u] == []
    lines = audit.read_text().splitlines()
    assert len(lines) == 1 and '"outcome":"cancelled"' in lines[0]
    assert verify(audit).ok


def test_async_calls_dropped_with_their_closed_loop_print_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two executes left on a loop closed without cancelling them, one running, one waiting for
    its turn: finalizing the first released the turn, which woke the second through the closed
    loop ("Exception ignored in: <coroutine AsyncSandbox.execute> ... RuntimeError: Event loop
    is closed")."""
    unraisable: list[str] = []
    monkeypatch.setattr(
        sys, "unraisablehook", lambda u: unraisable.append(f"{u.exc_type.__name__}: {u.exc_value}")
    )

    def abandon() -> None:
        loop = asyncio.new_event_loop()
        sb = AsyncSandbox("default", audit_log=tmp_path / "audit.jsonl")
        loop.run_until_complete(sb.start())
        tasks = [loop.create_task(sb.execute("import time\nwhile True: time.sleep(0.01)")) for _ in range(2)]
        while sb._sync is None or not sb._sync._lock.locked():  # the first execute holds the sandbox
            loop.run_until_complete(asyncio.sleep(0.01))
        assert not any(task.done() for task in tasks)
        loop.close()  # neither awaited nor cancelled

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        abandon()
        gc.collect()
    assert unraisable == []


# An exit handler registered before sandbox was imported runs after sandbox's own: it opens
# sandboxes (a second of one policy starts the pool's refill) and leaves one open.
SANDBOXES_IN_A_LATER_EXIT_HANDLER = (
    "import atexit, sys, time\n"
    "def late():\n"
    "    print('late at', time.monotonic(), file=sys.stderr, flush=True)\n"
    "    from sandbox import Sandbox\n"
    "    with Sandbox('default', audit_log=sys.argv[1]) as sb:\n"
    "        print('late', sb.execute('print(1)').stdout, end='', flush=True)\n"
    "    global kept\n"
    "    kept = Sandbox('default', audit_log=sys.argv[1])\n"
    "atexit.register(late)\n"
    "from sandbox import Sandbox\n"
    "with Sandbox('default', audit_log=sys.argv[1]) as sb:\n"
    "    print('main', sb.execute('print(0)').stdout, end='', flush=True)\n"
)


def test_sandboxes_of_an_exit_handler_that_runs_after_sandboxs_leave_nothing(tmp_path: Path) -> None:
    """sandbox's exit handler had drained the pools; a later one's second sandbox of a policy
    started refilling the default pool, whose ready children nobody stopped (their scratch
    directories were left, every run), and whose refill thread, frozen mid-spawn as the
    interpreter finalized, held the fork server's lock: the open sandbox's ``__del__`` then
    waited 10 s for it (half the runs)."""
    proc, ended = _host(tmp_path, SANDBOXES_IN_A_LATER_EXIT_HANDLER)
    assert proc.returncode == 0 and proc.stdout == "main 0\nlate 1\n", proc.stdout + proc.stderr
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("sandbox-")] == []
    # From the later handler on (two sandboxes started, one execute: seconds under load), not
    # from the host's start: the wait for the lock took 10 s of its own.
    assert _since(proc, "late at", ended) < 8.0, proc.stderr


# Ctrl-C pressed again while the host exits; its sandboxes are held by a daemon thread (only the
# exit's clean-up can remove their scratch directories).
CTRL_C_DURING_THE_EXIT = (
    "import os, signal, sys, threading, time\n"
    "from sandbox import Sandbox, forkserver\n"
    + _REPORT
    + "boxes = [Sandbox('default', audit_log=sys.argv[1], pool=None) for _ in range(4)]\n"
    "for box in boxes:\n"
    "    report(box)\n"
    "def worker():\n"
    "    while not forkserver._exiting:\n"
    "        time.sleep(0.0005)\n"
    "    os.kill(os.getpid(), signal.SIGINT)\n"
    "    while True:\n"
    "        time.sleep(1)\n"
    "threading.Thread(target=worker, daemon=True).start()\n"
    "print('exiting', flush=True)\n"
)


def test_ctrl_c_during_the_exit_neither_prints_a_traceback_nor_cuts_the_clean_up_short(
    tmp_path: Path,
) -> None:
    """A KeyboardInterrupt that lands in sandbox's exit handler printed "Exception ignored in
    atexit callback" with a traceback (every run), and skipped what came after it: the fork
    servers not yet closed, and the clean-up of sandboxes no ``close()`` reached."""
    proc, _ = _host(tmp_path, CTRL_C_DURING_THE_EXIT)
    assert proc.returncode == 0 and proc.stdout.endswith("exiting\n"), proc.stdout + proc.stderr
    assert proc.stdout.count("left ") == 4
    assert "Traceback" not in proc.stderr, proc.stderr
    assert _left(proc) == []


def test_draining_a_pool_under_a_steady_load_waits_only_for_the_spawns_in_flight(tmp_path: Path) -> None:
    """``drain()`` (``sandbox.shutdown()``) waits for the refills in flight. Sandboxes opened
    meanwhile wanted the policy again at once, a refill followed each spawn, and the drain
    waited for as long as the load lasted, up to its 30 s bound (7, 18 and 26 s measured)."""
    pool = SandboxPool(2)
    stop = threading.Event()
    opened = threading.Semaphore(0)

    def user() -> None:
        while not stop.is_set():
            with Sandbox("default", audit_log=tmp_path / "audit.jsonl", pool=pool):
                opened.release()

    users = [threading.Thread(target=user) for _ in range(4)]
    for thread in users:
        thread.start()
    took = []
    try:
        for _ in range(5):
            for _ in range(6):  # the pool is refilling under the load
                assert opened.acquire(timeout=30)
            start = time.monotonic()
            pool.drain()
            took.append(time.monotonic() - start)
    finally:
        stop.set()
        for thread in users:
            thread.join(30)
        pool.close()
    assert max(took) < 2.0, took


@pytest.mark.parametrize("argv", [["--help"], ["exec", "-"]], ids=["usage", "exec"])
def test_the_rlm_program_freezes_the_collector_before_the_interpreter_shuts_down(
    tmp_path: Path, argv: list[str]
) -> None:
    """``python -m rlm`` (and the console script, the same entry()) puts its objects beyond the
    collector before exiting: the shutdown's last collection walked every object litellm's import
    made (1.7 s of CPU after each ``rlm run``). Its exit handlers still run after, and see the freeze;
    an ``rlm exec`` still prints its output and leaves no scratch directory."""
    code = (
        "import atexit, gc, os, runpy, sys\n"
        "atexit.register(lambda: os.write(2, b'frozen %d' % gc.get_freeze_count()))\n"
        f"sys.argv = ['rlm', *{argv!r}]\n"
        "runpy.run_module('rlm', run_name='__main__', alter_sys=True)\n"
    )
    env = dict(os.environ, TMPDIR=str(tmp_path), PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", code], input="print(6 * 7)", capture_output=True, text=True,
                          env=env, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert int(done.stderr.rsplit("frozen ", 1)[1]) > 5_000, done.stderr  # every object, not a few
    assert done.stdout == ("42\n" if argv[0] == "exec" else done.stdout) and done.stdout
    assert os.listdir(tmp_path) == []
