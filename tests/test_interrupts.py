"""Exceptions a signal handler raises (Ctrl-C, an embedder's job timeout) at precise points
while a sandbox child is started: injected by monkeypatching one function to raise once, so
that each test is deterministic. The next calls must work and other sandboxes be unaffected.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import psutil
import pytest

from sandbox import Sandbox, forkserver, protocol
from tests.conftest import within


@pytest.fixture(autouse=True)
def fresh_fork_server() -> Iterator[None]:
    """Each test on a fork server of its own: one a failed test left out of step is not reused."""
    within(60, forkserver.shutdown)
    yield
    within(60, forkserver.shutdown)


class JobTimeout(Exception):
    """What an embedder's SIGALRM handler raises: a plain Exception subclass."""


def _pidfd_pid(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("Pid:"):
                return int(line.split()[1])
    raise AssertionError(f"fd {fd} is not a pidfd")


def _server_children(server: forkserver.ForkServer) -> set[int]:
    return {p.pid for p in psutil.Process(server.pid).children()}


def _later_sandboxes_get_their_own_child(
    audit_path: Any, server: forkserver.ForkServer, earlier: set[int]
) -> None:
    """Several new sandboxes start and run, each with the pidfd of its own child; the child of
    the interrupted start is killed and reaped."""
    for i in range(4):
        with Sandbox("default", audit_log=audit_path, pool=None) as sb:
            child = sb._child
            assert child is not None
            assert _pidfd_pid(child.pidfd) == child.pid, "a sandbox was handed another process's pidfd"
            r = sb.execute(f"print({i})")
            assert r.ok and r.stdout == f"{i}\n", r
    assert forkserver.shared(False) is server  # the same server went on serving
    assert server._fds == []  # no pidfd left behind for a later spawn to take
    deadline = time.monotonic() + 10
    while _server_children(server) - earlier:  # the interrupted start's child: killed and reaped
        assert time.monotonic() < deadline, "the child of the interrupted start was never reaped"
        time.sleep(0.01)


def _start_interrupted(
    audit_path: Any, monkeypatch: Any, owner: Any, name: str, patched: Any, exc: type[BaseException]
) -> None:
    """Start a sandbox with ``owner.name`` replaced by *patched* (which raises *exc* once, at the
    point under test): the start fails with *exc*; then later sandboxes each get their own child."""
    real = getattr(owner, name)
    server = forkserver.shared(False)
    earlier = _server_children(server)
    monkeypatch.setattr(owner, name, patched)
    with pytest.raises(exc):
        within(30, lambda: Sandbox("default", audit_log=audit_path, pool=None))
    monkeypatch.setattr(owner, name, real)
    _later_sandboxes_get_their_own_child(audit_path, server, earlier)


@pytest.mark.parametrize("sweep", [True, False], ids=["swept", "pid-checked"])
@pytest.mark.parametrize("exc", [KeyboardInterrupt, JobTimeout])
def test_interrupt_after_a_spawned_frame_was_read_does_not_hand_its_pidfd_to_the_next_child(
    audit_path, monkeypatch, exc: type[BaseException], sweep: bool
) -> None:
    """The ``spawned`` frame was read (its pidfd received) and the exception came before it was
    handled: the frame is gone. Pairing frames and pidfds by position, every later start then
    took the previous child's pidfd ("the sandbox child did not start: it exited"), for good.

    The orphaned pidfd is dropped before the next request; without that sweep, the check of
    each pidfd's process against the frame's pid alone must pair them right."""
    if not sweep:
        monkeypatch.setattr(forkserver.ForkServer, "_drop_orphans", lambda self: None)
    real_check = protocol.check
    interrupts = [exc("job timeout")]

    def check(msg: Any, sender: str) -> dict[str, Any]:
        if sender == "server" and isinstance(msg, dict) and msg.get("t") == "spawned" and interrupts:
            raise interrupts.pop()
        return real_check(msg, sender)

    _start_interrupted(audit_path, monkeypatch, protocol, "check", check, exc)
    assert not interrupts


def test_a_signal_exception_while_a_spawned_frame_is_decoded_propagates_as_itself(
    audit_path, monkeypatch
) -> None:
    """An embedder's exception (a subclass of Exception) raised while the fork server's
    ``spawned`` frame is decoded: it reaches the caller as itself, not as "the fork server broke
    the protocol: undecodable frame: JobTimeout", and the frame is not lost with its pidfd."""
    real_unpackb = msgpack.unpackb
    interrupts = [JobTimeout("job timeout")]

    def unpackb(data: Any, **kwargs: Any) -> Any:
        msg = real_unpackb(data, **kwargs)
        if isinstance(msg, dict) and msg.get("t") == "spawned" and interrupts:
            raise interrupts.pop()  # as a handler would, on the way out of the decoder
        return msg

    _start_interrupted(audit_path, monkeypatch, msgpack, "unpackb", unpackb, JobTimeout)
    assert not interrupts


def test_a_frame_whose_decoding_was_interrupted_is_yielded_by_the_next_iteration(monkeypatch) -> None:
    reader = protocol.FrameReader()
    reader.feed(protocol.encode({"t": "bye"}) + protocol.encode({"t": "get", "name": "x"}))
    real_unpackb = msgpack.unpackb
    interrupts = [KeyboardInterrupt()]

    def unpackb(data: Any, **kwargs: Any) -> Any:
        if interrupts:
            raise interrupts.pop()
        return real_unpackb(data, **kwargs)

    monkeypatch.setattr(msgpack, "unpackb", unpackb)
    with pytest.raises(KeyboardInterrupt):
        next(reader)
    assert list(reader) == [{"t": "bye"}, {"t": "get", "name": "x"}]
    assert reader.between_frames
    # Garbage is still a WireError, and consumed: the stream stays in step.
    reader.feed(protocol.HEADER.pack(1) + b"\xc1" + protocol.encode({"t": "bye"}))
    with pytest.raises(protocol.WireError, match="undecodable frame"):
        next(reader)
    assert list(reader) == [{"t": "bye"}]


def _wait_gone(pid: int, timeout: float = 10.0) -> None:
    """Until *pid* is gone: reaped, not left a zombie."""
    deadline = time.monotonic() + timeout
    while psutil.pid_exists(pid):
        assert time.monotonic() < deadline, f"process {pid} was never reaped"
        time.sleep(0.01)


def test_shutdown_returns_when_an_interrupted_poll_left_the_servers_waitpid_lock_held(audit_path) -> None:
    """Ctrl-C inside ``Popen.poll()`` (which ForkServer.alive called on every start) can leave
    the Popen's ``_waitpid_lock`` held. ``close()`` then waited on it forever: interpreter exit
    (the atexit ``shutdown()``) hung."""
    with Sandbox("default", audit_log=audit_path, pool=None) as sb:
        assert sb.execute("x = 1").ok
    server = forkserver.shared(False)
    lock = server.proc._waitpid_lock  # type: ignore[attr-defined]
    assert lock.acquire(blocking=False)  # held by nobody, as the interrupted poll() leaves it
    try:
        _, elapsed = within(30, forkserver.shutdown)
        assert elapsed < 15
        _wait_gone(server.pid)
    finally:
        lock.release()


def test_a_new_sandbox_starts_when_a_dead_servers_waitpid_lock_was_left_held(audit_path) -> None:
    """The same held lock, then the fork server dies (the OOM killer, kill -9): the next
    ``Sandbox()`` replaced it by way of an unbounded ``Popen.wait()`` while holding the
    registry's lock, and it and every other thread's ``Sandbox()`` hung for good."""
    server = forkserver.shared(False)
    lock = server.proc._waitpid_lock  # type: ignore[attr-defined]
    assert lock.acquire(blocking=False)
    try:
        os.kill(server.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while psutil.Process(server.pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the fork server did not die"
            time.sleep(0.01)

        def start() -> str:
            with Sandbox("default", audit_log=audit_path, pool=None) as sb:
                r = sb.execute("print(7)")
                assert r.ok, r
                return r.stdout

        for _ in range(2):
            stdout, _ = within(30, start)
            assert stdout == "7\n"
        assert forkserver.shared(False) is not server
        _wait_gone(server.pid)  # the dead server was reaped, not left a zombie
    finally:
        lock.release()
