"""The wire format between the host and a sandbox child; this module owns it alone.

Frames are a 4-byte big-endian length followed by one msgpack map. Every map
has a string ``"t"`` (its type); the other keys and their types are declared
in :data:`MESSAGES`, and :func:`check` validates a decoded frame against that
table and against the direction it travelled. Only plain data crosses:
``None, bool, int, float, str, bytes, list, dict`` (msgpack extension types,
timestamps included, are refused). Nothing received is ever pickled, eval'ed
or repr'ed.

Large values (``set``, ``reply`` and ``value`` of more than :data:`INLINE_LIMIT`
bytes) travel out of band. The host packs one into a memfd whose descriptor
rides on the same ``sendmsg`` as the frame (``SCM_RIGHTS``), and the frame
carries ``shm=<size>`` instead of ``value``. A large ``bytes`` or ASCII ``str``
(the usual context) travels through a pipe instead (``stream=<size>`` and
``kind="bytes"|"str"``; the read end rides on the frame): the sender writes
straight from the object's own buffer, the receiver reads straight into the
buffer of the new object (:func:`write_stream`, :func:`read_stream`). That is
one copy, with no intermediate memory file to allocate and fault in (on a
virtual machine a fresh page costs more than copying it), and the two sides
overlap; the receiver checks the size, and for ``str`` that every byte is
ASCII, before the object exists for anyone else. A pipe is also not a file:
``RLIMIT_FSIZE`` (the policy's ``max_file_mb``), which stops a child writing a
memfd larger than that, does not apply, so every large value a child sends
streams (others packed, as ``kind="msgpack"``).

What a frame or value may *decode to* on the host is bounded too, not only
its length: a packed ``[{}] * n`` is about n bytes but n dicts once decoded.
The host decodes with an element budget (:data:`MAX_ITEMS`: array items, map
entries and containers together, counted by msgpack's list and map hooks
while decoding, so decoding stops as soon as the budget is gone) and msgpack's
per-container caps, then walks the result for depth (:data:`MAX_DEPTH`).
Strings and bytes cost no more than their wire bytes (at most four times as
much for text that must be widened), so decoded size is bounded by about
``4 * size + MAX_ITEMS * 100`` bytes. The child checks the same budget before
it sends (a readable error for honest code); the host's check is the one
that holds.

Writes that cross to an untrusted peer take a *timeout* (:func:`send_frame`,
:func:`write_stream`), and so do the host's reads of a stream
(:func:`read_stream`): a peer that stops reading or writing cannot block the host.
A peer that died cannot kill the writer either: socket writes pass ``MSG_NOSIGNAL``
(an error, never ``SIGPIPE``, whatever the process's disposition of it).

This module is imported by the child, so it may use only the stdlib and msgpack.

Conversation (host = H, child = C)::

    C: hello{version, pid, layers, error?}          once, after the child has locked itself down
                     (error: with layer, a required layer failed; with read_path and errno, a
                     read_paths entry could not be opened)
    H: init{host_functions}                          once, first (a pooled child waits for it)
    H: exec{id, code}  -> C: call{id, fn, args, kwargs}* ... done{id, ...}
                          (each call is answered by H: reply{id, ok, value|error} before the next)
    H: set{name, value|shm|stream+kind}  -> C: ack{ok, error?}
    H: get{name}             -> C: value{ok, value|shm|stream+kind, error?}
    H: bye{}                 -> C exits

Host <-> fork server (the host's control channel)::

    H: spawn{request, config} + channel fd  -> S: spawned{request, pid} + pidfd | failed{request, error}
                                      (request: the host's number for it; a late answer is told apart)
    S: exited{pid, status, ...}       once the host released the child and it exited
    H: release{pid}                   the host is done with the pid; the server may reap it
"""

from __future__ import annotations

import array
import codecs
import ctypes
import fcntl
import itertools
import json
import math
import mmap
import os
import select
import socket
import stat
import struct
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any, Final

import msgpack

__all__ = [
    "DEFAULT_MAX_FRAME",
    "EXIT_OUT_OF_MEMORY",
    "FRAME_ROOM",
    "HEADER",
    "INLINE_LIMIT",
    "MAX_DEPTH",
    "MAX_ERROR_TYPE",
    "MAX_ITEMS",
    "MAX_REFUSAL",
    "MESSAGES",
    "PROTOCOL_VERSION",
    "BudgetError",
    "DescriptorsDropped",
    "FrameReader",
    "WireError",
    "check",
    "check_plain",
    "clean_text",
    "encode",
    "encode_with_value",
    "frame_cap",
    "inline_limit",
    "pack_value",
    "read_shm",
    "read_stream",
    "recv_frames",
    "send_frame",
    "send_message",
    "stream_kind",
    "unpack_value",
    "write_shm",
    "write_stream",
    "write_value_shm",
]

PROTOCOL_VERSION: Final = 1
#: Exit status of a child that ran out of memory outside the code (reading a
#: frame, reporting a result) even after freeing its reserve. The host labels
#: it ``limit="memory"``; nothing is enforced on the child's word.
EXIT_OUT_OF_MEMORY: Final = 6
HEADER: Final = struct.Struct(">I")
#: Frames longer than this are refused before a byte of their body is read.
DEFAULT_MAX_FRAME: Final = 64 * 1024 * 1024
#: Packed values larger than this travel in a memfd rather than inline.
INLINE_LIMIT: Final = 1024 * 1024
#: Longest exception class name (``error_type``) and longest refusal text (the ``error`` of an
#: ``ack`` or ``value``) in a frame: neither is covered by the output cap, so each end cuts them
#: (the child, so its frame fits; the host, whatever the child sends).
MAX_ERROR_TYPE: Final = 200
MAX_REFUSAL: Final = 2000
#: Bytes of a frame that are not its payload (the code, a value, the output texts): keys, ids,
#: flags, a variable name, cut markers; with room to spare.
FRAME_ROOM: Final = 16 * 1024
#: How deep plain data may nest (msgpack itself stops at the C stack).
MAX_DEPTH: Final = 100
#: Elements one frame or value from the child may decode to on the host: every
#: array item, map entry and container counts one. Decoding stops at the first
#: container past the budget, so the host never builds much more than this.
MAX_ITEMS: Final = 1_000_000

_ANY = object()  # marker: any plain value
_OPT = "?"  # a key ending in "?" is optional


class WireError(Exception):
    """A frame is malformed, oversized, out of turn or of the wrong shape.

    Stdlib-only so the child can raise it too; the host turns it into
    :class:`sandbox.errors.ProtocolError`.
    """


class DescriptorsDropped(WireError):
    """The kernel dropped a descriptor sent with a frame because this process had no free
    descriptor slot (``RLIMIT_NOFILE``). The frame's bytes were read: the stream is in step."""


class BudgetError(WireError):
    """A frame or value would decode to more than :data:`MAX_ITEMS` elements.

    The whole frame was consumed, so the stream is still in step: a reader may
    refuse this one value and go on.
    """


# Message table: type -> (sender, {key: type}). "host" frames go to the child,
# "child" frames come from it, "server" frames are the fork server's.
MESSAGES: Final[dict[str, tuple[str, dict[str, Any]]]] = {
    # child -> host
    "hello": (
        "child",
        {
            "version": int,
            "pid": int,
            "layers": dict,
            "error?": str,
            "layer?": str,
            "read_path?": str,
            "errno?": int,
        },
    ),
    "done": (
        "child",
        {
            "id": int,
            "ok": bool,
            "stdout": str,
            "stderr": str,
            "error_type?": str,
            "error_message?": str,
            "traceback?": str,
            "truncated": bool,
            "cut?": bool,
            "limit_hint?": str,
        },
    ),
    "call": ("child", {"id": int, "fn": str, "args": list, "kwargs": dict}),
    "ack": ("child", {"ok": bool, "error?": str}),
    "value": (
        "child",
        {"ok": bool, "value?": _ANY, "shm?": int, "stream?": int, "kind?": str, "error?": str},
    ),
    # host -> child
    # spin: whether the child may spin for the host's next frame (a CPU is free; see sandbox.spin)
    "exec": ("host", {"id": int, "code": str, "spin?": bool}),
    "reply": ("host", {"id": int, "ok": bool, "value?": _ANY, "shm?": int, "error?": str, "spin?": bool}),
    "set": ("host", {"name": str, "value?": _ANY, "shm?": int, "stream?": int, "kind?": str}),
    "get": ("host", {"name": str}),
    "bye": ("host", {}),
    "init": ("host", {"host_functions": list}),
    # host <-> fork server
    "spawn": ("host", {"request": int, "config": dict}),
    "release": ("host", {"pid": int}),
    "spawned": ("server", {"request": int, "pid": int, "cpu_path?": str}),
    "exited": ("server", {"pid": int, "status": int, "maxrss": int, "cpu": float, "limits?": dict}),
    "failed": ("server", {"request": int, "error": str}),
}


def _ext_refused(code: int, data: bytes) -> Any:
    raise WireError(f"msgpack extension type {code} is not plain data")


# unpackb bounds every string, array and map by the length of its input, so a
# frame cannot announce more elements than it has bytes.
_UNPACK: Final[dict[str, Any]] = {
    "raw": False,
    "use_list": True,
    "strict_map_key": False,
    "ext_hook": _ext_refused,
    "timestamp": 0,
}


_SCALARS: Final = (bool, int, float, str, bytes)


def check_plain(value: Any, max_items: int | None = None) -> None:
    """Raise :class:`WireError` unless *value* is plain msgpack data nesting at
    most :data:`MAX_DEPTH` deep; with *max_items*, :class:`BudgetError` when it
    holds more elements than that (counted as the host's decoder counts them:
    each container plus each of its items or entries)."""
    count = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        t = type(v)
        if v is None or t in _SCALARS:
            continue
        if depth > MAX_DEPTH:
            raise WireError("value nests too deeply")
        count += len(v) + 1 if t in (list, tuple, dict) else 0
        if max_items is not None and count > max_items:  # before the walk grows by this container
            raise BudgetError(f"value holds more than {max_items:,} elements (lists, dicts and their items)")
        if t is list or t is tuple:  # tuples travel as lists
            stack.extend((item, depth + 1) for item in v if not (item is None or type(item) in _SCALARS))
        elif t is dict:
            for k, item in v.items():
                if not (k is None or type(k) in _SCALARS):
                    raise WireError(f"dict key of type {type(k).__name__} is not plain data")
                if not (item is None or type(item) in _SCALARS):
                    stack.append((item, depth + 1))
        else:
            raise WireError(
                f"{t.__name__} is not plain data (allowed: None, bool, int, float, str, bytes, list, dict)"
            )


def pack_value(value: Any, max_items: int | None = None) -> bytes:
    """msgpack-encode a plain value (within *max_items* elements, if given)."""
    check_plain(value, max_items)
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


def _bounded(size: int, max_items: int | None) -> dict[str, Any]:
    """Unpack options that stop decoding once more than *max_items* elements were built."""
    if max_items is None:
        return _UNPACK
    built = 0

    def count(container: Any) -> Any:
        nonlocal built
        built += len(container) + 1
        if built > max_items:
            raise BudgetError(f"value holds more than {max_items:,} elements (lists, dicts and their items)")
        return container

    cap = min(size, max_items)  # msgpack allocates an announced array before filling it
    return {**_UNPACK, "max_array_len": cap, "max_map_len": cap, "list_hook": count, "object_hook": count}


#: What msgpack raises for data it cannot decode: garbage (``ValueError`` and its own
#: subclasses of it, ``TypeError`` for a list or map as a map key), a container past a cap
#: (``ValueError``), or no memory for what the data announces. Nothing else is turned into a
#: :class:`WireError`: an exception a signal handler raises while a frame is decoded (an
#: embedder's job timeout, ``KeyboardInterrupt``) goes on as itself.
_UNDECODABLE: Final = (ValueError, TypeError, msgpack.UnpackException, MemoryError, RecursionError)


def _decode(data: bytes | bytearray | memoryview | mmap.mmap, max_items: int | None, what: str) -> Any:
    # Each byte on the wire adds at most 2 to the count (a container's header counts as an item
    # of its parent and as a container), so data of at most max_items / 2 bytes cannot decode
    # to more: the counting hooks are needed only for larger data.
    if max_items is not None and 2 * len(data) <= max_items:
        max_items = None
    try:
        return msgpack.unpackb(data, **_bounded(len(data), max_items))
    except WireError:
        raise
    except _UNDECODABLE as exc:  # msgpack raises many types for garbage (and ValueError past a cap)
        if max_items is not None and isinstance(exc, ValueError) and "exceeds max_" in str(exc):
            raise BudgetError(f"{what} holds more than {max_items:,} elements in one list or dict") from None
        raise WireError(f"undecodable {what}: {type(exc).__name__}") from None


def unpack_value(
    data: bytes | bytearray | memoryview | mmap.mmap, max_len: int, max_items: int | None = None
) -> Any:
    """Decode one packed value of at most *max_len* bytes (and *max_items* elements, if given)."""
    if len(data) > max_len:
        raise WireError(f"value of {len(data)} bytes is over the cap of {max_len}")
    value = _decode(data, max_items, "value")
    check_plain(value)
    return value


def clean_text(text: str) -> str:
    """*text* in a form that can cross the wire: lone surrogates, which UTF-8
    cannot carry, escaped as ``\\udcff`` (everything else unchanged)."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def shown(value: Any, limit: int = 60, *, quoted: bool = True) -> str:
    """A short, quoted, escaped form of a value the peer sent, for an error message: a str cut
    at *limit* characters (JSON-quoted: control characters, DEL, and everything not ASCII, the C1
    controls U+0080-U+009F included, escaped as ``\\u00XX``),
    anything else by its type only. Never ``repr`` of the peer's data, never all of a long
    string. ``quoted=False`` leaves out the outer quotes (a peer's sentence, not a name)."""
    if type(value) is not str:
        return f"<{type(value).__name__}>"
    cut = json.dumps(value[:limit])
    return (cut if quoted else cut[1:-1]) + ("..." if len(value) > limit else "")


def frame_cap(max_message: int) -> int:
    """The longest frame body either end accepts under a policy's ``max_message_mb`` (in bytes)."""
    return min(max_message, DEFAULT_MAX_FRAME)


def inline_limit(max_frame: int) -> int:
    """The largest packed value either end sends inside a frame of at most *max_frame* bytes
    (a larger one travels out of band): the frame around it must fit too."""
    return min(INLINE_LIMIT, max_frame - FRAME_ROOM)


def encode(msg: dict[str, Any]) -> bytes:
    """One frame: header plus packed map."""
    body: bytes = msgpack.packb(msg, use_bin_type=True)
    return HEADER.pack(len(body)) + body


def encode_with_value(head: dict[str, Any], packed: bytes) -> bytes:
    """One frame for *head* plus ``"value": <packed>``, where *packed* is already
    msgpack (from :func:`pack_value`): large values are not packed twice."""
    n = len(head) + 1
    if n >= 1 << 16:
        raise WireError("too many keys in a frame")
    body: bytes = msgpack.packb(head, use_bin_type=True)
    rest = body[3:] if body[0] == 0xDE else body[1:]  # drop the map header, keep the entries
    header = bytes([0x80 | n]) if n < 16 else b"\xde" + n.to_bytes(2, "big")
    body = header + rest + msgpack.packb("value") + packed
    return HEADER.pack(len(body)) + body


# Per message type: (sender, allowed keys, [(key, type, required)]), from MESSAGES once.
_SHAPES: Final[dict[str, tuple[str, frozenset[str], list[tuple[str, Any, bool]]]]] = {
    t: (
        sender,
        frozenset({k.rstrip(_OPT) for k in fields} | {"t"}),
        [(k.rstrip(_OPT), typ, not k.endswith(_OPT)) for k, typ in fields.items()],
    )
    for t, (sender, fields) in MESSAGES.items()
}


def check(msg: Any, sender: str) -> dict[str, Any]:
    """Validate a decoded frame's shape against :data:`MESSAGES`; return it."""
    if type(msg) is not dict:
        raise WireError("frame is not a map")
    t = msg.get("t")
    shape = _SHAPES.get(t) if type(t) is str else None
    if shape is None:
        raise WireError(f"unknown message type {shown(t)}" if type(t) is str else "frame has no type")
    owner, allowed, fields = shape
    if owner != sender:
        raise WireError(f"message {t!r} may not be sent by the {sender}")
    for key in msg:
        if key not in allowed:
            raise WireError(f"message {t!r} has unexpected key {shown(key)}")
    for name, typ, required in fields:
        if name not in msg:
            if required:
                raise WireError(f"message {t!r} lacks key {name!r}")
            continue
        val = msg[name]
        if typ is _ANY:
            check_plain(val)
        elif typ is float:
            if type(val) not in (int, float):
                raise WireError(f"message {t!r}: {name!r} must be a number")
        elif type(val) is not typ:
            raise WireError(f"message {t!r}: {name!r} must be {typ.__name__}")
        elif typ is list or typ is dict:
            check_plain(val)
    return msg


#: Bytes :func:`recv_frames` reads at most at once.
RECV_CHUNK: Final = 262144


class FrameReader:
    """Incremental frame decoder with a size cap.

    ``feed(bytes)`` then iterate: yields each complete, decoded (not yet
    shape-checked) frame. A length prefix over ``max_frame`` raises
    :class:`WireError` at once, before any body is buffered. With
    ``max_items``, a frame that would decode to more elements raises
    :class:`BudgetError` (the frame is consumed; the stream stays in step).
    Any other exception raised while a frame is decoded (one a signal handler
    raised) leaves the frame unconsumed: the next iteration yields it.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME, max_items: int | None = None) -> None:
        self.max_frame = max_frame
        self.max_items = max_items
        self._buf = bytearray()
        self._need: int | None = None
        #: What :func:`recv_frames` reads into: allocated once, since a fresh 256 KiB buffer
        #: per read is an mmap and munmap each time (about 25 us on a VM, more than the read).
        self.chunk = bytearray(RECV_CHUNK)

    @property
    def pending(self) -> int:
        return len(self._buf)

    @property
    def between_frames(self) -> bool:
        """Every byte fed so far belonged to frames already yielded (or refused)."""
        return not self._buf and self._need is None

    def feed(self, data: bytes | memoryview) -> None:
        self._buf += data

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        buf = self._buf
        if self._need is None:
            if len(buf) < HEADER.size:
                raise StopIteration
            (size,) = HEADER.unpack_from(buf)
            if size > self.max_frame:
                raise WireError(f"frame of {size} bytes exceeds the cap of {self.max_frame} bytes")
            if size == 0:
                raise WireError("empty frame")
            self._need = size
            del buf[: HEADER.size]
        size = self._need
        if len(buf) < size:
            raise StopIteration
        try:
            with memoryview(buf) as view, view[:size] as body:  # decoded in place, not copied first
                msg = _decode(body, self.max_items, "frame")
        except WireError:  # undecodable or over budget: consumed, the stream stays in step
            del buf[:size]
            self._need = None
            raise
        # Anything else raised while decoding (an exception from a signal handler: Ctrl-C, a job
        # timeout) leaves the frame where it is, for the next call to decode again: it is not lost.
        del buf[:size]
        self._need = None
        return msg


_FD_SPACE: Final = socket.CMSG_SPACE(4 * array.array("i").itemsize)
_MSG_CTRUNC: Final = int(socket.MSG_CTRUNC)  # a plain int: ``&`` on the enum costs microseconds per frame


def recv_frames(
    sock: socket.socket, reader: FrameReader, fds: list[int] | None, *, wait: bool = True
) -> bool:
    """Read once from *sock* into *reader*; collect passed descriptors into *fds*.

    With ``fds=None`` descriptors are not accepted (the kernel closes any that
    were sent). ``wait=False`` raises BlockingIOError when nothing is there.
    Returns False on end of file.
    """
    flags = 0 if wait else socket.MSG_DONTWAIT
    chunk = reader.chunk
    cut = False
    if fds is None:
        size = sock.recv_into(chunk, RECV_CHUNK, flags)
    else:
        size, anc, msg_flags, _addr = sock.recvmsg_into([chunk], _FD_SPACE, flags)
        got = array.array("i")
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got.frombytes(payload[: len(payload) - (len(payload) % got.itemsize)])
        fds.extend(got)
        cut = bool(msg_flags & _MSG_CTRUNC)
        if cut and got:
            raise WireError("more descriptors were sent than a frame may carry")
    if size:
        with memoryview(chunk) as view, view[:size] as data:
            reader.feed(data)
    if cut:  # none arrived: the kernel had no slot for it (the bytes are read, the stream in step)
        raise DescriptorsDropped(
            "a descriptor sent with a frame was dropped: this process is out of file descriptors"
            " (RLIMIT_NOFILE)"
        )
    return bool(size)


#: Socket writes fail with EPIPE instead of raising SIGPIPE, which kills a process that did not
#: ignore it (Python ignores it, but a C program embedding Python or a CLI may restore it).
NO_SIGPIPE: Final = getattr(socket, "MSG_NOSIGNAL", 0)


def send_frame(
    sock: socket.socket, frame: bytes, fd: int | None = None, timeout: float | None = None
) -> None:
    """Send one encoded frame, with *fd* riding on its first byte if given.

    With *timeout* (seconds) the frame is written without blocking, waiting
    for room in the socket (``poll``) until the deadline; :class:`TimeoutError`
    when it passes. A part of the frame may then be on the wire: the caller
    must give up on the peer. ``timeout=None`` blocks (the child's side: the
    host is trusted to read).
    """
    if timeout is None:
        if fd is None:
            sock.sendall(frame, NO_SIGPIPE)
            return
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
        sent = sock.sendmsg([frame], rights, NO_SIGPIPE)
        if sent < len(frame):
            sock.sendall(frame[sent:], NO_SIGPIPE)
        return
    deadline = time.monotonic() + timeout
    view = memoryview(frame)
    rights = [] if fd is None else [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
    waiter: select.poll | None = None
    while True:
        try:  # the fast path: one non-blocking send that takes the whole frame
            if rights:
                sent = sock.sendmsg([view], rights, socket.MSG_DONTWAIT | NO_SIGPIPE)
                rights = []  # the descriptor went with the first byte
            else:
                sent = sock.send(view, socket.MSG_DONTWAIT | NO_SIGPIPE)
            view = view[sent:]
            if not view:
                return
        except BlockingIOError:
            pass
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"the peer did not read for {timeout:g} s")
        if waiter is None:
            waiter = select.poll()
            waiter.register(sock.fileno(), select.POLLOUT)
        waiter.poll(poll_ms(left))


def send_message(
    sock: socket.socket, msg: dict[str, Any], fd: int | None = None, timeout: float | None = None
) -> None:
    send_frame(sock, encode(msg), fd, timeout)


def _memfd(into: list[int] | None) -> int:
    """A fresh memfd for a value. With *into*, appended to it by C as it is made: an exception
    a signal handler raises (Ctrl-C) comes before the memfd exists or once its owner's list
    holds it, never in between, where nobody would close it."""
    if into is None:
        return os.memfd_create("sandbox-value", os.MFD_CLOEXEC)
    into.extend(map(os.memfd_create, ("sandbox-value",), (os.MFD_CLOEXEC,)))
    return into[-1]


def _shm_of(parts: Sequence[bytes | memoryview], into: list[int] | None) -> tuple[int, int]:
    """A fresh memfd holding *parts* one after the other: ``(fd, size)``. Without *into* it is
    closed if anything fails; with it, left in that list for its owner (see :func:`_memfd`)."""
    fd = _memfd(into)
    size = 0
    try:
        for part in parts:
            view = memoryview(part)
            while view:
                n = os.write(fd, view)
                view = view[n:]
                size += n
    except BaseException:
        if into is None:
            os.close(fd)
        raise
    return fd, size


def write_shm(data: bytes, into: list[int] | None = None) -> int:
    """Copy *data* into a fresh memfd; return its descriptor (caller closes). With *into*, the
    descriptor is appended to that list as it is made and left there if anything fails: the
    owner of the list closes it (see :func:`_memfd`)."""
    return _shm_of((data,), into)[0]


# CPython's C API through private function objects (a prototype bound to a name),
# so that nothing shared such as ``ctypes.pythonapi.<name>.restype`` is changed.
_UTF8_AND_SIZE: Final = ctypes.PYFUNCTYPE(
    ctypes.c_void_p, ctypes.py_object, ctypes.POINTER(ctypes.c_ssize_t)
)(("PyUnicode_AsUTF8AndSize", ctypes.pythonapi))
_NEW_BYTES: Final = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.c_void_p, ctypes.c_ssize_t)(
    ("PyBytes_FromStringAndSize", ctypes.pythonapi)
)
_NEW_STR: Final = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.c_ssize_t, ctypes.c_uint32)(
    ("PyUnicode_New", ctypes.pythonapi)
)
_MADVISE: Final = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)(
    ("madvise", ctypes.CDLL(None))
)
_MADV_HUGEPAGE: Final[int | None] = getattr(mmap, "MADV_HUGEPAGE", None)
#: Streamed values at least this large ask for huge pages (glibc's largest threshold for
#: serving an allocation from its own mapping is 32 MiB).
_HUGE_FROM: Final = 32 * 1024 * 1024
# Where the characters of a bytes object and of a compact ASCII str start: right
# after the header, whose size is what an empty one takes minus its trailing NUL.
_DATA_OFFSET: Final = {"bytes": sys.getsizeof(b"") - 1, "str": sys.getsizeof("") - 1}


def _str_buffer(value: str) -> memoryview:
    """The UTF-8 bytes of *value* without a copy when CPython already holds them.

    For an ASCII string, CPython's UTF-8 form *is* its storage; asking for it
    (``PyUnicode_AsUTF8AndSize``) returns a pointer, not a copy. Other strings
    are encoded (one pass). The view is valid while *value* is alive.
    """
    if not value.isascii():
        return memoryview(value.encode("utf-8"))
    size = ctypes.c_ssize_t()
    ptr = _UTF8_AND_SIZE(value, ctypes.byref(size))
    return memoryview((ctypes.c_char * size.value).from_address(ptr)).cast("B")


def _blank(kind: str, size: int) -> tuple[str | bytes, memoryview]:
    """A new, not yet shared ``bytes`` or ASCII ``str`` of *size* characters whose
    contents are unset, and a writable view of them (valid while the object lives).

    The caller fills every byte (ASCII only, for a str) before anything else
    sees the object, and drops it otherwise. :class:`MemoryError` if there is
    no room.
    """
    obj = _NEW_BYTES(None, size) if kind == "bytes" else _NEW_STR(size, 127)
    start = id(obj) + _DATA_OFFSET[kind]
    if size >= _HUGE_FROM and _MADV_HUGEPAGE is not None:
        # Transparent huge pages where the machine allows them on request: one fault per
        # 2 MiB instead of per 4 KiB while the value is filled (this VM: 40-60 ms instead
        # of 120-160 ms per 100 MB when the memory was recently freed). The range is the
        # object's own: glibc maps an allocation this large on its own.
        lo = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
        hi = (start + size) // mmap.PAGESIZE * mmap.PAGESIZE
        _MADVISE(lo, hi - lo, _MADV_HUGEPAGE)  # refused (THP off): plain pages, as before
    view = memoryview((ctypes.c_char * size).from_address(start)).cast("B")
    return obj, view


def _layout_ok() -> bool:
    """Whether objects made by :func:`_blank` hold what is written into them (a check of the
    offsets above on this interpreter; streams are not used if it fails)."""
    try:
        for kind, want in (("bytes", b"ok\x00\xff"), ("str", "ok\x00\x7f")):
            obj, view = _blank(kind, 4)
            view[:] = want if isinstance(want, bytes) else want.encode("ascii")
            view.release()
            if obj != want or len(obj) != 4:
                return False
    except Exception:
        return False
    return True


_STREAMS: Final = _layout_ok()
#: Bytes a str stream is read (and checked for ASCII) in at a time: small enough
#: that the check reads them from the cache.
_STREAM_CHUNK: Final = 256 * 1024
#: Capacity asked for a stream's pipe (the unprivileged maximum by default); the
#: default 64 KiB means four times more wake-ups.
_PIPE_SIZE: Final = 1024 * 1024


def stream_kind(value: Any) -> str | None:
    """``"bytes"`` or ``"str"`` when *value* can travel through a stream as it is (a
    bytes object, or an ASCII str), else None (packed, it travels as ``"msgpack"``)."""
    if not _STREAMS:
        return None
    if type(value) is bytes:
        return "bytes"
    if type(value) is str and value.isascii():
        return "str"
    return None


def open_stream(into: list[int] | None = None) -> tuple[int, int]:
    """A pipe for one streamed value: ``(read_end, write_end)``, close-on-exec. With *into*,
    both ends are appended to that list by C as the pipe is made, and left there if anything
    fails: the owner of the list closes them (see :func:`_memfd`)."""
    if into is None:
        r, w = os.pipe2(os.O_CLOEXEC)
    else:
        into.extend(itertools.chain.from_iterable(map(os.pipe2, (os.O_CLOEXEC,))))
        r, w = into[-2:]
    try:
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
    except OSError:
        pass  # over the per-user pipe allowance: the default size works, with more wake-ups
    return r, w


#: The longest wait ``poll`` takes, in milliseconds (a C int): about 24.8 days.
_POLL_MAX_MS: Final = (1 << 31) - 1


def poll_ms(seconds: float) -> int:
    """A ``poll`` timeout for *seconds* left: rounded up to whole milliseconds, at least 0 and
    at most what ``poll`` takes (a longer or infinite wait returns early: callers loop until
    their deadline)."""
    if not seconds > 0:
        return 0
    return _POLL_MAX_MS if seconds >= _POLL_MAX_MS / 1000 else math.ceil(seconds * 1000)


def _wait(fd: int, event: int, deadline: float | None, waiter: select.poll | None) -> select.poll:
    """Block until *fd* is ready for *event* or *deadline* (monotonic) passes: TimeoutError."""
    if waiter is None:
        waiter = select.poll()
        waiter.register(fd, event)
    if deadline is None:
        waiter.poll()
        return waiter
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the peer did not keep up with the stream")
    waiter.poll(poll_ms(left))
    return waiter


def write_stream(fd: int, value: str | bytes, timeout: float | None) -> None:
    """Write the bytes of *value* (bytes, or an ASCII str: see :func:`stream_kind`) into
    the pipe *fd*, straight from the object's buffer; the caller closes *fd*.

    With *timeout* (seconds) the writes do not block: :class:`TimeoutError` once
    it passes. :class:`BrokenPipeError` when the reader closed its end.
    """
    view = _str_buffer(value) if isinstance(value, str) else memoryview(value)
    deadline = None if timeout is None else time.monotonic() + timeout
    if deadline is not None:
        os.set_blocking(fd, False)
    waiter: select.poll | None = None
    try:
        while view:
            try:
                view = view[os.write(fd, view) :]
            except BlockingIOError:
                waiter = _wait(fd, select.POLLOUT, deadline, waiter)
    finally:
        view.release()


def read_stream(
    fd: int,
    size: int,
    kind: Any,
    max_len: int,
    timeout: float | None = None,
    max_items: int | None = None,
    *,
    close: bool = True,
) -> Any:
    """Read one streamed value of *size* bytes from the pipe *fd*; always closes *fd* (unless
    ``close=False``: the caller keeps it, in a list of its own it closes, so that no Ctrl-C can
    land between the hand-over and this function's own ``finally``).

    *kind* is ``"bytes"``, ``"str"`` (all ASCII) or ``"msgpack"`` (any plain
    value, packed; decoded within *max_items* elements if given, else
    :class:`BudgetError` once the whole stream was read). The bytes go
    straight into the new object, which is returned only once all *size*
    bytes arrived and passed the check: :class:`WireError` otherwise (a size
    outside ``1..max_len``, a descriptor that is not a pipe, an early end,
    a byte over 127 in a str). :class:`MemoryError` if there is no room for it.
    With *timeout* (seconds): :class:`TimeoutError` once it passes.
    """
    if kind == "msgpack":
        return unpack_value(read_stream(fd, size, "bytes", max_len, timeout, close=close), max_len, max_items)
    try:
        if kind not in _DATA_OFFSET:
            raise WireError(f"unknown stream kind {shown(kind)}")
        if size <= 0 or size > max_len:
            raise WireError(f"streamed value of {size} bytes is outside the allowed range")
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            raise WireError("streamed value does not come through a pipe")
        deadline = None if timeout is None else time.monotonic() + timeout
        if deadline is not None:
            os.set_blocking(fd, False)
        obj, view = _blank(kind, size)
        try:
            _fill(fd, view, kind == "str", deadline)
        except BaseException:
            view.release()
            del obj  # half filled, or not ASCII: nobody may see it
            raise
        view.release()
        return obj
    except TimeoutError:
        raise
    except OSError as exc:  # not readable (the write end of a pipe, say)
        raise WireError(f"cannot read the streamed value: {exc.strerror or exc}") from None
    finally:
        if close:
            os.close(fd)


def _fill(fd: int, view: memoryview, ascii_only: bool, deadline: float | None) -> None:
    size = len(view)
    got = 0
    waiter: select.poll | None = None
    chunk = _STREAM_CHUNK if ascii_only else size
    while got < size:
        try:
            n = os.readv(fd, [view[got : got + chunk]])
        except BlockingIOError:
            waiter = _wait(fd, select.POLLIN, deadline, waiter)
            continue
        if n == 0:
            raise WireError(f"stream ended after {got} of {size} bytes")
        if ascii_only:
            try:  # one pass over bytes still in the cache, into a small str dropped at once
                codecs.ascii_decode(view[got : got + n])
            except UnicodeDecodeError:
                raise WireError("streamed str is not ASCII") from None
        got += n


def _msgpack_header(kind: str, size: int) -> bytes:
    if size >= 1 << 32:
        raise WireError("value is over 4 GiB")
    return (b"\xdb" if kind == "str" else b"\xc6") + size.to_bytes(4, "big")


def write_value_shm(value: Any, into: list[int] | None = None) -> tuple[int, int]:
    """Put *value*, msgpack-encoded, in a fresh memfd; return ``(fd, size)``.

    A str or bytes goes in as a msgpack header followed by its raw bytes,
    copied once, straight from the object's own buffer. *into*: as for
    :func:`write_shm`.
    """
    if type(value) is str:
        parts: list[bytes | memoryview] = [b"", _str_buffer(value)]
        parts[0] = _msgpack_header("str", len(parts[1]))
    elif type(value) is bytes:
        parts = [_msgpack_header("bin", len(value)), memoryview(value)]
    else:
        parts = [pack_value(value)]
    return _shm_of(parts, into)


def read_shm(
    fd: int, size: int, max_len: int, *, mapped: bool, max_items: int | None = None, close: bool = True
) -> Any:
    """Unpack the value in a memfd of *size* bytes; always closes *fd* (unless ``close=False``:
    as for :func:`read_stream`).

    ``mapped=True`` maps it (no copy; only for a sender that cannot shrink it
    under us, i.e. the host). The host reads what a child sends with
    ``mapped=False``: a child could truncate its memfd while the host reads,
    and a mapping would then kill the host with SIGBUS.
    """
    try:
        if size <= 0 or size > max_len:
            raise WireError(f"out-of-band value of {size} bytes is outside the allowed range")
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size < size:
            raise WireError("out-of-band value is not a memory file of the announced size")
        if mapped:  # MAP_POPULATE: fault the pages in one go, not one at a time while decoding
            with mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ) as mm:
                return unpack_value(mm, max_len, max_items)
        buf = bytearray(size)
        view = memoryview(buf)
        got = 0
        while got < size:
            try:
                n = os.preadv(fd, [view[got:]], got)
            except OSError as exc:  # a descriptor that cannot be read (O_PATH, say) is the sender's fault
                raise WireError(f"out-of-band value cannot be read: {exc.strerror}") from None
            if n <= 0:
                raise WireError("out-of-band value is shorter than announced")
            got += n
        return unpack_value(buf, max_len, max_items)
    finally:
        if close:
            os.close(fd)
