"""The host cannot be hung, flooded or fooled by what a child does or sends.

Categories: host deadlines, decode amplification, the output cap on errors,
idle CPU, memory accounting. Each test runs under the allowlist guard (with
the imports the attack needs added to the allowlist: the guard is not what is
tested here) and with ``python.guard = "none"``.

Timing: every assertion is "the host came back within the limit plus a
generous margin", never a tight figure; a hang is reported as a failure
instead of hanging the suite.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from sandbox import AsyncSandbox, Sandbox
from sandbox.audit import verify
from sandbox.errors import ChildTimeoutError, ProtocolError, VariableError
from sandbox.policy import LAYERS
from tests.conftest import run_cli, within
from tests.security.conftest import policy_for

#: Imports the attacks below use; added to the allowlist so the allowlist mode runs them too.
ATTACK_IMPORTS = ["os", "stat", "msgpack", "signal", "time", "mmap", "sys", "threading"]

#: Margin on top of a limit for a loaded 2-core machine.
SLACK = 20.0


def hostile_policy(mode: str, **changes: Any) -> Any:
    if mode == "default":
        base = policy_for(mode)
        changes["python.allowed_imports"] = [*base.python.allowed_imports, *ATTACK_IMPORTS]
    return policy_for(mode, **changes)


FIND_CHANNEL = """
import os, stat
def _channel():
    for fd in range(3, 64):
        try:
            if stat.S_ISSOCK(os.fstat(fd).st_mode):
                return fd
        except OSError:
            pass
chan = _channel()
"""

# 5,000 call frames written straight to the channel; the replies are never read.
CALL_FLOOD = (
    FIND_CHANNEL
    + """
import msgpack, time
body = msgpack.packb({'t': 'call', 'id': 1, 'fn': 'f', 'args': [], 'kwargs': {}})
data = (len(body).to_bytes(4, 'big') + body) * 5000
view = memoryview(data)
while view:
    view = view[os.write(chan, view):]
time.sleep(120)
"""
)

# A signal handler that keeps the child from reading its channel between executes.
STOP_READING = """
import signal, time
signal.signal(signal.SIGALRM, lambda *a: time.sleep(120))
signal.setitimer(signal.ITIMER_REAL, 0.2)
"""


# A child that keeps a duplicate of every memfd the host lends it (a host function's large
# result, a large set_variable): the host wrote those pages, so they are charged to the host.
KEEP_LENT = """
import os, sandbox.protocol as P
kept = []
real = P.read_shm
def keeping(fd, size, max_len, **kw):
    kept.append(os.dup(fd))
    return real(fd, size, max_len, **kw)
P.read_shm = keeping
"""


def test_memfds_lent_to_the_child_are_emptied_once_it_answers() -> None:
    """Each memfd the host filled for the child is truncated as soon as the child writes again
    (its next call, its result, its ack): a child that kept them all pinned 1 GiB of host memory
    after 55 calls of 20 MB, outside its own limits. Only the value in flight stays."""
    big = ["x" * 10_000] * 200  # 2 MB packed: over INLINE_LIMIT, not a str: a memfd
    with Sandbox(policy_for("guard_none"), host_functions={"big": lambda: big}) as sb:
        assert sb.execute(KEEP_LENT).ok
        r = sb.execute("for _ in range(5):\n    assert big() == ['x' * 10_000] * 200\n"
                       "print([os.fstat(k).st_size for k in kept])")  # fmt: skip
        sizes = json.loads(r.stdout)
        assert len(sizes) == 5 and sizes[:4] == [0] * 4 and sizes[4] > 2_000_000, r
        sb.set_variable("value", {"k": ["é" * 2_000_000]})  # not a plain str: a memfd too
        r = sb.execute("print([os.fstat(k).st_size for k in kept], len(value['k'][0]))")
        assert r.stdout == "[0, 0, 0, 0, 0, 0] 2000000\n", r


# 50 calls written to the channel at once, before any reply is read: the host reads them all in
# one go and answers each, with a memfd for each (the result is 2 MB). The child then reads the
# 50 replies' frames (the memfds riding on them are dropped unread), so that its code ends, and
# its done frame follows, only once the host has answered every call: had it ended earlier
# (after a fixed second, as it did), it read a reply where it expected the next exec and exited,
# while a loaded host was still answering the calls (ChildExited, not the result of the code).
PIPELINED_CALLS = (
    FIND_CHANNEL
    + """
import msgpack, struct
body = msgpack.packb({'t': 'call', 'id': 1, 'fn': 'big', 'args': [], 'kwargs': {}})
data = (struct.pack('>I', len(body)) + body) * 50
view = memoryview(data)
while view:
    view = view[os.write(chan, view):]
buf = b''
for _ in range(50):
    while len(buf) < 4 or len(buf) < 4 + struct.unpack('>I', buf[:4])[0]:
        more = os.read(chan, 65536)
        assert more, 'the host closed the channel'
        buf += more
    buf = buf[4 + struct.unpack('>I', buf[:4])[0]:]
print('read', len(buf))
"""
)


def _lent_memfds() -> int:
    """Memfds of values this process has open (sandbox.protocol names them sandbox-value)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:sandbox-value")
    return count


def test_pipelined_calls_get_one_lent_memfd_at_a_time(mode: str) -> None:
    """A child that wrote 50 calls at once had 50 memfds lent (each truncated only once it wrote
    again, which it never did): 3 GiB of host memory with 16 MB results. Lending a memfd now
    takes back every earlier one: an honest child has read its reply before its next call."""
    seen: list[int] = []
    payload = b"z" * 2_000_000

    def big() -> bytes:
        seen.append(_lent_memfds())
        return payload

    with Sandbox(hostile_policy(mode), host_functions={"big": big}) as sb:
        r = sb.execute(PIPELINED_CALLS)
        assert r.ok and r.stdout == "read 0\n", r
        assert len(seen) == 50, len(seen)
        assert max(seen) <= 1, seen
        # It read every reply: the channel is in step, the child lives on.
        again = sb.execute("print(len(big()))")
        assert again.stdout == "2000000\n" and not again.state_lost, again


# ------------------------------------------------------------- host deadlines
def test_call_flood_does_not_block_execute(mode: str) -> None:
    with Sandbox(hostile_policy(mode, **{"limits.wall_seconds": 3})) as sb:
        r, elapsed = within(3 + SLACK, lambda: sb.execute(CALL_FLOOD))
        assert not r.ok and r.limit == "wall", r
        assert elapsed < 3 + SLACK
        again = sb.execute("print(6 * 7)")
        assert again.ok and again.stdout == "42\n" and again.state_lost


DEEP_SCRATCH = """
import os
os.symlink({target!r}, 'link')
for i in range(1500):
    os.mkdir('d')
    os.chdir('d')
    open('f', 'w').write('x')
os.symlink({target!r}, 'link')
print('nested')
"""


def test_closing_a_sandbox_whose_scratch_is_nested_deep(mode: str, tmp_path: Path) -> None:
    """Without the scratch tmpfs (``scratch_fs`` off: ``portable``, a host without user
    namespaces) the host removes the scratch directory the code filled. ``shutil.rmtree``
    recursed once per level: 1,500 nested directories made ``close()`` raise RecursionError
    and left the tree on disk for good (the sweep of leftovers stopped at it too). Links in the
    tree are removed, never followed."""
    target = tmp_path / "host"
    target.mkdir()
    (target / "keep").write_text("host data")
    policy = hostile_policy(mode, **{"isolation.scratch_fs": False, "isolation.require": []})
    sb = Sandbox(policy)
    try:
        r = sb.execute(DEEP_SCRATCH.format(target=str(target)))
        assert r.ok and r.stdout == "nested\n", r
        assert r.layers["scratch_fs"] == "off"
        assert sb._child is not None
        scratch = Path(sb._child.scratch)
        assert (scratch / "d" / "d" / "f").is_file()  # the host sees the tree it must remove
        try:
            sb.close()
            removed = not os.path.lexists(scratch)
        finally:  # what a failed close left (shutil.rmtree in pytest's clean-up would fail on it too)
            subprocess.run(["rm", "-rf", "--", str(scratch)], check=False)
    finally:
        sb.close()
    assert removed
    assert (target / "keep").read_text() == "host data"


def test_the_sweep_removes_a_leftover_scratch_nested_deep(tmp_path: Path) -> None:
    from sandbox.sandbox import _sweep_scratch

    leftover = tmp_path / "sandbox-abcd1234"
    os.mkdir(leftover)
    here = os.open(leftover, os.O_RDONLY)
    for _ in range(1500):  # deeper than the interpreter's recursion limit
        os.mkdir("d", dir_fd=here)
        deeper = os.open("d", os.O_RDONLY, dir_fd=here)
        os.close(here)
        here = deeper
    os.close(here)
    os.utime(leftover, (0, 0))  # old enough to be swept
    try:
        swept = _sweep_scratch(str(tmp_path))
        removed = not os.path.lexists(leftover)
    finally:  # (shutil.rmtree in pytest's clean-up would fail on it too)
        subprocess.run(["rm", "-rf", "--", str(leftover)], check=False)
    assert swept == 1 and removed


def test_set_variable_to_a_child_that_stopped_reading(mode: str) -> None:
    with Sandbox(hostile_policy(mode)) as sb:
        assert sb.execute(STOP_READING).ok
        time.sleep(0.5)  # the handler is asleep now: nothing reads the channel
        with pytest.raises(ChildTimeoutError, match="within 3 s"):
            within(3 + SLACK, lambda: sb.set_variable("big", "x" * 900_000, timeout=3))
        assert not sb.alive
        r = sb.execute("print(6 * 7)")
        assert r.ok and r.state_lost


def test_get_variable_from_a_child_that_stopped_reading(mode: str) -> None:
    with Sandbox(hostile_policy(mode)) as sb:
        assert sb.execute("v = 1\n" + STOP_READING).ok
        time.sleep(0.5)
        with pytest.raises(ChildTimeoutError):
            within(2 + SLACK, lambda: sb.get_variable("v", timeout=2))


# The code replaces how its child streams a value back (plain exec can reach the runtime).
FORGED_STREAM = """
import sys, time
protocol = sys.modules["sandbox.protocol"]
real_write, real_open = protocol.write_stream, protocol.open_stream
{patch}
v = "a" * 3_000_000
"""


@pytest.mark.parametrize(
    ("patch", "error", "why"),
    [
        (
            "protocol.write_stream = lambda fd, value, t: real_write(fd, b'\\xff' * len(value), t)",
            ProtocolError,
            "not ASCII",
        ),
        (
            "protocol.write_stream = lambda fd, value, t: real_write(fd, value[: len(value) // 2], t)",
            ProtocolError,
            "ended after 1500000 of",
        ),
        ("protocol.write_stream = lambda fd, value, t: time.sleep(120)", ChildTimeoutError, "did not send"),
        ("protocol.open_stream = lambda: real_open()[::-1]", ProtocolError, "cannot read"),  # the write end
    ],
)
def test_get_variable_refuses_a_forged_stream(patch: str, error: type[Exception], why: str) -> None:
    """A str streamed back must be all there, all ASCII and in time, or the child is killed."""
    with Sandbox(policy_for("guard_none")) as sb:
        assert sb.execute(FORGED_STREAM.format(patch=patch)).ok
        with pytest.raises(error, match=why):
            within(2 + SLACK, lambda: sb.get_variable("v", timeout=2))
        assert not sb.alive


def test_execute_to_a_child_that_stopped_reading(mode: str) -> None:
    """The exec frame itself (a large cell) cannot be written: the execute ends at its wall limit."""
    with Sandbox(hostile_policy(mode, **{"limits.wall_seconds": 2})) as sb:
        assert sb.execute(STOP_READING).ok
        time.sleep(0.5)
        cell = "x = 1\n" + "#" * 2_000_000
        r, _ = within(2 + SLACK, lambda: sb.execute(cell))
        assert not r.ok and r.limit == "wall", r


def test_async_execute_cancelled_while_a_huge_cell_waits_to_be_written(mode: str, tmp_path: Path) -> None:
    """The cell does not fit in the socket and the child stopped reading: the rest is written
    from a worker thread. Cancelled then, the execute ends at once, kills the child (which ends
    that thread: asyncio.run waits for it), is audited as cancelled, and the sandbox goes on."""
    audit = tmp_path / "audit.jsonl"
    policy = hostile_policy(mode, **{"limits.wall_seconds": 30, "audit.enabled": True})

    async def main() -> tuple[float, Any]:
        async with AsyncSandbox(policy, audit_log=audit) as sb:
            assert (await sb.execute(STOP_READING)).ok
            await asyncio.sleep(0.5)
            task = asyncio.ensure_future(sb.execute("x = 1\n" + "#" * 4_000_000))
            await asyncio.sleep(0.3)
            assert not task.done()
            start = time.monotonic()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return time.monotonic() - start, await sb.execute("print(6 * 7)")

    (waited, r), _ = within(SLACK, lambda: asyncio.run(main()))
    assert waited < SLACK / 2  # not the 30 s the thread would have waited for the child
    assert r.ok and r.stdout == "42\n" and r.state_lost, r
    outcomes = [json.loads(line)["outcome"] for line in audit.read_text().splitlines()]
    assert outcomes == ["ok", "cancelled", "ok"]
    assert verify(audit).ok


# Half a frame header, then one byte every 0.3 s: the frame never completes.
DRIBBLE = (
    FIND_CHANNEL
    + """
import time
os.write(chan, b"\\x00\\x00")
while True:
    time.sleep(0.3)
    os.write(chan, b"\\x01")
"""
)


def test_a_frame_sent_a_byte_at_a_time_does_not_extend_the_deadline(mode: str) -> None:
    """Each byte wakes the host, but the wait for the frame keeps one deadline: the wall limit."""
    with Sandbox(hostile_policy(mode, **{"limits.wall_seconds": 2})) as sb:
        r, _ = within(2 + SLACK, lambda: sb.execute(DRIBBLE))
        assert not r.ok and r.limit == "wall", r


@pytest.mark.slow
def test_rlm_exec_does_not_hang(tmp_path: Path) -> None:
    policy = tmp_path / "flood.toml"
    policy.write_text(
        'schema_version = 1\nname = "flood"\ndescription = "d"\n'
        '[limits]\nwall_seconds = 3\n[python]\nguard = "none"\n[audit]\nenabled = false\n'
    )
    start = time.monotonic()
    try:
        out = run_cli("exec", "--json", "--policy", str(policy), "-", stdin=CALL_FLOOD)
    except subprocess.TimeoutExpired:
        pytest.fail("rlm exec hung on a child that floods call frames")
    assert time.monotonic() - start < 3 + 60
    assert json.loads(out.stdout)["limit"] == "wall", out


# ------------------------------------------------------ decode amplification
# Run in a fresh host process so its peak RSS (ru_maxrss) measures this decode alone.
AMPLIFY_HOST = """
import json, resource, sys
from sandbox import Sandbox, load_policy
from sandbox.errors import SandboxError
mode, kind, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
changes = {"audit.enabled": False, "limits.memory_mb": 2048}
if mode == "guard_none":
    changes["python.guard"] = "none"
seen = []
with Sandbox(load_policy("default").override(changes), host_functions={"f": lambda *a: seen.append(1)}) as sb:
    # A hostile child: with the guard off it switches off its own courtesy checks.
    if mode == "guard_none":
        r = sb.execute("import sys\\np = sys.modules['sandbox.protocol']\\np.check_plain = lambda *a, **k: None")
        assert r.ok, r
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {}
    if kind == "get":
        assert sb.execute(f"x = [{{}}] * {n}").ok
        try:
            sb.get_variable("x")
            out["outcome"] = "decoded"
        except SandboxError as exc:
            out["outcome"] = type(exc).__name__
            out["message"] = str(exc)
    else:
        r = sb.execute(f"f([{{}}] * {n})")
        out["outcome"] = r.error_type or "ok"
        out["message"] = r.error_message
    out["calls"] = len(seen)
    out["growth_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    out["next"] = sb.execute("print(6 * 7)").stdout
print(json.dumps(out))
"""


def amplify(mode: str, kind: str, n: int) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-c", AMPLIFY_HOST, mode, kind, str(n)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def check_get_is_bounded(mode: str, n: int) -> None:
    out = amplify(mode, "get", n)
    assert out["outcome"] == "VariableError" and "1,000,000 elements" in out["message"], out
    assert out["growth_mb"] < 150, out  # unbounded: 250 MB for 4 M dicts, 1.4 GB for 20 M
    assert out["next"] == "42\n", out


def test_get_variable_decode_is_bounded(mode: str) -> None:
    """1.04 M empty dicts: about 1 MB packed, an inline ``value`` frame."""
    check_get_is_bounded(mode, 1_040_000)


@pytest.mark.slow
def test_get_variable_decode_of_an_out_of_band_value_is_bounded() -> None:
    """20 M empty dicts: 20 MB packed, streamed out of band; the child skips its own check."""
    check_get_is_bounded("guard_none", 20_000_000)


def test_host_function_arguments_are_bounded(mode: str) -> None:
    out = amplify(mode, "call", 4_000_000)
    assert out["calls"] == 0, out
    assert out["growth_mb"] < 150, out
    if mode == "guard_none":  # the child skipped its own check: the host refused the frame
        assert out["outcome"] == "ProtocolError" and "1,000,000 elements" in out["message"], out
    else:  # the code sees the refusal as its own exception
        assert out["outcome"] == "ValueError" and "1,000,000 elements" in out["message"], out
    assert out["next"] == "42\n", out


# ------------------------------------------------------ output cap on errors
def test_output_cap_bounds_error_message_and_traceback(mode: str) -> None:
    cap = 100_000
    with Sandbox(policy_for(mode, **{"limits.max_output_bytes": cap})) as sb:
        r = sb.execute("print('before')\nraise ValueError('A' * 30_000_000)")
        assert not r.ok and r.error_type == "ValueError" and r.output_truncated, r.error_type
        total = sum(len(t.encode()) for t in (r.stdout, r.stderr, r.error_message or "", r.traceback or ""))
        assert total <= cap + 1000, total
        assert r.stdout == "before\n"
        assert r.error_message is not None and r.error_message.startswith("AAAA")
        assert r.traceback is not None and "Traceback" in r.traceback
        assert r.limit is None  # the code's own exception ended it, not the output limit


def test_output_cap_is_shared_by_print_and_error(mode: str) -> None:
    cap = 50_000
    with Sandbox(policy_for(mode, **{"limits.max_output_bytes": cap})) as sb:
        r = sb.execute("print('x' * 45_000)\nraise KeyError('k' * 200_000)")
        total = sum(len(t.encode()) for t in (r.stdout, r.stderr, r.error_message or "", r.traceback or ""))
        assert total <= cap + 1000 and r.output_truncated, total
        assert r.error_type == "KeyError" and "kkkk" in (r.error_message or "")


# ------------------------------------------------------------------ idle CPU
BURN_LATER = """
import signal, time
def _burn(*a):
    t = time.process_time()
    while time.process_time() - t < {seconds}:
        pass
signal.signal(signal.SIGALRM, _burn)
signal.setitimer(signal.ITIMER_REAL, 0.1)
"""

BURN_IN_THREAD = """
import threading, time
def _burn():
    time.sleep(0.1)
    t = time.process_time()
    while time.process_time() - t < {seconds}:
        pass
threading.Thread(target=_burn, daemon=True).start()
"""


def check_idle_cpu_is_charged(mode: str, code: str, audit: Path) -> None:
    policy = hostile_policy(mode, **{"audit.enabled": True, "limits.max_processes": 2})
    with Sandbox(policy, audit_log=audit) as sb:
        first = sb.execute(code)
        assert first.ok, first
        deadline = time.monotonic() + 60
        charged = 0.0
        while charged < 1.4 and time.monotonic() < deadline:
            time.sleep(1)  # the host is idle; the child burns
            charged += sb.execute("pass").cpu_s
        assert charged >= 1.4, f"idle CPU was not charged: {charged} s"
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    assert sum(line["cpu_s"] for line in lines[1:]) >= 1.4, lines


def test_cpu_of_a_signal_handler_between_executes_is_charged(mode: str, tmp_path: Path) -> None:
    check_idle_cpu_is_charged(mode, BURN_LATER.format(seconds=1.5), tmp_path / "audit.jsonl")


def test_cpu_of_a_thread_between_executes_is_charged(tmp_path: Path) -> None:
    check_idle_cpu_is_charged("guard_none", BURN_IN_THREAD.format(seconds=1.5), tmp_path / "audit.jsonl")


BURN_DURING_CALL = """
import signal
def burn(*a):
    while True:
        pass
signal.signal(signal.SIGALRM, burn)
signal.setitimer(signal.ITIMER_REAL, 0.05)
wait()
"""


def _waiting_for_the_child(child: Any) -> Any:
    """A host function that returns once the child (``child()``: the host's record of it) has
    burnt 3 s of CPU or was killed, or after 60 s."""
    from sandbox.limits import cpu_seconds

    def wait() -> None:
        end = time.monotonic() + 60
        while time.monotonic() < end and not child().dead:
            if (cpu_seconds(child().pid) or 0.0) >= 3.0:
                return
            time.sleep(0.02)

    return wait


def test_cpu_burnt_while_a_host_function_runs_is_limited(mode: str) -> None:
    """The host checked the child's CPU only between frames: while a host function ran (a
    model call, a child RLM), a signal handler (or a thread) of the child burnt CPU for as long
    as the function took (5.9 s of a 1 s ``cpu_seconds`` during a 6 s call), bounded only by
    ``lifetime_cpu_seconds``. The host function here waits until the child has burnt 3 s, or
    was killed: it is killed at its 1 s."""
    policy = hostile_policy(mode, **{"limits.cpu_seconds": 1, "limits.wall_seconds": 60})
    sb = Sandbox(policy, host_functions={"wait": _waiting_for_the_child(lambda: sb._child)})
    with sb:
        r = sb.execute(BURN_DURING_CALL)
        assert r.limit == "cpu" and r.error_type == "CPULimitExceeded", r
        assert 1.0 <= r.cpu_s < 2.0, r
        again = sb.execute("print(6 * 7)")
        assert again.ok and again.stdout == "42\n" and again.state_lost


def test_cpu_burnt_while_an_async_host_function_runs_is_limited() -> None:
    policy = hostile_policy("guard_none", **{"limits.cpu_seconds": 1, "limits.wall_seconds": 60})

    async def main() -> Any:
        sb = AsyncSandbox(policy, host_functions={"wait": _waiting_for_the_child(lambda: sb._sync._child)})
        async with sb:
            return await sb.execute(BURN_DURING_CALL)

    r = asyncio.run(main())
    assert r.limit == "cpu" and r.error_type == "CPULimitExceeded", r
    assert 1.0 <= r.cpu_s < 2.0, r


def test_cpu_between_executes_is_limited(mode: str) -> None:
    policy = hostile_policy(mode, **{"limits.cpu_seconds": 1, "limits.wall_seconds": 5})
    with Sandbox(policy) as sb:
        assert sb.execute(BURN_LATER.format(seconds=30)).ok
        time.sleep(3)  # the handler burns more than the whole budget while the host is idle
        r = sb.execute("print('never')")
        assert not r.ok and r.limit == "cpu" and r.stdout == "", r
        again = sb.execute("print(6 * 7)")
        assert again.ok and again.stdout == "42\n"


# ---------------------------------------------------------- memory accounting
GROW_UNTIL_FULL = {
    "strings_64k": "x = []\nwhile True:\n    x.append('a' * 65536)",
    "strings_1m_and_lists": "x = []\nwhile True:\n    x.append('a' * 10**6)\n    x.append(list(range(100)))",
}


@pytest.mark.parametrize("name", sorted(GROW_UNTIL_FULL))
def test_running_out_of_memory_is_a_memory_limit(mode: str, name: str) -> None:
    """The code fills the address space until the next allocation fails: the child
    still reports its result (it was: crashed, "ChildExited (status 4)")."""
    with Sandbox(policy_for(mode, **{"limits.memory_mb": 256})) as sb:
        r = sb.execute(GROW_UNTIL_FULL[name])
        assert not r.ok and r.limit == "memory" and not r.crashed, r
        again = sb.execute("x = None\nprint(6 * 7)")
        if not again.ok:  # a child with no room left is replaced; never a crash
            assert again.limit == "memory" and not again.crashed, again
            again = sb.execute("print(6 * 7)")
        assert again.ok and again.stdout == "42\n", again


def test_surrogates_come_back_escaped(mode: str) -> None:
    with Sandbox(hostile_policy(mode)) as sb:
        r = sb.execute("raise ValueError('\\ud800')")
        assert not r.crashed and r.error_type == "ValueError", r
        assert r.error_message == "\\ud800", r.error_message
        r = sb.execute('print("\udcff")')  # the surrogate is in the code itself
        assert r.ok and r.stdout == "\\udcff\n", r
        r = sb.execute("print('\\udcff', 'é')\nimport sys\n_ = sys.stderr.write('\\ud83d')")
        assert r.ok and r.stdout == "\\udcff é\n" and r.stderr == "\\ud83d", r
        r = sb.execute("class E(Exception):\n    pass\nraise E('m\\udc81')")
        assert not r.crashed and r.error_message == "m\\udc81", r
        assert sb.execute("print(6 * 7)").stdout == "42\n"


def test_rlm_trajectory_holds_only_bounded_text(tmp_path: Path) -> None:
    from rlm import ScriptedBackend, run

    block = "```repl\n{}\n```"
    backend = ScriptedBackend(
        [block.format("raise ValueError('A' * 30_000_000)"), block.format("FINAL('done')")]
    )
    policy = policy_for("default", **{"limits.max_output_bytes": 100_000})
    result = run("q?", "ctx", model="root", sub_model="sub", backend=backend, policy=policy, log_dir=tmp_path)
    assert result.answer == "done"
    sizes = {p.name: p.stat().st_size for p in tmp_path.glob("*.jsonl")}
    assert sizes and all(size < 1_000_000 for size in sizes.values()), sizes


# ------------------------------------------------------- pids and process groups
def test_pid_is_not_reaped_before_the_host_releases_it(mode: str) -> None:
    """A child that exits between executes stays a zombie (its pid cannot be reused)
    until the host has made its last use of the pid; then it is reaped."""
    import psutil

    with Sandbox(hostile_policy(mode)) as sb:
        pid = sb.pid
        assert pid is not None
        code = "import signal, os\nsignal.signal(signal.SIGALRM, lambda *a: os._exit(0))\nsignal.setitimer(signal.ITIMER_REAL, 0.1)"
        assert sb.execute(code).ok
        time.sleep(1.5)
        assert psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # exited, not reaped
        r = sb.execute("print(1)")
        assert not r.ok and r.crashed, r
        deadline = time.monotonic() + 30
        while psutil.pid_exists(pid) and psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the released child was never reaped"
            time.sleep(0.1)


def test_group_of_a_child_that_exits_on_its_own_is_killed(mode: str) -> None:
    """Without a cgroup to sweep, a grandchild left in the process group of a child
    that exited by itself is killed all the same."""
    import psutil

    require = [x for x in policy_for(mode).isolation.require if x != "cgroup"]
    policy = hostile_policy(
        mode, **{"limits.max_processes": 2, "isolation.cgroup": False, "isolation.require": require}
    )
    with Sandbox(policy) as sb:
        pid = sb.pid
        assert pid is not None
        uid = psutil.Process(pid).uids().real
        r = sb.execute(
            "import os, time\nif os.fork() == 0:\n    time.sleep(120)\n    os._exit(0)\ntime.sleep(0.3)\nos._exit(0)"
        )
        assert not r.ok
        deadline = time.monotonic() + 30
        while True:
            left = [p for p in psutil.process_iter(["uids", "status"]) if p.info["uids"] and p.info["uids"].real == uid
                    and p.info["status"] != psutil.STATUS_ZOMBIE]  # fmt: skip
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert not left, f"left behind in the child's process group: {left}"


def test_host_cuts_output_of_a_child_that_skips_its_own_cap() -> None:
    """The child's cut is a courtesy: a child that switches it off still gets only the cap home."""
    cap = 100_000
    with Sandbox(policy_for("guard_none", **{"limits.max_output_bytes": cap})) as sb:
        off = "import sys\nsys.modules['sandbox.limits'].cap_texts = lambda texts, limit: (texts, [False] * len(texts))"
        assert sb.execute(off).ok
        r = sb.execute("raise ValueError('A' * 25_000_000)")
        assert r.error_type == "ValueError" and r.output_truncated, r.error_type
        total = sum(len(t.encode()) for t in (r.stdout, r.stderr, r.error_message or "", r.traceback or ""))
        assert total <= cap + 1000, total


# The code replaces a method of its own child object (plain exec can reach the runtime).
FORGE_CHILD = """
import gc, os
from sandbox import protocol
child = [o for o in gc.get_objects() if type(o).__name__ == 'Child' and hasattr(o, 'sock')][0]
{patch}
"""


def test_error_type_and_refusal_texts_are_bounded() -> None:
    """The exception class name a child reports is outside the output cap and goes into every
    audit line, and the error text of a refused get/set reaches the caller's exception: a child
    sending megabytes of either gets a short cut home, and the audit log stays small."""
    patch = (
        "real = child.report\n"
        "def forged(*a):\n"
        "    d = real(*a)\n"
        "    d.update(ok=False, error_type='E' * 5_000_000)\n"
        "    return d\n"
        "child.report = forged\n"
        "child.get = lambda name: child.send({'t': 'value', 'ok': False, 'error': 'G' * 5_000_000})\n"
        "child.set = lambda msg: child.send({'t': 'ack', 'ok': False, 'error': 'S' * 5_000_000})\n"
    )
    policy = policy_for("guard_none", **{"limits.max_output_bytes": 1000, "audit.enabled": True})
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "audit.jsonl"
        with Sandbox(policy, audit_log=log) as sb:
            sb.execute(FORGE_CHILD.format(patch=patch))  # its own result is forged already
            r = sb.execute("pass")
            assert r.error_type is not None and r.error_type.startswith("EEE") and len(r.error_type) < 300
            with pytest.raises(VariableError) as got:
                sb.get_variable("x")
            assert 1000 < len(str(got.value)) < 3000
            with pytest.raises(VariableError) as refused:
                sb.set_variable("x", 1)
            assert 1000 < len(str(refused.value)) < 3000
        assert log.stat().st_size < 10_000
        assert verify(log).ok


def test_an_unreadable_out_of_band_value_is_a_protocol_error() -> None:
    """A ``value`` announced in a memory file whose descriptor cannot be read (opened O_PATH:
    fstat says a regular file of the right size, the read fails) is the child's fault: a
    ProtocolError and a killed child, not a raw OSError in the caller."""
    patch = (
        "with open('f', 'wb') as f:\n"
        "    f.write(b'\\x00' * 4096)\n"
        "def forged(name):\n"
        "    fd = os.open('f', os.O_PATH)\n"
        "    protocol.send_message(child.sock, {'t': 'value', 'ok': True, 'shm': 100}, fd)\n"
        "    os.close(fd)\n"
        "child.get = forged\n"
    )
    with Sandbox(policy_for("guard_none")) as sb:
        assert sb.execute(FORGE_CHILD.format(patch=patch)).ok
        with pytest.raises(ProtocolError, match="cannot be read"):
            within(SLACK, lambda: sb.get_variable("x"))
        assert not sb.alive
        assert sb.execute("print(1)").state_lost


def test_a_child_dead_of_a_signal_python_has_no_name_for_is_a_result() -> None:
    """A real-time signal (40) after the child touched most of its memory: the result names the
    signal by number (``signal.Signals(40)`` raised ValueError out of execute, and the execute
    was not audited). Its own process group is killable only without the pid layer."""
    policy = policy_for(
        "guard_none",
        **{
            "isolation.pid": False,
            "isolation.require": [layer for layer in LAYERS if layer != "pid"],
            "limits.memory_mb": 256,
            "audit.enabled": True,
        },
    )
    code = (
        "import os\nkeep = []\n"
        "try:\n"
        "    while True:\n"
        "        b = bytearray(4 << 20)\n"
        "        b[::4096] = b'\\x01' * len(b[::4096])\n"
        "        keep.append(b)\n"
        "except MemoryError:\n"
        "    pass\n"
        "os.kill(os.getpid(), 40)\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "audit.jsonl"
        with Sandbox(policy, audit_log=log) as sb:
            r = within(SLACK, lambda: sb.execute(code))[0]
            assert not r.ok and "signal 40" in (r.error_message or ""), r
        outcomes = [json.loads(line)["outcome"] for line in log.read_text().splitlines()]
        assert len(outcomes) == 1 and outcomes[0] != "ok"
