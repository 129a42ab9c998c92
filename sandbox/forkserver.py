"""The warm fork server: starts sandbox children in about a millisecond.

Spawning ``python -I`` per sandbox costs 20-30 ms; forking a warm process
costs about 1 ms. So the host starts one fork server (``python -I`` with an
empty environment, stdin/stdout/stderr on /dev/null, its own session) the
first time a sandbox is opened, and asks it for children over a socket pair.
The host itself is never forked: its memory holds API keys.

The server preloads each policy's allowed modules before forking, so a child
that has dropped to an unprivileged uid (which cannot read a stdlib under a
0700 home) still has them. It reports each child's pid together with a pidfd
(``SCM_RIGHTS``), reaps children, and reports each one's exit status, peak
RSS and CPU time (from ``wait4``) back to the host.

It lives as long as the host *process*: it exits when its control socket
reaches end of file, which happens when the host closes it or dies (even of
SIGKILL), and it kills every child first, then removes the scratch directory of
each one the host had not released, once it can take the directory's lock the
host held (see :func:`_remove_orphaned_scratch`). (``PR_SET_PDEATHSIG`` would fire when
the host *thread* that started it ends, which killed the server of a host that
opened its first sandbox in a worker thread.) Children die with the server
(their own ``PR_SET_PDEATHSIG``; the server is single-threaded).

Pid reuse: the host addresses a child by pid (its process group, ``prlimit``,
its CPU clock, ``/proc/<pid>``). A pid is free for reuse only once its process
is reaped, so the server reaps a child only when both have happened: it exited
(its pidfd is readable) *and* the host sent ``release{pid}`` (the host's last
use of the pid). When a child exits the server kills its process group at
once (the zombie still holds the group's id, so this cannot hit a stranger):
a child that exits on its own leaves nothing behind in its group either.

:class:`ForkServer` is the host's client. One per host process is shared by
all sandboxes (:func:`shared`), replaced transparently when it is found dead;
:func:`spawn` retries once on a new server when the old one died under it.
After ``os.fork()`` of the host, the child process forgets the parent's servers,
also one another thread was starting (it closes its copies of their sockets,
which the parent keeps using: a copy left open would keep the server alive after
the parent died), and starts its own on first use. :func:`shutdown` stops them and waits for them.
Every failure here is a :class:`~sandbox.errors.SandboxStartError`.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import select
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Any

from sandbox import files, protocol

__all__ = ["ExitInfo", "ForkServer", "serve", "shared", "shutdown", "spawn"]

_CONTROL_FRAME_CAP = 1024 * 1024


class ExitInfo:
    """How a child ended, from the fork server's ``wait4``."""

    __slots__ = ("cpu", "events", "maxrss", "pid", "status")

    def __init__(
        self, pid: int, status: int, maxrss: int, cpu: float, events: dict[str, int] | None = None
    ) -> None:
        self.pid, self.status, self.maxrss, self.cpu = pid, status, maxrss, cpu
        #: cgroup counters of the child's sandbox: ``oom_kill``, ``pids_max`` (when it had a cgroup).
        self.events: dict[str, int] = events or {}

    @property
    def signal(self) -> int | None:
        return os.WTERMSIG(self.status) if os.WIFSIGNALED(self.status) else None

    @property
    def exit_code(self) -> int | None:
        return os.WEXITSTATUS(self.status) if os.WIFEXITED(self.status) else None


# ---------------------------------------------------------------- server side
class _Forked(BaseException):
    """Raised in a freshly forked child to unwind the server's loop, whose frames hold
    every other child's and policy's data, before the child's own code starts."""


def serve(ctl_fd: int) -> None:
    """Fork-server main loop (runs in the ``python -I`` helper process).

    Returns in the server when the host hangs up. A forked child leaves the
    loop by :class:`_Forked`, whose frames (the other children, their
    cgroups and scratch mounts, the prepared policies, unread host frames)
    are gone once it is caught here; then it runs :func:`sandbox.child.main`.
    """
    try:
        _serve(ctl_fd)
        return
    except _Forked as forked:
        config, chan_fd, prepared = forked.args
    from sandbox import child

    child.main(config, chan_fd, prepared)


def _serve(ctl_fd: int) -> None:
    from sandbox import isolation

    server_pid = os.getpid()
    host_pid = os.getppid()
    # A disposition of SIG_IGN survives exec: from a host that ignores SIGCHLD (a daemon letting
    # the kernel reap its children) the children would vanish before wait4, which then fails.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    # No PR_SET_PDEATHSIG: it follows the host *thread* that forked us. The
    # server ends on end of file of its control socket instead (below).
    isolation.server_setup()  # private mount + empty network namespace, cgroup bases
    ctl = socket.socket(fileno=ctl_fd)
    reader = protocol.FrameReader(_CONTROL_FRAME_CAP)
    fds: list[int] = []
    sel = selectors.DefaultSelector()
    sel.register(ctl, selectors.EVENT_READ, None)
    children: dict[int, int] = {}  # pid -> pidfd
    exited: set[int] = set()  # exited, not yet released by the host: not reaped, the pid stays ours
    released: set[int] = set()  # released by the host, not yet exited
    resources: dict[int, isolation.Resources] = {}  # pid -> its cgroup and scratch mount
    scratch: dict[int, str] = {}  # pid -> its scratch directory, until the host released the pid
    prepared: dict[str, Any] = {}

    def child_exited(pid: int) -> None:
        sel.unregister(children[pid])
        with contextlib.suppress(OSError):  # leftovers in its group; the zombie keeps the id ours
            os.killpg(pid, signal.SIGKILL)
        if pid in released:
            reap(pid)
        else:
            exited.add(pid)

    def release(pid: int) -> None:
        if pid in exited:
            reap(pid)
        elif pid in children:
            released.add(pid)

    def reap(pid: int) -> None:
        exited.discard(pid)
        released.discard(pid)
        os.close(children.pop(pid))
        _, status, usage = os.wait4(pid, 0)
        res = resources.pop(pid)
        scratch.pop(pid, None)  # released: the host removes the directory itself
        events = isolation.collect(res)  # kills leftovers in its cgroup, reads the limit counters
        cpu = usage.ru_utime + usage.ru_stime
        msg = {"t": "exited", "pid": pid, "status": status, "maxrss": usage.ru_maxrss * 1024, "cpu": cpu}
        if events:
            msg["limits"] = events
        protocol.send_message(ctl, msg)
        isolation.release(res)  # unmount its scratch, remove its cgroup (after the host was answered)

    def spawn(config: dict[str, Any], chan_fd: int, request: int) -> None:
        key = config["policy_sha256"]
        if key not in prepared:
            prepared[key] = isolation.prepare(config["policy"])
        config["server_pid"] = os.getpid()
        res = isolation.before_fork(prepared[key], config)
        try:
            pid = isolation.fork(config)
        except BaseException:
            isolation.after_fork()
            isolation.release(res)
            raise
        if pid == 0:  # the child: unwinds this loop (see serve) and never comes back
            try:
                sel.close()
                ctl.detach()
                mine = prepared[key]
                children.clear()
                resources.clear()
                scratch.clear()
                prepared.clear()
                fds.clear()
            except BaseException:
                os._exit(5)
            raise _Forked(config, chan_fd, mine)
        os.close(chan_fd)
        resources[pid] = res
        scratch[pid] = config["scratch"]
        pidfd = os.pidfd_open(pid)
        children[pid] = pidfd
        sel.register(pidfd, selectors.EVENT_READ, pid)
        spawned: dict[str, Any] = {"t": "spawned", "request": request, "pid": pid}
        if res.cpu_path is not None:
            spawned["cpu_path"] = res.cpu_path
        protocol.send_message(ctl, spawned, pidfd)
        isolation.after_fork()  # own PID namespace for later forks; the next child's cgroup

    try:
        while True:
            for key, _ in sel.select():
                if key.data is not None:
                    child_exited(key.data)
                    continue
                try:
                    if not protocol.recv_frames(ctl, reader, fds):
                        return  # the host closed its end or died: kill the children, exit
                except ConnectionError:
                    return
                for raw in reader:
                    msg = protocol.check(raw, "host")
                    if msg["t"] == "release":
                        release(msg["pid"])
                        continue
                    if msg["t"] != "spawn" or not fds:
                        raise protocol.WireError(f"fork server got {msg['t']!r} without a channel")
                    try:
                        spawn(msg["config"], fds.pop(0), msg["request"])
                    except Exception as exc:
                        error = f"{type(exc).__name__}: {exc}"
                        protocol.send_message(ctl, {"t": "failed", "request": msg["request"], "error": error})
    finally:
        if os.getpid() != server_pid:  # a forked child on its way out: not the server's clean-up
            if not isinstance(sys.exc_info()[1], _Forked):
                os._exit(5)
        else:
            for pid, pidfd in list(children.items()):
                try:
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                    os.killpg(pid, signal.SIGKILL)
                except OSError:
                    pass
            for pid in list(children):
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
            isolation.server_leave()
            for res in resources.values():
                isolation.collect(res)
                isolation.release(res)
            isolation.server_teardown()
            held = [path for path in scratch.values() if not _remove_orphaned_scratch(path)]
            if held and _host_exiting(host_pid):
                # End of file came as the host's descriptors were being closed: its locks go
                # with the rest of them, before the kernel hands this server to another parent.
                deadline = time.monotonic() + _HOST_EXIT_WAIT
                while os.getppid() == host_pid and time.monotonic() < deadline:
                    time.sleep(0.005)
                for path in held:
                    _remove_orphaned_scratch(path)


#: How long an exiting server waits for its dying host's last descriptors to close.
_HOST_EXIT_WAIT = 2.0
#: PF_EXITING, in the flags field of /proc/<pid>/stat: the process is on its way out.
_PF_EXITING = 0x4


def _host_exiting(host_pid: int) -> bool:
    """The host that started this server is gone (this server has another parent now) or on
    its way out (a host alive hung up on purpose: ``shutdown()``, its exit handlers)."""
    if os.getppid() != host_pid:
        return True
    try:
        with open(f"/proc/{host_pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return bool(int(fields[6]) & _PF_EXITING)
    except (OSError, IndexError, ValueError):
        return False  # unknown: a live host's directories are its own to remove


def _remove_orphaned_scratch(path: str) -> bool:
    """Server exit, its children dead and their scratch tmpfs unmounted: remove the scratch
    directory *path* of a child the host never released, unless a live host still holds its
    flock (see sandbox.sandbox's leftovers; the one that made it removes it on close).

    A host that ends without running its exit handlers drops its locks: SIGKILL (a worker
    manager's, past its graceful timeout), or the default action of SIGTERM, which uvicorn
    re-raises once its graceful shutdown is done (so every uvicorn worker ends that way). Its
    directories, its pool's ready children's too, were left for a later host's sweep, which
    takes only those over 10 minutes old. Best effort: never raises. False when another
    process holds the lock (a live host, or one whose descriptors are still being closed)."""
    try:
        fd = files.open_dir(path)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        files.remove_tree(path)
    except BlockingIOError:
        return False
    except OSError:
        pass
    finally:
        os.close(fd)
    return True


# ------------------------------------------------------------------ host side
# Run as `python -I -S`: no environment, no site (no .pth hooks), and a
# sys.path of exactly the stdlib plus the directories that hold sandbox,
# msgpack and RestrictedPython.
_BOOT = (
    "import sys; sys.path[1:1] = sys.argv[1:-1]; "
    "from sandbox.forkserver import serve; serve(int(sys.argv[-1]))"
)


def _search_path() -> list[str]:
    """Directories the fork server needs on sys.path, found without importing anything."""
    import importlib.util

    dirs = [str(Path(__file__).resolve().parent.parent)]
    for name in ("msgpack", "RestrictedPython"):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            parent = str(Path(next(iter(spec.submodule_search_locations))).resolve().parent)
            if parent not in dirs:
                dirs.append(parent)
    return dirs


def _pidfd_pid(fd: int) -> int | None:
    """The pid of the process the pidfd *fd* refers to (the ``Pid:`` line of its fdinfo), or
    None when it cannot be told (no /proc, not a pidfd, a process already reaped)."""
    try:
        with open(f"/proc/self/fdinfo/{fd}", "rb") as f:
            for line in f:
                if line.startswith(b"Pid:"):
                    pid = int(line.split()[1])
                    return pid if pid > 0 else None
    except (OSError, ValueError, IndexError):
        pass
    return None


def pidfd_exited(pidfd: int, timeout: float) -> bool:
    """True once the process *pidfd* refers to has exited (its pidfd readable), waiting up to
    *timeout* seconds. Raises OSError or ValueError for a descriptor that is not open."""
    waiter = select.poll()
    waiter.register(pidfd, select.POLLIN)
    return bool(waiter.poll(protocol.poll_ms(timeout)))


class _Holding:
    """``with server._lock, server._holding``: notes which thread holds the lock for a request
    (see :meth:`ForkServer.close`), and closes the descriptors a close() left to it."""

    __slots__ = ("server",)

    def __init__(self, server: ForkServer) -> None:
        self.server = server

    def __enter__(self) -> None:
        self.server._holder = threading.get_ident()

    def __exit__(self, *exc: object) -> None:
        server = self.server
        server._holder = None
        if server._left_open:
            server._left_open = False
            server._close_fds()


class ServerGone(Exception):
    """The fork server died or hung up under a request (the caller may retry on a new one, with
    a new channel: the server may have forked a child on the old one before it went).

    *sent*: the request reached the server, which may have forked a child before it went (a
    child that dies with its server, though not necessarily before the caller moves on); False
    when it was found closed or could not be written to."""

    def __init__(self, why: str, sent: bool = True) -> None:
        super().__init__(why)
        self.sent = sent


class ForkServer:
    """Host-side handle on one fork server process. Thread-safe."""

    def __init__(self) -> None:
        from sandbox.errors import SandboxStartError

        self.closed = False
        self.owner_pid = os.getpid()
        self._pidfd = -1
        self._fds: list[int] = []
        self._lock = threading.Lock()
        #: The thread that holds ``_lock`` for a request (spawn, wait_exit), while it does.
        self._holder: int | None = None
        #: close() left the descriptors to the holder of ``_lock`` (see close()).
        self._left_open = False
        self._holding = _Holding(self)
        self._reap_lock = threading.Lock()
        self._sock_lock = threading.Lock()  # held while the socket is shut down or closed (briefly)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # Known to the at-fork hook from here on: a process another thread forks while this
        # server starts must not keep a copy of its control socket, which would keep the server
        # (and every child it forks) alive after this process died.
        self.sock = ours
        self._starting: socket.socket | None = theirs
        _servers.add(self)
        try:
            if theirs.fileno() <= 2:
                # A host that closed its stdin, stdout or stderr (a daemon): the server's 0-2 are
                # made /dev/null, over the control socket had it kept one of those numbers.
                high = fcntl.fcntl(theirs.fileno(), fcntl.F_DUPFD_CLOEXEC, 3)
                theirs.close()
                theirs = self._starting = socket.socket(fileno=high)
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _BOOT, *_search_path(), str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                env={},
                cwd="/",
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError as exc:
            self.closed = True
            ours.close()
            raise SandboxStartError(f"cannot start the fork server: {exc}") from None
        finally:
            self._starting = None
            theirs.close()
        # Its liveness and its end are watched through a pidfd, not Popen.poll()/wait(): an
        # exception a signal handler raises inside those can leave Popen's waitpid lock held for
        # good, and every later wait() then blocks forever (interpreter exit, a dead server's
        # replacement).
        try:
            self._pidfd = os.pidfd_open(self.proc.pid)
        except OSError as exc:
            self.closed = True
            ours.close()  # the server exits at end of file
            self.proc.kill()
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.proc.pid, 0)
            self.proc.returncode = -signal.SIGKILL
            raise SandboxStartError(f"cannot start the fork server: {exc}") from None
        self._reader = protocol.FrameReader(_CONTROL_FRAME_CAP)
        self._exits: dict[int, ExitInfo] = {}
        # Each spawn request is numbered and its answer names it: the answer to a request given
        # up before it came (Ctrl-C while waiting) is not taken for a later one's; its child is
        # killed and released when it comes.
        self._requests = 0
        self._waiting = 0  # the request whose answer spawn() waits for (0: none)
        self._dropped: set[int] = set()  # children of given-up requests: exit reports not kept
        #: Children whose release wait_exit could not send (the lock was busy past its timeout).
        self._unreleased: list[int] = []

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        """True while the server runs and its socket is open (checked, not assumed)."""
        return not self.closed and self.owner_pid == os.getpid() and not self._exited()

    def _exited(self) -> bool:
        """The server process has ended (its pidfd is readable, or it was reaped). Never blocks."""
        fd = self._pidfd
        if fd < 0:
            return True
        try:
            return pidfd_exited(fd, 0)
        except (OSError, ValueError):  # closed meanwhile (close() in another thread)
            return True

    def _kill(self) -> None:
        fd = self._pidfd
        if fd >= 0:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)

    def _reap(self, timeout: float) -> bool:
        """Wait up to *timeout* seconds for the server to exit and reap it; True once reaped.

        Through its pidfd (``waitid(P_PIDFD)``, which no reused pid can confuse), never through
        ``Popen.wait``, whose lock a signal handler's exception may have left held.
        """
        deadline = time.monotonic() + timeout
        with self._reap_lock:  # held only for the bounded wait of another close()
            while self._pidfd >= 0:
                try:
                    info = os.waitid(os.P_PIDFD, self._pidfd, os.WEXITED | os.WNOHANG)
                except ChildProcessError:  # reaped by someone else (Popen, a SIGCHLD of SIG_IGN)
                    info = None
                    code: int | None = 0 if self.proc.returncode is None else self.proc.returncode
                else:
                    code = None
                    if info is not None and info.si_pid:
                        exited = info.si_code == os.CLD_EXITED
                        code = info.si_status if exited else -info.si_status
                if code is not None:
                    self.proc.returncode = code  # Popen will not wait for it again
                    fd, self._pidfd = self._pidfd, -1
                    os.close(fd)
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                with contextlib.suppress(OSError, ValueError):  # closed meanwhile: waitid says so
                    pidfd_exited(self._pidfd, min(left, 1.0))
            return True

    def _stopped(self) -> bool:
        """The server process is stopped (SIGSTOP, a debugger) or a zombie: it cannot answer."""
        try:
            with open(f"/proc/{self.proc.pid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            return self._exited()
        return state in (b"T", b"t", b"Z", b"X")

    def _gone(self, why: str, sent: bool = True) -> ServerGone:
        self.closed = True
        return ServerGone(why, sent)

    def _read_one(self, timeout: float | None) -> dict[str, Any] | None:
        """Next server frame, or None on timeout. Caller holds the lock."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            raw = next(self._reader, None)
            if raw is not None:
                msg = protocol.check(raw, "server")
                if msg["t"] in ("spawned", "failed") and msg["request"] != self._waiting:
                    if msg["t"] == "spawned":
                        index = self._pidfd_index(msg["pid"])
                        if index is None:
                            self._drop(msg["pid"], None)
                        else:
                            self._drop_held(index, msg["pid"])
                    continue
                if msg["t"] == "exited" and msg["pid"] in self._dropped:
                    self._dropped.discard(msg["pid"])
                    continue
                if msg["t"] == "exited":
                    self._exits[msg["pid"]] = ExitInfo(
                        msg["pid"], msg["status"], msg["maxrss"], msg["cpu"], msg.get("limits")
                    )
                return msg
            try:
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return None
                    self.sock.settimeout(left)
                else:
                    self.sock.settimeout(None)
                alive = protocol.recv_frames(self.sock, self._reader, self._fds)
            except protocol.DescriptorsDropped:  # a pidfd lost (no slot for it): its frame was read
                continue
            except TimeoutError:
                return None
            except OSError as exc:  # reset by a server that died, or our socket was closed
                raise self._gone(f"the fork server hung up: {exc.strerror or exc}") from None
            if not alive:
                raise self._gone("the fork server exited")

    def spawn(
        self,
        config: dict[str, Any],
        chan_fd: int,
        timeout: float | None = None,
        held: list[int] | None = None,
    ) -> tuple[int, int, str | None]:
        """Ask for a child on *chan_fd*; return ``(pid, pidfd, cpu_path)``: *cpu_path* names the
        file that counts the CPU time of the child's cgroup (None without one).

        *held*: the caller's list of descriptors a process forked meanwhile closes; the pidfd
        is put there before it leaves this server's (:meth:`forget` closes those).

        Raises :class:`ServerGone` when the server is dead, or did not answer within
        *timeout* seconds (default :data:`SPAWN_TIMEOUT`) because it is stopped (then it is
        killed), so that the caller may retry on a new one; ``SandboxStartError`` on every
        other failure (a server that runs but is slow is left to its other sandboxes).
        """
        from sandbox.errors import SandboxStartError

        timeout = SPAWN_TIMEOUT if timeout is None else timeout
        taken: tuple[int, int, str | None] | None = None
        try:
            with self._lock, self._holding:
                if self.closed:
                    raise ServerGone("the fork server is closed", sent=False)
                self._drop_orphans()
                self._send_releases()
                self._requests += 1
                self._waiting = request = self._requests
                try:
                    protocol.send_message(
                        self.sock, {"t": "spawn", "request": request, "config": config}, chan_fd
                    )
                except OSError as exc:
                    self._waiting = 0
                    raise self._gone(  # not whole: the server forks for a whole frame only
                        f"cannot write to the fork server: {exc.strerror or exc}", sent=False
                    ) from None
                try:
                    deadline = time.monotonic() + timeout
                    stopped_at: float | None = None  # when it was first seen stopped, unanswered
                    while True:
                        left = deadline - time.monotonic()
                        msg = self._read_one(min(left, STOP_CHECK)) if left > 0 else None
                        if msg is None:
                            # Looked at every STOP_CHECK seconds, not only at the deadline: a
                            # stopped server answers nobody, and the start waited out the whole
                            # timeout (30 s) before it was replaced. Seen stopped twice in a row
                            # (a tracer's brief stop is not one), it is useless to every later
                            # sandbox too: replaced.
                            now = time.monotonic()
                            if not self._stopped():
                                stopped_at = None
                            elif stopped_at is None:
                                stopped_at = now
                            elif now - stopped_at >= STOP_CHECK or now >= deadline:
                                self._kill()
                                waited = now - deadline + timeout
                                raise self._gone(
                                    f"the fork server was stopped and did not answer in {waited:.1f} s; it was killed"
                                )
                            if now < deadline:
                                continue
                            # Running but slow (a machine under heavy load): killing it would end every
                            # sandbox it serves, so only this start fails.
                            raise SandboxStartError(
                                f"the fork server did not answer a spawn request in {timeout:g} s"
                            )
                        if msg["t"] == "failed":
                            raise SandboxStartError(
                                f"the fork server could not start a child: {msg['error']}"
                            )
                        if msg["t"] == "spawned":
                            pid, cpu_path = msg["pid"], msg.get("cpu_path")
                            index = self._pidfd_index(pid)
                            if index is None:  # the kernel dropped it: this process has no free descriptor
                                self._drop(pid, None)
                                raise SandboxStartError(
                                    "cannot receive the new child's pidfd: this process is out of file"
                                    " descriptors (RLIMIT_NOFILE); the child was stopped"
                                )
                            taken = (pid, self._fds[index], cpu_path)
                            if held is not None:
                                held.append(taken[1])
                            del self._fds[index]  # ours now (no signal handler runs between these two)
                            break
                except protocol.WireError as exc:
                    raise SandboxStartError(f"the fork server broke the protocol: {exc}") from None
                finally:
                    self._waiting = 0
            assert taken is not None
            return taken
        except BaseException:
            # A pidfd received but not handed to the caller (an exception a signal handler raised
            # on the way out): its child is stopped and released, as for any given-up request.
            if taken is not None and taken[1] not in self._fds:
                if held is not None and taken[1] in held:
                    held.remove(taken[1])  # closed next: a fork must not close the number again
                with self._lock:
                    self._drop(taken[0], taken[1])
            raise

    def _pidfd_index(self, pid: int) -> int | None:
        """Where the pidfd of child *pid*, just announced by a ``spawned`` frame, is in
        ``_fds`` (None: it was dropped, the process being out of descriptors). Caller holds the lock.

        Each pidfd is checked to be *pid*'s: one whose frame was lost (an exception a signal
        handler raised after the frame was received and before it was handled) is not taken
        for a later child's; it and any other such orphan before the match are dropped (its
        child killed and released). Where no pidfd can be identified (no /proc), by position.
        """
        owners = [_pidfd_pid(fd) for fd in self._fds]
        if pid not in owners:
            if self._fds and all(owner is None for owner in owners):
                return 0  # cannot tell: the frames' order
            return None
        index = owners.index(pid)
        for _ in range(index):  # pidfds of frames before this one that were lost
            self._drop_held(0, owners.pop(0))
        return 0

    def _drop_orphans(self) -> None:
        """Drop every pidfd left in ``_fds`` once all the frames received were read: each one's
        ``spawned`` frame was lost (see :meth:`_pidfd_index`). Caller holds the lock."""
        if not self._reader.between_frames:  # a frame in part received: its pidfd may be among them
            return
        while self._fds:
            self._drop_held(0, _pidfd_pid(self._fds[0]))

    def _drop_held(self, index: int, pid: int | None) -> None:
        """Kill the child of the pidfd ``_fds[index]``, close that pidfd and, when *pid* is told
        (a lost frame's pidfd may not tell it), release the child (else the server keeps its
        zombie until it exits). Caller holds the lock.

        The pidfd leaves ``_fds`` only as it is closed: an exception a signal handler raises on
        the way (Ctrl-C) leaves it there, for :meth:`_drop_orphans` to drop with its child,
        where one taken out first was left open and its child unreleased for good."""
        pidfd = self._fds[index]
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        del self._fds[index]  # then closed (no signal handler runs between these two)
        os.close(pidfd)
        if pid is not None:
            self._drop(pid, None)

    def _drop(self, pid: int, pidfd: int | None) -> None:
        """Kill a child nobody waits for any more and let the server reap it. Caller holds the lock.

        Without its pidfd the child is only released: the kernel dropped the pidfd (no free
        descriptor), and the child exits when it finds its channel closed, which its starter
        does next; or :meth:`_drop_held` has killed it and closed the pidfd."""
        if pidfd is not None:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            os.close(pidfd)
        self._dropped.add(pid)
        with contextlib.suppress(OSError):
            protocol.send_message(self.sock, {"t": "release", "pid": pid}, None, 5.0)

    def wait_exit(self, pid: int, timeout: float, asked: list[bool] | None = None) -> ExitInfo | None:
        """Release child *pid* (the caller's last use of that pid: the server may now
        reap it, and the pid be reused) and return its exit report, waiting up to
        *timeout* seconds for it to exit.

        *asked*: True is appended to it just before the release is sent or queued. A caller
        this call was cut short in (an exception a signal handler raised) that finds it empty
        queues the release itself (:meth:`release_later`); one found there is never sent again
        (once the server reaped the child, its pid may be a new child's)."""
        asked = [] if asked is None else asked
        deadline = time.monotonic() + timeout
        if self._holder == threading.get_ident():
            # This thread's own request holds the lock: a signal handler or a __del__ (a sandbox
            # freed by the garbage collector) runs inside it. Waiting would never end.
            asked.append(True)
            self.release_later(pid)
            return None
        got: list[bool] = []  # [True] once the lock is ours (see sandbox._try_acquire)
        try:
            # Another thread may hold the lock for as long as the server takes to answer it (a
            # spawn on a stopped server: SPAWN_TIMEOUT): the report is given up at our deadline,
            # the release left for the lock's next holder to send.
            # Once the interpreter finalizes (a sandbox closed by its __del__ as modules are torn
            # down), daemon threads are frozen: one that held the lock (in the middle of a spawn)
            # never lets go, and the wait was the whole timeout (10 s of the exit).
            wait = 0.0 if sys.is_finalizing() else min(max(timeout, 0.0), threading.TIMEOUT_MAX)
            got.extend(map(self._lock.acquire, (True,), (wait,)))
            if not got[0]:
                asked.append(True)
                self.release_later(pid)
                return None
            self._holding.__enter__()
            self._send_releases()
            frame = protocol.encode({"t": "release", "pid": pid})  # made first: the mark is then
            asked.append(True)  # as near the write as Python allows (closed: the server reaps all)
            if not self.closed:
                try:
                    protocol.send_frame(self.sock, frame, None, timeout)
                except OSError:
                    return None
            while pid not in self._exits:
                left = deadline - time.monotonic()
                if left <= 0 or self.closed:
                    return None
                try:
                    self._read_one(left)
                except Exception:
                    return None
            return self._exits.pop(pid)
        finally:
            if got and got[0]:
                self._holding.__exit__(None, None, None)
                self._lock.release()

    def release_later(self, pid: int) -> None:
        """Queue the release of child *pid* for the lock's next holder (see :meth:`wait_exit`)."""
        self._unreleased.append(pid)

    def _send_releases(self) -> None:
        """Release the children whose :meth:`wait_exit` gave up waiting for the lock; their exit
        reports are not kept. Caller holds the lock."""
        while self._unreleased:
            # Out of the list first: a release sent twice (a Ctrl-C in between) could reach a
            # new child that reused the pid once the server reaped this one.
            self._drop(self._unreleased.pop(0), None)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the server (it kills its children first) and wait for it: *timeout* seconds,
        then it is killed and waited for as long again (never longer: a server that even
        SIGKILL does not end, in uninterruptible sleep, is left unreaped)."""
        if self.owner_pid != os.getpid():  # a forked copy: leave the parent's server alone
            self.forget()
            return
        self.closed = True
        # Hung up before the lock is taken: a thread holding it while it waits for the server's
        # answer (a spawn on a stopped server waits SPAWN_TIMEOUT) finds end of file at once and
        # lets go, where close() waited for it past its own timeout.
        with self._sock_lock, contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        # Any other thread that holds the lock finds end of file and lets go at once. This thread
        # may hold it itself: close() (sandbox.shutdown()) from a signal handler or a __del__ that
        # runs inside this thread's own request waited for it for ever. The descriptors are then
        # left to the request, which closes them on its way out; so they are when the lock is not
        # had in *timeout* (a signal came between the lock's taking and the noting of its holder).
        if self._holder != threading.get_ident() and self._lock.acquire(True, max(timeout, 0.0)):
            try:
                self._close_fds()
            finally:
                self._lock.release()
        else:
            self._left_open = True
        if not self._reap(timeout):
            self._kill()
            self._reap(timeout)

    def _close_fds(self) -> None:
        with self._sock_lock:  # never while close() hangs it up: its number could be reused
            self.sock.close()
        while self._fds:
            # Out of the list before it is closed: a process another thread forks in between
            # forgets this server (_after_fork_in_child) and would close the number again,
            # which there may be a descriptor opened since (by a third thread) that it needs.
            fd = self._fds.pop()
            with contextlib.suppress(OSError):
                os.close(fd)

    def forget(self) -> None:
        """In a forked copy of the host: close our copies of the descriptors, nothing else.

        ``close()`` without ``shutdown()`` only drops this process's reference;
        the parent's socket and server are untouched.
        """
        self.closed = True
        self._lock = threading.Lock()  # may have been held by another thread at fork time
        self._holder = None
        self._left_open = False
        self._reap_lock = threading.Lock()
        self._sock_lock = threading.Lock()
        self._close_fds()
        starting, self._starting = self._starting, None
        if starting is not None:  # forked while another thread started this server
            starting.close()
        if self._pidfd >= 0:  # our copy; the parent's stays open
            fd, self._pidfd = self._pidfd, -1
            os.close(fd)


#: Seconds a fork server has to answer a spawn request (it answers in milliseconds; the margin is
#: for a machine under heavy load). A server found stopped then is killed and replaced.
SPAWN_TIMEOUT = 30.0
#: Seconds between two looks at whether a fork server that has not answered a spawn request is
#: stopped: one seen stopped at two looks in a row is killed and replaced.
STOP_CHECK = 0.5

# One server per preload set: a server that has loaded RestrictedPython for a
# restricted policy must not fork children of the other policies, which may
# load only the stdlib and msgpack. The registry is process state (like the
# servers it names), not configuration.
_shared: dict[bool, ForkServer] = {}
#: Every server object of this process, also one another thread is starting or closing now:
#: a forked process forgets them all (see _after_fork_in_child).
_servers: weakref.WeakSet[ForkServer] = weakref.WeakSet()
_shared_lock = threading.Lock()
_on_shutdown: list[Any] = []  # callables run by shutdown() first (the child pools drain here)
#: Callables run at exit after :func:`shutdown` (the child records no close() reached are cleaned here).
_on_exit: list[Any] = []
#: The process is exiting: _at_exit has begun (ready-child pools hand out and refill nothing now).
_exiting = False


def shared(restricted: bool = False) -> ForkServer:
    """The host process's fork server for restricted or other policies, started on first use
    and again whenever the previous one is found dead."""
    with _shared_lock:
        server = _shared.get(restricted)
        if server is not None and server.alive:
            return server
        old = server
        server = _shared[restricted] = ForkServer()
        _shut_down_with_the_worker()
    if old is not None:  # reaped outside the lock: other threads' sandboxes need not wait for it
        with contextlib.suppress(Exception):
            old.close(timeout=1.0)
    return server


_worker_pid: int | None = None  # the multiprocessing worker that registered shutdown() at its end


def _shut_down_with_the_worker() -> None:
    """In a ``multiprocessing`` worker (a ``Pool``'s, a ``ProcessPoolExecutor``'s, a ``Process``),
    run :func:`shutdown` when the worker returns. One made by fork or forkserver ends with
    ``os._exit``, so ``atexit`` never runs there, and every worker that had used the default
    pool left its ready children's scratch directories and uid lock files behind for a later
    host's sweep. multiprocessing runs its own finalizers on that way out."""
    global _worker_pid
    mp = sys.modules.get("multiprocessing")
    if mp is None or _worker_pid == os.getpid() or mp.parent_process() is None:
        return
    from multiprocessing import util

    util.Finalize(None, _at_exit, exitpriority=0)
    _worker_pid = os.getpid()


def spawn(
    restricted: bool, config: dict[str, Any], chan_fd: int, held: list[int] | None = None
) -> tuple[ForkServer, int, int, str | None]:
    """A child from the shared server: ``(server, pid, pidfd, cpu_path)`` (see :meth:`ForkServer.spawn`).

    A server that died (killed, shut down, or its host thread's death in older versions) raises
    :class:`ServerGone`; the next call starts a new one. The caller retries with a new channel,
    never *chan_fd* again: the dead server may have forked a child on it, whose ``hello`` was
    then read as the second child's and the second's taken for a broken first answer.
    """
    server = shared(restricted)
    pid, pidfd, cpu_path = server.spawn(config, chan_fd, held=held)
    return server, pid, pidfd, cpu_path


def shutdown() -> None:
    """Stop the shared fork servers, if any run; the next sandbox starts a new one.

    Ready children waiting in pools are stopped first (their scratch removed). A server that
    is stopped (SIGSTOP) is killed before that: draining waits for the spawns in flight, which
    it would never answer (each waited out SPAWN_TIMEOUT before it was found so).
    """
    for server in _shared_servers(clear=False):
        if server.owner_pid == os.getpid() and server._stopped():
            server._kill()
    for hook in list(_on_shutdown):
        with contextlib.suppress(Exception):
            hook()
    for server in _shared_servers(clear=True):
        server.close()


#: Seconds shutdown() waits for the registry's lock: it may be held by this very thread (a signal
#: handler that runs while the thread starts a server), which would never let go.
_SHARED_LOCK_WAIT = 1.0


def _shared_servers(clear: bool) -> list[ForkServer]:
    """The shared servers (and, with *clear*, none from now on). Without the lock when it is not
    had in time: a dict is copied whole under the GIL, and a server left in it is found closed."""
    got = _shared_lock.acquire(True, _SHARED_LOCK_WAIT)
    try:
        servers = list(_shared.values())
        if clear and got:
            _shared.clear()
    finally:
        if got:
            _shared_lock.release()
    return servers


def held_here() -> bool:
    """This thread holds a server's lock for a request (spawn, wait_exit): code that runs inside
    it (a signal handler, a ``__del__``) must not wait for what needs that lock."""
    me = threading.get_ident()
    return any(server._holder == me for server in list(_servers))


def _after_fork_in_child() -> None:
    """``os.fork()`` of the host: the new process drops the parent's servers without touching them."""
    global _shared_lock, _exiting
    _shared_lock = threading.Lock()
    _exiting = False
    _shared.clear()
    for server in list(_servers):  # not only the shared ones: one may be starting in another thread
        server.forget()


def _at_exit() -> None:
    """The process ends (``atexit``, or a ``multiprocessing`` worker's return): :func:`shutdown`,
    then what no ``close()`` will do now. A sandbox its embedder did not close is closed by its
    ``__del__`` only if the interpreter frees it, and it does not free what a daemon thread's
    frame still holds (the sandbox it runs a cell in, every global of a module whose function
    it runs, ``__main__``'s): such a sandbox left its scratch directory and, as root, its uid
    lock file behind for a later host's sweep."""
    global _exiting
    _exiting = True
    for step in (shutdown, _close_every_server, *_on_exit):
        # Each step runs, whatever the one before raised: a Ctrl-C (a second one, while the
        # process exits anyway) or a signal handler's SystemExit cut the exit short, printed
        # "Exception ignored in atexit callback" with its traceback, and skipped the rest (the
        # clean-up of sandboxes no close() reached). Every step is bounded by its own timeouts.
        try:
            step()
        except BaseException:
            pass


def _close_every_server() -> None:
    """Close what an interrupted :func:`shutdown` left (closing twice does nothing)."""
    for server in list(_servers):
        if server.owner_pid == os.getpid():
            server.close(timeout=1.0)


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_at_exit)
