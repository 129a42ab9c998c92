"""Fixtures of the attack suite: canaries, listeners, markers, and a runner.

Every attack runs twice: under ``default`` and under ``default`` with
``python.guard = "none"`` (plain exec: only the kernel layers stand between
the code and the host). "Contained" is asserted concretely by each test.
"""

from __future__ import annotations

import os
import socket
import stat
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sandbox import ExecResult, Policy, Sandbox, forkserver, load_policy
from sandbox.errors import ProtocolError

MODES = ("default", "guard_none")

#: The host's secret: in the test process's environment (the fork server's is empty by design).
ENV_CANARY = f"envcanary-{uuid.uuid4().hex}"
os.environ["RLM_TEST_SECRET_TOKEN"] = ENV_CANARY


def policy_for(mode: str, **changes: Any) -> Policy:
    base = load_policy("default")
    over: dict[str, Any] = {"audit.enabled": False}
    if mode == "guard_none":
        over["python.guard"] = "none"
    over.update(changes)
    return base.override(over)


class Listener:
    """TCP and UDP listeners on 127.0.0.1 of the host, recording anything that arrives."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.tcp.bind(("127.0.0.1", 0))
        self.tcp.listen(16)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.tcp_port = self.tcp.getsockname()[1]
        self.udp_port = self.udp.getsockname()[1]
        self.unix_name = f"rlm-canary-{uuid.uuid4().hex[:12]}"
        self.unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.unix.bind("\0" + self.unix_name)
        self.unix.listen(16)
        self._stop = False
        for target in (self._tcp_loop, self._udp_loop, self._unix_loop):
            threading.Thread(target=target, daemon=True).start()

    def _tcp_loop(self) -> None:
        while not self._stop:
            try:
                conn, addr = self.tcp.accept()
            except OSError:
                return
            self.events.append(f"tcp from {addr}")
            conn.close()

    def _udp_loop(self) -> None:
        while not self._stop:
            try:
                data, addr = self.udp.recvfrom(65536)
            except OSError:
                return
            self.events.append(f"udp {data[:40]!r} from {addr}")

    def _unix_loop(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.unix.accept()
            except OSError:
                return
            self.events.append("abstract unix connection")
            conn.close()

    def close(self) -> None:
        self._stop = True
        for s in (self.tcp, self.udp, self.unix):
            s.close()


@dataclass
class Env:
    """What an attack may target, and what must stay untouched."""

    root: Path
    canary: str
    canary_file: Path
    key_file: Path
    listener: Listener
    markers: list[Path] = field(default_factory=list)

    def marker(self) -> Path:
        p = self.root / f"marker-{uuid.uuid4().hex[:10]}"
        self.markers.append(p)
        return p

    def fill(self, code: str, **extra: Any) -> str:
        values = {
            "CANARY_FILE": str(self.canary_file),
            "KEY_FILE": str(self.key_file),
            "MARKER": str(self.marker()),
            "MARKER2": str(self.marker()),
            "TCP_PORT": self.listener.tcp_port,
            "UDP_PORT": self.listener.udp_port,
            "UNIX_NAME": self.listener.unix_name,
            "HOST_PID": os.getpid(),
            "SERVER_PID": forkserver.shared().pid,
            **extra,
        }
        for key, value in values.items():
            code = code.replace("{" + key + "}", str(value))
        return code


@pytest.fixture(scope="session")
def listener() -> Iterator[Listener]:
    lst = Listener()
    yield lst
    lst.close()


@pytest.fixture(scope="session")
def env(listener: Listener) -> Iterator[Env]:
    root = Path(tempfile.mkdtemp(prefix="rlm-security-"))
    canary = f"filecanary-{uuid.uuid4().hex}"
    canary_file = root / "secret.txt"
    canary_file.write_text(canary)
    canary_file.chmod(stat.S_IRUSR | stat.S_IWUSR)  # 0600, owned by the invoking user
    key_dir = root / "home" / ".config" / "openai"
    key_dir.mkdir(parents=True)
    key_file = key_dir / "api_key"
    key_file.write_text(f"sk-{canary}")
    key_file.chmod(0o600)
    yield Env(root, canary, canary_file, key_file, listener)
    import shutil

    shutil.rmtree(root, ignore_errors=True)


def in_forked_child(fn: Callable[[int], bool]) -> tuple[int, str]:
    """Run *fn* in a forked copy of this process, which must not return into pytest.

    *fn* gets the write end of a pipe and returns whether it went as the test
    expects (exit status 0, else 1); returns ``(exit status, what it wrote)``.
    """
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the forked child
        code = 1
        try:
            code = 0 if fn(write) else 1
        finally:
            os._exit(code)
    os.close(write)
    got = os.read(read, 1000).decode()
    os.close(read)
    _, status = os.waitpid(pid, 0)
    return os.WEXITSTATUS(status), got


def everything(r: ExecResult) -> str:
    return "\n".join(str(x) for x in (r.stdout, r.stderr, r.error_type, r.error_message, r.traceback))


def _answer(sb: Sandbox) -> ExecResult:
    try:
        return sb.execute("print(6 * 7)")
    except ProtocolError:  # the host refused to talk to a child that broke the protocol
        return sb.execute("print(6 * 7)")


def assert_contained(env: Env, r: ExecResult, sb: Sandbox | None = None) -> None:
    """The canaries never reach any output, no marker exists, the listeners heard nothing, the host answers."""
    text = everything(r)
    assert env.canary not in text, f"file canary leaked: {text[:500]}"
    assert ENV_CANARY not in text, f"environment canary leaked: {text[:500]}"
    for m in env.markers:
        assert not m.exists(), f"the sandbox wrote {m}"
    assert env.listener.events == [], f"the listener received {env.listener.events}"
    assert forkserver.shared().proc.poll() is None, "the fork server died"
    if sb is not None:
        again = _answer(sb)
        if not again.ok and (again.crashed or again.error_type == "ProtocolError"):
            # The child broke its own channel after its result was sent; the host
            # notices on the next call, reports it, and starts a fresh child.
            again = _answer(sb)
        assert again.ok and again.stdout.strip() == "42", f"the sandbox no longer answers: {again}"


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def sb(mode: str) -> Iterator[Sandbox]:
    with Sandbox(policy_for(mode)) as box:
        assert all(v == "active" for v in box.layers.values()), box.layers
        yield box
