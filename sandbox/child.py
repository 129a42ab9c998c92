"""The REPL loop that runs inside a sandbox child.

The fork server forks, calls :func:`main`, and never gets control back: the
child locks itself down (:mod:`sandbox.isolation`), says ``hello`` and then
serves ``exec``/``set``/``get`` frames from the host until ``bye`` or EOF.
Variables persist in one namespace between ``exec`` calls. Host functions are
stubs that send a ``call`` frame and block until the host's ``reply``.

Output is captured here against ``max_output_bytes``: a write past it raises
``OutputLimitExceeded``, which stops the cell, and what was printed comes back
cut with a marker. The error message and traceback share that budget (the
host cuts again: this copy only keeps a runaway ``print`` loop or a huge
exception from filling memory and the channel). Text that UTF-8 cannot carry (lone surrogates) is sent escaped.

The child holds a small memory reserve (address space, not touched, so not
resident) that it frees when reporting a result runs out of memory, so code
that failed at its memory limit still gets its result home. Nothing in
this module enforces a limit the host relies on; CPU, wall time, memory,
processes, files and disk are the kernel's and the host's business.

Stdlib and msgpack only (RestrictedPython in restricted mode, via the guard).
"""

from __future__ import annotations

import ast
import errno
import gc
import io
import linecache
import mmap
import os
import re
import socket
import sys
import threading
import time
import traceback
from typing import Any, NoReturn

from sandbox import isolation, limits, protocol
from sandbox.guard import GuardError, Runtime, make_runtime
from sandbox.spin import Spinner

__all__ = ["HostFunctionError", "OutputLimitExceeded", "main"]

#: The descriptor of the channel to the host once the layers are applied.
CHANNEL_FD = 3

#: How long the child polls for the next frame before it blocks.
SPIN_SECONDS = 0.0005

#: Cells whose source is kept for tracebacks (older ones show file and line only).
SOURCE_CELLS_KEPT = 200
#: Where the compiler ends a line of source: after ``\n``, ``\r\n`` and a lone ``\r``, not at the
#: other characters ``str.splitlines()`` breaks at (U+2028, form feed, ...): split there, a
#: traceback would quote another line than the one that raised.
_SOURCE_LINE_END = re.compile(r"(?<=\n)|(?<=\r)(?!\n)")

TRUNCATION_MARKER = "\n[... output truncated at {limit} bytes by policy {policy!r}]\n"

#: Address space kept in reserve to report a result when memory runs out.
MEMORY_RESERVE = 8 * 1024 * 1024


class HostFunctionError(Exception):
    """A host function raised; its message is the host's error text."""


class OutputLimitExceeded(BaseException):
    """The code printed more than ``max_output_bytes``.

    A BaseException so that a bare ``except Exception`` in a print loop does
    not swallow it and keep the loop spinning.
    """


class _ChannelLost(BaseException):
    """The host went away or spoke out of turn; the child must exit."""


class _Stream(io.TextIOBase):
    """sys.stdout / sys.stderr during an execute: writes go to a _Capture."""

    def __init__(self, capture: _Capture, which: str) -> None:
        self._capture = capture
        self._which = which

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        self._capture.add(self._which, s)
        return len(s)


class _Capture:
    """stdout and stderr of one execute, sharing one byte budget."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.truncated = False
        self.parts: dict[str, list[str]] = {"stdout": [], "stderr": []}

    def add(self, which: str, s: str) -> None:
        if self.truncated:
            raise OutputLimitExceeded(f"output is over the limit of {self.limit} bytes")
        size = len(s) if s.isascii() else len(s.encode("utf-8", "surrogatepass"))
        room = self.limit - self.used
        if size <= room:
            self.parts[which].append(s)
            self.used += size
            return
        self.parts[which].append(s.encode("utf-8", "surrogatepass")[:room].decode("utf-8", "ignore"))
        self.used = self.limit
        self.truncated = True
        raise OutputLimitExceeded(f"output is over the limit of {self.limit} bytes")

    def text(self, which: str) -> str:
        parts = self.parts[which]
        if not parts:
            return ""
        return protocol.clean_text("".join(parts))


def _limit_hint(exc: BaseException) -> str | None:
    """Which limit an exception inside the code most likely came from (labelling only)."""
    if isinstance(exc, MemoryError):
        return "memory"
    if isinstance(exc, OutputLimitExceeded):
        return "output"
    if isinstance(exc, OSError):
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            return "files"
        if exc.errno in (errno.EFBIG, errno.ENOSPC, errno.EDQUOT):
            return "disk"
        if exc.errno == errno.EAGAIN and isinstance(exc, BlockingIOError):
            return "processes"
    if isinstance(exc, RuntimeError) and "can't start new thread" in str(exc):
        return "processes"
    return None


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except BaseException:
        return "<exception message could not be rendered>"


def _refusal(text: str) -> str:
    """The ``error`` of an ``ack`` or ``value`` refusal: valid text, cut so that its frame fits."""
    return protocol.clean_text(text)[: protocol.MAX_REFUSAL]


_CELL_FILE = re.compile(r"<cell-[0-9]+>")


def _source_lines(code: str) -> list[str]:
    """*code*'s lines as the compiler numbers them, each with its line end."""
    lines = _SOURCE_LINE_END.split(code)
    if lines and not lines[-1]:
        lines.pop()
    return lines


def _exit_status(error: BaseException | None) -> int:
    """A forked process's exit status for how its part of the cell ended: 0, a ``SystemExit``'s
    number, else 1."""
    if error is None:
        return 0
    if isinstance(error, SystemExit):
        code = error.code
        return code & 0xFF if isinstance(code, int) else (0 if code is None else 1)
    return 1


def _code_only_traceback(exc: BaseException) -> str:
    """``traceback.format_exception`` keeping only frames of executed cells."""
    # lookup_lines=False: source lines are read at format time, for the frames kept only
    top = traceback.TracebackException(type(exc), exc, exc.__traceback__, lookup_lines=False, compact=True)
    renames: dict[str, str] = {}
    todo, seen = [top], set()
    while todo:
        te = todo.pop()
        if id(te) in seen:
            continue
        seen.add(id(te))
        te.stack = traceback.StackSummary.from_list([f for f in te.stack if _CELL_FILE.fullmatch(f.filename)])
        kind = te.exc_type
        if kind is not None and kind.__module__.split(".")[0] == "sandbox":
            renames[f"{kind.__module__}.{kind.__qualname__}"] = kind.__qualname__
        todo.extend(x for x in (te.__cause__, te.__context__) if x is not None)
        todo.extend(te.exceptions or ())
    text = "".join(top.format())
    for long, short in renames.items():
        text = text.replace(long, short)
    return text


class _HostPaths:
    """Host paths that must not reach the model, and what stands in for them.

    The scratch directory is the code's working directory, so a path under it
    becomes relative; paths under the Python installation, its site
    directories or the sandbox package become ``<python>``.
    """

    def __init__(self, scratch: str) -> None:
        self._scratch = scratch
        self._stand_in: dict[str, str] = {}
        self._pattern: re.Pattern[str] | None = None
        self._built = False

    def _build(self) -> None:
        """Resolve the directories on first use (about 1 ms of realpath calls; most errors never need it)."""
        self._built = True
        scratch = self._scratch
        scratch_dirs = {d for d in (scratch, os.path.realpath(scratch) if scratch else "") if len(d) > 1}
        library = {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
        library |= {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
        library |= {p for p in sys.path if os.path.isabs(p)}
        library = {os.path.realpath(p) for p in library} | library
        library -= scratch_dirs
        # Never the root or a one-level directory such as /usr or /tmp.
        self._stand_in = {d: "<python>" for d in library if os.path.isabs(d) and d.count(os.sep) >= 2}
        self._stand_in.update({d: "." for d in scratch_dirs if os.path.isabs(d) and d.count(os.sep) >= 2})
        # Longest first, so the most specific directory names a path.
        dirs = sorted(self._stand_in, key=len, reverse=True)
        if dirs:
            self._pattern = re.compile("(" + "|".join(map(re.escape, dirs)) + r")(?![\w.-])(/[^\s'\"():,]*)?")

    def scrub(self, text: str) -> str:
        """*text* with every host path replaced."""
        if "/" not in text:
            return text
        if not self._built:
            self._build()
        if self._pattern is None:
            return text
        return self._pattern.sub(self._replace, text)

    def _replace(self, match: re.Match[str]) -> str:
        stand_in = self._stand_in[match.group(1)]
        if stand_in == ".":  # under the working directory: relative
            return (match.group(2) or "/.")[1:] or "."
        return stand_in


class Child:
    """One child's state: its channel, its namespace, its guard."""

    def __init__(self, sock: socket.socket, config: dict[str, Any], runtime: Runtime) -> None:
        policy = config["policy"]
        self.sock = sock
        #: This process: a process the code forks (policies with ``max_processes``) shares the
        #: channel, and must neither report a cell nor call the host on it (see :meth:`execute`).
        self.pid = os.getpid()
        self.policy_name: str = policy["name"]
        self.max_output = int(policy["limits"]["max_output_bytes"])
        self.max_message = int(policy["limits"]["max_message_mb"]) * 1024 * 1024
        self.reader = protocol.FrameReader(protocol.frame_cap(self.max_message))
        self.inline = protocol.inline_limit(self.reader.max_frame)
        self.fds: list[int] = []
        self.runtime = runtime
        self.call_id = 0
        #: One host-function call at a time (threads, when the policy allows them): a reply is
        #: for the thread that sent its call, and a memfd it brings is read before the host,
        #: at the next call, empties it.
        self.call_lock = threading.Lock()
        self.spinner = Spinner(SPIN_SECONDS)
        #: The host's word in its last exec or reply: a CPU is free for spinning (see sandbox.spin).
        self.may_spin = True
        self.exec_count = 0
        self.reserve: mmap.mmap | None = None
        self.keep_reserve()
        self.builtins = dict(runtime.builtins)
        self.builtins["HostFunctionError"] = HostFunctionError
        self.ns: dict[str, Any] = {"__name__": "__main__", "__builtins__": self.builtins}
        self.ns.update(runtime.extra_globals)
        self.host_paths = _HostPaths(str(config.get("scratch", "")))
        # sys.stdout and sys.stderr during an execute, pointed at that execute's _Capture.
        self.stdout = _Stream(_Capture(0), "stdout")
        self.stderr = _Stream(_Capture(0), "stderr")

    # -- memory reserve ----------------------------------------------------
    def keep_reserve(self) -> None:
        """Hold MEMORY_RESERVE bytes of address space (mapped, never touched), if there is room."""
        if self.reserve is None:
            try:
                self.reserve = mmap.mmap(-1, MEMORY_RESERVE)
            except (OSError, MemoryError, ValueError):
                self.reserve = None

    def free_reserve(self) -> bool:
        """Give the reserve back; False if there was none."""
        if self.reserve is None:
            return False
        self.reserve.close()
        self.reserve = None
        return True

    def warm_up(self) -> None:
        """One throwaway cell before ``hello``: the copy-on-write faults and first-call costs of
        the execute path are paid while the child waits (in a pool), not by its first request.
        The same for the way in and out: a request frame decoded and checked, its answer encoded."""
        saved = dict(self.ns)
        reader = protocol.FrameReader(self.reader.max_frame)
        reader.feed(protocol.encode({"t": "exec", "id": 0, "code": "pass"}))
        protocol.check(next(reader), "host")
        protocol.encode(self.execute(0, "_w = [str(i) for i in range(10)]"))
        self.ns.clear()
        self.ns.update(saved)
        linecache.cache.pop("<cell-1>", None)
        self.exec_count = 0

    def init(self) -> bool:
        """Wait for the host's ``init`` (it may come long after ``hello``: pooled children wait
        for their sandbox) and install the host-function stubs. False: the host said ``bye``.

        No spinning for it: the host marks this child's CPU clock when it reads ``hello``, and
        CPU spent after that counts towards the first execute."""
        self.spinner.window = 0.0
        msg = self.recv()
        if msg["t"] == "bye":
            return False
        if msg["t"] != "init":
            raise _ChannelLost(f"expected init, got {msg['t']!r}")
        for name in msg["host_functions"]:
            if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
                raise _ChannelLost(f"bad host function name {name!r}")
            self.builtins[name] = self._stub(name)
        # The sandbox that sent init usually sends its first request right away: spin for it
        # (the wait for init itself, long in a pool, has halved the window).
        self.spinner.window = self.spinner.full
        return True

    # -- channel ---------------------------------------------------------
    def recv(self) -> dict[str, Any]:
        # Spin briefly before blocking (on a VM a blocked process takes 100+ us
        # to wake), adaptively: see sandbox.spin.
        budget = self.spinner.budget() if self.may_spin else 0.0
        self.spinner.wait_started()
        spun = budget > 0
        if spun:
            self.spinner.spin_started()
        spin_until = time.perf_counter() + budget
        while True:
            try:
                msg = next(self.reader, None)
            except protocol.WireError as exc:
                raise _ChannelLost(str(exc)) from None
            if msg is not None:
                try:
                    msg = protocol.check(msg, "host")
                except protocol.WireError as exc:
                    raise _ChannelLost(str(exc)) from None
                self.may_spin = msg.get("spin", self.may_spin)
                return msg
            try:
                if spun and time.perf_counter() < spin_until:
                    try:
                        alive = protocol.recv_frames(self.sock, self.reader, self.fds, wait=False)
                    except BlockingIOError:
                        continue
                    self.spinner.spin_ended(True)
                    spun = False
                else:
                    if spun:
                        self.spinner.spin_ended(False)
                        spun = False
                    alive = protocol.recv_frames(self.sock, self.reader, self.fds)
                    self.spinner.woke()  # would a spin have caught it?
            except OSError as exc:
                raise _ChannelLost(str(exc)) from None
            if not alive:
                raise _ChannelLost("host closed the channel")

    def send(self, msg: dict[str, Any], fd: int | None = None) -> None:
        try:
            protocol.send_message(self.sock, msg, fd)
        except OSError as exc:
            raise _ChannelLost(str(exc)) from None

    def take_value(self, msg: dict[str, Any]) -> Any:
        if "shm" in msg or "stream" in msg:
            if not self.fds:
                raise _ChannelLost("out-of-band value announced without a descriptor")
            fd = self.fds.pop(0)
            if "stream" in msg:  # read straight into the new str or bytes
                return protocol.read_stream(fd, msg["stream"], msg.get("kind"), self.max_message)
            return protocol.read_shm(fd, msg["shm"], self.max_message, mapped=True)
        return msg.get("value")

    def send_value(self, kind: str, value: Any, **extra: Any) -> None:
        """Send ``value`` in a frame of type *kind*, out of band if it is large.

        Values the host would refuse to decode (over ``MAX_ITEMS`` elements)
        are refused here first, with the same message.
        """
        stream = protocol.stream_kind(value)
        if stream is not None and len(value) > self.inline:
            self.send_stream(kind, stream, value, extra)
            return
        data = protocol.pack_value(value, protocol.MAX_ITEMS)
        if len(data) <= self.inline:
            self.send({"t": kind, "value": value, **extra})
            return
        self.send_stream(kind, "msgpack", data, extra)

    def send_stream(self, kind: str, stream: str, value: str | bytes, extra: dict[str, Any]) -> None:
        """Send a large value in a frame of type *kind*, through a pipe: a bytes or ASCII
        str as it is, anything else packed (*stream* says which). Not a memfd: the
        child's could hold no more than ``max_file_mb`` (``RLIMIT_FSIZE``)."""
        if len(value) > self.max_message:
            raise protocol.WireError(f"value of {len(value)} bytes is over the policy's max_message_mb")
        try:
            r, w = protocol.open_stream()
        except OSError as exc:  # out of descriptors, say: a readable error, not a lost child
            raise protocol.WireError(f"no pipe for the value: {exc.strerror}") from None
        try:
            try:
                self.send({"t": kind, "stream": len(value), "kind": stream, **extra}, r)
            finally:
                os.close(r)
            protocol.write_stream(w, value, None)
        except BrokenPipeError:
            pass  # the host stopped reading (no room for it there): it says so to its caller
        finally:
            os.close(w)

    # -- host functions ----------------------------------------------------
    def _stub(self, name: str) -> Any:
        child = self

        def host_function(*args: Any, **kwargs: Any) -> Any:
            if os.getpid() != child.pid:  # its reply would be read by either process
                raise RuntimeError(
                    f"{name}(): host functions answer the sandbox's own process, not one its code forked"
                )
            with child.call_lock:
                return call(args, kwargs)

        def call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            child.call_id += 1
            cid = child.call_id
            msg = {"t": "call", "id": cid, "fn": name, "args": list(args), "kwargs": kwargs}
            try:
                protocol.check_plain(msg, protocol.MAX_ITEMS)
                frame = protocol.encode(msg)
            except protocol.BudgetError as exc:
                raise ValueError(f"{name}(): the host refuses these arguments: {exc}") from None
            except (protocol.WireError, TypeError, ValueError, OverflowError) as exc:
                raise TypeError(f"{name}(): arguments must be plain data: {exc}") from None
            if len(frame) > child.reader.max_frame:
                raise ValueError(f"{name}(): arguments are {len(frame)} bytes, over the message cap")
            try:
                protocol.send_frame(child.sock, frame)
            except OSError as exc:
                raise _ChannelLost(str(exc)) from None
            reply = child.recv()
            if reply["t"] != "reply" or reply["id"] != cid:
                raise _ChannelLost(f"expected reply {cid}, got {reply['t']!r}")
            if reply["ok"]:
                return child.take_value(reply)
            raise HostFunctionError(reply.get("error", f"{name}() failed"))

        host_function.__name__ = name
        host_function.__qualname__ = name
        return host_function

    # -- execute -----------------------------------------------------------
    def execute(self, exec_id: int, code: str) -> dict[str, Any]:
        self.exec_count += 1
        filename = f"<cell-{self.exec_count}>"
        linecache.cache[filename] = (len(code), None, _source_lines(code), filename)
        # Keep the source of the last cells only, so a long-lived child does not grow per execute.
        linecache.cache.pop(f"<cell-{self.exec_count - SOURCE_CELLS_KEPT}>", None)
        capture = _Capture(self.max_output)
        self.stdout._capture = self.stderr._capture = capture
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = self.stdout, self.stderr
        error: BaseException | None = None
        try:
            tree = ast.parse(code, filename, "exec")
            if self.runtime.check is not None:
                self.runtime.check(tree, code)
            last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
            assert last is None or isinstance(last, ast.Expr)
            exec(self.runtime.compile_exec(tree, filename), self.ns)
            if last is not None:
                value = eval(self.runtime.compile_eval(ast.Expression(last.value), filename), self.ns)
                if value is not None:
                    print(repr(value))
        except _ChannelLost:
            raise
        except BaseException as exc:  # the code's exception is a result, not our failure
            error = exc
        finally:
            sys.stdout, sys.stderr = saved
        if os.getpid() != self.pid:
            # A process the cell forked ran to the end of it (no os._exit): its result would be a
            # second answer to this exec on the shared channel (taken for the cell's, and the
            # next frames read by two processes). It ends here, as a forked worker does.
            os._exit(_exit_status(error))
        try:
            return self.report(exec_id, capture, error, filename)
        except MemoryError:  # the code left no room to build its result: use the reserve
            self.free_reserve()
        try:
            return self.report(exec_id, capture, error, filename)
        except MemoryError:
            capture.parts = {"stdout": [], "stderr": []}
            return self.out_of_memory(exec_id)

    def report(
        self, exec_id: int, capture: _Capture, error: BaseException | None, filename: str
    ) -> dict[str, Any]:
        """The ``done`` frame: output, error and traceback within max_output_bytes together."""
        done: dict[str, Any] = {
            "t": "done",
            "id": exec_id,
            "ok": error is None,
            "stdout": capture.text("stdout"),
            "stderr": capture.text("stderr"),
            "truncated": capture.truncated,
        }
        if capture.truncated:
            marker = TRUNCATION_MARKER.format(limit=self.max_output, policy=self.policy_name)
            done["stdout" if capture.parts["stdout"] else "stderr"] += marker
        if error is None:
            return done
        done["error_type"] = protocol.clean_text(
            "GuardError" if isinstance(error, GuardError) else type(error).__name__
        )[: protocol.MAX_ERROR_TYPE]  # a class name has no length limit: the frame has
        hint = _limit_hint(error)
        if hint is not None:
            done["limit_hint"] = hint
        message = protocol.clean_text(self.host_paths.scrub(_safe_str(error)))
        trace = protocol.clean_text(self.format_traceback(error, filename))
        texts, cut = limits.cap_texts([done["stdout"], done["stderr"], message, trace], self.max_output)
        done["stdout"], done["stderr"], done["error_message"], done["traceback"] = texts
        if any(cut):  # the print loop went on (not stopped by the limit): only the texts were cut
            done["cut"] = True
        return done

    @staticmethod
    def out_of_memory(exec_id: int) -> dict[str, Any]:
        return {
            "t": "done", "id": exec_id, "ok": False, "stdout": "", "stderr": "", "truncated": False,
            "error_type": "MemoryError", "error_message": "out of memory while reporting the result",
            "limit_hint": "memory",
        }  # fmt: skip

    def format_traceback(self, exc: BaseException, filename: str) -> str:
        """The traceback with the code's own frames only, and no host path in it.

        Frames of the sandbox package, the guard, RestrictedPython and the
        standard library are dropped (in chained exceptions too; a refusal at
        compile time has no frame left but its message), exception
        classes of the sandbox package show their bare name, and host paths
        left in messages are replaced (see :class:`_HostPaths`).
        """
        try:
            return self.host_paths.scrub(_code_only_traceback(exc))
        except BaseException:
            return f"{type(exc).__name__}: {self.host_paths.scrub(_safe_str(exc))}\n"

    # -- loop --------------------------------------------------------------
    def serve(self) -> None:
        while True:
            msg = self.recv()
            kind = msg["t"]
            if kind == "exec":
                done = self.execute(msg["id"], msg["code"])
                try:
                    self.send(done)
                except MemoryError:  # encoding the frame found no room: nothing was written yet
                    self.free_reserve()
                    try:
                        self.send(done)
                    except MemoryError:
                        self.send(self.out_of_memory(msg["id"]))
                self.keep_reserve()
            elif kind == "set":
                self.set(msg)
            elif kind == "get":
                self.get(msg["name"])
            elif kind == "bye":
                return
            else:
                raise _ChannelLost(f"unexpected {kind!r} frame")

    def set(self, msg: dict[str, Any]) -> None:
        replaced = None
        try:
            value = self.take_value(msg)
            replaced = self.ns.get(msg["name"])
            self.ns[msg["name"]] = value
            del value
            self.send({"t": "ack", "ok": True})
        except (protocol.WireError, OSError, ValueError, MemoryError) as exc:
            self.send({"t": "ack", "ok": False, "error": _refusal(f"{type(exc).__name__}: {_safe_str(exc)}")})
        # The value it replaced is freed here, after the ack (a 100 MB str takes 20-30 ms to
        # unmap): the host goes on meanwhile.
        del replaced

    def get(self, name: str) -> None:
        if name not in self.ns or name.startswith("__"):
            self.send({"t": "value", "ok": False, "error": f"no variable named {name!r}"})
            return
        value = self.ns[name]
        try:
            self.send_value("value", value, ok=True)
        except MemoryError:  # its message is empty
            self.send({"t": "value", "ok": False, "error": f"variable {name!r}: no memory left to send it"})
        except (protocol.WireError, TypeError, ValueError, OverflowError) as exc:
            error = _refusal(f"variable {name!r}: {_safe_str(exc) or type(exc).__name__}")
            self.send({"t": "value", "ok": False, "error": error})


def main(config: dict[str, Any], chan_fd: int, prepared: Any) -> NoReturn:
    """Entry point in the freshly forked child; never returns."""
    code = 0
    try:
        sock = socket.socket(fileno=chan_fd)
        try:
            layers = isolation.apply(prepared, config, chan_fd)
        except isolation.LayerFailure as exc:
            protocol.send_message(
                sock,
                {"t": "hello", "version": protocol.PROTOCOL_VERSION, "pid": os.getpid(), "layers": {},
                 "error": exc.reason, "layer": exc.layer},
            )  # fmt: skip
            os._exit(3)
        except isolation.ReadPathFailure as exc:
            protocol.send_message(
                sock,
                {"t": "hello", "version": protocol.PROTOCOL_VERSION, "pid": os.getpid(), "layers": {},
                 "error": exc.reason, "read_path": exc.path, "errno": exc.errno},
            )  # fmt: skip
            os._exit(3)
        if chan_fd != CHANNEL_FD:
            # Its number was whatever was free in the fork server (higher with every live
            # sibling): the channel is now descriptor 3, the only one besides 0-2 (apply closed
            # the rest), whichever server made the child.
            os.dup2(chan_fd, CHANNEL_FD, inheritable=False)
            sock.detach()
            os.close(chan_fd)
            sock = socket.socket(fileno=CHANNEL_FD)
        # Nothing the fork server held about other children or policies is reachable now
        # (see forkserver.serve and isolation.apply); free the cycles that held it, too.
        gc.collect()
        policy = config["policy"]
        runtime = make_runtime(
            policy["python"]["guard"],
            policy["python"]["allowed_imports"],
            policy["name"],
            config["scratch"],
            policy["isolation"]["read_paths"],
        )
        child = Child(sock, config, runtime)
        child.warm_up()
        child.send({"t": "hello", "version": protocol.PROTOCOL_VERSION, "pid": os.getpid(), "layers": layers})
        if child.init():
            child.serve()
    except _ChannelLost:
        code = 2
    except MemoryError:
        code = protocol.EXIT_OUT_OF_MEMORY
    except BaseException:
        code = 4
    finally:
        os._exit(code)
