"""The host side of a sandbox: :class:`Sandbox` and its asyncio twin :class:`AsyncSandbox`.

A ``Sandbox`` owns one child process at a time (forked by the shared fork
server, see :mod:`sandbox.forkserver`) and talks to it over a socket pair in
the frames of :mod:`sandbox.protocol`. Around each ``execute`` the host:

- sets a kernel CPU backstop (``prlimit``) and resets the child's peak-RSS counter;
- waits for frames with a deadline: the wall limit (host-function time is not
  counted) and the CPU limit, read from the child's CPU clock only when it could
  have been reached, so a fast execute costs no extra system calls;
- services ``call`` frames by running host functions, replying in order;
- kills the child's process group at a deadline, on a protocol violation, or
  when it hangs up, and classifies how it ended (limit, crash);
- measures CPU time and peak RSS from the kernel, and appends an audit line.

When a child has died, the next call starts a fresh one and the next
``ExecResult`` says ``state_lost=True``.

Children come ready from a :class:`~sandbox.pool.SandboxPool` when one holds a
child of the same policy (every layer applied, ``hello`` sent); the sandbox
then sends its own ``init`` (host-function names) before the first request.

Embedding: a ``Sandbox`` may be used from any thread (calls are serialized),
never re-entrantly from its own host functions (a clear ``SandboxError``); a
process forked from the host must open its own sandboxes (those inherited
from the parent refuse use there and close without touching the parent's).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import hashlib
import inspect
import os
import select
import shutil
import signal
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from sandbox import forkserver, limits, protocol
from sandbox.audit import AuditLog, default_audit_path
from sandbox.errors import (
    LayerUnavailableError,
    ProtocolError,
    SandboxClosedError,
    SandboxError,
    SandboxStartError,
    VariableError,
)
from sandbox.policy import Policy, load_policy
from sandbox.pool import DEFAULT, Default, SandboxPool, default_pool
from sandbox.result import ExecResult, LimitName
from sandbox.spin import Spinner

__all__ = ["AsyncSandbox", "HostFunction", "Sandbox"]

HostFunction = Callable[..., Any]

_START_TIMEOUT = 15.0
#: How long the host polls for the child's answer before it blocks (at most; see sandbox.spin).
SPIN_SECONDS = 0.0005
_SPIN_SLOT = threading.Lock()  # held by the one host thread that may spin now
_UID_BASE = 1_200_000
_UID_SPAN = 1 << 20
_uid_counter = 0
_uid_lock = threading.Lock()


def _next_identity() -> tuple[int, int] | None:
    """A uid/gid no other live sandbox of this host process uses (root only)."""
    global _uid_counter
    if os.geteuid() != 0:
        return None
    with _uid_lock:
        _uid_counter += 1
        n = (os.getpid() * 4099 + _uid_counter) % _UID_SPAN
    return _UID_BASE + n, _UID_BASE + n


def _resolve(policy: Policy | str | Path) -> Policy:
    return policy if isinstance(policy, Policy) else load_policy(policy)


#: Limits a child may report for its own exception (labelling only; nothing is enforced on its word).
_CHILD_LIMITS: dict[str, LimitName] = {k: k for k in ("memory", "output", "processes", "files", "disk")}


class _Child:
    """Host-side record of one live child."""

    def __init__(
        self,
        server: forkserver.ForkServer,
        pid: int,
        pidfd: int,
        sock: socket.socket,
        scratch: str,
        identity: tuple[int, int] | None,
        max_frame: int,
    ):
        self.server = server  # the fork server that forked it (and reports its exit)
        self.identity = identity  # its uid/gid, reserved while it lives
        self.pid = pid
        self.pidfd = pidfd
        self.sock = sock
        self.scratch = scratch
        self.layers: dict[str, str] = {}
        self.reader = protocol.FrameReader(max_frame)
        self.fds: list[int] = []
        self.poll = select.poll()
        self.poll.register(sock.fileno(), select.POLLIN)
        self.poll.register(pidfd, select.POLLIN)
        self.rss = limits.RSSMeter(pid)
        self.spinner = Spinner(SPIN_SECONDS)
        self.spinner.window = 0.0  # no spinning for the hello: forking takes milliseconds
        self.dead = False
        self.exit_info: forkserver.ExitInfo | None = None
        self.init_frame = b""  # sent ahead of the first request (Sandbox._send)

    def kill(self) -> None:
        if self.dead:
            return
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.killpg(self.pid, signal.SIGKILL)
        self.dead = True

    def drop_fds(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()

    def pidfd_ready(self) -> bool:
        """True once the child has exited (its pidfd is readable); one ``poll`` call."""
        return any(fd == self.pidfd for fd, _ in self.poll.poll(0))

    def usable(self) -> bool:
        """A ready child that has said nothing since ``hello``, still runs, on a live server."""
        return not self.dead and not self.poll.poll(0) and self.server.alive

    def discard(self) -> None:
        """Stop a child nobody uses (a pool's, or one that failed to start)."""
        _stop_child(self, graceful=False)

    def forget(self) -> None:
        """In a process forked from the host: close our copies of its descriptors, nothing else."""
        self.dead = True
        self.drop_fds()
        self.rss.close()
        self.sock.close()
        with contextlib.suppress(OSError):
            os.close(self.pidfd)


@dataclass(frozen=True)
class _Spec:
    """Everything a ready child depends on: the same for every sandbox of one policy."""

    policy: dict[str, Any]
    policy_sha256: str
    restricted: bool
    max_frame: int
    identity: bool


def _choose_identity(spec: _Spec) -> tuple[int, int] | None:
    """The uid/gid of the next child (one place, chosen at spawn time; held while it lives)."""
    return _next_identity() if spec.identity else None


def _spawn_ready(spec: _Spec) -> _Child:
    """Fork a child of *spec*'s policy and wait for its ``hello``: it then waits for ``init``."""
    identity = _choose_identity(spec)
    scratch = tempfile.mkdtemp(prefix="sandbox-")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if identity is not None:
            os.chown(scratch, identity[0], identity[1])
        config = {
            "policy": spec.policy,
            "policy_sha256": spec.policy_sha256,
            "scratch": scratch,
            "uid": identity[0] if identity else None,
            "gid": identity[1] if identity else None,
        }
        server, pid, pidfd = forkserver.spawn(spec.restricted, config, theirs.fileno())
    except BaseException as exc:
        ours.close()
        shutil.rmtree(scratch, ignore_errors=True)
        if isinstance(exc, OSError):
            raise SandboxStartError(f"cannot prepare a sandbox child: {exc}") from None
        raise
    finally:
        theirs.close()
    child = _Child(server, pid, pidfd, ours, scratch, identity, spec.max_frame)
    try:
        hello = Sandbox._next_frame(child, _START_TIMEOUT)
    except (_Timeout, _Died, protocol.WireError) as exc:
        child.discard()
        why = {_Timeout: "no hello in time", _Died: "it exited"}.get(type(exc), str(exc))
        raise SandboxStartError(f"the sandbox child did not start: {why}") from None
    if hello["t"] != "hello" or hello["version"] != protocol.PROTOCOL_VERSION:
        child.discard()
        raise SandboxStartError(
            f"the sandbox child did not start: got {hello['t']!r} version {hello.get('version')}"
            f" (host speaks protocol {protocol.PROTOCOL_VERSION})"
        )
    if "error" in hello:
        child.discard()
        raise LayerUnavailableError(hello.get("layer", "?"), hello["error"])
    child.layers = {str(k): str(v) for k, v in hello["layers"].items()}
    child.spinner.window = SPIN_SECONDS
    return child


def _stop_child(child: _Child, graceful: bool) -> None:
    if graceful and not child.dead:
        try:
            child.sock.sendall(protocol.encode({"t": "bye"}))
            child.poll.unregister(child.sock.fileno())
            if not child.poll.poll(500):
                child.kill()
        except OSError:
            child.kill()
    child.kill()
    if child.exit_info is None:  # collect the server's exit report (it would pile up otherwise)
        child.exit_info = child.server.wait_exit(child.pid, 10.0)
    child.drop_fds()
    child.rss.close()
    child.sock.close()
    os.close(child.pidfd)
    shutil.rmtree(child.scratch, ignore_errors=True)


class _Using:
    """``with sb._using() as child``: the sandbox's lock, re-entrancy refused, a live child."""

    __slots__ = ("sb",)

    def __init__(self, sb: Sandbox) -> None:
        self.sb = sb

    def __enter__(self) -> _Child:
        sb = self.sb
        if os.getpid() != sb._owner_pid:  # checked before the lock, which a thread may have held at fork
            raise SandboxClosedError(
                f"this sandbox belongs to process {sb._owner_pid}; a forked process must open its own"
            )
        me = threading.get_ident()
        if sb._holder == me:
            raise SandboxError(
                "re-entrant use is not allowed: a host function called execute, set_variable,"
                " get_variable or close on the sandbox that is running it"
            )
        sb._lock.acquire()
        sb._holder = me
        try:
            return sb._ensure_child()
        except BaseException:
            sb._holder = None
            sb._lock.release()
            raise

    def __exit__(self, *exc: object) -> None:
        self.sb._holder = None
        self.sb._lock.release()


class _Cancel:
    """Lets another thread stop one execute: kills the child it runs on (if it started)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.cancelled = False
        self.running: _Child | None = None
        self.finished = threading.Event()  # set when the execute has returned (or never ran)

    def cancel(self) -> bool:
        """Stop the execute; True if its cell was running (its child is now killed)."""
        with self.lock:
            self.cancelled = True
            if self.running is None:
                return False
            self.running.kill()
            return True


class _Died(Exception):
    """The child hung up or exited while we waited for it."""


class _Timeout(Exception):
    """A deadline passed while we waited for a frame."""


class Sandbox:
    """A persistent Python REPL in a locked-down child process.

    >>> with Sandbox("default", host_functions={"double": lambda x: 2 * x}) as sb:
    ...     sb.set_variable("context", "some text")
    ...     r = sb.execute("print(len(context)); y = double(21)")
    ...     sb.get_variable("y")
    42

    *pool* supplies ready children: by default the process's shared
    :func:`sandbox.pool.default_pool`; pass your own :class:`SandboxPool`, or
    ``None`` to fork every child on demand.
    """

    def __init__(
        self,
        policy: Policy | str | Path = "default",
        *,
        host_functions: Mapping[str, HostFunction] | None = None,
        audit_log: str | Path | None = None,
        pool: SandboxPool | Default | None = DEFAULT,
    ) -> None:
        self.policy = _resolve(policy)
        self.id = uuid.uuid4().hex[:16]
        self._host: dict[str, HostFunction] = {}
        for name, fn in (host_functions or {}).items():
            if not name.isidentifier() or name.startswith("_"):
                raise ValueError(f"host function name {name!r} must be an identifier not starting with '_'")
            if not callable(fn):
                raise TypeError(f"host function {name!r} is not callable")
            self._host[name] = fn
        self._policy_dump = self.policy.model_dump(mode="json")
        self._policy_sha = self.policy.sha256
        lim = self.policy.limits
        self._max_message = lim.max_message_mb * 1024 * 1024
        self._max_frame = min(self._max_message, protocol.DEFAULT_MAX_FRAME)
        self._audit: AuditLog | None = None
        if self.policy.audit.enabled:
            path = audit_log or self.policy.audit.path or default_audit_path()
            self._audit = AuditLog(path)
        self._lock = threading.Lock()
        self._holder: int | None = None  # the thread inside execute/set/get (re-entrancy check)
        self._using_cm = _Using(self)
        self._owner_pid = os.getpid()
        self._spec = self._spec_of(self.policy, self._policy_dump)
        self._make = functools.partial(_spawn_ready, self._spec)
        self._pool = default_pool() if isinstance(pool, Default) else pool
        self._child: _Child | None = None
        self._seq = 0
        self._exec_id = 0
        self._lost = False
        self._layers: dict[str, str] = {}
        self.closed = False
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------- public
    @property
    def audit_path(self) -> Path | None:
        """Where this sandbox's audit lines go (None when auditing is off)."""
        return self._audit.path if self._audit else None

    @property
    def layers(self) -> dict[str, str]:
        """Each protection layer of the current child -> 'active', 'off' or 'unavailable: <reason>'."""
        return dict(self._layers)

    @property
    def alive(self) -> bool:
        """True while the current child is running (False after a limit or crash killed it)."""
        child = self._child
        return child is not None and not child.dead

    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child else None

    def execute(self, code: str) -> ExecResult:
        """Run *code* in the persistent namespace and report what happened."""
        if not isinstance(code, str):
            raise TypeError(f"code must be str, not {type(code).__name__}")
        with self._using() as child:
            state_lost, self._lost = self._lost, False
            result = self._run(child, code, state_lost)
            self._audit_line(code, result)
            return result

    def _execute(self, code: str, cancel: _Cancel) -> ExecResult | None:
        """``execute`` that *cancel* can stop from another thread (None: cancelled before it ran)."""
        try:
            with self._using() as child:
                with cancel.lock:
                    if cancel.cancelled:
                        return None
                    cancel.running = child
                try:
                    state_lost, self._lost = self._lost, False
                    result = self._run(child, code, state_lost)
                finally:
                    with cancel.lock:
                        cancel.running = None
                self._audit_line(code, result)
                return result
        finally:
            cancel.finished.set()

    def _using(self) -> _Using:
        return self._using_cm

    def set_variable(self, name: str, value: Any) -> None:
        """Bind *name* to a copy of *value* (plain data: None, bool, int, float, str, bytes, list, dict)."""
        if not isinstance(name, str) or not name.isidentifier() or name.startswith("__"):
            raise VariableError(f"{name!r} is not a valid variable name")
        # Large strings and bytes skip msgpack's copy: their raw buffer goes straight into a memfd.
        direct = type(value) in (str, bytes) and len(value) > protocol.INLINE_LIMIT
        data = b""
        try:
            size = len(value) + 5 if direct else len(data := protocol.pack_value(value))
        except (protocol.WireError, TypeError, ValueError, OverflowError) as exc:
            raise VariableError(f"cannot set {name!r}: {exc}") from None
        if size > self._max_message:
            raise VariableError(
                f"cannot set {name!r}: {size} bytes is over the policy's max_message_mb ({self.policy.limits.max_message_mb} MiB)"
            )
        with self._using() as child:
            if size <= protocol.INLINE_LIMIT:
                self._send(child, protocol.encode_with_value({"t": "set", "name": name}, data))
            else:
                try:
                    fd, size = protocol.write_value_shm(value) if direct else (protocol.write_shm(data), size)
                except (protocol.WireError, UnicodeEncodeError) as exc:
                    raise VariableError(f"cannot set {name!r}: {exc}") from None
                if size > self._max_message:  # non-ASCII text is longer in bytes than in characters
                    os.close(fd)
                    raise VariableError(
                        f"cannot set {name!r}: {size} bytes is over the policy's max_message_mb"
                    )
                try:
                    self._send(child, protocol.encode({"t": "set", "name": name, "shm": size}), fd)
                finally:
                    os.close(fd)
            msg = self._expect(child, "ack", self.policy.limits.wall_seconds + 30)
            if not msg["ok"]:
                raise VariableError(f"cannot set {name!r}: {msg.get('error', 'refused by the child')}")

    def get_variable(self, name: str) -> Any:
        """A copy of the variable *name* (plain data only, else :class:`VariableError`)."""
        if not isinstance(name, str):
            raise VariableError("variable name must be a str")
        with self._using() as child:
            self._send(child, protocol.encode({"t": "get", "name": name}))
            msg = self._expect(child, "value", self.policy.limits.wall_seconds + 30)
            if not msg["ok"]:
                child.drop_fds()
                raise VariableError(msg.get("error", f"cannot get {name!r}"))
            if "shm" in msg:
                if not child.fds:
                    self._fail(child, "value announced out of band without a descriptor")
                try:
                    return protocol.read_shm(child.fds.pop(0), msg["shm"], self._max_message, mapped=False)
                except protocol.WireError as exc:
                    self._fail(child, str(exc))
                finally:
                    child.drop_fds()
            child.drop_fds()
            return msg.get("value")

    def close(self) -> None:
        """Stop the child and delete its scratch directory. Idempotent."""
        if self._holder == threading.get_ident():
            raise SandboxError("re-entrant use is not allowed: a host function closed its own sandbox")
        if os.getpid() != self._owner_pid:  # inherited through os.fork(): the parent's child, not ours
            self.closed = True
            if self._child is not None:
                self._child.forget()
                self._child = None
            return
        with self._lock:
            if self.closed:
                return
            self.closed = True
            if self._child is not None:
                self._stop_child(self._child, graceful=True)
                self._child = None
            if self._audit is not None:
                self._audit.close()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "closed", True):
            with contextlib.suppress(Exception):
                self.close()

    # --------------------------------------------------------------- children
    def _ensure_child(self) -> _Child:
        if self.closed:
            raise SandboxClosedError("this sandbox is closed")
        child = self._child
        if child is not None and not child.dead:
            if child.pidfd_ready():  # died between calls (a kill, its fork server's death)
                child.dead = True
            else:
                return child
        if child is not None:
            self._stop_child(child, graceful=False)
            self._child = None
            self._lost = True
        return self._start()

    def _start(self) -> _Child:
        child = self._pool.take(self._policy_sha, self._make) if self._pool is not None else None
        if child is None:
            child = _spawn_ready(self._spec)
        # What is this sandbox's own reaches the child with its first request (a pooled child was
        # forked before the sandbox existed); see _send.
        child.init_frame = protocol.encode({"t": "init", "host_functions": sorted(self._host)})
        self._layers = child.layers
        self._child = child
        return child

    def _stop_child(self, child: _Child, graceful: bool) -> None:
        _stop_child(child, graceful)

    @staticmethod
    def _spec_of(policy: Policy | str | Path, dump: dict[str, Any] | None = None) -> _Spec:
        policy = _resolve(policy)
        max_frame = min(policy.limits.max_message_mb * 1024 * 1024, protocol.DEFAULT_MAX_FRAME)
        return _Spec(
            dump if dump is not None else policy.model_dump(mode="json"),
            policy.sha256,
            policy.python.guard == "restricted",
            max_frame,
            policy.isolation.identity,
        )

    def _exit_info(self, child: _Child) -> forkserver.ExitInfo | None:
        """How *child* ended (it must be dead or killed); asked of the fork server once."""
        if child.exit_info is None:
            child.exit_info = child.server.wait_exit(child.pid, 10.0)
        return child.exit_info

    # ---------------------------------------------------------------- framing
    def _send(self, child: _Child, frame: bytes, fd: int | None = None) -> None:
        if child.init_frame:  # the sandbox's init rides with its first request: one wake-up, not two
            frame, child.init_frame = child.init_frame + frame, b""
        try:
            protocol.send_frame(child.sock, frame, fd)
        except OSError as exc:
            child.kill()
            raise ProtocolError(f"cannot write to the sandbox child: {exc.strerror or exc}") from None

    @staticmethod
    def _next_frame(child: _Child, timeout: float | None, accept_fd: bool = False) -> dict[str, Any]:
        """Next valid frame from the child; raises _Timeout, _Died or protocol.WireError.

        Descriptors are accepted only with *accept_fd* (an out-of-band ``value``
        is awaited), and then at most one.
        """
        while True:
            raw = next(child.reader, None)
            if raw is not None:
                return protocol.check(raw, "child")
            if child.dead:
                raise _Died()
            events = child.poll.poll(0)
            # Spin briefly before blocking (a blocked process on a VM takes 100+ us
            # to wake), adaptively and one host thread at a time: see sandbox.spin.
            if not events and (budget := child.spinner.budget()) and _SPIN_SLOT.acquire(blocking=False):
                try:
                    spin_until = time.perf_counter() + budget
                    while not events and time.perf_counter() < spin_until:
                        events = child.poll.poll(0)
                finally:
                    _SPIN_SLOT.release()
                child.spinner.outcome(bool(events))
            if not events:
                events = child.poll.poll(None if timeout is None else max(0, int(timeout * 1000)))
            if not events:
                raise _Timeout()
            if any(fd == child.sock.fileno() for fd, _ in events):
                try:
                    alive = protocol.recv_frames(child.sock, child.reader, child.fds)
                except OSError:
                    alive = False
                if not alive:
                    raise _Died()
                if len(child.fds) > (1 if accept_fd else 0):
                    raise protocol.WireError("child sent descriptors nobody asked for")
            else:  # pidfd readable: the child exited; drain what it wrote first
                child.poll.unregister(child.pidfd)
                child.dead = True

    def _expect(self, child: _Child, kind: str, timeout: float) -> dict[str, Any]:
        try:
            msg = self._next_frame(child, timeout, accept_fd=kind == "value")
        except _Timeout:
            self._fail(child, f"no {kind!r} from the child within {timeout:.0f} s")
        except _Died:
            child.kill()
            raise ProtocolError(f"the sandbox child exited while the host waited for {kind!r}") from None
        except protocol.WireError as exc:
            self._fail(child, str(exc))
        if msg["t"] != kind:
            self._fail(child, f"expected {kind!r}, got {msg['t']!r}")
        return msg

    def _fail(self, child: _Child, why: str) -> Any:
        child.kill()
        raise ProtocolError(f"sandbox child broke the protocol and was killed: {why}")

    # ---------------------------------------------------------------- execute
    def _run(self, child: _Child, code: str, state_lost: bool) -> ExecResult:
        lim = self.policy.limits
        pid = child.pid
        self._exec_id += 1
        exec_id = self._exec_id
        cpu_start = limits.cpu_seconds(pid) or 0.0
        limits.set_cpu_backstop(pid, cpu_start, lim.cpu_seconds)
        child.rss.reset()
        t0 = time.perf_counter()
        host_time = 0.0
        cpu_rate = 1 + lim.max_processes  # CPU seconds per wall second the code can burn at most
        next_cpu_check = t0 + lim.cpu_seconds / cpu_rate
        killed_for: LimitName | None = None
        done: dict[str, Any] | None = None
        protocol_error: str | None = None
        cpu_used = 0.0
        self._send(child, protocol.encode({"t": "exec", "id": exec_id, "code": code}))
        while True:
            now = time.perf_counter()
            wall_deadline = t0 + host_time + lim.wall_seconds
            timeout = min(wall_deadline, next_cpu_check) - now
            try:
                msg = self._next_frame(child, max(timeout, 0.0))
            except _Timeout:
                now = time.perf_counter()
                used = (limits.cpu_seconds(pid) or cpu_start) - cpu_start
                if used >= lim.cpu_seconds:
                    killed_for = "cpu"
                elif now >= wall_deadline:
                    killed_for = "wall"
                else:
                    next_cpu_check = now + max(0.005, (lim.cpu_seconds - used) / cpu_rate)
                    continue
                cpu_used = used
                child.kill()
                break
            except _Died:
                break
            except protocol.WireError as exc:
                protocol_error = str(exc)
                child.kill()
                break
            if msg["t"] == "done" and msg["id"] == exec_id:
                done = msg
                break
            if msg["t"] == "call":
                h0 = time.perf_counter()
                try:
                    self._serve_call(child, msg)
                except protocol.WireError as exc:
                    protocol_error = str(exc)
                    child.kill()
                    break
                host_time += time.perf_counter() - h0
                continue
            protocol_error = f"unexpected {msg['t']!r} frame during execute"
            child.kill()
            break
        child.drop_fds()
        duration = time.perf_counter() - t0
        return self._result(
            child, done, killed_for, protocol_error, duration, cpu_start, cpu_used, state_lost
        )

    def _serve_call(self, child: _Child, msg: dict[str, Any]) -> None:
        name = msg["fn"]
        fn = self._host.get(name)
        reply: dict[str, Any] = {"t": "reply", "id": msg["id"]}
        try:
            if fn is None:
                raise LookupError(f"no host function named {name!r}")
            value = fn(*msg["args"], **msg["kwargs"])
            data = protocol.pack_value(value)
        except Exception as exc:  # the host function's failure is the child's HostFunctionError
            reply.update(ok=False, error=f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
            self._send(child, protocol.encode(reply))
            return
        except BaseException:
            child.kill()
            raise
        if len(data) > self._max_message:
            reply.update(ok=False, error=f"{name}() returned {len(data)} bytes, over max_message_mb")
            self._send(child, protocol.encode(reply))
        elif len(data) <= protocol.INLINE_LIMIT:
            reply["ok"] = True
            self._send(child, protocol.encode_with_value(reply, data))
        else:
            fd = protocol.write_shm(data)
            try:
                self._send(child, protocol.encode({**reply, "ok": True, "shm": len(data)}), fd)
            finally:
                os.close(fd)

    def _result(
        self,
        child: _Child,
        done: dict[str, Any] | None,
        killed_for: LimitName | None,
        protocol_error: str | None,
        duration: float,
        cpu_start: float,
        cpu_used: float,
        state_lost: bool,
    ) -> ExecResult:
        lim = self.policy.limits
        common: dict[str, Any] = {
            "duration_s": duration,
            "state_lost": state_lost,
            "policy_name": self.policy.name,
            "policy_sha256": self._policy_sha,
            "layers": dict(child.layers),
        }
        if done is not None:
            cpu = limits.cpu_seconds(child.pid)
            rss = child.rss.peak()
            stdout, stderr = done["stdout"], done["stderr"]
            truncated = bool(done["truncated"])
            # The host enforces the output cap itself: the child's copy is a courtesy.
            if len(stdout) + len(stderr) > lim.max_output_bytes + 200:
                stdout, stderr, truncated = (
                    stdout[: lim.max_output_bytes],
                    stderr[: max(0, lim.max_output_bytes - len(stdout))],
                    True,
                )
            hint = done.get("limit_hint")
            limit: LimitName | None = _CHILD_LIMITS.get(hint) if isinstance(hint, str) else None
            if truncated:
                limit = limit or "output"
            # Every field was type-checked by protocol.check or computed here:
            # skip pydantic's second validation on the hot path.
            return ExecResult.model_construct(
                ok=bool(done["ok"]) and limit is None,
                stdout=stdout,
                stderr=stderr,
                error_type=done.get("error_type"),
                error_message=done.get("error_message"),
                traceback=done.get("traceback"),
                limit=limit,
                output_truncated=truncated,
                cpu_s=max(0.0, (cpu if cpu is not None else cpu_start) - cpu_start),
                max_rss_bytes=rss or 0,
                **common,
            )
        # The child is gone (or being killed): learn how it ended from the fork server.
        child.kill()
        info = self._exit_info(child)
        cpu_total = info.cpu if info else cpu_start + cpu_used
        maxrss = info.maxrss if info else 0
        sig = info.signal if info else None
        limit = killed_for
        crashed = False
        error_type: str | None
        if protocol_error is not None:
            error_type, message = (
                "ProtocolError",
                f"sandbox child broke the protocol and was killed: {protocol_error}",
            )
        elif killed_for == "cpu":
            error_type, message = (
                "CPULimitExceeded",
                f"CPU time limit of {lim.cpu_seconds:g} s exceeded; the child was killed",
            )
        elif killed_for == "wall":
            error_type, message = (
                "WallLimitExceeded",
                f"wall-time limit of {lim.wall_seconds:g} s exceeded; the child was killed",
            )
        elif sig in (signal.SIGXCPU,) or (sig == signal.SIGKILL and cpu_total - cpu_start >= lim.cpu_seconds):
            limit, error_type, message = (
                "cpu",
                "CPULimitExceeded",
                f"CPU time limit of {lim.cpu_seconds:g} s exceeded (kernel)",
            )
        elif sig == signal.SIGXFSZ:
            limit, error_type, message = "disk", "FileSizeLimitExceeded", "file size limit exceeded"
        elif sig is not None and (
            maxrss >= 0.8 * lim.memory_mb * 1024 * 1024 or (info is not None and info.events.get("oom_kill"))
        ):  # the memory cgroup's OOM killer also counts memory the RSS does not show (tmpfs, memfd)
            limit, error_type, message = (
                "memory",
                "MemoryLimitExceeded",
                f"memory limit of {lim.memory_mb} MiB reached; the child was killed by signal {signal.Signals(sig).name}",
            )
        elif sig is not None:
            crashed = True
            name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
            error_type, message = "ChildCrashed", f"the sandbox child died of signal {name}"
        else:
            crashed = True
            code = info.exit_code if info else None
            error_type, message = "ChildExited", f"the sandbox child exited (status {code})"
        return ExecResult(
            ok=False,
            error_type=error_type,
            error_message=message,
            limit=limit,
            crashed=crashed,
            cpu_s=max(0.0, cpu_total - cpu_start),
            max_rss_bytes=maxrss,
            **common,
        )

    def _audit_line(self, code: str, result: ExecResult) -> None:
        if self._audit is None:
            return
        self._seq += 1
        if result.ok:
            outcome = "ok"
        elif result.limit:
            outcome = f"limit:{result.limit}"
        elif result.crashed:
            outcome = "crashed"
        else:
            outcome = f"error:{result.error_type}"
        self._audit.append(
            {
                "time": datetime.now(UTC).isoformat(timespec="microseconds"),
                "sandbox_id": self.id,
                "seq": self._seq,
                "policy": self.policy.name,
                "schema_version": self.policy.schema_version,
                "policy_sha256": self._policy_sha,
                "code_sha256": hashlib.sha256(code.encode("utf-8", "surrogatepass")).hexdigest(),
                "code": code,
                "outcome": outcome,
                "duration_s": round(result.duration_s, 6),
                "cpu_s": round(result.cpu_s, 6),
                "max_rss_bytes": result.max_rss_bytes,
            }
        )


_IN_HOST_CALL: contextvars.ContextVar[AsyncSandbox | None] = contextvars.ContextVar(
    "sandbox_in_host_call", default=None
)


class AsyncSandbox:
    """The asyncio twin of :class:`Sandbox`: the same methods, as coroutines.

    Blocking work runs in a worker thread, so the event loop keeps serving.
    Host functions may be coroutine functions; they run on the event loop that
    called ``execute``. Concurrent first calls share one child. Cancelling an
    ``execute`` (``task.cancel()``, ``asyncio.timeout``) kills the child running
    the cell; the next result says ``state_lost=True``. The object may be used
    from successive event loops (``asyncio.run`` twice).
    """

    def __init__(
        self,
        policy: Policy | str | Path = "default",
        *,
        host_functions: Mapping[str, HostFunction] | None = None,
        audit_log: str | Path | None = None,
        pool: SandboxPool | Default | None = DEFAULT,
    ) -> None:
        self.policy = _resolve(policy)
        self._host = dict(host_functions or {})
        self._audit_log = audit_log
        self._pool = pool
        self._sync: Sandbox | None = None
        self._make_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None

    def _wrap(self, fn: HostFunction) -> HostFunction:
        if not inspect.iscoroutinefunction(fn):
            return fn

        async def marked(*args: Any, **kwargs: Any) -> Any:
            _IN_HOST_CALL.set(self)  # this task's context only: a re-entrant call can tell
            return await fn(*args, **kwargs)

        def run_on_loop(*args: Any, **kwargs: Any) -> Any:
            assert self._loop is not None
            return asyncio.run_coroutine_threadsafe(marked(*args, **kwargs), self._loop).result()

        return run_on_loop

    def _make(self) -> Sandbox:
        with self._make_lock:  # concurrent first calls wait here and share one sandbox
            if self._sync is None:
                host = {name: self._wrap(fn) for name, fn in self._host.items()}
                self._sync = Sandbox(
                    self.policy, host_functions=host, audit_log=self._audit_log, pool=self._pool
                )
            return self._sync

    async def _sandbox(self) -> Sandbox:
        if _IN_HOST_CALL.get() is self:
            raise SandboxError(
                "re-entrant use is not allowed: a host function called this AsyncSandbox while it runs the function"
            )
        self._loop = asyncio.get_running_loop()
        sb = self._sync
        if sb is None:
            sb = await asyncio.to_thread(self._make)
        return sb

    async def start(self) -> AsyncSandbox:
        await self._sandbox()
        return self

    @property
    def layers(self) -> dict[str, str]:
        return self._sync.layers if self._sync else {}

    @property
    def alive(self) -> bool:
        return self._sync is not None and self._sync.alive

    async def execute(self, code: str) -> ExecResult:
        sb = await self._sandbox()
        cancel = _Cancel()
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(None, sb._execute, code, cancel)
        except asyncio.CancelledError:
            if cancel.cancel():  # the cell ran and its child is killed: the worker returns at once
                with contextlib.suppress(BaseException):
                    await loop.run_in_executor(None, cancel.finished.wait, 60.0)
            raise
        assert result is not None
        return result

    async def set_variable(self, name: str, value: Any) -> None:
        sb = await self._sandbox()
        await asyncio.to_thread(sb.set_variable, name, value)

    async def get_variable(self, name: str) -> Any:
        sb = await self._sandbox()
        return await asyncio.to_thread(sb.get_variable, name)

    async def close(self) -> None:
        if self._sync is not None:
            await asyncio.to_thread(self._sync.close)

    async def __aenter__(self) -> AsyncSandbox:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
