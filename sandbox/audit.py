"""The tamper-evident audit log: one hash-chained JSON line per ``execute``.

Each line holds what ran (the code and its sha256), under which policy (name,
schema version, sha256), what came of it, and two hashes: ``prev_hash`` (the
``hash`` of the line before, 64 zeros for the first line) and ``hash``, the
sha256 of ``prev_hash`` joined to the canonical JSON of the line without its
``hash``. Editing, dropping or reordering any line breaks the chain at that
line, which :func:`verify` names. A line must also be spelled byte for byte as
the writer writes it (keys sorted, no spaces, ``hash`` last): a key given
twice, which a JSON parser resolves to its last copy and grep or a reader sees
first, is an edit even when the hash of the parsed values matches. Text is
written as UTF-8, but characters where ``str.splitlines()`` ends a line
(U+0085, U+2028, U+2029), the other C1 controls and the bidirectional controls
(U+202E and the like, which show text reordered) are written as ``\\uXXXX``:
one line per record for every reader, shown in its order. Lines written
before they were escaped hold them raw; that spelling verifies too.

Cutting lines off the *end* leaves a valid shorter chain, and cutting into a
line leaves what looks like a crash's cut-off line, which the next append
records (below): the log then grows again and verifies. Keep the last hash
(:attr:`VerifyReport.last_hash`) elsewhere and pass it back later as
``verify(path, expect=...)`` (``rlm audit verify --expect HASH``): it must be
the hash of a line of the chain, however much was appended since.

Several sandboxes, in one process or many, may share a file: each append
takes an exclusive ``flock`` and re-reads the last line only when another
process has written since. The lock is waited for at most
:data:`LOCK_SECONDS` (threads of one process queue on a lock of their own
first, so only other processes are polled for): a process stopped or hung
while it held the lock makes appends fail with an :class:`AuditError` naming
its pid, instead of hanging every writer of the file. This process remembers, per file, the size,
modification time and hash its last append left; an append (or a new log
object, the next sandbox on that file) that finds the file at that size and
time chains onto that hash and reads nothing back, so sandboxes of one
process sharing the default log do not read each other's lines. An append
first checks, under the lock, that the path still names the file it has open:
a log renamed away by a rotation (or deleted) gets no further line, the append
opens (or creates) the file at the path and goes on with that file's chain.
The last line is read through the log's own descriptor, never by name.
logrotate's ``copytruncate`` ignores the lock and may empty the file inside an
append: one whose line then stands alone in the file writes it again as the
first line of a new chain, and one that finds the file's size other than its
write left it reads the tail at its next append.
Finding the last line
reads backwards from the end, so it costs the length of that line, however
long, not its square.

A crash in the middle of an append can leave the file ending in a cut-off
line. The next append does not chain onto it and does not drop it: it ends
the fragment with a newline, chains onto the last complete line, and records
the fragment's size and sha256 in ``torn_before``. Appends cut off in a row
(the one that was to record a fragment cut off too: a crash loop, a full
disk) leave fragments and newlines: everything after the last record line is
one torn region, recorded as one (its bytes, without a newline at its end).
:func:`verify` accepts such a region only when the line after it records it
that way, so the chain still verifies; a region nothing records yet is
reported at its first line. An append chains onto the last complete line, so
a line of the region that holds its whole top-level ``prev_hash`` must hold
that line's hash: one holding another was not cut off by a crash there (lines
before it were removed, or complete lines were cut into a region) and is
reported as an edit. A line cut into before its ``prev_hash`` cannot be told
from a crash's this way; only a kept hash tells.

:func:`verify` reads the log a block and a line at a time (its memory is the
longest line's, not the file's: a log of months runs to gigabytes), up to the
size the log had at a moment no append was writing: it takes the append lock
shared for as long as an ``fstat`` takes. A line appended meanwhile is not
read, and none is read in part (a reader sees a long write land a page at a
time), which it would report as an incomplete last line.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import stat
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, overload

from sandbox.errors import AuditError
from sandbox.files import NOT_REGULAR, UntrustedLinkError, open_through_trusted_links

__all__ = [
    "GENESIS",
    "LOCK_SECONDS",
    "AuditLog",
    "VerifyReport",
    "default_audit_path",
    "encode_fields",
    "line_hash",
    "verify",
]

GENESIS = "0" * 64

#: Seconds an append waits for the log's lock (held by another process or thread) before it
#: gives up with AuditError. Appends hold it for microseconds: a wait this long means the
#: holder is stopped (Ctrl-Z, SIGSTOP) or hung.
LOCK_SECONDS = 10.0


#: The last default_audit_path() and the environment it was computed from.
_default_path: tuple[tuple[str | None, str | None], Path] | None = None


def default_audit_path() -> Path:
    """``$XDG_STATE_HOME/rlm/audit.jsonl`` (``~/.local/state/rlm/audit.jsonl`` without it, or when
    it is relative: the XDG spec says to ignore a relative value, and a log found by the current
    directory would move with it)."""
    global _default_path
    key = (os.environ.get("XDG_STATE_HOME"), os.environ.get("HOME"))
    if _default_path is not None and _default_path[0] == key:  # pathlib is slow on a cold start
        return _default_path[1]
    state = key[0] if key[0] and os.path.isabs(key[0]) else str(Path.home() / ".local" / "state")
    path = Path(state) / "rlm" / "audit.jsonl"
    _default_path = (key, path)
    return path


_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)
_BASESTRING = json.encoder.encode_basestring  # what _ENCODER writes for a str (ensure_ascii=False)

#: Characters JSON (``ensure_ascii=False``) writes raw that a line must not hold raw: U+0085
#: (NEL), U+2028 and U+2029, where ``str.splitlines()`` ends a line (the others it ends one at
#: are C0 controls, which JSON escapes); the other C1 controls (a terminal may take U+009B for
#: CSI); and the bidirectional controls (U+061C, U+200E, U+200F, U+202A-U+202E, U+2066-U+2069),
#: which make a terminal or an editor show the line's text reordered. Code in a sandbox names
#: its exception class and writes its code: both reach the line. They are written as ``\uXXXX``.
_UNSAFE = re.compile("[\x80-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _u_escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def _string(value: str) -> str:
    """The str *value* as the writer spells it: JSON, with the characters of ``_UNSAFE`` escaped."""
    text = _BASESTRING(value)
    # str.isascii() reads a flag (no scan): the common all-ASCII value costs nothing more.
    return text if value.isascii() else _UNSAFE.sub(_u_escape, text)


def _json(value: Any) -> str:
    """*value* as ``_ENCODER`` writes it, the characters of ``_UNSAFE`` escaped; flat values
    without going through it (3x faster)."""
    kind = type(value)
    if kind is str:
        return _string(value)
    if kind is int:
        return int.__repr__(value)
    if kind is float and math.isfinite(value):
        return float.__repr__(value)
    if value is None:
        return "null"
    if kind is bool:
        return "true" if value else "false"
    text = _ENCODER.encode(value)
    if isinstance(value, (dict, list, tuple)):
        # Keys that are not str ({2: .., 10: ..}) are written as strings but sorted as they
        # were: written as verify reads them back, or it would take the line for an edit.
        text = _ENCODER.encode(json.loads(text))
    # Outside its strings JSON is ASCII: what _UNSAFE finds is inside one, where an escape says the same.
    return text if text.isascii() else _UNSAFE.sub(_u_escape, text)


def encode_fields(fields: Mapping[str, Any]) -> dict[str, str]:
    """Each field as its piece of the canonical JSON (``"key":value``).

    A caller may encode the fields it knows early (the code of a cell, while
    the cell runs) and hand them to :meth:`AuditLog.append` as ``encoded``.
    """
    keys, plain = _KEYS, _BASESTRING  # (an ASCII str, the common value, without a call of ours)
    return {
        key: (keys.get(key) or _key(key))
        + ((plain(value) if value.isascii() else _string(value)) if type(value) is str else _json(value))
        for key, value in fields.items()
    }


#: ``"key":`` per field name seen (the names are this package's own: a few dozen at most).
_KEYS: dict[str, str] = {}


def _key(key: str) -> str:
    piece = f"{_string(key)}:"
    if len(_KEYS) < 1024:
        _KEYS[key] = piece
    return piece


def _canonical(record: Mapping[str, Any], encoded: Mapping[str, str] | None = None) -> bytes:
    """The record (plus the *encoded* pieces) as JSON with sorted keys and no spaces: the bytes
    its hash covers, byte for byte what ``_ENCODER`` writes for the whole record."""
    pieces = encode_fields(record)
    if encoded:
        pieces.update(encoded)
    text = "{" + ",".join([pieces[key] for key in sorted(pieces)]) + "}"
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (a file name that is not UTF-8): UTF-8 cannot carry it
        return _SURROGATE.sub(_escaped, text).encode("utf-8")


#: A lone surrogate, which a str may hold (``os.fsdecode`` of bytes that are not UTF-8, text from a
#: program) and UTF-8 cannot. The line shows it as the text ``\udc80`` (a backslash escaped in the
#: JSON), as the sandbox shows one in what code prints, so every record can be written.
_SURROGATE = re.compile("[\ud800-\udfff]")


def _escaped(match: re.Match[str]) -> str:
    return f"\\\\u{ord(match.group()):04x}"


#: In a body the writer wrote: an escape ``_string`` writes for a character of ``_UNSAFE``, or an
#: escaped backslash (matched whole, so that the text ``\\u2028``, a backslash and "u2028", is not
#: taken for an escape). json's encoder writes those characters raw, never escaped: each such
#: escape in a body is ``_string``'s.
_UNSAFE_ESCAPE = re.compile(rb"\\(?:\\|u(00[89][0-9a-f]|061c|200[ef]|202[89a-e]|206[6-9]))")


def _raw_unsafe(match: re.Match[bytes]) -> bytes:
    code = match.group(1)
    return match.group() if code is None else chr(int(code, 16)).encode()


def _unescaped(body: bytes) -> bytes:
    """*body* (as :func:`_canonical` writes it) as the writer wrote it before it escaped the
    characters of ``_UNSAFE``: with them raw."""
    return _UNSAFE_ESCAPE.sub(_raw_unsafe, body) if b"\\u" in body else body


def _hash_of(prev_hash: str, body: bytes) -> str:
    h = hashlib.sha256(prev_hash.encode() + b"\n")  # fed in two parts: a long body is not copied
    h.update(body)
    return h.hexdigest()


def _line(body: bytes, hash_: str) -> bytes:
    """The line (without its newline) the writer writes for the hashed *body*: ``hash`` spliced
    in as its last key. :func:`verify` accepts no other spelling of a record."""
    return body[:-1] + b',"hash":"' + hash_.encode() + b'"}'


def line_hash(record: dict[str, Any]) -> str:
    """The ``hash`` a record must carry (computed over everything but ``hash``), as the writer
    writes it now: a record with a character of ``_UNSAFE`` from a line written before those
    were escaped carries the hash of its raw spelling instead."""
    body = {k: v for k, v in record.items() if k != "hash"}
    return _hash_of(str(record.get("prev_hash", "")), _canonical(body))


#: (st_dev, st_ino) of an audit file -> (size, mtime_ns, hash) its last append by this process
#: left. An append that finds the file at that size and modification time (under its lock)
#: chains onto that hash instead of reading the last line back: the line is this process's own,
#: from another log object (another sandbox on the same file). Another writer changes the time
#: (and, unless the file was truncated and refilled to the same length, the size).
_heads: dict[tuple[int, int], tuple[int, int, str]] = {}
_HEADS_KEPT = 256


#: (st_dev, st_ino) of an audit file -> the lock this process's appends to it queue on before
#: they take its flock (so the flock is polled for only while another process holds it).
#: Emptied in a forked child: a lock some other thread of the parent held stays held there.
_gates: dict[tuple[int, int], threading.Lock] = {}
_gates_lock = threading.Lock()


def _gate(file: tuple[int, int]) -> threading.Lock:
    gate = _gates.get(file)
    if gate is None:
        with _gates_lock:
            gate = _gates.get(file)
            if gate is None:
                if len(_gates) >= _HEADS_KEPT:  # a gate nobody holds goes (its flock still excludes)
                    idle = next((key for key, held in _gates.items() if not held.locked()), None)
                    if idle is not None:
                        del _gates[idle]
                gate = _gates[file] = threading.Lock()
    return gate


def _attempt(lock: threading.Lock, wait: bool, timeout: float) -> Iterator[bool]:
    """``for got in _attempt(lock, wait, timeout): break``, with ``got = False`` and a
    ``try``/``finally: if got: lock.release()`` around it: *lock* is released if and only if
    it was taken, whatever exception a signal handler (Ctrl-C) raises, wherever it lands.

    Python runs pending signal handlers after every call, also between ``lock.acquire()``
    returning True and the result reaching a variable; an exception then leaves the lock
    taken with nobody to release it (and one raised inside ``acquire``, while it waits, leaves
    it not taken: a ``try`` around the call cannot tell the two apart). Called by the loop
    (``for``) through ``map``, ``acquire`` returns straight into *got*, with no point in
    between where a handler runs. *wait* False: only if it is free now."""
    return map(lock.acquire, (wait,), (timeout if wait else -1,))


#: Every open log of this process: a forked child gives each a fresh lock, and each opens its
#: file anew at its next append (see _after_fork).
_logs: weakref.WeakSet[AuditLog] = weakref.WeakSet()


def _after_fork() -> None:
    """In a forked child: locks other threads of the parent held stay held here, and an
    inherited descriptor shares its flock with the parent's (the two would not exclude each
    other), so the locks are new and each log opens its file again before its next append."""
    global _gates_lock
    _gates.clear()
    _gates_lock = threading.Lock()
    for log in list(_logs):
        log._lock = threading.Lock()
        log._inherited = True


os.register_at_fork(after_in_child=_after_fork)


def _holder(file: tuple[int, int]) -> str:
    """`` (pid N)``: who holds an flock on *file* by ``/proc/locks``; empty if not found."""
    dev, ino = file
    key = f"{os.major(dev):02x}:{os.minor(dev):02x}:{ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            for line in f:
                fields = line.split()
                # "1: FLOCK  ADVISORY  WRITE 1234 fd:00:5678 0 EOF" (blocked waiters carry "->")
                if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == key and fields[4].isdigit():
                    return f" (pid {fields[4]})"
    except OSError:
        pass
    return ""


#: What AuditLog._append returns for a file deleted or renamed away since it was opened.
_DELETED = object()
#: Times one append opens the log at its path again before it gives up.
_REOPENS = 8


def _poll_flock(fd: int, op: int, deadline: float | None) -> bool:
    """Take *fd*'s flock (*op*: ``LOCK_EX`` or ``LOCK_SH``) before *deadline*
    (``time.monotonic``), polling: another process holds it for microseconds, unless it was
    stopped with it. False if it is still held then (at once when *deadline* is None)."""
    delay = 0.00005
    while True:
        try:
            fcntl.flock(fd, op | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if deadline is None:
                return False
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(delay, left))
        delay = min(2 * delay, 0.002)


def _flock(fd: int, deadline: float | None, timeout: float, path: Path, file: tuple[int, int]) -> bool:
    """Take *fd*'s exclusive flock before *deadline* (:func:`_poll_flock`); past it, an
    AuditError naming the holder. *deadline* None: only if it is free now (False if not)."""
    if _poll_flock(fd, fcntl.LOCK_EX, deadline):
        return True
    if deadline is None:
        return False
    raise AuditError(
        f"audit log {path} stayed locked by another process{_holder(file)} for {timeout:g} s;"
        " a process stopped or hung while it appended holds the lock"
    )


def _as_path(path: str | Path) -> Path:
    """*path* as a Path, ``~`` expanded; a Path that needs nothing is used as it is (pathlib
    costs tens of microseconds on a cold start, and a sandbox opens its log when it starts)."""
    p = path if isinstance(path, Path) else Path(path)
    if str(p)[:1] != "~":
        return p
    try:
        return p.expanduser()
    except RuntimeError:  # ~user with no such user, or no home directory to be found
        raise AuditError(f"audit log {str(path)!r}: cannot expand '~' on this host") from None


def _open_log(path: Path, flags: int, follow: bool) -> tuple[int, bool]:
    """Open *path* with *flags* (O_CREAT among them) and whether a symbolic link was followed.

    A link at the path (and at each target in turn) is followed only if *follow* and the link
    itself is owned by this process's effective user or by root: one planted by another user
    who may write the log's directory (not sticky: ``fs.protected_symlinks`` does not cover
    it) would make this process create and append to any file it may write. Each link is
    opened (``O_PATH | O_NOFOLLOW``) and its owner and target read from that descriptor, so
    a link swapped in after the check is not followed; an untrusted one is an AuditError
    (:func:`sandbox.files.open_through_trusted_links`).
    """
    if not follow:
        return os.open(path, flags | os.O_NOFOLLOW, 0o600), False
    try:
        fd, opened = open_through_trusted_links(path, flags, 0o600)
    except UntrustedLinkError as exc:
        raise AuditError(f"audit log {exc.explain(path, exc.link)}") from None
    return fd, opened != os.fspath(path)


class AuditLog:
    """Appends hash-chained lines to one file."""

    def __init__(self, path: str | Path, lock_timeout: float | None = None) -> None:
        """*lock_timeout*: seconds an append waits for the file's lock (default :data:`LOCK_SECONDS`)."""
        self.path = _as_path(path)
        #: The path as opened, made absolute: a later chdir must not make it name another file
        #: (each append compares what it names with the file open, see _replaced).
        self._where = self.path if os.path.isabs(self.path) else Path(os.path.abspath(self.path))
        self._where_str = os.fspath(self._where)  # (what os.lstat takes fastest: 0.7 us less than a Path)
        self.lock_timeout = LOCK_SECONDS if lock_timeout is None else lock_timeout
        if not 0 < self.lock_timeout <= threading.TIMEOUT_MAX:
            raise ValueError(f"lock_timeout must be positive and finite, not {lock_timeout!r}")
        self._fd = -1
        #: Held by an append (and by close, which waits for one): the descriptor and what is known
        #: of the chain belong to one thread at a time, even when the file is replaced meanwhile.
        self._lock = threading.Lock()
        self._close_pending = False
        self._finalized = False  # closed by __del__, not by close() (see append)
        self._linked = False  # the path was a symbolic link when the log was made
        self._inherited = False  # opened by the parent of this forked process (see _after_fork)
        self._open()
        try:
            _logs.add(self)
        except BaseException:  # (a Ctrl-C): the descriptor must not outlive the attempt
            self._close_now()
            raise

    def __del__(self) -> None:
        # A log dropped unclosed: one whose making was cut short after its file was opened
        # (a Ctrl-C as AuditLog() returned, before the caller held it) cannot be closed else.
        if getattr(self, "_fd", -1) >= 0:
            self._close_now()
            self._finalized = True

    def _open(self, again: bool = False) -> None:
        """Open (or create) the file at ``path`` and learn where its chain stands. *again*: the
        file this log had open was deleted; a symbolic link at the path now is followed only if
        the path was one when this log was made (configured so), not one planted since by
        someone who may write the directory. A link is followed only when owned by this
        process's user or root (see :func:`_open_log`)."""
        # read: the last line, through this file; non-blocking: a FIFO at the path must not hang us
        # O_NOCTTY: a terminal at the path must not become this process's controlling terminal
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
        follow = not again or self._linked
        fd = -1
        try:
            try:
                fd, linked = _open_log(self._where, flags, follow)
            except FileNotFoundError:  # its directory is missing: the first log there
                self._where.parent.mkdir(parents=True, exist_ok=True)
                fd, linked = _open_log(self._where, flags, follow)
            if not again:
                self._linked = linked
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):  # a FIFO, a device: a write could block or vanish
                raise OSError(errno.EINVAL, NOT_REGULAR)
            old, self._fd, fd = self._fd, fd, -1  # (one step: ours from here)
        except BaseException as exc:  # a Ctrl-C included: the descriptor must not outlive the attempt
            if fd >= 0:
                os.close(fd)
            if isinstance(exc, OSError):
                raise AuditError(f"cannot open audit log {self.path}: {exc.strerror}") from None
            raise
        if old >= 0:
            os.close(old)
        self._file = (st.st_dev, st.st_ino)
        #: (size, mtime_ns) of the file after the last append this object knows of.
        self._at: tuple[int, int] = (-1, -1)
        self._last = GENESIS
        known = _heads.get(self._file)
        if known is not None and known[:2] == (st.st_size, st.st_mtime_ns):
            self._at, self._last = known[:2], known[2]

    @overload
    def append(
        self, record: dict[str, Any], encoded: Mapping[str, str] | None = None, *, wait: Literal[True] = True
    ) -> dict[str, Any]: ...
    @overload
    def append(
        self, record: dict[str, Any], encoded: Mapping[str, str] | None = None, *, wait: bool
    ) -> dict[str, Any] | None: ...

    def append(
        self, record: dict[str, Any], encoded: Mapping[str, str] | None = None, *, wait: bool = True
    ) -> dict[str, Any] | None:
        """Chain and write *record* plus the fields *encoded* by :func:`encode_fields`;
        return *record* with ``prev_hash`` and ``hash``.

        ``wait=False``: if another writer holds the lock right now, write nothing and return
        None (an event loop then waits for it in a thread instead of on the loop)."""
        timeout = self.lock_timeout
        deadline = time.monotonic() + timeout
        lock = self._lock
        # Both locks are taken through _attempt: a Ctrl-C landing anywhere here cannot leave
        # one held (the gate is process-wide: every later append to the file would wait on it).
        locked = revived = False
        try:
            for locked in _attempt(lock, wait, timeout):  # noqa: B007 (see _attempt)
                break
            if not locked:
                if not wait:
                    return None
                raise AuditError(
                    f"audit log {self.path}: another append through this log took over {timeout:g} s"
                )
            if self._fd < 0 and self._finalized and not self._close_pending:
                # Closed by its finalizer, not by close(): the garbage collector finalized it
                # before a call it was collected with, which writes its line now (an
                # AsyncSandbox execute left pending on a closed loop: its "cancelled" line was
                # lost, with an "Exception ignored" traceback). Opened again for that line
                # (a link at the path followed only if it was one at first), closed after it.
                self._open(again=True)
                revived = True
            if self._fd < 0 or self._close_pending:
                raise AuditError(f"audit log {self.path} is closed")
            if self._inherited:  # opened by the parent: a description of our own
                self._open()
                self._inherited = False
            gate = _gate(self._file)
            gated = False
            try:
                for gated in _attempt(gate, wait, max(0.0, deadline - time.monotonic())):  # noqa: B007 (see _attempt)
                    break
                if not gated:
                    if not wait:
                        return None
                    holder = _holder(self._file)  # what the append ahead of this one waits for, if anyone
                    raise AuditError(
                        f"audit log {self.path}: waited {timeout:g} s behind another append of this process"
                        + (f", itself waiting for the lock another process{holder} holds" if holder else "")
                    )
                done = self._append(record, encoded, deadline if wait else None)
                reopened = 0
                while done is _DELETED:  # deleted or renamed away: the file at the path, maybe a new chain
                    if reopened == _REOPENS:
                        raise AuditError(
                            f"audit log {self.path} was deleted or replaced each time it was opened again"
                            f" ({reopened} times)"
                        )
                    self._open(again=True)
                    reopened += 1
                    done = self._append(record, encoded, deadline if wait else None)
                return done  # type: ignore[no-any-return]
            finally:
                if gated:
                    gate.release()
        finally:
            if locked:
                if revived:
                    self._close_now()
                lock.release()
                # A close gave up waiting for this append: it ends here. Looked at after the
                # release, as close() sets the flag before it tries the lock once more: one of
                # the two closes.
                if self._close_pending:
                    self._close_if_free()

    def _replaced(self) -> bool:
        """Whether the path no longer names the file open: it was renamed away (logrotate's
        ``create``, a ``mv``) or removed and maybe replaced. Appends then go to the file at the
        path (created if none is there), never to the renamed one: one moved aside by a rotation
        would be written on for as long as the process lives, and a line written while it was
        compressed (read, then unlinked) would be lost. Looked at under the flock, so at most
        the append in flight as the file is renamed lands in it: once its lock is free (what
        ``verify`` waits for), the renamed file is final."""
        try:
            st = os.stat(self._where_str) if self._linked else os.lstat(self._where_str)
        except (FileNotFoundError, NotADirectoryError):
            return True
        except OSError:  # (a directory on the way made unsearchable): not known to be replaced
            return False
        return (st.st_dev, st.st_ino) != self._file

    def _close_if_free(self) -> None:
        """Close the file now unless an append (or a close) holds the log's lock."""
        lock = self._lock
        locked = False
        try:
            for locked in _attempt(lock, False, 0):  # noqa: B007 (see _attempt)
                break
            if locked:
                self._close_now()
        finally:
            if locked:
                lock.release()

    def _append(
        self, record: dict[str, Any], encoded: Mapping[str, str] | None, deadline: float | None
    ) -> Any:
        """The append under this process's gate; *deadline* None: only if the flock is free now."""
        given = record
        try:
            try:  # the flock taken inside: a Ctrl-C just after it must not leave it held
                if not _flock(self._fd, deadline, self.lock_timeout, self.path, self._file):
                    return None
                st = os.fstat(self._fd)
                if st.st_nlink == 0 or self._replaced():  # lines written here would be lost, or go astray
                    return _DELETED
                size, at = st.st_size, (st.st_size, st.st_mtime_ns)
                seal = b""
                if at != self._at:  # written (or truncated) since this object's last append
                    known = _heads.get(self._file)
                    if known is not None and known[:2] == at:  # by another log object of ours
                        self._last = known[2]
                    else:  # by someone else: read what is there
                        for _ in range(_REOPENS):
                            try:
                                tail = _read_tail(self._fd, size)
                                break
                            except _Shrank:  # truncated under the lock (copytruncate): read it again
                                size = os.fstat(self._fd).st_size
                        else:
                            raise OSError(errno.EIO, "the audit log shrank each time it was read")
                        self._last = tail.prev_hash
                        if tail.seal:
                            seal = b"\n"
                        if tail.torn is not None:
                            record = dict(record, torn_before=tail.torn)
                record, line = _chained(record, self._last, encoded)
                line = seal + line + b"\n"
                _write_all(self._fd, line)
                after = os.fstat(self._fd)  # what the next append compares (still under the lock)
                if after.st_size == len(line) and size:
                    # Truncated between the fstat above and the write, by one that ignores the lock
                    # (logrotate's copytruncate: a busy log is locked most of the time, so most
                    # truncations land inside an append): the line begins the file, chained onto
                    # a line that is not there. It is the file's only line and the lock is ours:
                    # written again, as the first line of a new chain.
                    os.ftruncate(self._fd, 0)
                    record, line = _chained(given, GENESIS, encoded)
                    line += b"\n"
                    _write_all(self._fd, line)
                    size = 0
                    after = os.fstat(self._fd)
                self._last = record["hash"]
                if after.st_size != size + len(line):
                    # Changed by someone outside the lock (truncated after the write, say): what
                    # this line left is not known, and the next append reads the tail.
                    self._at = (-1, -1)
                    _heads.pop(self._file, None)
                    return record
                self._at = (after.st_size, after.st_mtime_ns)
                if self._file not in _heads and len(_heads) >= _HEADS_KEPT:
                    with contextlib.suppress(RuntimeError, StopIteration, KeyError):
                        del _heads[next(iter(_heads))]
                _heads[self._file] = (*self._at, self._last)
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        except OSError as exc:
            raise AuditError(f"cannot write audit log {self.path}: {exc.strerror}") from None
        return record

    def close(self) -> None:
        """Close the file once no append uses it: an append in flight (from another thread)
        finishes first, or closes it itself if it takes longer than ``lock_timeout``."""
        lock = self._lock
        locked = False
        try:
            for locked in _attempt(lock, True, self.lock_timeout):  # noqa: B007 (see _attempt)
                break
            if locked:
                self._close_now()
                return
        finally:
            if locked:
                lock.release()
        self._close_pending = True  # the append in flight closes it as it ends ...
        self._close_if_free()  # ... unless it ended between the timeout and the flag: then here

    def _close_now(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


def _chained(
    record: dict[str, Any], prev: str, encoded: Mapping[str, str] | None
) -> tuple[dict[str, Any], bytes]:
    """*record* chained onto the line whose hash is *prev* (with its ``prev_hash`` and ``hash``),
    and its line, newline excluded: encoded once, the hashed body with "hash" spliced in."""
    record = dict(record, prev_hash=prev)
    body = _canonical(record, encoded)
    record["hash"] = _hash_of(prev, body)
    return record, _line(body, record["hash"])


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


#: Bytes read per step when looking backwards for the start of the last line.
TAIL_BLOCK = 65536


class _Shrank(OSError):
    """The log is shorter than its size said a moment ago: truncated while it was read."""

    def __init__(self) -> None:
        super().__init__(errno.EIO, "the audit log shrank while it was read")


def _line_before(fd: int, end: int) -> tuple[int, bytes]:
    """Where the line that ends at *end* (newline excluded) starts, and its bytes.

    Reads backwards one block at a time and searches only the new block, so the
    cost is linear in the line's length.
    """
    chunks: list[bytes] = []
    pos = end
    while pos > 0:
        step = min(TAIL_BLOCK, pos)
        pos -= step
        chunk = os.pread(fd, step, pos)
        if len(chunk) != step:
            raise _Shrank
        cut = chunk.rfind(b"\n")
        if cut >= 0:
            chunks.append(chunk[cut + 1 :])
            pos += cut + 1
            break
        chunks.append(chunk)
    chunks.reverse()
    return pos, b"".join(chunks)


def _record_hash(raw: bytes) -> str | None:
    """The ``hash`` of an audit line, or None if *raw* is not one."""
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nested too deeply to parse
        return None
    if isinstance(value, dict) and isinstance(value.get("hash"), str):
        return str(value["hash"])
    return None


def _torn(fragment: bytes) -> dict[str, Any]:
    return {"bytes": len(fragment), "sha256": hashlib.sha256(fragment).hexdigest()}


@dataclass(frozen=True)
class _Tail:
    prev_hash: str  # the hash the next line chains onto
    seal: bool = False  # the file does not end with a newline: write one first
    torn: dict[str, Any] | None = None  # the cut-off last line the next line records


def _read_tail(fd: int, size: int) -> _Tail:
    """How the file open as *fd* ends (*size* bytes long): read through that descriptor, not
    by name (a log renamed away by a rotation is still the file its writers append to)."""
    if size == 0:
        return _Tail(GENESIS)
    complete = os.pread(fd, 1, size - 1) == b"\n"
    start, last = _line_before(fd, size - 1 if complete else size)
    found = _record_hash(last)
    if found is not None:
        return _Tail(found, seal=not complete)
    # A write cut off by a crash, maybe several in a row (the append that was to record a
    # fragment cut off too, after its newline or within its line): everything after the last
    # record line is one torn region. Chain onto that line and record the region.
    end = size - 1 if complete else size
    prev = GENESIS
    while start > 0:
        before, line = _line_before(fd, start - 1)
        found = _record_hash(line)
        if found is not None:
            prev = found
            break
        start = before
    torn = _torn(last) if end - start == len(last) else _torn_region(fd, start, end)  # one line: read already
    return _Tail(prev, seal=not complete, torn=torn)


def _torn_region(fd: int, start: int, end: int) -> dict[str, Any]:
    """:func:`_torn` of the bytes from *start* to *end* of *fd*, read a block at a time."""
    h = hashlib.sha256()
    pos = start
    while pos < end:
        chunk = os.pread(fd, min(TAIL_BLOCK, end - pos), pos)
        if not chunk:
            raise _Shrank
        h.update(chunk)
        pos += len(chunk)
    return {"bytes": end - start, "sha256": h.hexdigest()}


@dataclass(frozen=True)
class VerifyReport:
    """Result of :func:`verify`: ``ok``, lines read, and the first bad line (1-based) with why.

    ``torn_lines`` are lines cut off by a crash mid-append that the line after
    them records (``torn_before``, one region of one or more lines); they do not
    break the chain. ``last_hash``
    is the ``hash`` of the last line of a chain that verified (None for an
    empty log): lines cut off the *end* leave a shorter chain that verifies
    too, so keep it elsewhere and pass it to :func:`verify` as ``expect``
    later. ``missing``: the hashes of ``expect`` that are the ``hash`` of no
    line of a chain that verified (``ok`` False, ``bad_line`` None).
    """

    ok: bool
    lines: int
    bad_line: int | None = None
    reason: str | None = None
    torn_lines: tuple[int, ...] = ()
    last_hash: str | None = None
    missing: tuple[str, ...] = ()


#: A hash as the writer writes it: 64 lowercase hex digits.
_HASH = re.compile("[0-9a-f]{64}")
_DECODER = json.JSONDecoder()
#: What _prev_hash_in returns for a line that holds no complete top-level prev_hash.
_ABSENT = object()


def _prev_hash_in(fragment: bytes) -> object:
    """The value of the top-level ``prev_hash`` field a line that is no record holds whole
    (the writer's is a string: whole with its closing quote), or ``_ABSENT``. A line cut off
    by a crash is a prefix of a line the writer wrote: its fields are read in order until one
    is cut off (or is not JSON)."""
    text = fragment.decode("utf-8", "replace")  # (a character cut in two comes last)
    if text[:1] != "{":
        return _ABSENT
    pos = 1
    try:
        while text[pos] == '"':
            key, pos = _DECODER.raw_decode(text, pos)  # (a string: it starts with a quote)
            if text[pos] != ":":
                break
            value, pos = _DECODER.raw_decode(text, pos + 1)
            if key == "prev_hash":
                return value
            if text[pos] != ",":
                break
            pos += 1
    except (ValueError, IndexError, RecursionError):  # cut off (or no JSON from here on)
        pass
    return _ABSENT


def _stray(raw: bytes, prev: str) -> bool:
    """Whether the line *raw* of a torn region (after the chain's line *prev*) cannot be the
    start of an append cut off by a crash.

    An append chains onto the last complete line of the file (the lines of a torn region are
    none): a line cut off anywhere after its ``prev_hash`` holds that line's hash. One that
    holds another hash was not cut off there: lines were removed before it, or it was made
    from a complete line later in the chain (cut off, with the lines after it, and more
    appended since)."""
    if b'"prev_hash":' not in raw:
        return False
    held = _prev_hash_in(raw)
    return held is not _ABSENT and held != prev


_STRAY = (
    "a cut-off line whose prev_hash is not the hash of the last complete line before it: no"
    " append cut off by a crash leaves that (lines were removed, cut off or edited)"
)


#: Bytes :func:`verify` reads at a time: it holds one block and one line (however long), never
#: the whole log (a log of months runs to gigabytes).
READ_BLOCK = 1 << 20


def _lines(fd: int, size: int, cut: list[bool]) -> Iterator[bytes]:
    """The lines of the first *size* bytes of *fd*, without their newlines, one at a time; a
    last line without a newline too, and then ``cut[0]`` is True. Read a block at a time: a
    line is joined from its pieces once, when its newline is found (linear in its length)."""
    pos = 0
    parts: list[bytes] = []
    while pos < size:
        block = os.pread(fd, min(READ_BLOCK, size - pos), pos)
        if not block:  # truncated under us (a copytruncate rotation)
            raise _Shrank
        pos += len(block)
        pieces = block.split(b"\n")
        if len(pieces) == 1:
            parts.append(block)
            continue
        if parts:
            parts.append(pieces[0])
            pieces[0] = b"".join(parts)
        parts = [pieces[-1]] if pieces[-1] else []
        del pieces[-1]
        yield from pieces
        del pieces
    if parts:
        cut[0] = True
        yield b"".join(parts)


def _snapshot(fd: int, deadline: float) -> tuple[int, bool]:
    """The size of the log open as *fd* at a moment no append was writing to it, and True; or
    its size now and False when the append lock stayed held until *deadline*.

    An append writes its line under an exclusive ``flock``, and a reader may see the first
    part of a line being written (the kernel copies a write into the file a page at a time,
    and the size grows with each page). Taken shared, for as long as an ``fstat`` takes, the
    lock waits for the append in flight to end; appends after it only add bytes past that
    size, and verification reads no further: the log is checked as it stood then."""
    if not _poll_flock(fd, fcntl.LOCK_SH, deadline):
        return os.fstat(fd).st_size, False
    try:
        return os.fstat(fd).st_size, True
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def _body(record: dict[str, Any]) -> bytes:
    """:func:`_canonical` of a record parsed from a line (str keys only), through the C encoder
    in one call (2-3x faster than field by field): byte for byte the same, as the writer's
    pieces are ``_ENCODER``'s with the characters of ``_UNSAFE`` escaped, and those are only
    ever inside strings, where escaping the whole text escapes the same ones."""
    text = _ENCODER.encode(record)
    if not text.isascii():
        text = _UNSAFE.sub(_u_escape, text)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: as _canonical spells it
        return _SURROGATE.sub(_escaped, text).encode("utf-8")


def verify(
    path: str | Path, expect: str | Iterable[str] = (), *, lock_timeout: float | None = None
) -> VerifyReport:
    """Check the whole chain; name the first line that breaks it (or is not spelled as the
    writer writes it).

    *expect*: hashes kept elsewhere (a ``last_hash`` an earlier verify reported, say), each
    of which must be the ``hash`` of a line of the chain: one that is not means lines were
    cut off, even when the log grew again since (a cut-off line looks like a crash's and the
    next append records it). The report then fails naming them (``missing``). A value that is
    not 64 lowercase hex digits is a ValueError.

    The log is read a line at a time (memory: the longest line, not the file), up to its size
    when verification starts, taken under the append lock (shared, for an instant: see
    :func:`_snapshot`), so a line an append is writing meanwhile is neither read in part nor
    reported. *lock_timeout*: seconds to wait for that lock (default :data:`LOCK_SECONDS`);
    held longer (a writer stopped while it appended), the log is read as it is, and an
    incomplete last line found then is said to be maybe that writer's.
    """
    kept = [expect] if isinstance(expect, str) else list(expect)
    for value in kept:
        if not isinstance(value, str) or not _HASH.fullmatch(value):
            raise ValueError(f"expect: {value!r} is not a hash (64 lowercase hex digits)")
    timeout = LOCK_SECONDS if lock_timeout is None else lock_timeout
    if not 0 <= timeout <= threading.TIMEOUT_MAX:
        raise ValueError(f"lock_timeout must be non-negative and finite, not {lock_timeout!r}")
    wanted = set(kept)
    try:
        fd = os.open(_as_path(path), os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as exc:
        raise AuditError(f"cannot read audit log {path}: {exc.strerror}") from None
    try:
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):  # a FIFO, a device, a directory
                raise OSError(errno.EINVAL, NOT_REGULAR)
            size, quiet = _snapshot(fd, time.monotonic() + timeout)
            holder = "" if quiet else _holder((st.st_dev, st.st_ino))
            return _verify_lines(fd, size, kept, wanted, quiet, holder)
        except OSError as exc:
            raise AuditError(f"cannot read audit log {path}: {exc.strerror}") from None
    finally:
        os.close(fd)


def _verify_lines(
    fd: int, size: int, kept: list[str], wanted: set[str], quiet: bool, holder: str
) -> VerifyReport:
    """:func:`verify` of the first *size* bytes of *fd*; *quiet*: read while no append wrote."""
    prev = GENESIS
    torn: list[int] = []
    # Lines that are no record, maybe torn writes: where they start, their count, the size and
    # sha256 of their bytes joined by newlines (what the next record's torn_before must say),
    # whether one starts as an append does, and the first that no crash leaves (see _stray).
    pending = 0
    region_lines = 0
    region = hashlib.sha256()
    region_bytes = 0
    region_brace = False
    region_stray: int | None = None
    bad_why = ""
    count = 0
    cut = [False]  # the last line has no newline

    def bad(line: int, reason: str) -> VerifyReport:
        return VerifyReport(False, count, line, reason, tuple(torn))

    for count, raw in enumerate(_lines(fd, size, cut), start=1):
        try:
            record = json.loads(raw)
        except (ValueError, RecursionError):  # RecursionError: nested too deeply to parse
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("hash"), str):
            if not pending:
                pending, region_lines, region, region_bytes = count, 0, hashlib.sha256(), 0
                region_brace, region_stray = False, None
                bad_why = "not valid JSON" if record is None else "not an audit record"
            else:  # writes cut off in a row: one torn region, recorded as one
                region.update(b"\n")
                region_bytes += 1
            region.update(raw)
            region_bytes += len(raw)
            region_lines += 1
            region_brace = region_brace or raw.startswith(b"{")
            if region_stray is None and _stray(raw, prev):
                region_stray = count
            continue
        if pending:
            if record.get("torn_before") != {"bytes": region_bytes, "sha256": region.hexdigest()}:
                return bad(pending, bad_why)
            if region_stray is not None:
                return bad(region_stray, _STRAY)
            torn.extend(range(pending, count))
            pending = 0
        elif "torn_before" in record:
            return bad(count, "records a cut-off line before it that is not there")
        if record.get("prev_hash") != prev:
            return bad(
                count, "prev_hash does not match the line before (a line was dropped, inserted or moved)"
            )
        hash_ = record.pop("hash")
        try:
            body: bytes | None = _body(record)
        except (UnicodeEncodeError, RecursionError):  # a lone surrogate (an escape UTF-8 cannot carry)
            body = None  # the writer cannot write such a line: only an edit puts it there
        spelled = b"" if body is None else _line(body, hash_)  # the writer's spelling
        if body is not None and raw != spelled:
            # Written before the writer escaped the characters of _UNSAFE (they are raw in the
            # line): that spelling is the writer's too. Accepting it lets no edit through: the
            # hash covers the line's bytes as spelled, so a line whose spelling was swapped for
            # the other (raw for escaped, or back) without hashing it again fails just below.
            old = _unescaped(body)
            if old != body and raw == _line(old, hash_):
                body, spelled = old, raw
        if body is None or _hash_of(prev, body) != hash_:
            return bad(count, "hash does not match the line's content (the line was edited)")
        # The hash covers the values json.loads keeps, not the bytes: a key given twice (the
        # parser keeps the last, grep and a reader see the first), added spaces or escapes
        # leave it matching. The writer's spelling of a record is one: any other is an edit.
        if raw != spelled:
            return bad(
                count,
                "the line is not spelled as the writer writes it (a key given twice, spaces or"
                " escapes changed): the line was edited",
            )
        prev = hash_
        if wanted:
            wanted.discard(prev)
    if pending:
        if region_stray is not None:
            return bad(region_stray, _STRAY)
        if cut[0] and pending == 1 and not region_brace:
            # Nothing a writer began (every append starts a line with "{"): /bin/ls, a text file.
            return bad(
                1, "no audit record in the file (it is not an audit log, or every write to it was cut off)"
            )
        if cut[0]:
            busy = (
                ""
                if quiet
                else f"; another process{holder} held the log's lock while it was read, and may be writing it"
            )
            return bad(
                pending,
                "incomplete last line (a write cut off, e.g. by a crash); the lines before it "
                f"verify, and the next append records it{busy}"
                if region_lines == 1
                else f"incomplete last lines {pending}-{count} (writes cut off, e.g. by crashes);"
                f" the lines before them verify, and the next append records them{busy}",
            )
        return bad(pending, bad_why)
    if wanted:
        missing = tuple(dict.fromkeys(value for value in kept if value in wanted))
        return VerifyReport(
            False,
            count,
            reason=f"kept hash{'es' if len(missing) > 1 else ''} {', '.join(missing)} not in the log:"
            " lines were cut off (a cut-off line is taken for a crash's, and more may have been"
            " appended since) or the log was replaced",
            torn_lines=tuple(torn),
            missing=missing,
        )
    return VerifyReport(True, count, torn_lines=tuple(torn), last_hash=None if prev == GENESIS else prev)
