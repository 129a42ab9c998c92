"""The output of a batch: a JSONL file of results, written so that a crash never corrupts it.

Rules that make a batch resumable:

- each result is one line, written with a single ``write`` on a file opened
  ``O_APPEND``; nothing is buffered in this process, so a kill (``-9``
  included) leaves the lines written so far, whole;
- one batch at a time writes a file: a second one is refused while the first
  holds ``OUT.lock`` (an ``flock``, released by the kernel when the holder
  dies, so a killed batch never blocks the next one), and while the first
  holds an ``flock`` on OUT itself, which follows the file, not its name: a
  batch writing the same file under another name (a hard link) is refused
  too. OUT is created under ``OUT.lock`` when missing, then locked, and read
  through the descriptor it is locked and written through;
- on opening, a last line without its newline (a write cut by a crash or a
  full disk) is dropped, and so are records that stand for no real run
  (``stop_reason`` ``"skipped"`` or ``"bad_input"``): those items run again.
  Such a repair writes a new file beside OUT (created under a random name,
  so nothing planted there is written through, with OUT's permissions) and
  renames it over OUT, so a crash during the repair leaves the old file or
  the new one, never half;
- the ids of the remaining records are the items already done (and those
  whose record has no answer, the ``error`` lines, are the ones that failed);
- OUT and ``OUT.lock`` must be regular files: a FIFO there (opening it would
  wait for its other end, forever) or a device is refused, not waited on;
- OUT deleted (or renamed over) while the batch runs is noticed at the next
  append, which raises: the lines written since went to a file nobody can
  open, so the batch stops instead of spending on runs whose results are lost;
- OUT may be a symbolic link: the file it leads to is the one locked,
  repaired and written (its lock beside it, so a batch writing it under
  another name is refused too, and the repair renames over that file, never
  over the link). A link at OUT (and each one after it) is followed only
  when the link is owned by this process's effective user or by root, as
  for an audit log: one planted by another user who may write OUT's
  directory would have the batch create and append to any file it may
  write. ``OUT.lock`` is never opened through a link: a link there is
  refused (the lock file is truncated: through a link planted there it
  would be another file).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import stat
from pathlib import Path
from types import TracebackType
from typing import Any

from rlm.errors import ConfigurationError
from rlm.files import open_regular, replace_file
from sandbox.files import UntrustedLinkError, read_trusted_link

__all__ = ["RECORD_FIELDS", "RERUN_STOP_REASONS", "ResultsFile", "encode_record", "spent_usd"]

#: Symbolic links OUT may lead through (the kernel's own limit is 40).
_LINK_HOPS = 8


def _followed(path: Path) -> Path:
    """The file *path* leads to: the symbolic links at its end followed, each only when the link
    itself is owned by this process's effective user or by root (read from the link's own
    ``O_PATH`` descriptor); its directory's links resolved. ConfigurationError otherwise. The
    file is then opened with ``O_NOFOLLOW``: a link swapped in after this is refused, not followed.
    """
    target = os.fspath(path)
    for _ in range(_LINK_HOPS + 1):
        try:
            dest = read_trusted_link(target)
        except UntrustedLinkError as exc:
            raise ConfigurationError(exc.explain(path, target)) from None
        except OSError as exc:
            raise ConfigurationError(f"{path}: {exc.strerror or exc}") from None
        if dest is None:
            break  # no link: the file itself, or nothing there yet (it is created there)
        target = os.path.join(os.path.dirname(target), dest)
    else:
        raise ConfigurationError(f"{path}: more than {_LINK_HOPS} symbolic links in a row")
    parent, name = os.path.split(target)
    return Path(os.path.realpath(parent or ".")) / name


#: The fields of an output line, in order.
RECORD_FIELDS: tuple[str, ...] = (
    "id",
    "answer",
    "stop_reason",
    "iterations",
    "sub_calls",
    "input_tokens",
    "output_tokens",
    "cost_usd",
    "time_s",
    "error",
    "priced_usd",
    "question_sha256",
)


def spent_usd(record: dict[str, Any]) -> float:
    """What an output line counts towards the batch's budget: the run's priced calls
    (``priced_usd``; ``cost_usd`` in lines written before it), 0 for an item that did not run."""
    for key in ("priced_usd", "cost_usd"):
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return max(0.0, float(value))
    return 0.0


#: Records with these stop reasons are not runs: a rerun drops them and tries their items again.
RERUN_STOP_REASONS: frozenset[str] = frozenset({"skipped", "bad_input"})


def encode_record(record: dict[str, Any]) -> bytes:
    """One output line (UTF-8, ending in a newline); text that is not valid Unicode is escaped."""
    try:
        return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate in an answer: \\u escapes keep the line valid JSON
        return (json.dumps(record, ensure_ascii=True) + "\n").encode("ascii")


def _record_id(line: bytes) -> tuple[str, dict[str, Any]] | None:
    try:
        data = json.loads(line)
    except (ValueError, RecursionError):  # RecursionError: nested too deeply for Python's parser
        return None
    if isinstance(data, dict) and isinstance(data.get("id"), str):
        return data["id"], data
    return None


class ResultsFile:
    """The output file of one batch, locked for the batch's lifetime.

    ``with ResultsFile(path) as out:`` takes the lock, repairs the file and
    reads it; ``out.done`` is then the set of ids already recorded and
    ``out.append(record)`` adds one line. Raises ConfigurationError when
    another batch holds the file or a line of it is not a result record.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.name:  # "", "." or "/": a directory, and no name to put OUT.lock beside
            raise ConfigurationError(f"{self.path}: not a regular file")
        #: The file written: :attr:`path` with its symbolic links followed (when it is opened).
        self.file = self.path
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.done: set[str] = set()
        #: The ids in :attr:`done` whose record has no answer (a run that failed): the batch's exit
        #: status counts them, and a rerun does not run them again.
        self.unanswered: set[str] = set()
        #: USD the runs already in the file spent (their priced calls): a resumed batch's budget
        #: counts them.
        self.spent_usd = 0.0
        #: The question each id of :attr:`done` answered, for the records that say
        #: (``question_sha256``; lines written before it was recorded do not).
        self.questions: dict[str, str] = {}
        self.dropped = 0  # lines dropped by the repair (cut lines, skipped and bad-input records)
        #: OUT did not exist: this batch made it (see :meth:`discard_if_unused`).
        self.created = False
        self._lock_fd: int | None = None
        self._fd: int | None = None

    # ------------------------------------------------------------------ lock
    def _take_lock(self) -> None:
        while True:
            try:
                fd = open_regular(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError as exc:
                why = "a symbolic link, refused" if exc.errno == errno.ELOOP else exc.strerror or exc
                raise ConfigurationError(f"{self.lock_path}: {why}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise ConfigurationError(
                    f"{self.path}: another rlm batch is writing this file (it holds {self.lock_path})"
                ) from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.lock_path))
            except FileNotFoundError:
                same = False  # the previous holder removed it after we opened it: take a fresh one
            if same:
                self._lock_fd = fd
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                return
            os.close(fd)

    def _release_lock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.lock_path)  # unlinked while still held: a waiter re-checks the inode
        os.close(fd)

    # ---------------------------------------------------------------- repair
    def _load(self) -> bool:
        """Read OUT through the locked descriptor and repair it; True when it was replaced."""
        assert self._fd is not None
        try:
            mode = stat.S_IMODE(os.fstat(self._fd).st_mode)
            chunks = []
            offset = 0
            while chunk := os.pread(self._fd, 1 << 20, offset):
                chunks.append(chunk)
                offset += len(chunk)
            data = b"".join(chunks)
        except OSError as exc:
            raise ConfigurationError(f"{self.path}: {exc.strerror or exc}") from None
        kept: list[bytes] = []
        lines = data.split(b"\n")
        tail = lines.pop()  # b"" when the file ends with a newline
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                self.dropped += 1
                continue
            parsed = _record_id(line)
            if parsed is None:
                raise ConfigurationError(
                    f"{self.path}: line {number} is not a batch result; fix it or write to another file"
                )
            self._keep(parsed, line, kept)
        if tail.strip():
            parsed = _record_id(tail)
            if parsed is None:
                self.dropped += 1  # a line cut short by a crash: its item runs again
            else:
                self._keep(parsed, tail, kept)  # whole but without its newline: the rewrite adds it
        if self.dropped or tail:
            self._replace(kept, mode)
            return True
        return False

    def _keep(self, parsed: tuple[str, dict[str, Any]], line: bytes, kept: list[bytes]) -> None:
        record_id, record = parsed
        if record.get("stop_reason") in RERUN_STOP_REASONS or record_id in self.done:
            self.dropped += 1
            return
        self.done.add(record_id)
        if record.get("answer") is None:
            self.unanswered.add(record_id)
        if isinstance(question := record.get("question_sha256"), str):
            self.questions[record_id] = question
        self.spent_usd += spent_usd(record)
        kept.append(line + b"\n")

    def _replace(self, lines: list[bytes], mode: int) -> None:
        # A new file (never one planted at its temporary name), renamed over OUT, with OUT's mode
        # (less the umask: never looser): answers kept private (0600) must not become readable.
        try:
            replace_file(self.file, lines, mode=mode, fsync=True)
        except OSError as exc:
            raise ConfigurationError(f"{self.path}: cannot repair the file: {exc.strerror or exc}") from None

    # ------------------------------------------------------------- lifecycle
    def open(self) -> ResultsFile:
        # OUT's links followed once, here: the lock, the repair and the appends all act on the file
        # they lead to (a link elsewhere to the same file finds the same lock).
        self.file = _followed(self.path)
        self.lock_path = self.file.with_name(self.file.name + ".lock")
        self._take_lock()
        try:
            self.created = not os.path.lexists(self.file)  # under the lock: no batch makes it meanwhile
            self._fd = self._open_locked()
            if self._load():  # a new file was renamed over OUT: lock and write that one
                old, self._fd = self._fd, None
                os.close(old)
                self._fd = self._open_locked()
        except BaseException:
            self.close()
            raise
        return self

    def _open_locked(self) -> int:
        """OUT opened for reading and appending (created when missing, under OUT.lock), with an
        ``flock`` on the file itself: OUT.lock is found by name, and a hard link is another name
        of the same file, whose batch takes another OUT.lock but meets this lock."""
        try:
            fd = open_regular(self.file, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            raise ConfigurationError(f"{self.path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise ConfigurationError(f"{self.path}: cannot lock: {exc.strerror or exc}") from None
            raise ConfigurationError(
                f"{self.path}: another rlm batch is writing this file under another name (a hard link)"
            ) from None
        return fd

    def append(self, record: dict[str, Any]) -> None:
        """Write one record as one line, at once (the id must not be in :attr:`done`)."""
        if self._fd is None:
            raise ConfigurationError(f"{self.path}: the results file is not open")
        if record["id"] in self.done:
            raise ConfigurationError(f"{self.path}: id {record['id']!r} is already recorded")
        data = encode_record(record)
        try:
            written = os.write(self._fd, data)
            while written < len(data):  # only on a full disk or a signal: finish or fail loudly
                written += os.write(self._fd, data[written:])
            gone = os.fstat(self._fd).st_nlink == 0
        except OSError as exc:
            raise ConfigurationError(f"{self.path}: cannot write: {exc.strerror or exc}") from None
        self.done.add(record["id"])
        if gone:  # the lines go to a file nobody can open any more: stop spending on runs now
            raise ConfigurationError(
                f"{self.path}: deleted or replaced while the batch ran; the results written since are "
                "lost (rerun the command to run those items again)"
            )

    def discard_if_unused(self) -> bool:
        """Remove OUT if this batch made it and wrote nothing to it (a setup error stopped the
        batch before any result): a failed command leaves no empty file that looks like a
        batch's results. True when it was removed (a link at OUT stays, as it was)."""
        if self._fd is None or not self.created:
            return False
        try:
            st = os.fstat(self._fd)
            if st.st_size or not os.path.samestat(st, os.stat(self.file, follow_symlinks=False)):
                return False  # written to (a line of this batch's), or replaced: not ours to remove
            os.unlink(self.file)  # still locked: another batch waits on nothing it could use
        except OSError:
            return False
        return True

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.fsync(fd)
            os.close(fd)
        self._release_lock()

    def __enter__(self) -> ResultsFile:
        return self.open()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
