"""A KeyboardInterrupt (or any exception a signal handler raises) landing while a sandbox call,
a start or a cleanup runs: the next call works, nothing of a failed start is kept, other
sandboxes are unaffected.

Signals are not timed here: :class:`Injector` raises KeyboardInterrupt at exactly one of the
points where CPython runs pending signal handlers (a function's entry, just after a call into C
returns, a backward jump) inside the functions named, and the tests try each such point in
turn. Real children throughout."""

from __future__ import annotations

import asyncio
import contextlib
import dis
import gc
import os
import select
import socket
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

import pytest

import sandbox.sandbox as impl
from sandbox import AsyncSandbox, Sandbox, audit, forkserver, limits, protocol
from sandbox import pool as pool_module
from sandbox.pool import SandboxPool
from tests.conftest import within


@pytest.fixture(autouse=True)
def _earlier_objects_left_out_of_collections() -> Iterator[None]:
    """What the process held before the test is left out of its collections (``gc.freeze``):
    these tests collect at each point they interrupt, and once an earlier test of the worker had
    imported litellm each full collection walked about a million objects (0.47 s; 26 s of one
    test's 31). Objects the test makes are collected as before."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()

_CALLS = {dis.opmap[name] for name in ("CALL", "CALL_FUNCTION_EX") if name in dis.opmap}
_BACK = {dis.opmap[name] for name in ("JUMP_BACKWARD", "JUMP_BACKWARD_NO_INTERRUPT") if name in dis.opmap}


def codes_of(*functions: Any) -> set[CodeType]:
    """The code objects of *functions* (methods, properties' getters); missing ones (None) skipped."""
    return {fn.__code__ for fn in functions if fn is not None}


class Injector:
    """``with Injector(codes, at=k)``: KeyboardInterrupt at the *k*-th point (from 0) of this
    thread where CPython 3.11 would run a signal handler inside the code objects *codes*: the
    entry of one of them, the instruction after a call into C (a call into Python returns
    without that check), a backward jump. ``at=None``: only count them (``count``)."""

    def __init__(self, codes: Iterable[CodeType], at: int | None = None) -> None:
        self.codes = set(codes)
        self.at = at
        self.count = 0
        self.fired: str | None = None
        self.pending: dict[int, bool] = {}  # id(frame) -> a call it made is in flight, into C so far

    def __enter__(self) -> Injector:
        sys.settrace(self.trace)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.settrace(None)

    def point(self, frame: FrameType, why: str) -> None:
        if self.count == self.at:
            self.fired = f"{frame.f_code.co_name}:{frame.f_lineno} ({why})"
            self.count += 1
            raise KeyboardInterrupt(self.fired)
        self.count += 1

    def trace(self, frame: FrameType, event: str, arg: object) -> Callable[..., Any] | None:
        back = frame.f_back
        if back is not None and id(back) in self.pending:
            self.pending[id(back)] = False  # that call was into Python
        if frame.f_code not in self.codes:
            return None
        frame.f_trace_opcodes = True
        frame.f_trace_lines = False
        self.point(frame, "entry")
        return self.local

    def local(self, frame: FrameType, event: str, arg: object) -> Callable[..., Any] | None:
        if event == "opcode":
            op = frame.f_code.co_code[frame.f_lasti]
            if self.pending.pop(id(frame), False):
                self.point(frame, "after a call into C")
            if op in _BACK:
                self.point(frame, "loop")
            if op in _CALLS:
                self.pending[id(frame)] = True
        elif event == "return":
            self.pending.pop(id(frame), None)
        return self.local


def each_point(codes: set[CodeType], run: Callable[[], object]) -> Iterable[int]:
    """The points :class:`Injector` finds in *codes* while *run* runs undisturbed (at least one)."""
    with Injector(codes) as counted:
        run()
    assert counted.count > 0
    print(f"{counted.count} points")
    return range(counted.count)


def interrupted(codes: set[CodeType], at: int, run: Callable[[], object]) -> str | None:
    """Run *run* with KeyboardInterrupt at point *at*: where it landed (None: it did not)."""
    with Injector(codes, at) as injector:
        try:
            run()
        except KeyboardInterrupt:
            pass
    return injector.fired


def unlock_for_teardown(sb: Sandbox) -> None:
    """After a failure: free a lock left held, so that closing the sandbox cannot hang the suite."""
    if sb._lock.locked():
        sb._lock.release()


# ------------------------------------------------------------ the sandbox's own lock
def test_an_interrupt_anywhere_in_executes_bookkeeping_leaves_the_sandbox_usable(audit_path: Path) -> None:
    """At each point of execute's taking and leaving its sandbox (the lock, the re-entrancy
    mark, the count of calls in flight): the next execute and close() return, and the count
    of calls in flight is right again (a count left high stops all spinning in the process)."""
    codes = codes_of(
        Sandbox.execute,
        getattr(Sandbox, "_admit", None),
        impl._Using.__enter__,
        impl._Using.__exit__,
        impl._Callers.enter,
        impl._Callers.leave,
    )
    sb = Sandbox("default", audit_log=audit_path)
    try:
        base = impl._CALLERS.count
        assert sb.execute("x = 1").ok
        for at in each_point(codes, lambda: sb.execute("x = 1")):
            where = interrupted(codes, at, lambda: sb.execute("x = 1"))
            assert where is not None
            result, _ = within(20, lambda: sb.execute("print(1 + 1)"))
            assert result.ok and result.stdout == "2\n", where
            assert not sb._lock.locked(), where
            assert impl._CALLERS.count == base, where
        within(20, sb.close)
        assert sb._child is None
    finally:
        unlock_for_teardown(sb)
        sb.close()


def test_an_interrupt_anywhere_in_waiting_for_a_frame_leaves_the_spin_slot_free(
    audit_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one host thread that may spin holds a process-wide slot while it spins. A Ctrl-C
    landing just after it took the slot, before the ``try`` that gives it back, kept it for
    good: no thread of the process spun again (every wait a sleep, 100+ us slower on a VM).
    At each point of the wait, with spinning allowed (the CPU-slack check and the spin budget
    fixed, so that a loaded machine cannot skip the spin): the slot is free afterwards and the
    next execute works."""
    monkeypatch.setattr(impl.CpuSlack, "free", lambda self: True)
    monkeypatch.setattr(impl.Spinner, "budget", lambda self: 0.002)
    codes = codes_of(Sandbox._next_frame, getattr(impl, "_try_acquire", None))
    sb = Sandbox("default", audit_log=audit_path, pool=None)  # no refill thread spinning beside it
    try:
        assert sb.execute("x = 1").ok
        landed = []
        for at in range(12):  # the spin starts within the first points; its loop's are alike
            # A cell that takes a while: the child has not answered by the first look.
            where = interrupted(codes, at, lambda: sb.execute("import time\ntime.sleep(0.02)"))
            if where is None:
                break
            landed.append(where)
            # Free, or freed soon: another thread of this process (a pool's refill) may spin now.
            assert impl._SPIN_SLOT.acquire(timeout=5), where
            impl._SPIN_SLOT.release()
            result, _ = within(20, lambda: sb.execute("print(1 + 1)"))
            assert result.ok and result.stdout == "2\n", where
        assert any(w.startswith("_try_acquire") for w in landed), landed  # the window was tried
    finally:
        unlock_for_teardown(sb)
        if impl._SPIN_SLOT.locked():
            impl._SPIN_SLOT.release()
        sb.close()


def test_an_interrupt_anywhere_in_close_is_finished_by_the_next_close(audit_path: Path) -> None:
    codes = codes_of(Sandbox.close, impl._Callers.leave)
    probe = Sandbox("default", audit_log=audit_path)
    points = each_point(codes, probe.close)
    for at in points:
        sb = Sandbox("default", audit_log=audit_path)
        try:
            assert sb.execute("x = 1").ok
            child = sb._child
            assert child is not None
            where = interrupted(codes, at, sb.close)
            within(20, sb.close)
            assert sb._child is None and child.released and child.pidfd == -1, where
        finally:
            unlock_for_teardown(sb)
            sb.close()


def test_an_interrupt_anywhere_in_close_then_the_sandbox_dropped_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A close cut short (Ctrl-C, or a request timeout's SIGALRM in a ``with`` block's exit)
    and the sandbox dropped, so no later close finishes it: the finalizer saw ``closed`` and did
    nothing, and the child (zombie), its pidfd, channel, uid lease and scratch directory stayed
    for good (44 of 50 such closes in the embedder's test). Dropped, it is stopped at once."""
    scratch_root, start = _unpooled_starts(tmp_path, monkeypatch)
    codes = codes_of(Sandbox.close, impl._Callers.leave, impl._stop_child, impl._collect_exit)
    probe = start()
    probe.execute("x = 1")
    cut = 0
    for at in each_point(codes, probe.close):
        before = _leftovers(scratch_root)
        sb = start()
        assert sb.execute("x = 1").ok
        where = interrupted(codes, at, sb.close)
        cut += where is not None
        unlock_for_teardown(sb)
        del sb
        fds, _, dirs = _leftovers(scratch_root)
        assert (fds, dirs) == (before[0], before[2]), where
        # The fork server reaps the child once released; a release the cut kept from being sent
        # goes with the server's next request.
        start().close()
        assert _leftovers(scratch_root) == before, where
    assert cut > 0


def test_a_dropped_sandboxs_stop_cut_short_again_in_its_finalizer_is_finished_by_the_next_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The close is cut short, and so is the finalizer's stop of the dropped sandbox's child (a
    second signal): the finalizer had let go of the record first, which then had only weak
    references, and nothing could ever finish it (the attack on this session's change: 77
    scratch directories left after the exit). It is held until the next start stops it."""
    scratch_root, start = _unpooled_starts(tmp_path, monkeypatch)

    with start() as warm:
        warm.execute("x = 1")  # (what an execute opens once per process: /proc/loadavg)
    before = _leftovers(scratch_root)
    real = impl._collect_exit
    cuts = []

    def cut(child: Any) -> Any:
        if len(cuts) < 2:
            cuts.append(child)
            raise KeyboardInterrupt
        return real(child)

    monkeypatch.setattr(impl, "_collect_exit", cut)
    unraisable: list[Any] = []  # the types only: a traceback would keep the sandbox alive
    monkeypatch.setattr(sys, "unraisablehook", lambda u: unraisable.append(u.exc_type))
    sb = start()
    assert sb.execute("x = 1").ok
    with pytest.raises(KeyboardInterrupt):
        sb.close()
    del sb
    gc.collect()
    assert len(cuts) == 2 and unraisable == [KeyboardInterrupt]
    assert impl._dropped == {cuts[0]}
    sb = start()  # finishes it
    sb.close()
    assert not impl._dropped
    assert _leftovers(scratch_root) == before


def test_an_interrupt_anywhere_as_an_async_execute_takes_its_sandbox_leaves_it_usable(
    audit_path: Path,
) -> None:
    """``AsyncSandbox._hold`` took the sandbox's lock before its ``try``: a Ctrl-C (an exception
    a signal handler raises; a cancellation cannot land there, it has no ``await``) just after
    ``acquire(blocking=False)`` returned left the lock held by nobody, and every later call
    (and ``close()``) waited for it for good."""
    codes = codes_of(AsyncSandbox._hold, getattr(impl, "_try_acquire", None))
    asb = AsyncSandbox("default", audit_log=audit_path)

    def execute(code: str) -> Any:
        return asyncio.run(asb.execute(code))

    try:
        assert execute("x = 1").ok
        for at in each_point(codes, lambda: execute("x = 1")):
            where = interrupted(codes, at, lambda: execute("x = 1"))
            assert where is not None
            result, _ = within(20, lambda: execute("print(1 + 1)"))
            assert result.ok and result.stdout == "2\n", where
            assert asb._sync is not None and not asb._sync._lock.locked(), where
    finally:
        if asb._sync is not None:
            unlock_for_teardown(asb._sync)
        within(20, lambda: asyncio.run(asb.close()))


# ------------------------------------------------------------------- the audit log
def test_an_interrupt_anywhere_in_an_audit_append_leaves_the_file_writable(tmp_path: Path) -> None:
    """The per-file gate is process-wide: one left held would stop every later append to the
    file (from any sandbox) for good; the log's own lock, every append through that log."""
    path = tmp_path / "audit.jsonl"
    log = audit.AuditLog(path, lock_timeout=5)
    other = audit.AuditLog(path, lock_timeout=5)
    codes = codes_of(
        audit.AuditLog.append,
        audit.AuditLog._append,
        getattr(audit.AuditLog, "_close_if_free", None),
        getattr(audit, "_attempt", None),
        audit._gate,
        audit._flock,
    )
    other.append({"n": -2})
    log.append({"n": -1})  # each turn below starts so, and ends so
    for at in each_point(codes, lambda: log.append({"n": -1})):
        where = interrupted(codes, at, lambda: log.append({"n": -1}))
        assert where is not None
        within(10, lambda: other.append({"by": "other"}))
        within(10, lambda: log.append({"by": "log"}))
    log.close()
    other.close()
    assert audit.verify(path).ok


def test_an_interrupt_anywhere_in_an_audit_close_leaves_it_closed_or_closable(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    codes = codes_of(audit.AuditLog.close, getattr(audit.AuditLog, "_close_if_free", None))
    probe = audit.AuditLog(path)
    for at in each_point(codes, probe.close):
        log = audit.AuditLog(path, lock_timeout=5)
        log.append({"n": at})
        interrupted(codes, at, log.close)
        within(10, log.close)
        assert log._fd == -1
        assert not log._lock.locked()


def test_an_exit_cut_short_at_its_entry_stops_the_child_at_the_next_call(audit_path: Path) -> None:
    """A Ctrl-C at the very entry of the call's exit skips its bookkeeping: the next call
    cannot know whether an answer is still on its way, so it starts a fresh child (and says so)."""
    with Sandbox("default", audit_log=audit_path) as sb:
        try:
            assert sb.set_variable("x", 1) is None
            assert interrupted(codes_of(impl._Using.__exit__), 0, lambda: sb.get_variable("x")) is not None
            result, _ = within(20, lambda: sb.execute("print(3 + 3)"))
            assert result.stdout == "6\n" and result.state_lost
        finally:
            unlock_for_teardown(sb)


# ------------------------------------------------------------ an interrupted variable transfer
_TRANSFER_CODES = codes_of(
    Sandbox.set_variable,
    Sandbox._stream_to,
    Sandbox.get_variable,
    Sandbox._stream_from,
    Sandbox._reply,
    impl._Child.lend,
    impl._Child.take_back,
    impl._Child.drop_fds,
    protocol.write_shm,
    protocol.write_value_shm,
    protocol.open_stream,
    protocol.read_stream,
    protocol.read_shm,
)
_GLOBALS = "gb = b'g' * 3_000_000; gl = list(range(300_000))"


@pytest.mark.parametrize(
    "call",
    [
        ("set", "\xe9" * 2_000_000),  # text that is not ASCII: packed into a memfd
        ("set", list(range(300_000))),  # a list: packed into a memfd
        ("set", b"b" * 3_000_000),  # bytes: through a pipe
        ("get", "gb"),  # bytes back: through a pipe
        ("get", "gl"),  # a list back: packed, through a pipe
        ("execute", "x = big()"),  # a host function's large result: packed into a memfd
    ],
    ids=["set-text", "set-list", "set-bytes", "get-bytes", "get-list", "host-result"],
)
def test_an_interrupt_anywhere_in_a_variable_transfer_leaks_no_descriptor(
    audit_path: Path, call: tuple[str, Any]
) -> None:
    """At each point of a large set_variable or get_variable, or of the reply that carries a
    host function's large result: no descriptor is left behind.
    A Ctrl-C as a value's memfd was lent to the child, or as a received pipe was handed to
    the reader, lost the descriptor: a memfd holding the whole value (host memory) or a
    pipe with up to 1 MiB in it, per interrupt, until the host exited."""
    how, arg = call
    big = {"big": lambda: "\xe9" * 2_000_000}
    with Sandbox("default", audit_log=audit_path, pool=None, host_functions=big) as sb:
        try:

            def run() -> object:
                if how == "execute":
                    return sb.execute(arg)
                return sb.set_variable("v", arg) if how == "set" else sb.get_variable(arg)

            assert sb.execute(_GLOBALS).ok
            for at in each_point(_TRANSFER_CODES, run):
                assert sb.execute(_GLOBALS).ok
                before = len(os.listdir("/proc/self/fd"))
                where = interrupted(_TRANSFER_CODES, at, run)
                result, _ = within(30, lambda: sb.execute(_GLOBALS + "; print('ok')"))
                assert result.stdout == "ok\n", (where, result)
                assert len(os.listdir("/proc/self/fd")) == before, where
        finally:
            unlock_for_teardown(sb)


# ------------------------------------------------------------------ an interrupted start
def _children(parents: Iterable[int]) -> set[int]:
    """Pids whose parent is one of *parents* (zombies included: a child never reaped shows)."""
    parents = set(parents)
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid in parents:
                found.add(int(entry))
    return found


def _leftovers(scratch_root: Path) -> tuple[int, int, int]:
    """(descriptors of this process, children of the fork servers, scratch directories)."""
    gc.collect()
    servers = [server.pid for server in forkserver._shared.values()]
    return len(os.listdir("/proc/self/fd")), len(_children(servers)), len(list(scratch_root.iterdir()))


def _close_default_pool() -> None:
    """The process-wide pool (earlier tests used it) refills in the background: its children
    would count in :func:`_leftovers`. It is closed, its refill thread waited for, and replaced
    (lazily)."""
    default = pool_module._default
    if default is not None:
        default.close()
        if default._thread is not None:
            default._thread.join(30)
        pool_module._default = None


def _unpooled_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Callable[[], Sandbox]]:
    """No default pool (its refills would count in :func:`_leftovers`), scratch directories in a
    root of the test's own, and how to start a sandbox without a pool there."""
    _close_default_pool()
    scratch_root = tmp_path / "tmp"
    scratch_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch_root))

    def start() -> Sandbox:
        return Sandbox("default", audit_log=tmp_path / "audit.jsonl", pool=None)

    return scratch_root, start


_START_CODES = codes_of(
    Sandbox.__init__,
    Sandbox._start,
    impl._spawn_ready,
    impl._spawn_started,
    impl._mark_cpu,
    limits.set_cpu_backstop,
    limits.RSSMeter.reset,
    SandboxPool.take,
    audit.AuditLog.__init__,
    audit.AuditLog._open,
)


@pytest.mark.parametrize("pooled", [False, True], ids=["forked", "pooled"])
def test_an_interrupt_anywhere_in_a_start_keeps_nothing_of_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pooled: bool
) -> None:
    """At each point of Sandbox() where a Ctrl-C may land (once the child is forked, nothing
    else knows of it: the sandbox records it only at the end of _start): afterwards no child,
    descriptor or scratch directory more than before, and the next Sandbox() works."""
    _close_default_pool()
    scratch_root = tmp_path / "tmp"
    scratch_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch_root))
    audit_log = tmp_path / "audit.jsonl"
    with SandboxPool(1) as pool:

        def start() -> Sandbox:
            if pooled:
                pool.warm("default")
                assert pool.wait_ready(20)
            return Sandbox("default", audit_log=audit_log, pool=pool if pooled else None)

        start().close()
        for at in each_point(_START_CODES, lambda: start().close()):
            if pooled:
                start().close()  # the pool refilled, at rest
                assert pool.wait_ready(20)
            before = _leftovers(scratch_root)
            with Injector(_START_CODES, at) as injector:
                try:
                    started = start()
                except KeyboardInterrupt:
                    pass
                else:  # the interrupt landed in the preparation, outside the codes
                    started.close()
            if pooled:
                assert pool.wait_ready(20)
            assert _leftovers(scratch_root) == before, injector.fired
            sb, _ = within(30, start)
            try:
                assert sb.execute("print(1)").stdout == "1\n", injector.fired
            finally:
                sb.close()


def _interrupt_each_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, codes: Any, skip: Any = None
) -> int:
    """A Ctrl-C at each point of *codes* during a start of a sandbox (no pool): nothing of the
    start is left (scratch, processes, descriptors: ``_leftovers``) and the next start works.
    Points *skip* (given what the injector says it fired at) returns true for are not judged.
    Returns how many points were judged."""
    scratch_root, start = _unpooled_starts(tmp_path, monkeypatch)

    start().close()
    tried = 0
    for at in each_point(codes, lambda: start().close()):
        before = _leftovers(scratch_root)
        started = None
        with Injector(codes, at) as injector:
            try:
                started = start()
            except KeyboardInterrupt:
                pass
        if started is not None:  # the point was in close(), not in the start
            started.close()
        where = injector.fired or ""
        if skip is not None and skip(where):
            continue
        tried += 1
        assert _leftovers(scratch_root) == before, where
        sb, _ = within(30, start)
        try:
            assert sb.execute("print(1)").stdout == "1\n", where
        finally:
            sb.close()
    return tried


def test_an_interrupt_anywhere_as_a_start_closes_the_childs_end_of_its_channel_keeps_nothing_of_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The host closes its copy of the child's end of the channel once the fork server has
    forked the child. That close ran in a ``finally`` outside the start's protection: a Ctrl-C
    landing in it left the child, its pidfd, the host's end, the scratch directory and its lock
    behind, known to nobody."""
    codes = codes_of(socket.socket.close, socket.socket._real_close)  # type: ignore[attr-defined]
    assert _interrupt_each_start(tmp_path, monkeypatch, codes) > 0


def test_an_interrupt_anywhere_as_a_childs_record_and_meters_are_made_keeps_nothing_of_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``_Child()`` opened the peak-memory meter's descriptors (``/proc/<pid>/status`` and
    ``clear_refs``) while the record was made: a Ctrl-C later in the making, or between the two
    opens, lost them (the start's cleanup had no record, or no meter, to close them from).

    Not tried: the instant inside ``RSSMeter._open`` between ``os.open`` returning and its
    result being stored, where no Python code can keep a descriptor (as for every one the host
    opens)."""
    codes = codes_of(
        impl._Child.__init__,
        limits.RSSMeter.__init__,
        getattr(limits.RSSMeter, "open", None),
        limits.RSSMeter._open,
    )

    def unguardable(where: str) -> bool:  # os.open returned, its result not yet stored (see above)
        return where.startswith("_open:") and where.endswith("(after a call into C)")

    assert _interrupt_each_start(tmp_path, monkeypatch, codes, unguardable) > 0


_LATE_ANSWER_CODES = codes_of(
    forkserver.ForkServer._read_one,
    forkserver.ForkServer._pidfd_index,
    forkserver.ForkServer._drop_orphans,
    getattr(forkserver.ForkServer, "_drop_held", None),
    getattr(forkserver.ForkServer, "_drop_orphan", None),
    forkserver.ForkServer._drop,
)


def test_an_interrupt_anywhere_in_dropping_a_late_spawn_answer_leaks_no_pidfd(
    audit_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A spawn request given up before its answer came (Ctrl-C while waiting; here a spawn
    timeout of 0): the next start reads the late ``spawned`` frame and drops its child. At each
    point of that start's exchange with the fork server where a Ctrl-C may land: once later
    starts have read the server's frames again, no pidfd more than before is open. (One taken
    out of the received descriptors, then cut short before it was closed, stayed open for good.)"""
    server = forkserver.shared(False)
    real_timeout = forkserver.SPAWN_TIMEOUT

    def give_up_one() -> None:
        monkeypatch.setattr(forkserver, "SPAWN_TIMEOUT", 0.0)
        try:
            with pytest.raises(impl.SandboxStartError, match="did not answer"):
                Sandbox("default", audit_log=audit_path, pool=None)
        finally:
            monkeypatch.setattr(forkserver, "SPAWN_TIMEOUT", real_timeout)
        # Its answer is in: the next start reads it before its own.
        assert select.select([server.sock], [], [], 10)[0], "the given-up request was never answered"

    def start_and_close() -> None:
        Sandbox("default", audit_log=audit_path, pool=None).close()

    start_and_close()
    give_up_one()
    with Injector(_LATE_ANSWER_CODES) as counted:
        started = Sandbox("default", audit_log=audit_path, pool=None)
    started.close()
    assert counted.count > 0
    for at in range(counted.count):
        before = len(os.listdir("/proc/self/fd"))
        give_up_one()
        started = None
        with Injector(_LATE_ANSWER_CODES, at) as injector:
            try:
                started = Sandbox("default", audit_log=audit_path, pool=None)
            except KeyboardInterrupt:
                pass
        if started is not None:  # it landed in none of the start's points (fewer this time)
            started.close()
        for _ in range(2):  # the interrupted start's own answer, maybe late too, and any orphan
            within(30, start_and_close)
        assert forkserver.shared(False) is server, injector.fired
        assert server._fds == [], injector.fired
        assert len(os.listdir("/proc/self/fd")) == before, injector.fired


# --------------------------------------------------------------- host functions' errors
class _Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text for this one")


def _unprintable() -> None:
    raise _Unprintable()


def test_a_host_functions_error_that_cannot_be_shown_is_a_host_function_error(audit_path: Path) -> None:
    """An exception whose __str__ fails: the child gets HostFunctionError (its type), the
    execute returns and the child lives on (the host used to raise that error itself)."""
    with Sandbox("default", host_functions={"f": _unprintable}, audit_log=audit_path) as sb:
        assert sb.execute("x = 1").ok
        r = sb.execute("try:\n    f()\nexcept HostFunctionError as e:\n    print('caught', e)")
        assert r.ok and r.stdout == "caught _Unprintable\n", r
        r = sb.execute("print(x)")
        assert r.stdout == "1\n" and not r.state_lost, r


async def _unprintable_async() -> None:
    raise _Unprintable()


def test_an_async_host_functions_error_that_cannot_be_shown_is_a_host_function_error(
    audit_path: Path,
) -> None:
    async def main() -> None:
        async with AsyncSandbox(
            "default", host_functions={"f": _unprintable_async}, audit_log=audit_path
        ) as sb:
            r = await sb.execute("try:\n    f()\nexcept HostFunctionError as e:\n    print('caught', e)")
            assert r.ok and r.stdout == "caught _Unprintable\n", r

    asyncio.run(main())


def test_a_host_call_left_on_a_loop_closed_without_cancelling_it_is_dropped_quietly(
    audit_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An execute awaiting a coroutine host function when its loop is closed without cancelling
    it (a framework's shutdown): the garbage collector closes the coroutine outside the task's
    context. No "Exception ignored ... ValueError: <Token ...> was created in a different
    Context"; the sandbox is usable from a new loop and closes."""
    unraisable: list[BaseException | None] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda info: unraisable.append(info.exc_value))
    called = threading.Event()

    async def slow() -> None:
        called.set()
        await asyncio.sleep(3600)

    asb = AsyncSandbox("default", host_functions={"slow": slow}, audit_log=audit_path)
    loop = asyncio.new_event_loop()
    try:
        task = loop.run_until_complete(_abandoned(asb, called))
        assert not task.done()
    finally:
        loop.close()  # no cancel: the pending task is dropped
    del task
    gc.collect()
    assert not [exc for exc in unraisable if isinstance(exc, ValueError)], unraisable

    async def again() -> str:
        r = await asyncio.wait_for(asb.execute("print(2)"), 20)
        await asb.close()
        return r.stdout

    assert within(30, lambda: asyncio.run(again()))[0] == "2\n"


def test_a_variable_transfer_left_on_a_loop_closed_without_cancelling_it_is_dropped_quietly(
    audit_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As for an execute above: a set_variable still in its worker thread (its child stopped)
    when its loop is closed without cancelling it. The garbage collector closes the coroutine
    outside the task's context, where resetting the transfer's ticket raised "ValueError:
    <Token ...> was created in a different Context" (printed as ignored). The sandbox is usable
    from a new loop and closes."""
    import signal
    import time
    import weakref

    unraisable: list[BaseException | None] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda info: unraisable.append(info.exc_value))
    asb = AsyncSandbox("default", audit_log=audit_path, pool=None)

    async def abandon() -> asyncio.Task[None]:
        await asb.start()
        assert asb.pid is not None
        os.kill(asb.pid, signal.SIGSTOP)  # the transfer waits for it until its timeout
        task = asyncio.ensure_future(asb.set_variable("x", "y" * 100, timeout=1.0))
        await asyncio.sleep(0.2)
        return task

    loop = asyncio.new_event_loop()
    pid: int | None = None
    try:
        task = loop.run_until_complete(abandon())
        pid = asb.pid
        assert not task.done()
    finally:
        loop.close()  # no cancel: the pending task is dropped
    gone = weakref.ref(task)
    del task
    deadline = time.monotonic() + 60
    while gone() is not None:  # collectable once its worker thread let go of it (timed out)
        assert time.monotonic() < deadline, "the abandoned set_variable was never collected"
        time.sleep(0.05)
        gc.collect()
    assert not [exc for exc in unraisable if isinstance(exc, ValueError)], unraisable
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)

    async def again() -> str:
        r = await asyncio.wait_for(asb.execute("print(2)"), 20)
        await asb.close()
        return r.stdout

    assert within(30, lambda: asyncio.run(again()))[0] == "2\n"


async def _abandoned(asb: AsyncSandbox, called: threading.Event) -> asyncio.Task[object]:
    await asb.start()
    task: asyncio.Task[object] = asyncio.ensure_future(asb.execute("slow()"))
    for _ in range(2000):
        if called.is_set():
            return task
        await asyncio.sleep(0.01)
    raise AssertionError("the host function was not called")
