"""A sandbox taken from a pool starts fast: what it does early, and what it no longer repeats."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sandbox import Sandbox, limits
from sandbox import sandbox as sandbox_module
from sandbox.policy import load_policy
from sandbox.pool import SandboxPool
from sandbox.spin import Spinner


def _cpu_moves(pid: int, since: float, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = limits.cpu_seconds(pid)
        if now is not None and now > since:
            return True
        time.sleep(0.01)
    return False


def test_a_pooled_child_is_woken_by_its_sandbox_not_by_the_first_request(audit_path) -> None:
    policy = load_policy("default")
    with SandboxPool(size=1) as pool:
        pool.warm(policy)
        assert pool.wait_ready(30)
        time.sleep(0.1)  # the ready child is blocked, waiting for its init
        (pid,) = pool.ready_pids()
        idle = limits.cpu_seconds(pid)
        assert idle is not None
        time.sleep(0.05)
        assert limits.cpu_seconds(pid) == idle  # asleep in the pool: it burns nothing
        with Sandbox(policy, host_functions={"f": lambda x: x + 1}, audit_log=audit_path, pool=pool) as sb:
            assert sb.pid == pid
            # its init went out with Sandbox(): it runs before any request is sent
            assert _cpu_moves(pid, idle)
            r = sb.execute("print(f(41))")
            assert r.ok and r.stdout == "42\n" and not r.state_lost
            # charged from its hello on (init and this cell), not for its time in the pool
            assert 0 < r.cpu_s < 1.0


def test_a_stopped_ready_child_is_not_handed_out(audit_path) -> None:
    """A ready child stopped while it waits (SIGSTOP by an operator, a debugger) would have taken
    the first request and waited out the wall limit, blamed on the code (limit="wall"); it is
    discarded, and the sandbox gets a child that runs."""
    import signal

    policy = load_policy("default")
    with SandboxPool(size=1) as pool:
        pool.warm(policy)
        assert pool.wait_ready(30)
        (pid,) = pool.ready_pids()
        os.kill(pid, signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the stop takes effect asynchronously
            with open(f"/proc/{pid}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"T":
                    break
            time.sleep(0.01)
        with Sandbox(policy, audit_log=audit_path, pool=pool) as sb:
            assert sb.pid != pid
            r = sb.execute("print(1)")
            assert r.ok and r.stdout == "1\n" and r.duration_s < 5, r
        assert not os.path.exists(f"/proc/{pid}") or _zombie_or_gone(pid)


def _zombie_or_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")
    except OSError:
        return True


def test_a_child_forked_on_demand_still_gets_init_with_its_first_request(audit_path) -> None:
    with Sandbox("default", host_functions={"f": lambda: "hi"}, audit_log=audit_path, pool=None) as sb:
        assert sb._child is not None and sb._child.init_frame  # rides with the first request
        assert sb.execute("print(f())").stdout == "hi\n"


def test_the_policy_spec_is_computed_once_per_policy_object() -> None:
    policy = load_policy("default")
    spec, make = sandbox_module._spec_for(policy)
    assert sandbox_module._spec_for(policy) == (spec, make)
    assert spec.policy_sha256 == policy.sha256 and spec.policy == policy.model_dump(mode="json")
    other = load_policy("default")  # equal, but another object: its own entry
    assert sandbox_module._spec_for(other)[0] == spec
    for _ in range(sandbox_module._SPECS_KEPT + 5):
        sandbox_module._spec_for(policy.override({"limits.cpu_seconds": 3.0}))
    assert len(sandbox_module._specs) <= sandbox_module._SPECS_KEPT  # bounded


def test_a_spinner_told_to_skip_blocks_then_spins_again() -> None:
    s = Spinner(0.001)
    s.skip = 1
    assert s.budget() == 0.0
    assert s.budget() == 0.001
    s.outcome(False)
    assert s.budget() == 0.0005


def test_a_spinner_learns_from_waits_that_blocked() -> None:
    """Spinning stops after misses and comes back as soon as a blocked wait shows that a
    full window would have caught the answer; long waits (many tenants) never bring it back."""
    s = Spinner(0.001)
    for _ in range(10):
        s.outcome(False)
    assert s.budget() == 0.0
    s.blocked(0.05)  # the answer took 50 ms: spinning would have been wasted
    assert s.budget() == 0.0
    s.blocked(0.0004)  # 0.4 ms, wake-up included: a full window would have caught it
    assert s.budget() == 0.001


def test_only_the_first_wake_up_of_a_wait_counts() -> None:
    """woke() reports the wait from wait_started() once: the later reads of a frame that came
    in pieces are not waits of their own."""
    s = Spinner(0.001)
    s.outcome(False)
    s.outcome(False)
    s.window = 0.0
    s.wait_started()
    s.woke()  # at once: a full window would have caught it
    assert s.budget() == 0.001
    s.window = 0.0
    s.woke()  # a second read in the same wait: nothing to report
    assert s.budget() == 0.0


def test_a_spinner_that_lost_its_cpu_stops_spinning_for_a_while() -> None:
    """A spin that got much less CPU than wall time ran on a loaded machine: spinning there
    slows both ends, so it stops, and only every COOLDOWN-th short blocked wait restarts it."""
    from sandbox.spin import COOLDOWN

    s = Spinner(0.001)
    s.outcome(True, wall=0.0009, cpu=0.00085)  # ran the whole time: fine
    assert s.budget() == 0.001
    s.outcome(True, wall=0.0009, cpu=0.0003)  # preempted for 0.6 ms: answered, but others want the core
    assert s.budget() == 0.0
    for _ in range(COOLDOWN):
        s.blocked(0.0001)
        assert s.budget() == 0.0
    s.blocked(0.0001)
    assert s.budget() == 0.001
    s.outcome(True, wall=0.003, cpu=0.0004)  # preempted again, at its next spin: twice as long a pause
    for _ in range(2 * COOLDOWN):
        s.blocked(0.0001)
        assert s.budget() == 0.0
    s.blocked(0.0001)
    s.outcome(True, wall=0.0002, cpu=0.0002)  # a clean spin: the pause is short again
    s.outcome(False, wall=0.003, cpu=0.0004)
    for _ in range(COOLDOWN):
        s.blocked(0.0001)
    s.blocked(0.0001)
    assert s.budget() == 0.001


def test_sandbox_ids_do_not_repeat_in_a_forked_process() -> None:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the forked copy draws its next id
        os.write(w, f"{sandbox_module._ids.getrandbits(64):016x}".encode())
        os._exit(0)
    os.close(w)
    theirs = os.read(r, 64).decode()
    os.close(r)
    os.waitpid(pid, 0)
    assert len(theirs) == 16 and theirs != f"{sandbox_module._ids.getrandbits(64):016x}"


def test_the_cpu_backstop_is_set_only_when_it_changes(audit_path, monkeypatch) -> None:
    import resource

    calls: list[tuple[object, ...]] = []
    real = resource.prlimit

    def counting(*args: object) -> object:
        if len(args) == 3:  # a change, not a read
            calls.append(args)
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(limits.resource, "prlimit", counting)
    assert limits.set_cpu_backstop(1 << 22, 0.5, 10.0, 600.0, current=12) == 12  # same limit: no call
    assert calls == []
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        got = limits.set_cpu_backstop(victim.pid, 0.5, 10.0, 600.0, current=None)
        assert got == 12 and len(calls) == 1
        assert resource.prlimit(victim.pid, resource.RLIMIT_CPU) == (12, 12)
        assert limits.set_cpu_backstop(victim.pid, 0.9, 10.0, 600.0, got) == 12 and len(calls) == 1
        # a new limit is set (lower here: raising a hard limit takes CAP_SYS_RESOURCE)
        assert limits.set_cpu_backstop(victim.pid, 0.0, 9.0, 600.0, got) == 10 and len(calls) == 2
        assert resource.prlimit(victim.pid, resource.RLIMIT_CPU) == (10, 10)
        # a raise (refused without CAP_SYS_RESOURCE) is asked for once, not again and again
        assert limits.set_cpu_backstop(victim.pid, 5.0, 10.0, 600.0, 10) == 16 and len(calls) == 3
        assert limits.set_cpu_backstop(victim.pid, 4.5, 10.0, 600.0, 16) == 16 and len(calls) == 3
        # never past the lifetime budget the child started with
        assert limits.set_cpu_backstop(victim.pid, 5.0, 10.0, 12.0, 16) == 12 and len(calls) == 4
    finally:
        victim.kill()
        victim.wait()


def test_the_default_audit_path_follows_the_environment(monkeypatch, tmp_path) -> None:
    from pathlib import Path

    from sandbox.audit import AuditLog, default_audit_path

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "a"))
    assert default_audit_path() == tmp_path / "a" / "rlm" / "audit.jsonl"
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "b"))
    assert default_audit_path() == tmp_path / "b" / "rlm" / "audit.jsonl"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_audit_path() == tmp_path / "home" / ".local" / "state" / "rlm" / "audit.jsonl"
    monkeypatch.setenv("XDG_STATE_HOME", "relative/state")  # ignored, as the XDG spec says
    assert default_audit_path() == tmp_path / "home" / ".local" / "state" / "rlm" / "audit.jsonl"
    monkeypatch.delenv("XDG_STATE_HOME")
    log = AuditLog("~/logs/x.jsonl")  # "~" expanded, the missing directory made
    assert log.path == tmp_path / "home" / "logs" / "x.jsonl" and log.path.parent.is_dir()
    log.close()
    log = AuditLog(Path("~") / "y.jsonl")
    assert log.path == tmp_path / "home" / "y.jsonl"
    log.close()


def test_a_pooled_child_taken_by_a_sandbox_that_fails_to_start_is_stopped(tmp_path) -> None:
    import pytest

    from sandbox.errors import AuditError
    from tests.conftest import gone

    policy = load_policy("default")
    with SandboxPool(size=1) as pool:
        pool.warm(policy)
        assert pool.wait_ready(30)
        (pid,) = pool.ready_pids()
        with pytest.raises(AuditError):  # the log is a directory: set-up fails after the take
            Sandbox(policy, audit_log=tmp_path, pool=pool)
        assert gone(pid)  # woken by its init, then stopped: not leaked, not handed out again
        assert pid not in pool.ready_pids()


def test_cpu_slack_reads_the_runnable_count_and_keeps_it_for_a_while(tmp_path) -> None:
    """Spinning needs a free CPU: no more runnable tasks than CPUs this process may use,
    read from the loadavg file at most every *refresh* seconds; an unreadable or odd file
    leaves the last answer (True at first)."""
    from sandbox.spin import CpuSlack

    cpus = len(os.sched_getaffinity(0))
    if cpus < 2:
        pytest.skip("spinning needs two CPUs this process may use")
    loadavg = tmp_path / "loadavg"
    loadavg.write_text(f"0.50 0.40 0.30 {cpus + 3}/250 12345\n")
    slack = CpuSlack(refresh=0.0, path=str(loadavg), cgroup=str(tmp_path / "no-cgroup"))
    assert slack.free() is False  # every CPU taken, and more tasks waiting
    loadavg.write_text(f"0.50 0.40 0.30 {cpus}/250 12345\n")
    assert slack.free() is True
    kept = CpuSlack(refresh=3600.0, path=str(loadavg), cgroup=str(tmp_path / "no-cgroup"))
    assert kept.free() is True
    loadavg.write_text(f"9.00 9.00 9.00 {cpus + 8}/250 12345\n")
    assert kept.free() is True  # not read again within the hour
    loadavg.write_text("garbage")
    assert slack.free() is True  # the last answer stands
    assert CpuSlack(path=str(tmp_path / "missing")).free() is True
    assert CpuSlack().free() in (True, False)  # the real file parses


def _fake_cgroup(tmp_path, v2: bool, quota: str, throttled: int = 0):
    """A cgroup file system in *tmp_path* with this process two levels down, the lower one
    limited to *quota* (v2 ``cpu.max`` text, or v1 ``cfs_quota_us`` with a 100 ms period)."""
    fs = tmp_path / "cgfs"
    if v2:
        (fs / "a" / "b").mkdir(parents=True)
        (fs / "cgroup.controllers").write_text("cpu memory\n")
        (fs / "a" / "cpu.max").write_text("max 100000\n")
        (fs / "a" / "b" / "cpu.max").write_text(quota + "\n")
        stat = fs / "a" / "b" / "cpu.stat"
        cgroup = "0::/a/b\n"
    else:
        (fs / "cpu,cpuacct" / "a" / "b").mkdir(parents=True)
        (fs / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("-1\n")  # the hierarchy's root
        for level in ("a", "a/b"):
            (fs / "cpu,cpuacct" / level / "cpu.cfs_quota_us").write_text("-1\n")
            (fs / "cpu,cpuacct" / level / "cpu.cfs_period_us").write_text("100000\n")
            (fs / "cpu,cpuacct" / level / "cpu.stat").write_text("nr_periods 0\nnr_throttled 0\n")
        (fs / "cpu,cpuacct" / "a" / "b" / "cpu.cfs_quota_us").write_text(quota + "\n")
        stat = fs / "cpu,cpuacct" / "a" / "b" / "cpu.stat"
        cgroup = "12:memory:/x\n4:cpu,cpuacct:/a/b\n0::/\n"
    stat.write_text(f"nr_periods 10\nnr_throttled {throttled}\nthrottled_time 0\n")
    (tmp_path / "cgroup").write_text(cgroup)
    return str(tmp_path / "cgroup"), str(fs), stat


@pytest.mark.parametrize("v2", [True, False], ids=["cgroup2", "cgroup1"])
def test_cpu_slack_counts_the_cgroup_quota_and_its_throttling(tmp_path, v2) -> None:
    """In a container limited to less than two CPUs of a big machine nobody spins (a spinner
    and its peer need two); with more quota, a cgroup throttled since the last read stops
    spinning until a read finds no new throttling."""
    from sandbox.spin import CpuSlack

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("spinning needs two CPUs this process may use")
    loadavg = tmp_path / "loadavg"
    loadavg.write_text("0.1 0.1 0.1 1/100 1\n")  # the machine is idle
    one_cpu = "150000 100000" if v2 else "150000"  # 1.5 CPUs: one whole CPU
    cgroup, fs, _ = _fake_cgroup(tmp_path / "one", v2, one_cpu)
    assert CpuSlack(refresh=0.0, path=str(loadavg), cgroup=cgroup, cgroup_fs=fs).free() is False
    two_cpus = "200000 100000" if v2 else "200000"
    cgroup, fs, stat = _fake_cgroup(tmp_path / "two", v2, two_cpus, throttled=5)
    slack = CpuSlack(refresh=0.0, path=str(loadavg), cgroup=cgroup, cgroup_fs=fs)
    assert slack.free() is True
    stat.write_text("nr_periods 20\nnr_throttled 7\nthrottled_time 99\n")
    assert slack.free() is False  # throttled since the last read
    assert slack.free() is True  # and not since
    (stat.parent / ("cpu.max" if v2 else "cpu.cfs_quota_us")).write_text("max 100000\n" if v2 else "-1\n")
    loadavg.write_text("0.1 0.1 0.1 1/100 1\n")
    assert slack.free() is True  # the quota was lifted: the affinity counts alone
    # No cgroup file, or one naming nothing readable: the affinity alone.
    assert CpuSlack(refresh=0.0, path=str(loadavg), cgroup=str(tmp_path / "none")).free() is True


def test_cpu_slack_in_a_real_cpu_cgroup_with_a_quota(tmp_path) -> None:
    """The same with the kernel's own files: a process in a v1 ``cpu`` cgroup limited to half
    a CPU never spins; after the quota is lifted, it may."""
    root = "/sys/fs/cgroup/cpu"
    if not os.access(os.path.join(root, "cgroup.procs"), os.W_OK):
        pytest.skip("no writable cgroup v1 cpu hierarchy here")
    group = os.path.join(root, f"rlm-test-slack-{os.getpid()}")
    os.mkdir(group)
    loadavg = tmp_path / "loadavg"
    loadavg.write_text("0.1 0.1 0.1 1/100 1\n")
    probe = (
        "import sys; from sandbox.spin import CpuSlack\n"
        f"s = CpuSlack(refresh=0.0, path={str(loadavg)!r})\n"
        "for _ in range(2): sys.stdin.readline(); print(s.free(), flush=True)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", probe], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )

    def ask() -> str:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("\n")
        proc.stdin.flush()
        return proc.stdout.readline().strip()

    try:
        Path(group, "cpu.cfs_quota_us").write_text("50000")  # half of the 100 ms period
        Path(group, "cgroup.procs").write_text(str(proc.pid))
        assert ask() == "False"
        Path(group, "cpu.cfs_quota_us").write_text("-1")
        assert ask() == "True"
    finally:
        proc.kill()
        proc.wait(10)
        os.rmdir(group)


def test_the_child_is_told_to_spin_only_when_alone_and_a_cpu_is_free(
    audit_path, tmp_path, monkeypatch
) -> None:
    """The ``spin`` word of exec and reply frames: True for a lone call on a machine with a
    free CPU; False when every CPU is taken, or when another call is in flight."""
    from sandbox import protocol
    from sandbox.spin import CpuSlack

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("spinning needs two CPUs this process may use")
    sent: list[tuple[str, bool]] = []
    encode = protocol.encode

    def spy(msg):
        if msg.get("t") in ("exec", "reply"):
            sent.append((msg["t"], msg["spin"]))
        return encode(msg)

    encode_with_value = protocol.encode_with_value

    def spy_with_value(head, packed):
        spy(head)
        return encode_with_value(head, packed)

    monkeypatch.setattr(protocol, "encode", spy)
    monkeypatch.setattr(protocol, "encode_with_value", spy_with_value)
    loadavg = tmp_path / "loadavg"
    slack = CpuSlack(refresh=0.0, path=str(loadavg), cgroup=str(tmp_path / "no-cgroup"))
    monkeypatch.setattr(sandbox_module, "_SLACK", slack)
    cpus = len(os.sched_getaffinity(0))
    with Sandbox("default", host_functions={"f": lambda: 1}, audit_log=audit_path) as sb:
        loadavg.write_text("0.1 0.1 0.1 1/100 1\n")
        assert sb.execute("f()").ok
        assert sent == [("exec", True), ("reply", True)]
        sent.clear()
        loadavg.write_text(f"3.0 3.0 3.0 {cpus + 2}/100 1\n")  # every CPU taken
        assert sb.execute("f()").ok
        assert sent == [("exec", False), ("reply", False)]
        sent.clear()
        loadavg.write_text("0.1 0.1 0.1 1/100 1\n")
        sandbox_module._CALLERS.enter("another")  # as if another thread were inside a sandbox call
        try:
            assert sb.execute("f()").ok
        finally:
            sandbox_module._CALLERS.leave("another")
        assert sent == [("exec", False), ("reply", False)]
