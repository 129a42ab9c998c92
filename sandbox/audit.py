"""The tamper-evident audit log: one hash-chained JSON line per ``execute``.

Each line holds what ran (the code and its sha256), under which policy (name,
schema version, sha256), what came of it, and two hashes: ``prev_hash`` (the
``hash`` of the line before, 64 zeros for the first line) and ``hash``, the
sha256 of ``prev_hash`` joined to the canonical JSON of the line without its
``hash``. Editing, dropping or reordering any line breaks the chain at that
line, which :func:`verify` names. (Cutting lines off the *end* leaves a valid
shorter chain; keep the last hash elsewhere if that matters to you.)

Several sandboxes, in one process or many, may share a file: each append
takes an exclusive ``flock`` and re-reads the last line only when someone
else has written since.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandbox.errors import AuditError

__all__ = ["GENESIS", "AuditLog", "VerifyReport", "default_audit_path", "line_hash", "verify"]

GENESIS = "0" * 64


def default_audit_path() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "rlm" / "audit.jsonl"


_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _canonical(record: dict[str, Any]) -> bytes:
    return _ENCODER.encode(record).encode("utf-8")


def _hash_of(prev_hash: str, body: bytes) -> str:
    return hashlib.sha256(prev_hash.encode() + b"\n" + body).hexdigest()


def line_hash(record: dict[str, Any]) -> str:
    """The ``hash`` a record must carry (computed over everything but ``hash``)."""
    body = {k: v for k, v in record.items() if k != "hash"}
    return _hash_of(str(record.get("prev_hash", "")), _canonical(body))


class AuditLog:
    """Appends hash-chained lines to one file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise AuditError(f"cannot open audit log {self.path}: {exc.strerror}") from None
        self._end = -1  # file size after our last append; -1: unknown
        self._last = GENESIS

    def append(self, record: dict[str, Any]) -> dict[str, Any]:
        """Chain and write *record*; return it with ``prev_hash`` and ``hash``."""
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                size = os.fstat(self._fd).st_size
                if size != self._end:
                    self._last = _last_hash(self.path, size)
                record = dict(record, prev_hash=self._last)
                body = _canonical(record)
                record["hash"] = _hash_of(self._last, body)
                # Encode once: the line is the hashed body with "hash" spliced in.
                line = body[:-1] + b',"hash":"' + record["hash"].encode() + b'"}\n'
                os.write(self._fd, line)
                self._end = size + len(line)
                self._last = record["hash"]
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        except OSError as exc:
            raise AuditError(f"cannot write audit log {self.path}: {exc.strerror}") from None
        return record

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _last_hash(path: Path, size: int) -> str:
    if size == 0:
        return GENESIS
    with open(path, "rb") as f:
        block = 65536
        pos = size
        tail = b""
        while pos > 0:
            step = min(block, pos)
            pos -= step
            f.seek(pos)
            tail = f.read(step) + tail
            cut = tail.rstrip(b"\n").rfind(b"\n")
            if cut >= 0:
                tail = tail[cut + 1 :]
                break
    try:
        value = json.loads(tail)["hash"]
    except (ValueError, KeyError, TypeError):
        raise AuditError(f"audit log {path} ends with a damaged line; run `rlm audit verify` on it") from None
    if not isinstance(value, str):
        raise AuditError(f"audit log {path} ends with a damaged line")
    return value


@dataclass(frozen=True)
class VerifyReport:
    """Result of :func:`verify`: ``ok``, lines read, and the first bad line (1-based) with why."""

    ok: bool
    lines: int
    bad_line: int | None = None
    reason: str | None = None


def verify(path: str | Path) -> VerifyReport:
    """Check the whole chain; name the first line that breaks it."""
    prev = GENESIS
    count = 0
    try:
        lines = Path(path).expanduser().read_bytes().splitlines()
    except OSError as exc:
        raise AuditError(f"cannot read audit log {path}: {exc.strerror}") from None
    for count, raw in enumerate(lines, start=1):
        try:
            record = json.loads(raw)
        except ValueError:
            return VerifyReport(False, count, count, "not valid JSON")
        if not isinstance(record, dict) or not isinstance(record.get("hash"), str):
            return VerifyReport(False, count, count, "not an audit record")
        if record.get("prev_hash") != prev:
            return VerifyReport(
                False,
                count,
                count,
                "prev_hash does not match the line before (a line was dropped, inserted or moved)",
            )
        if line_hash(record) != record["hash"]:
            return VerifyReport(
                False, count, count, "hash does not match the line's content (the line was edited)"
            )
        prev = record["hash"]
    return VerifyReport(True, count)
