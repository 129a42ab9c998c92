"""The audit log's lock is waited for with a deadline: a process stopped or hung while it held
it makes appends fail with an AuditError naming it, instead of hanging every writer of the file
(every sandbox of every host process sharing the default log)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from sandbox import AsyncSandbox, Sandbox, audit
from sandbox.audit import AuditLog, verify
from sandbox.errors import AuditError
from tests.conftest import within

HOLD = (
    "import fcntl, sys, time\n"
    "f = open(sys.argv[1], 'a')\n"
    "fcntl.flock(f, fcntl.LOCK_EX)\n"
    "print('locked', flush=True)\n"
    "time.sleep(120)\n"
)


def _start_holder(path, procs):
    """Another process holding the flock of *path* (as one stopped in the middle of an append
    would), once it says so; added to *procs*, which the caller kills."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    procs.append(proc)
    assert proc.stdout.readline() == "locked\n"
    return proc


@pytest.fixture
def holder(tmp_path):
    path = tmp_path / "audit.jsonl"
    path.touch()
    procs = []
    try:
        yield path, _start_holder(path, procs)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def _in_thread(fn, limit=10.0):
    """Run *fn* in a thread; what it returned or raised, or a failure if it is still waiting after
    *limit* seconds (without a deadline the append would wait as long as the holder lives)."""

    def catching():
        try:
            return {"value": fn()}
        except BaseException as exc:
            return {"error": exc}

    out, seconds = within(limit, catching)
    out["seconds"] = seconds
    return out


def test_a_lock_held_by_another_process_fails_the_append_naming_it(holder):
    path, proc = holder
    log = AuditLog(path, lock_timeout=0.5)
    out = _in_thread(lambda: log.append({"seq": 1}))
    assert isinstance(out["error"], AuditError), out
    assert f"pid {proc.pid}" in str(out["error"]) and str(path) in str(out["error"])
    assert 0.4 <= out["seconds"] < 5
    assert path.read_bytes() == b""  # nothing was written without the lock
    proc.kill()
    proc.wait()  # the kernel drops the dead holder's lock: the same object appends again
    log.append({"seq": 2})
    log.close()
    assert verify(path).ok and verify(path).lines == 1


def test_a_lock_released_within_the_deadline_is_waited_for(holder):
    path, proc = holder
    log = AuditLog(path, lock_timeout=20)
    threading.Timer(0.3, proc.kill).start()
    out = _in_thread(lambda: log.append({"seq": 1}), limit=15)
    assert "error" not in out, out
    assert 0.2 <= out["seconds"] < 10
    log.close()
    assert verify(path).ok


def test_execute_with_a_locked_log_raises_an_audit_error_and_recovers(holder, monkeypatch):
    path, proc = holder
    monkeypatch.setattr(audit, "LOCK_SECONDS", 0.5, raising=False)
    with Sandbox("default", audit_log=path, pool=None) as sb:
        out = _in_thread(lambda: sb.execute("x = 41; print('ran')"))
        assert isinstance(out["error"], AuditError) and f"pid {proc.pid}" in str(out["error"]), out
        # the cell ran: what it did comes with the error (a caller need not run it again)
        assert out["error"].result is not None and out["error"].result.ok
        assert out["error"].result.stdout == "ran\n"
        proc.kill()
        proc.wait()
        assert sb.execute("x += 1").ok  # the sandbox goes on: the cell before did run
        assert sb.get_variable("x") == 42
    assert verify(path).ok and verify(path).lines == 1


@contextlib.asynccontextmanager
async def loop_watch():
    """Yields a list that ends up holding the longest stand-still of the running event loop
    while the block ran (a task ticks every 10 ms)."""
    stalls = [0.0]
    stop = asyncio.Event()

    async def ticker():
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.01)
            now = time.monotonic()
            stalls[0] = max(stalls[0], now - last)
            last = now

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.05)  # ticking
    try:
        yield stalls
    finally:
        stop.set()
        await tick


def test_an_async_execute_waits_for_a_locked_log_off_the_event_loop(tmp_path, monkeypatch):
    """The lock is waited for in a thread: the event loop (every other sandbox and task on it)
    runs on meanwhile, and the execute returns once the holder lets go."""
    path = tmp_path / "audit.jsonl"
    monkeypatch.setattr(audit, "LOCK_SECONDS", 5.0, raising=False)
    procs = []

    async def main():
        async with AsyncSandbox("default", audit_log=path, pool=None) as sb:
            await sb.execute("x = 0")  # started (fork, layers) before the lock is taken
            proc = _start_holder(path, procs)
            async with loop_watch() as stalls:
                threading.Timer(1.0, proc.kill).start()  # not through the loop: it may be the one stuck
                t0 = time.monotonic()
                result = await sb.execute("x = 1")
                waited = time.monotonic() - t0
        return result, waited, stalls[0]

    try:
        result, waited, stall = asyncio.run(main())
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    assert result.ok and 0.5 <= waited < 4.5
    assert stall < 0.5, f"the event loop stood still for {stall:.2f} s"
    assert verify(path).ok and verify(path).lines == 2


def test_a_cancelled_async_execute_writes_its_line_off_the_event_loop(tmp_path, monkeypatch):
    """A cancelled execute's line ("cancelled") waits for a held lock in a thread too: the
    cancellation comes through at once, the loop runs on, and the line is written (in order,
    before the next execute's) once the holder lets go."""
    path = tmp_path / "audit.jsonl"
    monkeypatch.setattr(audit, "LOCK_SECONDS", 5.0, raising=False)
    procs = []

    async def main():
        async with AsyncSandbox("default", audit_log=path, pool=None) as sb:
            await sb.execute("x = 0")
            task = asyncio.create_task(sb.execute("import time; time.sleep(30)"))
            await asyncio.sleep(0.3)  # the cell runs
            proc = _start_holder(path, procs)
            async with loop_watch() as stalls:
                threading.Timer(1.0, proc.kill).start()
                t0 = time.monotonic()
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                cancelled_in = time.monotonic() - t0
                after = await sb.execute("y = 1")  # waits for the cancelled cell's line, then its own
        return cancelled_in, after, stalls[0]

    try:
        cancelled_in, after, stall = asyncio.run(main())
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    assert cancelled_in < 0.5, f"the cancellation took {cancelled_in:.2f} s"
    assert stall < 0.5, f"the event loop stood still for {stall:.2f} s"
    assert after.ok and after.state_lost
    report = verify(path)
    assert report.ok and report.lines == 3
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["outcome"] for line in lines] == ["ok", "cancelled", "ok"]
    assert [line["seq"] for line in lines] == [1, 2, 3]


def test_threads_of_one_process_queue_without_polling(tmp_path, monkeypatch):
    """Sandboxes of one process sharing a log wait on a lock of their own, not by polling the
    flock: with 8 threads appending at once, no flock attempt is ever refused."""
    path = tmp_path / "audit.jsonl"
    refused = []
    real_flock = audit.fcntl.flock

    def flock(fd, op):
        try:
            return real_flock(fd, op)
        except BlockingIOError:
            refused.append(op)
            raise

    monkeypatch.setattr(audit.fcntl, "flock", flock)
    logs = [AuditLog(path) for _ in range(8)]
    start = threading.Barrier(len(logs))

    def work(log):
        start.wait()
        for i in range(200):
            log.append({"seq": i})

    threads = [threading.Thread(target=work, args=(log,)) for log in logs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for log in logs:
        log.close()
    assert refused == []
    report = verify(path)
    assert report.ok and report.lines == 1600


def test_a_forked_child_is_not_blocked_by_a_thread_of_its_parent(tmp_path):
    """A thread of the parent in the middle of an append when the host forks (a pre-fork
    server): the child's appends do not wait for a lock nobody in the child will release."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, lock_timeout=1)
    log.append({"seq": 0})
    gate = audit._gate(log._file)
    held, release = threading.Event(), threading.Event()

    def hold():
        with gate:
            held.set()
            release.wait(30)

    t = threading.Thread(target=hold)
    t.start()
    held.wait(10)
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child reports through its exit status)
            code = 1
            try:
                AuditLog(path, lock_timeout=1).append({"seq": 1, "from": "child"})
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
    finally:
        release.set()
        t.join(10)
    assert os.waitstatus_to_exitcode(status) == 0
    log.append({"seq": 2})
    log.close()
    assert verify(path).ok and verify(path).lines == 3


@pytest.mark.parametrize("bad", [0, -1, float("inf"), float("nan")])
def test_lock_timeout_must_be_positive_and_finite(tmp_path, bad):
    with pytest.raises(ValueError, match="lock_timeout"):
        AuditLog(tmp_path / "a.jsonl", lock_timeout=bad)


# ----------------------------------------------------- a log deleted, replaced, or shared
def test_a_log_deleted_again_and_again_never_loses_an_append_silently(tmp_path):
    """While another thread deletes the log over and over, every append either returns its
    line or raises AuditError (never None, never a raw OSError), also for one log object
    shared by threads; no line lands in a file the log does not own."""
    path = tmp_path / "a.jsonl"
    shared = AuditLog(path)
    own = [AuditLog(path) for _ in range(2)]
    stop = threading.Event()
    outcomes: list[str] = []
    lock = threading.Lock()

    def deleter():
        while not stop.is_set():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            time.sleep(0.0003)

    def bystander():  # opens and writes files of its own: a descriptor closed twice would hit them
        i = 0
        while not stop.is_set():
            fd = os.open(tmp_path / f"other{i % 20}.txt", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            i += 1
            try:
                os.write(fd, b"mine\n")
            finally:
                os.close(fd)

    def writer(log):
        for k in range(300):
            try:
                got = log.append({"k": k})
                what = "ok" if isinstance(got, dict) and "hash" in got else f"returned {got!r}"
            except AuditError:
                what = "AuditError"
            except OSError as exc:
                what = f"raw {exc!r}"
            with lock:
                outcomes.append(what)

    aux = [threading.Thread(target=deleter), threading.Thread(target=bystander)]
    writers = [threading.Thread(target=writer, args=(log,)) for log in [shared, shared, *own]]
    for t in aux + writers:
        t.start()
    for t in writers:
        t.join(120)
    stop.set()
    for t in aux:
        t.join(10)
    for log in [shared, *own]:
        log.close()
    assert set(outcomes) <= {"ok", "AuditError"}, set(outcomes)
    assert outcomes.count("ok") > len(outcomes) // 2
    for i in range(20):
        other = tmp_path / f"other{i}.txt"
        assert not other.exists() or set(other.read_bytes().splitlines()) == {b"mine"}
    shared2 = AuditLog(path)
    shared2.append({"k": "last"})
    shared2.close()
    assert verify(path).ok


def test_gates_held_are_never_evicted(tmp_path):
    """One log object shared by 4 threads while another thread appends to 300 other logs (more
    than the process keeps gates for): the shared log's chain still verifies."""
    path = tmp_path / "shared.jsonl"
    shared = AuditLog(path)
    others = [AuditLog(tmp_path / f"o{i}.jsonl") for i in range(300)]

    def churn():
        for _ in range(3):
            for log in others:
                log.append({"x": 1})

    def work():
        for k in range(500):
            shared.append({"k": k})

    threads = [threading.Thread(target=work) for _ in range(4)] + [threading.Thread(target=churn)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for log in [shared, *others]:
        log.close()
    report = verify(path)
    assert report.ok and report.lines == 2000, report


def test_a_fifo_or_symlink_put_where_a_deleted_log_was_is_refused(tmp_path):
    """After the log is deleted, what is put at its path is not trusted: a FIFO would hang every
    append, a symbolic link would make the host append to its target."""
    path = tmp_path / "a.jsonl"
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    log = AuditLog(path, lock_timeout=2)
    log.append({"k": 0})
    os.unlink(path)
    os.mkfifo(path)
    out = _in_thread(lambda: log.append({"k": 1}), limit=10)
    assert isinstance(out.get("error"), AuditError) and "not a regular file" in str(out["error"]), out
    os.unlink(path)
    os.symlink(victim, path)
    out = _in_thread(lambda: log.append({"k": 2}), limit=10)
    assert isinstance(out.get("error"), AuditError), out
    assert victim.read_bytes() == b"precious"
    os.unlink(path)
    log.append({"k": 3})  # a regular file again: a new chain
    log.close()
    assert verify(path).ok and verify(path).lines == 1
    with pytest.raises(AuditError, match="not a regular file"):
        os.unlink(path)
        os.mkfifo(path)
        AuditLog(path)  # a FIFO is refused when the log is first opened, too


def test_a_configured_symlink_is_still_followed_when_its_target_is_rotated_away(tmp_path):
    """A log path that is a symbolic link by configuration (audit.jsonl -> volume/real.jsonl):
    when the target is deleted (rotated), the log follows the link again, as a new log would."""
    (tmp_path / "volume").mkdir()
    real = tmp_path / "volume" / "real.jsonl"
    link = tmp_path / "audit.jsonl"
    link.symlink_to(real)
    log = AuditLog(link)
    log.append({"n": 1})
    real.unlink()
    log.append({"n": 2})
    log.append({"n": 3})
    log.close()
    assert [json.loads(x)["n"] for x in real.read_text().splitlines()] == [2, 3] and verify(real).ok


def test_logs_inherited_across_fork_keep_one_chain_with_the_parent(tmp_path):
    """A pre-fork server: the parent's threads keep appending while forked children append
    through the log objects they inherited. Parent and children end up on one valid chain (an
    inherited descriptor shares its flock with the parent's, so it is opened anew)."""
    path = tmp_path / "a.jsonl"
    logs = [AuditLog(path) for _ in range(3)]
    stop = threading.Event()

    def work(log):
        while not stop.is_set():
            log.append({"parent": True})

    threads = [threading.Thread(target=work, args=(log,)) for log in logs]
    for t in threads:
        t.start()
    kids = []
    try:
        for j in range(3):
            time.sleep(0.05)
            pid = os.fork()
            if pid == 0:  # pragma: no cover (reports through its exit status)
                code = 1
                try:
                    for k in range(1000):
                        logs[j].append({"child": j, "k": k})
                    code = 0
                finally:
                    os._exit(code)
            kids.append(pid)
        statuses = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in kids]
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert statuses == [0, 0, 0]
    report = verify(path)
    assert report.ok, report
    children = [json.loads(x) for x in path.read_text().splitlines() if '"child"' in x]
    assert len(children) == 3000


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a link another owner")
def test_a_symlink_planted_by_another_user_is_not_followed(tmp_path):
    """A log directory others may write (0777, not sticky: fs.protected_symlinks does not
    apply): a dangling link planted at the log path by another user made the next AuditLog
    (the next sandbox) create and write its target, anywhere this process may write. A link
    is followed only when this process's user or root owns it, at the path or further on."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    secret = tmp_path / "root-only"
    secret.mkdir(mode=0o700)
    victim = secret / "evil.sh"
    path = shared / "audit.jsonl"
    os.symlink(victim, path)
    os.lchown(path, 65534, 65534)  # planted by nobody
    with pytest.raises(AuditError, match="symbolic link owned by uid 65534") as info:
        AuditLog(path)
    assert str(path) in str(info.value)
    assert not victim.exists()
    # ... also when it is the second link of a chain that starts with one of ours
    own = tmp_path / "configured.jsonl"
    os.symlink(path, own)
    with pytest.raises(AuditError, match=f"leads to {path}, which is a symbolic link owned by uid 65534"):
        AuditLog(own)
    assert not victim.exists()
    # links of this process's user (or root) are followed, as configured
    os.lchown(path, 0, 0)
    log = AuditLog(own)
    log.append({"n": 1})
    log.close()
    assert verify(victim).ok and verify(victim).lines == 1
