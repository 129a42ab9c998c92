"""Embedded the way servers embed it: threads, event loops, forks, a dead fork server, pools.

Every test here failed before its fix (the fork server died with the thread
that started it, concurrent first calls built one child each, a cancelled
execute kept running, re-entrant use said "Broken pipe", ...).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

import sandbox
from sandbox import AsyncSandbox, Sandbox, SandboxError, forkserver
from sandbox.errors import SandboxClosedError
from sandbox.pool import SandboxPool, default_pool
from tests.conftest import gone

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ lifecycle
def test_server_started_by_a_thread_outlives_the_thread(audit_path) -> None:
    sandbox.shutdown()  # the next sandbox starts the server, from the worker thread
    seen: list[int] = []

    def worker() -> None:
        with Sandbox("default", audit_log=audit_path) as sb:
            assert sb.execute("x = 1").ok
        seen.append(forkserver.shared().pid)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    with Sandbox("default", audit_log=audit_path) as sb:
        r = sb.execute("print(2)")
    assert r.stdout == "2\n"
    assert forkserver.shared().pid == seen[0]  # the same server: it did not die with the thread


def test_async_sandbox_in_two_successive_event_loops(audit_path) -> None:
    sandbox.shutdown()

    async def once(i: int) -> str:
        async with AsyncSandbox("default", audit_log=audit_path) as sb:
            return (await sb.execute(f"print({i})")).stdout

    server_pids = []
    for i in range(2):
        assert asyncio.run(once(i)) == f"{i}\n"
        server_pids.append(forkserver.shared().pid)
    assert server_pids[0] == server_pids[1]


def test_fork_server_killed_existing_and_new_sandboxes_recover(audit_path) -> None:
    sb = Sandbox("default", audit_log=audit_path)
    try:
        assert sb.execute("x = 41").ok
        server = forkserver.shared()
        os.kill(server.pid, signal.SIGKILL)
        assert gone(server.pid)
        assert gone(sb.pid)  # its children die with it
        try:
            r = sb.execute("print(x)")
        except SandboxError:
            pass  # allowed: a SandboxError, never a raw OSError
        else:  # a result that says the child is gone (or, had it been replaced already, that state was lost)
            assert r.crashed or r.state_lost, r
        r = sb.execute("x = 1; print(x)")  # and the sandbox keeps working on a new server
        assert r.ok and r.stdout == "1\n"
        with Sandbox("default", audit_log=audit_path) as fresh:
            assert fresh.execute("print(3)").stdout == "3\n"
        assert forkserver.shared().pid != server.pid
    finally:
        sb.close()


def test_spawn_on_a_server_that_just_died_is_retried(audit_path, monkeypatch) -> None:
    server = forkserver.shared()
    os.kill(server.pid, signal.SIGKILL)
    assert gone(server.pid)
    # As if it died between the liveness check and the request: only the spawn itself can find out.
    monkeypatch.setattr(forkserver.ForkServer, "alive", property(lambda self: not self.closed))
    with Sandbox("default", audit_log=audit_path, pool=None) as sb:
        assert sb.execute("print(4)").stdout == "4\n"
    assert server.closed and forkserver.shared() is not server


def test_a_server_that_forked_the_child_then_died_is_retried_on_a_new_channel(audit_path, monkeypatch) -> None:
    """A fork server that goes under a spawn request (``sandbox.shutdown()`` from another thread,
    a kill) after it forked the child: the child's ``hello`` was on the channel, the request was
    retried on the same channel, and the new child's ``hello`` reached the first execute: a
    ``ProtocolError`` blaming a child that broke nothing (the embedder's shutdown race, 4 runs
    of 8). The start is made again with a new channel."""
    import select

    real = forkserver.ForkServer.spawn
    went: list[int] = []

    def forks_then_goes(self, config, chan_fd, *args, **kwargs):
        got = real(self, config, chan_fd, *args, **kwargs)
        if went:
            return got
        frame = sys._getframe(1)
        while "ours" not in frame.f_locals:  # the start's end of the channel
            frame = frame.f_back
        assert select.select([frame.f_locals["ours"]], [], [], 20)[0], "the first child said nothing"
        went.append(got[0])
        self._kill()
        assert gone(self.pid)
        raise self._gone("the fork server died under the request")  # as a hang-up is found

    monkeypatch.setattr(forkserver.ForkServer, "spawn", forks_then_goes)
    with Sandbox("default", audit_log=audit_path, pool=None) as sb:
        for i in range(3):
            r = sb.execute(f"print({i})")
            assert r.ok and r.stdout == f"{i}\n" and not r.state_lost, r
    assert went


@pytest.mark.parametrize(
    "how", ["found-closed", "went-after-the-request", "went-and-a-child-runs"]
)
def test_a_start_that_meets_two_dead_servers_keeps_a_uid_only_while_a_process_uses_it(
    audit_path, monkeypatch, how: str
) -> None:
    """``shutdown()`` racing with starts: each start that met two dead servers kept its uid until
    the exit (a lock file and a descriptor each: 68-75 in 15 s of the attack), although a child
    the dead servers forked under it dies with them, and a server found closed before the
    request forked nothing. The uid is let go once no process runs under it; kept (until the
    exit) only while one does."""
    import sandbox.sandbox as impl

    survivors: list[int] = []

    def goes(self, config, chan_fd, *args, **kwargs):
        if how == "went-and-a-child-runs" and config["uid"] is not None and not survivors:
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # a child of the dead server that has not died yet
                try:
                    os.setresuid(config["uid"], config["uid"], config["uid"])
                    os.write(w, b"x")
                    time.sleep(30)
                finally:
                    os._exit(0)
            survivors.append(pid)
            os.close(w)
            with os.fdopen(r, "rb") as ready:
                assert ready.read(1) == b"x"  # under its uid now (a loaded machine: not at once)
        raise forkserver.ServerGone("went", sent=how != "found-closed")

    monkeypatch.setattr(forkserver.ForkServer, "spawn", goes)
    monkeypatch.setattr(impl, "_EXPOSED_WAIT", 0.3)
    kept = len(impl._unconfirmed)
    try:
        with pytest.raises(SandboxError, match="died twice in a row"):
            Sandbox("default", audit_log=audit_path, pool=None)
    finally:
        for pid in survivors:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    taken = impl._unconfirmed[kept:]
    del impl._unconfirmed[kept:]
    try:
        if how == "went-and-a-child-runs" and os.geteuid() == 0:
            assert survivors  # (a root host: a uid of its own for each child)
        assert len(taken) == len(survivors), (taken, survivors)
    finally:
        for lease in taken:
            lease.release()
    monkeypatch.undo()
    with Sandbox("default", audit_log=audit_path, pool=None) as sb:
        assert sb.execute("print(2)").stdout == "2\n"


def test_sandbox_in_a_forked_host_process(audit_path) -> None:
    parent = Sandbox("default", audit_log=audit_path)
    try:
        assert parent.execute("x = 5").ok
        pid = os.fork()
        if pid == 0:  # the forked host: its own sandboxes work, the parent's is left alone
            code = 1
            try:
                # kill() and alive leave the parent's child alone too
                parent.kill()
                if parent.alive:
                    os._exit(3)
                try:
                    parent.execute("x")
                except SandboxClosedError:
                    parent.close()
                    with Sandbox("default", audit_log=audit_path) as sb:
                        if sb.execute("print(6)").stdout == "6\n":
                            code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        r = parent.execute("print(x)")
        assert r.stdout == "5\n" and not r.state_lost
    finally:
        parent.close()


# ------------------------------------------------------------------- asyncio
def test_concurrent_first_calls_share_one_child(audit_path) -> None:
    async def main() -> list[object]:
        sb = AsyncSandbox("default", audit_log=audit_path)
        try:
            await asyncio.gather(*(sb.execute(f"v{i} = {i}") for i in range(4)))
            return [await sb.get_variable(f"v{i}") for i in range(4)]
        finally:
            await sb.close()

    assert asyncio.run(main()) == [0, 1, 2, 3]


@pytest.mark.parametrize("how", ["cancel", "timeout"])
def test_cancelled_execute_stops_the_cell(audit_path, how: str) -> None:
    async def main() -> None:
        async with AsyncSandbox("default", audit_log=audit_path) as sb:
            await sb.execute("x = 1")
            pid = sb._sync.pid if sb._sync else None
            cell = "import time\nwhile True: time.sleep(0.01)"
            if how == "cancel":
                task = asyncio.ensure_future(sb.execute(cell))
                await asyncio.sleep(0.5)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            else:
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(0.5):
                        await sb.execute(cell)
            assert pid is not None and gone(pid)  # the cell stopped: its child was killed
            r = await sb.execute("print(2)")
            assert r.ok and r.state_lost and r.stdout == "2\n"

    asyncio.run(main())
    outcomes = [json.loads(line)["outcome"] for line in audit_path.read_text().splitlines()]
    assert outcomes == ["ok", "cancelled", "ok"]  # the cancelled cell ran, and is audited as such


class _NoThreads(concurrent.futures.ThreadPoolExecutor):
    """A default executor that refuses work: what runs on it shows up as an error."""

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError(f"{getattr(fn, '__qualname__', fn)} was sent to a worker thread")


def test_async_execute_runs_on_the_loop_without_worker_threads(audit_path) -> None:
    """Once the child is there, execute (and coroutine host functions) need no thread per call."""

    async def main() -> list[str]:
        async def double(x: int) -> int:
            await asyncio.sleep(0)
            return 2 * x

        async with AsyncSandbox("default", host_functions={"double": double}, audit_log=audit_path) as sb:
            asyncio.get_running_loop().set_default_executor(_NoThreads())
            out = [(await sb.execute(f"print(double({i}))")).stdout for i in range(20)]
            asyncio.get_running_loop().set_default_executor(concurrent.futures.ThreadPoolExecutor(2))
            return out

    assert asyncio.run(main()) == [f"{2 * i}\n" for i in range(20)]


def test_async_sync_host_function_does_not_block_the_loop(audit_path) -> None:
    """A blocking host function runs in a worker thread: other tasks on the loop go on meanwhile."""

    async def main() -> tuple[str, int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        def slow() -> str:
            time.sleep(1.0)
            return "done"

        async with AsyncSandbox("default", host_functions={"slow": slow}, audit_log=audit_path) as sb:
            task = asyncio.ensure_future(ticker())
            r = await sb.execute("print(slow())")
            task.cancel()
            return r.stdout, ticks

    out, ticks = asyncio.run(main())
    assert out == "done\n" and ticks >= 10  # a blocked loop would have ticked about once


# -------------------------------------------------------------- re-entrancy
def test_reentrant_use_from_a_host_function_is_a_clear_error(audit_path) -> None:
    errors: list[str] = []

    def inner() -> int:
        try:
            sb.execute("y = 1")
        except SandboxError as exc:
            errors.append(str(exc))
        return 1

    with Sandbox("default", host_functions={"inner": inner}, audit_log=audit_path) as sb:
        r = sb.execute("print(inner())")
        assert r.ok and r.stdout == "1\n"
        assert sb.execute("print(3)").stdout == "3\n"
    assert errors and "re-entrant use is not allowed" in errors[0]


@pytest.mark.parametrize(
    "call, message",
    [
        ("execute", "re-entrant use is not allowed"),
        # close() waited for the turn its own execute held: the execute never ended (time in
        # host functions is not wall time).
        ("close", "a host function closed its own sandbox"),
    ],
)
def test_reentrant_use_from_an_async_host_function_is_a_clear_error(audit_path, call: str, message: str) -> None:
    async def main() -> tuple[str, str]:
        async def inner() -> str:
            try:
                await (sb.execute("y = 1") if call == "execute" else sb.close())
            except SandboxError as exc:
                return str(exc)
            return "no error"

        sb = AsyncSandbox("default", host_functions={"inner": inner}, audit_log=audit_path)
        try:
            r = await asyncio.wait_for(sb.execute("print(inner())"), 60)
            return r.stdout, (await sb.execute("print(3)")).stdout
        finally:
            await sb.close()

    out, after = asyncio.run(main())
    assert message in out and after == "3\n"


def test_pipelined_calls_leave_the_loop_its_turns(audit_path) -> None:
    """A child (guard off) that writes 3,000 calls to its channel at once, served by a coroutine
    host function that never suspends: the calls already read were served back to back, and a
    ticker task on the same loop got no turn until all were done (400 ms stalls with 5,000). The
    loop now gets a turn between calls."""
    from tests.security.conftest import policy_for

    code = (
        "import msgpack, os, struct, time\n"
        "body = msgpack.packb({'t': 'call', 'id': 1, 'fn': 'quick', 'args': [], 'kwargs': {}})\n"
        "data = memoryview((struct.pack('>I', len(body)) + body) * 3000)\n"
        "while data:\n    data = data[os.write(3, data):]\n"
        "time.sleep(0.5)\n"
    )

    async def main() -> tuple[int, int]:
        calls = 0

        async def quick() -> int:
            nonlocal calls
            calls += 1
            return 1

        ticks: list[int] = []

        async def ticker() -> None:
            while True:
                ticks.append(calls)
                await asyncio.sleep(0)

        policy = policy_for("guard_none", **{"limits.wall_seconds": 10})
        async with AsyncSandbox(policy, host_functions={"quick": quick}, audit_log=audit_path) as sb:
            await sb.execute("pass")
            task = asyncio.create_task(ticker())
            await sb.execute(code)
            task.cancel()
            # the most calls served between two turns of the ticker
            gaps = [b - a for a, b in itertools.pairwise(ticks)]
            return calls, max(gaps, default=0)

    calls, gap = asyncio.run(main())
    assert calls >= 100, calls  # until the child's socket buffer, full of unread replies, stalls it
    assert gap <= 2, gap  # a turn after every call (at most one more before the ticker runs)


# --------------------------------------------------------------------- pool
def test_pooled_children_serve_one_sandbox_each(audit_path) -> None:
    with SandboxPool(size=2) as pool:
        pool.warm("default")
        assert pool.wait_ready(30)
        ready = set(pool.ready_pids())
        assert len(ready) == 2
        with Sandbox("default", host_functions={"d": lambda x: 2 * x}, audit_log=audit_path, pool=pool) as a:
            assert a.pid in ready  # taken from the pool
            a.execute("secret = 'tenant a'")
            assert a.execute("print(d(21))").stdout == "42\n"  # host functions reach a pooled child
            pid_a = a.pid
        assert gone(pid_a)  # never reused
        assert pool.wait_ready(30)
        with Sandbox("default", audit_log=audit_path, pool=pool) as b:
            assert b.pid != pid_a
            r = b.execute("print(secret)")
            assert r.error_type == "NameError"
            r = b.execute("d(1)")
            assert r.error_type == "NameError"  # the previous tenant's host functions are not there
        ready = set(pool.ready_pids())
    assert all(gone(pid) for pid in ready)  # close() stopped the ready children


def test_pool_size_zero_and_pool_none_fork_on_demand(audit_path) -> None:
    with SandboxPool(size=0) as pool:
        pool.warm("default")
        with Sandbox("default", audit_log=audit_path, pool=pool) as sb:
            assert sb.execute("print(1)").ok
        assert pool.ready_pids() == []
    with Sandbox("default", audit_log=audit_path, pool=None) as sb:
        assert sb.execute("print(1)").ok
    with pytest.raises(ValueError):
        SandboxPool(size=-1)
    for wrong in ("2", 2.0, True):  # a wrong type is a TypeError, as the README says of every argument
        with pytest.raises(TypeError, match="pool size must be an int"):
            SandboxPool(size=wrong)  # type: ignore[arg-type]


def test_pool_children_of_a_killed_server_are_replaced(audit_path) -> None:
    with SandboxPool(size=2) as pool:
        pool.warm("default")
        assert pool.wait_ready(30)
        old = set(pool.ready_pids())
        os.kill(forkserver.shared().pid, signal.SIGKILL)
        assert all(gone(pid) for pid in old)
        with Sandbox("default", audit_log=audit_path, pool=pool) as sb:
            assert sb.pid not in old
            r = sb.execute("print(7)")
            assert r.ok and r.stdout == "7\n" and not r.state_lost


def test_a_one_shot_program_does_not_fill_the_pool(audit_path) -> None:
    with SandboxPool(size=2) as pool:
        with Sandbox("default", audit_log=audit_path, pool=pool) as sb:  # the first of its policy
            assert sb.execute("print(1)").ok
        time.sleep(0.5)
        assert pool.ready_pids() == []  # nothing forked for a pool nobody may use
        with Sandbox("default", audit_log=audit_path, pool=pool) as sb:  # the second: now it pays off
            assert sb.execute("print(2)").ok
        assert pool.wait_ready(30) and len(pool.ready_pids()) == 2


def test_only_a_lone_calling_thread_spins(audit_path) -> None:
    """The host spins for an answer only while one thread is inside a sandbox call (a spinning
    thread takes the GIL at every poll); the count is kept right through errors."""
    import sandbox.sandbox as impl

    seen: list[int] = []
    both_in = threading.Barrier(2, timeout=30)

    def probe(wait: bool) -> int:
        if wait:
            both_in.wait()  # both threads are inside an execute now
        seen.append(impl._CALLERS.count)
        if wait:
            both_in.wait()  # and neither leaves before both have looked
        return 1

    with (
        Sandbox("default", host_functions={"probe": probe}, audit_log=audit_path) as a,
        Sandbox("default", host_functions={"probe": probe}, audit_log=audit_path) as b,
    ):
        base = impl._CALLERS.count  # a thread left by an earlier test may still be in a call
        assert a.execute("probe(False)").ok and seen == [base + 1]
        results = []
        threads = [
            threading.Thread(target=lambda sb=sb: results.append(sb.execute("probe(True)"))) for sb in (a, b)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert all(r.ok for r in results) and seen[1:] == [base + 2, base + 2]
        with pytest.raises(TypeError):
            a.execute(b"not text")  # type: ignore[arg-type]
        a.close()
        with pytest.raises(SandboxClosedError):
            a.execute("x = 1")
    assert impl._CALLERS.count == base


# ------------------------------------------------------- cancellation, hard cases
def _wait_unlocked(sb: Sandbox, seconds: float = 10.0) -> bool:
    """True once *sb*'s lock is free; else frees it (so that a failure cannot hang the suite)."""
    deadline = time.monotonic() + seconds
    while sb._lock.locked() and time.monotonic() < deadline:
        time.sleep(0.01)
    if sb._lock.locked():
        sb._lock.release()
        return False
    return True


def test_execute_cancelled_while_a_thread_replaces_the_child_frees_the_sandbox_on_a_closed_loop(
    audit_path,
) -> None:
    """The loop is closed before the worker thread is done: the sandbox's lock must still be freed."""
    sb = AsyncSandbox("default", audit_log=audit_path)

    async def first() -> None:
        await sb.execute("x = 1")
        assert sb._sync is not None
        sb._sync.kill()  # the next execute replaces the child in a worker thread
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0):  # cancelled at its first await: during that thread
                await sb.execute("y = 1")

    loop = asyncio.new_event_loop()
    loop.run_until_complete(first())
    loop.close()  # at once, as run_until_complete-style embedders do: nothing runs on it again
    assert sb._sync is not None and _wait_unlocked(sb._sync), "the sandbox stayed locked"

    async def second() -> object:
        try:
            return await sb.execute("print(2)")
        finally:
            await sb.close()

    r = asyncio.run(second())
    assert r.ok and r.stdout == "2\n" and r.state_lost, r
    assert sandbox.audit.verify(audit_path).ok


def test_ctrl_c_while_a_dead_child_is_cleaned_up_leaves_a_usable_sandbox(audit_path, monkeypatch) -> None:
    """Ctrl-C landing in the clean-up of a dead child (its last step deletes the scratch dir):
    the next call starts a fresh child instead of closing that child's descriptors again."""
    real_remove_tree = sandbox.sandbox.remove_tree
    interrupts = [KeyboardInterrupt()]

    def remove_tree(path: str) -> None:
        real_remove_tree(path)
        if interrupts:
            raise interrupts.pop()

    with Sandbox("default", audit_log=audit_path, pool=None) as sb:
        assert sb.execute("x = 1").ok
        sb.kill()
        monkeypatch.setattr(sandbox.sandbox, "remove_tree", remove_tree)
        with pytest.raises(KeyboardInterrupt):
            sb.execute("y = 2")
        r = sb.execute("print(3)")
        assert r.ok and r.stdout == "3\n" and r.state_lost, r
    assert sandbox.audit.verify(audit_path).ok


def test_ctrl_c_while_a_child_is_forked_does_not_desynchronize_the_fork_server(
    audit_path, monkeypatch
) -> None:
    """Ctrl-C while the host waits for the fork server's answer to a spawn: that answer
    (a pid, a pidfd) arrives later and must not be taken as the answer to the next spawn
    (every later sandbox then got the previous request's child, which had already quit)."""
    real_read = forkserver.ForkServer._read_one
    interrupts = [KeyboardInterrupt()]

    def read_one(self: forkserver.ForkServer, timeout: float | None) -> object:
        if interrupts:
            raise interrupts.pop()
        return real_read(self, timeout)

    server = forkserver.shared(False)
    earlier = {p.pid for p in psutil.Process(server.pid).children()}
    monkeypatch.setattr(forkserver.ForkServer, "_read_one", read_one)
    with pytest.raises(KeyboardInterrupt):
        Sandbox("default", audit_log=audit_path, pool=None)
    deadline = time.monotonic() + 10
    while not (orphans := {p.pid for p in psutil.Process(server.pid).children()} - earlier):
        assert time.monotonic() < deadline, "the interrupted request forked nothing"
        time.sleep(0.01)
    for i in range(3):
        with Sandbox("default", audit_log=audit_path, pool=None) as sb:
            r = sb.execute(f"print({i})")
            assert r.ok and r.stdout == f"{i}\n", r
    assert forkserver.shared(False) is server  # the same server went on serving
    # Killed and reaped, not left a zombie. The new children may include one the default pool
    # forked meanwhile (an earlier test of this process used it): those stay, as ready children.
    deadline = time.monotonic() + 10
    while left := {pid for pid in orphans if psutil.pid_exists(pid)} - set(default_pool().ready_pids()):
        assert time.monotonic() < deadline, f"the child of the interrupted request was never reaped: {left}"
        time.sleep(0.01)


def test_execute_cancelled_while_its_result_is_built_keeps_the_sandbox_until_then(
    audit_path, monkeypatch
) -> None:
    """Cancelled while a worker thread asks the fork server how the child ended (slow here):
    the next execute waits for that thread, so the two are never at work on one sandbox at once."""
    real_exit_info = Sandbox._exit_info

    def slow_exit_info(self: Sandbox, child: object) -> object:
        time.sleep(1.0)
        return real_exit_info(self, child)  # type: ignore[arg-type]

    policy = sandbox.load_policy("default").override({"limits.wall_seconds": 0.5})

    async def main() -> None:
        async with AsyncSandbox(policy, audit_log=audit_path) as sb:
            monkeypatch.setattr(Sandbox, "_exit_info", slow_exit_info)
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(1.0):  # the wall limit kills the cell at 0.5 s
                    await sb.execute("while True: pass")
            monkeypatch.setattr(Sandbox, "_exit_info", real_exit_info)
            r = await sb.execute("print(1)")
            assert r.ok and r.state_lost, r

    asyncio.run(main())
    outcomes = [json.loads(line)["outcome"] for line in audit_path.read_text().splitlines()]
    assert outcomes == ["limit:wall", "ok"]
    assert sandbox.audit.verify(audit_path).ok


def test_a_task_started_by_an_async_host_function_may_use_the_sandbox_after_the_call(audit_path) -> None:
    """Tasks inherit the host function's context: once the call is over, theirs is no re-entrant use."""

    async def main() -> str:
        done = asyncio.Event()
        tasks: list[asyncio.Task[object]] = []

        async def follow_up() -> object:
            await done.wait()
            return await sb.execute("print(x + 1)")

        async def schedule() -> int:
            tasks.append(asyncio.ensure_future(follow_up()))
            return 1

        async with AsyncSandbox("default", host_functions={"schedule": schedule}, audit_log=audit_path) as sb:
            assert (await sb.execute("x = schedule()")).ok
            done.set()
            r = await asyncio.wait_for(tasks[0], 60)
            return r.stdout  # type: ignore[attr-defined,no-any-return]

    assert asyncio.run(main()) == "2\n"


@pytest.mark.parametrize("where", ["cell", "host function"])
def test_ctrl_c_during_a_sync_execute_kills_the_cell_and_is_audited(audit_path, where: str) -> None:
    """A real SIGINT while execute waits for the cell (or runs a host function): KeyboardInterrupt
    reaches the caller, the child is killed, the audit line says "cancelled", the sandbox goes on."""
    assert threading.current_thread() is threading.main_thread()
    main = threading.get_ident()
    timer = threading.Timer(0.5, signal.pthread_kill, (main, signal.SIGINT))
    cell = "import time\nwhile True: time.sleep(0.01)" if where == "cell" else "wait()"
    with Sandbox("default", host_functions={"wait": lambda: time.sleep(30)}, audit_log=audit_path) as sb:
        assert sb.execute("x = 1").ok
        pid = sb.pid
        timer.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                sb.execute(cell)
        finally:
            timer.cancel()
        assert pid is not None and gone(pid)
        r = sb.execute("print('x' in dir())")
        assert r.ok and r.stdout == "False\n" and r.state_lost, r
    outcomes = [json.loads(line)["outcome"] for line in audit_path.read_text().splitlines()]
    assert outcomes == ["ok", "cancelled", "ok"]
    assert sandbox.audit.verify(audit_path).ok


@pytest.mark.parametrize("call", ["get_variable", "set_variable"])
def test_ctrl_c_during_a_variable_transfer_does_not_hand_its_answer_to_the_next_call(
    audit_path, monkeypatch, call: str
) -> None:
    """A real SIGINT while get_variable or set_variable waits for the child: the answer on its
    way must not be taken by the next call for its own (get_variable("small") returning the
    big list, set_variable("b") "succeeding" on the other's ack and the next execute breaking
    the protocol). The child is stopped; the next calls work on a fresh one and say so.

    The interrupt must land after the request went out (not while the host still packs the
    value) and before the answer: it is sent as the host starts to wait for the answer. (Timers
    set to shares of one measured transfer missed that window in all 9 tries on a loaded
    machine, and slept 5 s after each miss.)"""
    assert threading.current_thread() is threading.main_thread()
    big = [f"item {i}" for i in range(600_000)]
    real_expect = Sandbox._expect
    armed: list[str] = []

    def interrupted_expect(self: Sandbox, child: object, kind: str, timeout: float) -> object:
        if armed and kind == armed[0]:  # the request is out: its answer is awaited from here
            armed.clear()
            signal.pthread_kill(threading.get_ident(), signal.SIGINT)
        return real_expect(self, child, kind, timeout)  # type: ignore[arg-type]

    monkeypatch.setattr(Sandbox, "_expect", interrupted_expect)
    with Sandbox("default", audit_log=audit_path) as sb:
        if call == "get_variable":
            assert sb.execute("big = ['item %d' % i for i in range(600_000)]; small = 'SMALL'").ok
        pid = sb.pid
        assert pid is not None
        armed.append("value" if call == "get_variable" else "ack")
        with pytest.raises(KeyboardInterrupt):
            if call == "get_variable":
                sb.get_variable("big")
            else:
                sb.set_variable("big", big)
        assert not armed
        assert gone(pid, 10.0), "the child the answer was on its way from still runs"
        if call == "get_variable":
            with pytest.raises(SandboxError, match="restarted"):
                sb.get_variable("small")
        else:
            sb.set_variable("b", 1)
        r = sb.execute("print('big' in dir(), 'b' in dir())")
        assert r.ok and r.state_lost, r
        assert r.stdout == ("False False\n" if call == "get_variable" else "False True\n")


def test_an_infinite_or_huge_variable_timeout_means_no_deadline(audit_path) -> None:
    """timeout=math.inf (or 1e300) on set_variable and get_variable: no OverflowError from the
    wait (it used to escape after the request was sent, and the next call took the answer)."""
    import math

    with Sandbox("default", audit_log=audit_path) as sb:
        assert sb.execute("big = ['item %d' % i for i in range(300_000)]; small = 'SMALL'").ok
        for timeout in (math.inf, 1e300):
            assert len(sb.get_variable("big", timeout=timeout)) == 300_000
            assert sb.get_variable("small", timeout=timeout) == "SMALL"
            sb.set_variable("z", list(range(300_000)), timeout=timeout)
            assert sb.execute("print(len(z))").stdout == "300000\n"
        with pytest.raises(ValueError):
            sb.get_variable("small", timeout=math.nan)


def test_closing_an_async_sandbox_whose_start_was_cancelled_stops_its_child(audit_path) -> None:
    """``asyncio.timeout`` fires while ``start()`` builds the sandbox in a worker thread; the
    caller then closes it. The thread finished the child after close() had returned, and that
    child ran on; the closed object still executed. Now close waits for the start and stops
    the child, and the object refuses further use."""

    async def main() -> None:
        for _ in range(3):
            sb = AsyncSandbox("default", audit_log=audit_path, pool=None)
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.001):
                    await sb.start()
            await sb.close()
            inner = sb._sync
            if inner is not None:
                assert inner.closed and not inner.alive
            await asyncio.sleep(0.3)  # a start still running would have finished by now
            assert sb._sync is inner  # nothing was built after close()
            with pytest.raises(SandboxClosedError):
                await sb.execute("x = 1")

    asyncio.run(main())


def test_close_from_another_thread_stops_the_running_cell(audit_path) -> None:
    """close() while another thread's execute runs a long cell: the child is killed at once,
    that execute returns a result saying so, and close returns without waiting for the cell
    (it waited out the whole cell, up to wall_seconds)."""
    running = threading.Event()  # set by the cell: it runs in its child now
    sb = Sandbox("default", audit_log=audit_path, host_functions={"running": running.set})
    results = []
    cell = "running()\nimport time\ntime.sleep(25)"
    worker = threading.Thread(target=lambda: results.append(sb.execute(cell)))
    worker.start()
    assert running.wait(30)
    t0 = time.monotonic()
    sb.close()
    assert time.monotonic() - t0 < 10
    worker.join(10)
    assert not worker.is_alive() and len(results) == 1
    assert not results[0].ok and results[0].error_type in ("ChildCrashed", "ChildExited"), results[0]
    assert sb.closed and not sb.alive
    with pytest.raises(SandboxClosedError):
        sb.execute("x = 1")


def test_a_slow_fork_server_is_not_killed(audit_path, monkeypatch) -> None:
    """A spawn that times out on a server that runs (slow, on a loaded machine) fails alone:
    the server, and the state of every sandbox it serves, stays; its late answer is not taken
    for the next request's."""
    with Sandbox("default", audit_log=audit_path, pool=None) as keep:
        keep.set_variable("v", 41)
        server = forkserver.shared(False)
        monkeypatch.setattr(forkserver, "SPAWN_TIMEOUT", 1e-6)
        with pytest.raises(sandbox.SandboxError, match="did not answer"):
            Sandbox("default", audit_log=audit_path, pool=None)
        monkeypatch.setattr(forkserver, "SPAWN_TIMEOUT", 30.0)
        assert forkserver.shared(False) is server and server.alive
        with Sandbox("default", audit_log=audit_path, pool=None) as sb:
            assert sb.execute("print(6 * 7)").stdout == "42\n"
        r = keep.execute("print(v + 1)")
        assert r.ok and r.stdout == "42\n" and not r.state_lost, r


@pytest.mark.parametrize("delay", [0.0, 0.003, 0.01])
def test_close_from_another_thread_while_the_next_child_starts(audit_path, delay: float) -> None:
    """The child died; another thread's execute is starting a new one when close() comes: close
    killed the old child only, and the new one ran the whole cell while close waited. Now the
    new child is stopped before it runs anything, and that execute says the sandbox closed."""
    sb = Sandbox("default", audit_log=audit_path, pool=None)
    assert sb.execute("x = 1").ok
    sb.kill()
    time.sleep(0.05)
    out: list[object] = []

    def run() -> None:
        try:
            out.append(sb.execute("import time\ntime.sleep(20)\nprint('cell finished')"))
        except SandboxClosedError as exc:
            out.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    time.sleep(delay)
    t0 = time.monotonic()
    sb.close()
    assert time.monotonic() - t0 < 10
    worker.join(15)
    assert not worker.is_alive() and len(out) == 1
    assert isinstance(out[0], SandboxClosedError) or not out[0].ok, out[0]  # type: ignore[attr-defined]


@contextlib.contextmanager
def _stopped_server(audit_path: Path) -> Iterator[forkserver.ForkServer]:
    """The shared fork server, SIGSTOPped once it has served one sandbox; killed (and let go on)
    at the end, whatever the test did to it."""
    with Sandbox("default", audit_log=audit_path, pool=None) as first:
        assert first.execute("x = 1").ok
    server = forkserver.shared(False)
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        yield server
    finally:
        with contextlib.suppress(OSError):
            os.kill(server.proc.pid, signal.SIGKILL)
            os.kill(server.proc.pid, signal.SIGCONT)


def test_a_stopped_fork_server_is_replaced(audit_path, monkeypatch) -> None:
    """A fork server that stops answering (SIGSTOP, a hang) made every new sandbox wait out the
    spawn timeout and fail, forever. Now the first one to time out kills it, and that sandbox
    and the next start on a new server."""
    monkeypatch.setattr(forkserver, "SPAWN_TIMEOUT", 2.0)
    with _stopped_server(audit_path) as server:
        t0 = time.monotonic()
        with Sandbox("default", audit_log=audit_path, pool=None) as sb:
            assert sb.execute("print(6 * 7)").stdout == "42\n"
        assert time.monotonic() - t0 < 30
        assert forkserver.shared(False) is not server
        assert server.proc.wait(10) is not None  # killed, not left stopped
        t0 = time.monotonic()
        with Sandbox("default", audit_log=audit_path, pool=None) as sb:
            assert sb.execute("x = 1").ok
        assert time.monotonic() - t0 < 2


def test_a_stopped_fork_server_is_replaced_without_waiting_out_the_spawn_timeout(audit_path, monkeypatch) -> None:
    """A stopped fork server was found so only once a spawn request had waited the whole
    SPAWN_TIMEOUT (30 s): the first new sandbox after a SIGSTOP took that long. The server is
    looked at while the request waits now; seen stopped twice in a row, it is killed and the
    sandbox starts on a new one. (The timeout is raised here so that waiting it out shows as
    a hang.)"""
    from tests.conftest import within

    monkeypatch.setattr(forkserver, "SPAWN_TIMEOUT", 600.0)

    def start() -> str:
        with Sandbox("default", audit_log=audit_path, pool=None) as sb:
            return sb.execute("print(6 * 7)").stdout

    with _stopped_server(audit_path) as server:
        stdout, _ = within(60, start)
        assert stdout == "42\n"
        assert forkserver.shared(False) is not server
        assert server.proc.wait(10) is not None  # killed, not left stopped


def test_one_hanging_async_sandbox_does_not_hold_up_the_others_on_its_loop(audit_path) -> None:
    """Sixteen sandboxes on one loop; one cell hangs (sleeping, under a 60 s wall limit). The
    others finish their work while it still hangs; once it is cancelled, no reader of its
    child stays registered with the loop."""
    policy = sandbox.load_policy("default").override({"limits.wall_seconds": 60})

    async def main() -> None:
        loop = asyncio.get_running_loop()
        boxes = [AsyncSandbox(policy, audit_log=audit_path) for _ in range(16)]
        try:
            await asyncio.gather(*(b.start() for b in boxes))
            hang = asyncio.ensure_future(boxes[0].execute("import time\ntime.sleep(120)"))
            await asyncio.sleep(0.2)

            async def work(b: AsyncSandbox, n: int) -> list[str]:
                return [(await b.execute(f"print({n} * {i})")).stdout for i in range(10)]

            outs = await asyncio.gather(*(work(b, n) for n, b in enumerate(boxes[1:], 1)))
            assert outs == [[f"{n * i}\n" for i in range(10)] for n in range(1, 16)]
            assert not hang.done()  # the others were not waiting for it
            child = boxes[0]._sync._child if boxes[0]._sync else None
            assert child is not None
            watched = {child.sock.fileno(), child.pidfd}
            hang.cancel()
            with pytest.raises(asyncio.CancelledError):
                await hang
            assert not watched & set(loop._selector.get_map())  # type: ignore[attr-defined]
        finally:
            await asyncio.gather(*(b.close() for b in boxes))

    asyncio.run(main())
    assert sandbox.audit.verify(audit_path).ok


def test_a_cancelled_async_set_variable_does_not_land_after_later_calls(audit_path) -> None:
    """set_variable of a large list is cancelled while its worker thread still packs the value;
    the caller then sets the variable again. The cancelled worker went on, took the sandbox
    after the later call and overwrote its value: the variable ended up holding the value
    whose set was cancelled. A call given up before it reached the child does nothing."""
    big = list(range(3_000_000))  # packing it takes a worker thread a good part of a second
    sb = AsyncSandbox("default", audit_log=audit_path)

    async def first() -> None:
        await sb.start()
        task = asyncio.ensure_future(sb.set_variable("x", big))
        await asyncio.sleep(0.05)  # a worker thread has taken the call and packs the value
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await sb.set_variable("x", "later")

    try:
        asyncio.run(first())  # returns once every worker thread of the loop has ended

        async def second() -> object:
            return await sb.get_variable("x")

        assert asyncio.run(second()) == "later"
    finally:
        sb._close_sync()


@pytest.mark.parametrize("call", ["set_variable", "get_variable"])
def test_a_cancelled_async_variable_transfer_with_a_stopped_child_frees_the_sandbox(
    audit_path, call: str
) -> None:
    """The child is stopped (SIGSTOP) and a 40 MB set_variable or get_variable is cancelled by
    ``asyncio.timeout``. Its worker thread waited on for the call's own deadline (wall_seconds
    + 30 s, a minute), holding the sandbox: the next execute waited that long, and the value
    still went in once the child ran again. The child is now killed when a transfer under way
    is given up, as for a cancelled execute: the next execute runs at once, on a fresh child,
    and says state_lost."""
    big = b"v" * (40 * 1024 * 1024)

    async def main() -> None:
        async with AsyncSandbox("default", audit_log=audit_path, pool=None) as sb:
            assert (await sb.execute("y = b'y' * (40 * 1024 * 1024)")).ok
            pid = sb.pid
            assert pid is not None
            os.kill(pid, signal.SIGSTOP)
            try:
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(0.5):
                        if call == "set_variable":
                            await sb.set_variable("v", big)
                        else:
                            await sb.get_variable("y")
                assert gone(pid)  # killed on the cancellation, not at the call's own deadline
                async with asyncio.timeout(20):  # without the kill: a minute
                    r = await sb.execute("print('v' in dir(), 'y' in dir())")
                assert r.ok and r.state_lost and r.stdout == "False False\n", r
            finally:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGCONT)

    asyncio.run(main())


def test_async_close_from_another_task_stops_the_running_cell(audit_path) -> None:
    """AsyncSandbox.close() while another task's execute runs a long cell: as Sandbox.close()
    from another thread, the child is killed at once and that execute returns a result saying
    so. close() waited for the sandbox's turn instead, so for the whole cell (up to
    wall_seconds; a server closing its sessions at shutdown waited that long for each)."""

    async def main() -> None:
        sb = AsyncSandbox("default", audit_log=audit_path, pool=None)
        await sb.start()
        pid = sb.pid
        assert pid is not None
        cell = asyncio.ensure_future(sb.execute("import time\ntime.sleep(25)\nprint('finished')"))
        await asyncio.sleep(0.5)
        t0 = time.monotonic()
        await sb.close()
        assert time.monotonic() - t0 < 10  # without the kill: the rest of the 25 s cell
        r = await cell
        assert not r.ok and r.error_type in ("ChildCrashed", "ChildExited"), r
        assert gone(pid, 1.0)
        with pytest.raises(SandboxClosedError):
            await sb.execute("x = 1")

    asyncio.run(main())


def test_an_async_close_cancelled_while_a_cell_runs_still_closes_the_sandbox(audit_path) -> None:
    """close() given up by ``asyncio.timeout`` while another task's cell runs: the object
    refused further use, but the close itself never happened (it was waiting for the cell's
    turn): the child ran on after the cell, with its scratch directory and descriptors, until
    the garbage collector came for the object. The close now goes on in its thread: the child
    is killed at once, and the sandbox is closed once the cell's execute has returned."""

    async def main() -> None:
        sb = AsyncSandbox("default", audit_log=audit_path, pool=None)
        await sb.start()
        pid, inner = sb.pid, sb._sync
        assert pid is not None and inner is not None
        scratch = inner._child.scratch if inner._child else None
        cell = asyncio.ensure_future(sb.execute("import time\ntime.sleep(25)"))
        await asyncio.sleep(0.5)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0):  # given up at its first wait
                await sb.close()
        async with asyncio.timeout(10):  # without the fix: the 25 s cell
            r = await cell
        assert not r.ok, r
        assert gone(pid, 1.0)
        deadline = time.monotonic() + 10
        while inner._child is not None:  # the close finishes in its thread after the cell
            assert time.monotonic() < deadline, "the sandbox was never closed"
            await asyncio.sleep(0.01)
        assert scratch is not None and not os.path.exists(scratch)

    asyncio.run(main())


# Sandboxes whose cells run, closed together from the event loop (a server closing its sessions
# at shutdown) on a loop whose default executor has two threads: the default one has
# min(32, CPUs + 4), which as many closes at once fill as well.
CLOSES_THAT_FILL_THE_EXECUTOR = """
import asyncio, os, time
from concurrent.futures import ThreadPoolExecutor
from sandbox import AsyncSandbox

async def main():
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=2))
    audit = os.path.join(os.environ["TMPDIR"], "audit.jsonl")
    boxes = [AsyncSandbox("default", audit_log=audit, pool=None) for _ in range(2)]
    for box in boxes:
        await box.start()
    cells = [asyncio.ensure_future(box.execute("import time\\ntime.sleep(25)")) for box in boxes]
    await asyncio.sleep(0.5)
    t0 = time.monotonic()
    await asyncio.gather(*(box.close() for box in boxes))
    took = time.monotonic() - t0
    results = await asyncio.gather(*cells)
    print("closed", round(took, 1), [r.error_type for r in results], flush=True)

asyncio.run(main())
"""


def test_async_closes_of_running_sandboxes_do_not_wait_for_each_other_in_the_executor(tmp_path) -> None:
    """close() ran Sandbox.close() in the loop's default executor, where it kills the child and
    waits for the sandbox's lock, which the running execute releases once its result is built,
    in that same executor: as many closes at once as the executor has threads took them all,
    and every execute waited for a thread behind them, for ever (the wall limit did not help:
    its result waits for a thread too). close() now runs in a thread of its own."""
    env = dict(os.environ, TMPDIR=str(tmp_path), PYTHONPATH=str(ROOT))
    try:
        proc = subprocess.run(
            [sys.executable, "-c", CLOSES_THAT_FILL_THE_EXECUTOR],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
    except subprocess.TimeoutExpired:
        raise AssertionError("closes and executes waited for each other: killed after 60 s") from None
    assert proc.returncode == 0, proc.stdout + proc.stderr
    took, kinds = proc.stdout.split(" ", 2)[1:]
    assert float(took) < 15, proc.stdout  # without the kill: the rest of the 25 s cells
    assert "None" not in kinds, proc.stdout  # both cells were stopped, not finished
