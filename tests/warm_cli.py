"""``python -m rlm`` started warm: real processes forked from an interpreter that has imported rlm and litellm.

litellm's import alone costs 7-8 s of CPU on the 2-core test machine, and the tests that run the
CLI against the loopback model (``rlm run``, ``rlm batch``) each paid it: about a sixth of the
suite's CPU. Here one server process per pytest worker (started on first use) imports the CLI and
litellm once and forks a process per command. The process is real: its own pid, argv, environment,
working directory, session if asked, and stdio (a pipe, a file or a terminal, reopened as a fresh
interpreter opens them); signals reach it; it exits through the interpreter's normal shutdown
(exit handlers run) and its exit status is the one reported. What it skips is the import, and with it
what a cold start does: tests of start-up, of the import rules and of interpreter flags (``-X dev``)
start ``python`` cold as before.

Fail closed: a command whose environment would configure the interpreter differently from the
server's (``PYTHONPATH``, a locale, ``PYTHONIOENCODING``, ...) is refused with an error naming the
variable, rather than run in an interpreter that is not the one it asked for.

Wire (``AF_UNIX``, ``SOCK_SEQPACKET``): the client sends one JSON request (argv, env, cwd, new
session) with its three stdio descriptors; the server answers the pid as 4 bytes (or why it
refuses, as text), then, once that process has exited, its exit status (``subprocess``
convention: ``-N`` for signal N) as 4 bytes. :func:`command` gives a command line for code that
starts the process itself (the MCP SDK's stdio client): a small launcher that does the same.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
_ENTRY = str(ROOT / "rlm" / "__main__.py")  # sys.argv[0] of `python -m rlm`
_INT = struct.Struct("!i")
_MAX_REQUEST = 1 << 20

#: Environment variables read while the interpreter starts (or by our imports) whose value must be
#: the server's: a command that sets one otherwise is refused.
_FIXED_AT_START = ("PYTHONPATH", "PYTHONHOME", "PYTHONIOENCODING", "PYTHONUTF8", "PYTHONWARNINGS",
                   "PYTHONDEVMODE", "PYTHONSAFEPATH", "PYTHONNOUSERSITE", "PYTHONOPTIMIZE",
                   "PYTHONHASHSEED", "PYTHONUNBUFFERED", "PYTHONINSPECT", "PYTHONFAULTHANDLER",
                   "PYTHONTRACEMALLOC", "PYTHONPROFILEIMPORTTIME", "LANG", "LC_ALL", "LC_CTYPE",
                   "LITELLM_LOCAL_MODEL_COST_MAP", "LITELLM_TELEMETRY", "LITELLM_MODE")  # fmt: skip


#: What rlm.llm sets (unless set) before it imports litellm: the same with these absent or as here.
_SET_BY_RLM = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False"}


def _refusal(env: Mapping[str, str], own: Mapping[str, str]) -> str:
    """Why a command with *env* cannot run in an interpreter started with *own*; "" if it can."""
    for name in _FIXED_AT_START:
        if name == "PYTHONPATH" and env.get(name, "") in ("", str(ROOT)):
            continue  # the package is this checkout's either way (installed in place)
        if env.get(name, _SET_BY_RLM.get(name)) != own.get(name):
            return f"warm_cli: {name} differs from the warm interpreter's: start this one cold"
    return ""


def _server_env() -> dict[str, str]:
    """The server's environment: the test process's, without provider keys (litellm reads some at import)."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY") and not k.startswith("RLM_")}
    return {**_SET_BY_RLM, **env}


# ---------------------------------------------------------------- server (its own process)


def _serve(path: str) -> None:
    import rlm.cli  # noqa: F401  (what `python -m rlm` imports before main())
    from rlm import llm

    llm._lib()  # litellm, imported and set up as the first model call would
    if threading.active_count() != 1:  # a fork would copy a thread's locks held mid-way
        raise SystemExit(f"warm_cli: {threading.active_count()} threads after the imports; cannot fork")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(64)
    print("ready", flush=True)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    parent = os.pidfd_open(os.getppid())  # the test process: when it goes, so does the server
    sel.register(parent, selectors.EVENT_READ)
    children: dict[int, tuple[int, socket.socket]] = {}  # pidfd -> (pid, its client's connection)
    own_env = dict(os.environ)
    while True:
        for key, _ in sel.select():
            if key.fileobj is listener:
                conn, _ = listener.accept()
                try:
                    msg, fds, _, _ = socket.recv_fds(conn, _MAX_REQUEST, 3)
                    if len(fds) != 3:
                        raise ValueError(f"{len(fds)} descriptors, not 3")
                    request = json.loads(msg)
                    refusal = _refusal(request["env"], own_env)
                except (OSError, ValueError) as exc:
                    print(f"warm_cli: bad request: {exc}", file=sys.stderr, flush=True)
                    conn.close()
                    continue
                if refusal:
                    for fd in fds:
                        os.close(fd)
                    with contextlib.suppress(OSError):
                        conn.send(refusal.encode())
                    conn.close()
                    continue
                pid = os.fork()
                if pid == 0:  # the server's descriptors closed through their objects, once
                    sel.close()
                    for fd in (*children, parent):
                        os.close(fd)
                    for _, other in children.values():
                        other.close()
                    listener.close()
                    _become(request, fds, conn)  # never returns
                for fd in fds:
                    os.close(fd)
                pidfd = os.pidfd_open(pid)
                children[pidfd] = (pid, conn)
                sel.register(pidfd, selectors.EVENT_READ)
                with contextlib.suppress(OSError):
                    conn.send(_INT.pack(pid))
            elif key.fd == parent:
                for pid, _ in children.values():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                raise SystemExit(0)
            else:
                pidfd = key.fd
                pid, conn = children.pop(pidfd)
                sel.unregister(pidfd)
                os.close(pidfd)
                _, status = os.waitpid(pid, 0)
                with contextlib.suppress(OSError):
                    conn.send(_INT.pack(os.waitstatus_to_exitcode(status)))
                conn.close()


def _become(request: dict[str, Any], fds: list[int], conn: socket.socket) -> None:
    """In the forked process: take the command's stdio, session, cwd, environment and argv, run the
    CLI as ``python -m rlm`` would, and exit as the interpreter exits."""
    conn.close()
    if request["new_session"]:
        os.setsid()
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    for fd in set(fds) - {0, 1, 2}:
        os.close(fd)
    # Reopened as a fresh interpreter opens them: same encoding and errors (the same environment
    # configured the server's), stdout line-buffered only on a terminal, stderr always.
    for fd, name in enumerate(("stdin", "stdout", "stderr")):
        old = getattr(sys, name)
        raw = open(fd, "rb" if fd == 0 else "wb", closefd=False)  # noqa: SIM115
        new = io.TextIOWrapper(
            raw, encoding=old.encoding, errors=old.errors, newline="\n",
            line_buffering=fd == 2 or (fd == 1 and os.isatty(1)),
        )  # fmt: skip
        setattr(sys, name, new)
        setattr(sys, f"__{name}__", new)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for name, value in _SET_BY_RLM.items():  # as rlm.llm's import of litellm would have
        os.environ.setdefault(name, value)
    sys.dont_write_bytecode = bool(request["env"].get("PYTHONDONTWRITEBYTECODE"))
    sys.argv = [_ENTRY, *request["argv"]]
    from rlm.cli import entry

    entry()  # its SystemExit unwinds through _serve: the interpreter exits as `python -m rlm` does


# ---------------------------------------------------------------- client (in the test process)


class _Server:
    """The server of this process (one per pytest worker), started on first use, stopped at exit."""

    _lock = threading.Lock()
    _current: _Server | None = None

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="warm-cli-")
        self.path = os.path.join(self.dir, "s")
        self.env = _server_env()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.warm_cli", self.path], cwd=ROOT, env=self.env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # a hang detector would be pytest-timeout's
        if line != "ready\n":
            self.proc.kill()
            raise RuntimeError(f"the warm CLI server did not start (exit {self.proc.wait()})")
        self.pid = os.getpid()
        atexit.register(self.stop)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
            os.rmdir(self.dir)

    @classmethod
    def live(cls) -> _Server | None:
        """This process's server if it runs (one inherited through a fork is its parent's)."""
        server = cls._current
        if server is None or server.pid != os.getpid() or server.proc.poll() is not None:
            return None
        return server

    @classmethod
    def get(cls) -> _Server:
        with cls._lock:
            server = cls.live()
            if server is None:
                cls._current = server = cls()
            return server


def _ask(path: str, request: dict[str, Any], fds: Sequence[int]) -> tuple[socket.socket, int]:
    """Send *request* with the stdio *fds* to the server at *path*: the connection its exit
    status will come on, and the pid it answered; its refusal raised as a ValueError."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        conn.connect(path)
        socket.send_fds(conn, [json.dumps(request).encode()], list(fds))
        answer = conn.recv(_MAX_REQUEST)
    except BaseException:
        conn.close()
        raise
    if len(answer) != _INT.size:
        conn.close()
        raise ValueError(answer.decode() or "the warm CLI server went away")
    pid: int = _INT.unpack(answer)[0]
    return conn, pid


def command(argv: Sequence[str]) -> list[str]:
    """A command line that runs ``rlm ARGV`` warm, for code that starts the process itself (the
    MCP SDK's stdio client): a small launcher hands its stdio, environment and working directory
    to a warm process, passes on the signals it gets (not SIGKILL: the process then ends when its
    stdin closes, as ``rlm mcp`` does), and exits as that process exited."""
    return [sys.executable, "-m", "tests.warm_cli", "--exec", _Server.get().path, *argv]


def _launch(path: str, argv: list[str]) -> None:
    """The launcher of :func:`command` (its own process)."""
    request = {"argv": argv, "env": dict(os.environ), "cwd": os.getcwd(), "new_session": False}
    conn, pid = _ask(path, request, [0, 1, 2])
    devnull = os.open(os.devnull, os.O_RDWR)  # the process has the stdio now; this one keeps none
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)

    def pass_on(signum: int, _: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, pass_on)
    answer = conn.recv(_INT.size)
    code = _INT.unpack(answer)[0] if len(answer) == _INT.size else 1
    if code < 0:  # ended by a signal: so does this one
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code)


def helper_pids() -> set[int]:
    """The pid of this process's warm server, if it runs: a child the tests that count this
    process's children must leave out (the processes it forks for commands still count)."""
    server = _Server.live()
    return set() if server is None else {server.proc.pid}


def _fd_of(spec: int | IO[Any] | None, default: int, mode: str, pipes: list[int]) -> tuple[int, int | None]:
    """(the descriptor to send, our end of a pipe or None) for a Popen-style stdio argument."""
    if spec is None:
        return default, None
    if spec == subprocess.DEVNULL:
        fd = os.open(os.devnull, os.O_RDWR)
        pipes.append(fd)
        return fd, None
    if spec == subprocess.PIPE:
        r, w = os.pipe()
        theirs, ours = (r, w) if mode == "r" else (w, r)
        pipes.append(theirs)
        return theirs, ours
    if isinstance(spec, int):
        return spec, None
    return spec.fileno(), None


class Process:
    """A ``subprocess.Popen`` look-alike for ``rlm ARGS`` run warm (the parts the tests use)."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        stdin: int | IO[Any] | None = None,
        stdout: int | IO[Any] | None = None,
        stderr: int | IO[Any] | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        text: bool = False,
        start_new_session: bool = False,
    ) -> None:
        server = _Server.get()
        env = dict(os.environ if env is None else env)
        theirs: list[int] = []
        try:
            fd0, ours0 = _fd_of(stdin, 0, "r", theirs)
            fd1, ours1 = _fd_of(stdout, 1, "w", theirs)
            fd2, ours2 = (fd1, None) if stderr == subprocess.STDOUT else _fd_of(stderr, 2, "w", theirs)
            request = {"argv": list(argv), "env": env, "cwd": os.fspath(cwd or os.getcwd()),
                       "new_session": start_new_session}  # fmt: skip
            self._conn, self.pid = _ask(server.path, request, [fd0, fd1, fd2])
        finally:
            for fd in theirs:
                os.close(fd)
        self.args = ["rlm", *argv]
        self.returncode: int | None = None
        kw: dict[str, Any] = {"encoding": "utf-8", "errors": "strict"} if text else {}

        def wrap(fd: int | None, mode: str) -> IO[Any] | None:
            return None if fd is None else open(fd, mode if text else mode + "b", **kw)

        self.stdin, self.stdout, self.stderr = wrap(ours0, "w"), wrap(ours1, "r"), wrap(ours2, "r")

    def poll(self) -> int | None:
        if self.returncode is None:
            self._conn.setblocking(False)
            try:
                self._status(self._conn.recv(_INT.size))
            except BlockingIOError:
                self._conn.setblocking(True)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self._conn.settimeout(timeout)
            try:
                self._status(self._conn.recv(_INT.size))
            except TimeoutError:
                raise subprocess.TimeoutExpired(self.args, timeout or 0) from None
            finally:
                if self.returncode is None:
                    self._conn.settimeout(None)
        assert self.returncode is not None
        return self.returncode

    def _status(self, data: bytes) -> None:
        if len(data) != _INT.size:
            raise RuntimeError("the warm CLI server went away")
        self.returncode = _INT.unpack(data)[0]
        self._conn.close()

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def communicate(self, input: str | bytes | None = None, timeout: float | None = None) -> tuple[Any, Any]:
        """As Popen.communicate: feed stdin, read stdout and stderr to their ends (threads), wait."""
        deadline = None if timeout is None else time.monotonic() + timeout
        out: dict[str, Any] = {}

        def drain(name: str, stream: IO[Any]) -> None:
            out[name] = stream.read()
            stream.close()

        readers = [threading.Thread(target=drain, args=(n, s), daemon=True)
                   for n, s in (("stdout", self.stdout), ("stderr", self.stderr)) if s is not None]  # fmt: skip
        for reader in readers:
            reader.start()
        if self.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                if input:
                    self.stdin.write(input)
                self.stdin.close()
        for reader in readers:
            reader.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if reader.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return out.get("stdout"), out.get("stderr")

    def __enter__(self) -> Process:
        return self

    def __exit__(self, *exc: object) -> None:
        for stream in (self.stdin, self.stdout, self.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        if self.returncode is None:
            self.kill()
            self.wait()


def run(
    argv: Sequence[str],
    *,
    input: str | bytes | None = None,
    capture_output: bool = False,
    text: bool = False,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float | None = None,
) -> subprocess.CompletedProcess[Any]:
    """As ``subprocess.run([python, "-m", "rlm", *argv], ...)``, warm; a timeout kills the process."""
    pipe = subprocess.PIPE if capture_output else None
    proc = Process(argv, stdin=subprocess.PIPE if input is not None else None, stdout=pipe, stderr=pipe,
                   env=env, cwd=cwd, text=text)  # fmt: skip
    with proc:
        try:
            out, err = proc.communicate(input, timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


if __name__ == "__main__":
    if sys.argv[1] == "--exec":
        _launch(sys.argv[2], sys.argv[3:])
    else:
        _serve(sys.argv[1])
