"""The input of a batch: :class:`BatchItem`, and reading a JSONL input file line by line.

An input line is ``{"id": str, "query": str, "context": str}`` or
``{"id": str, "query": str, "context_path": str}``; a relative
``context_path`` is resolved against the input file's directory. Other keys
are ignored (an evaluation file may carry its expected answers). A line that
cannot be used becomes an :class:`InputProblem` naming its line number:
invalid JSON, not an object, a missing or mistyped field, both or neither of
``context`` and ``context_path``, an id seen on an earlier line, a
``context_path`` that cannot be read, a query that is not valid Unicode text
(a lone surrogate, which no model request can carry).

Contexts named by ``context_path`` are checked for readability when the file
is read and loaded only when their item starts, so a batch of thousands of
long documents does not hold them all in memory.
:meth:`BatchItem.question_sha256` names an item's question (its query and its
context's bytes) in its output line; ``rlm batch`` compares it on a rerun,
reading a ``context_path`` again in pieces.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from rlm.checks import check_text
from rlm.errors import ConfigurationError
from rlm.files import open_regular

__all__ = ["BatchItem", "InputProblem", "item_from_mapping", "read_input"]


@dataclass(frozen=True)
class BatchItem:
    """One question of a batch: ``id`` (unique in the batch), ``query``, and the context as text or a file."""

    id: str
    query: str
    context: str | None = None
    context_path: Path | None = None
    line: int | None = None  # the input file's line it came from, when it came from one

    def load_context(self) -> str:
        """The context text (read from ``context_path`` when there is one). Raises ConfigurationError."""
        return self.load()[0]

    def load(self) -> tuple[str, str]:
        """The context text and :meth:`question_sha256`, from one read of ``context_path`` (when
        there is one): the digest is of the bytes the text came from. Raises ConfigurationError."""
        if self.context_path is None:
            return self.context or "", self.question_sha256()
        with self._open() as f:
            data = f.read()
        digest = _question_hash(self.query)
        digest.update(data)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigurationError(f"{self.context_path}: not UTF-8 text") from None
        del data
        # As a file opened in text mode reads it (universal newlines), which it was until now.
        return text.replace("\r\n", "\n").replace("\r", "\n"), digest.hexdigest()

    def question_sha256(self) -> str:
        """What question this item is, as recorded in its output line (``question_sha256``): the
        sha256 of the query's UTF-8 bytes preceded by their number in decimal and a newline, then
        the context's bytes: ``context`` in UTF-8, or the bytes of the ``context_path`` file (read
        again here, in pieces). Raises ConfigurationError when the file cannot be read."""
        digest = _question_hash(self.query)
        if self.context_path is None:
            digest.update((self.context or "").encode("utf-8", "surrogatepass"))
            return digest.hexdigest()
        with self._open() as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        return digest.hexdigest()

    @contextlib.contextmanager
    def _open(self) -> Iterator[BinaryIO]:
        assert self.context_path is not None
        try:
            # Read through the descriptor that was checked: a FIFO swapped in after a check by
            # name would hang the read.
            with open(_open_regular(self.context_path), "rb", closefd=True) as f:
                yield f
        except OSError as exc:
            raise ConfigurationError(f"{self.context_path}: {exc.strerror or exc}") from None
        except ValueError as exc:  # from _open_regular
            raise ConfigurationError(str(exc)) from None


def _question_hash(query: str) -> hashlib._Hash:
    data = query.encode("utf-8", "surrogatepass")
    digest = hashlib.sha256(b"%d\n" % len(data))
    digest.update(data)
    return digest


@dataclass(frozen=True)
class InputProblem:
    """A line of the input that cannot run: its number, its id when it has a usable one, and why."""

    line: int
    reason: str
    id: str | None = None

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


def _field(data: Mapping[str, Any], name: str) -> str:
    if name not in data:
        raise ValueError(f"missing field {name!r}")
    value = data[name]
    if not isinstance(value, str):
        raise ValueError(f"field {name!r} must be a string, not {type(value).__name__}")
    return value


def _open_regular(path: Path) -> int:
    """A read-only descriptor of *path*, a regular file (ValueError otherwise): opening a FIFO
    for reading waits for a writer, forever (a batch that hung). See :func:`rlm.files.open_regular`."""
    try:
        return open_regular(path)
    except OSError as exc:
        raise ValueError(f"context_path {str(path)!r}: {exc.strerror or exc}") from None


def _check_readable(path: Path) -> None:
    os.close(_open_regular(path))


def item_from_mapping(data: Any, *, base_dir: Path | None = None, line: int | None = None) -> BatchItem:
    """A :class:`BatchItem` from a decoded JSON object; ValueError says what is wrong with it."""
    if isinstance(data, BatchItem):
        check_text("field 'query'", data.query)
        return data
    if not isinstance(data, Mapping):
        raise ValueError(f"an item must be a JSON object, not {type(data).__name__}")
    item_id = _field(data, "id")
    if not item_id:
        raise ValueError("field 'id' is empty")
    query = _field(data, "query")
    # A lone surrogate ("\\ud800" in the JSON) can never be sent: refused here, naming the line,
    # not tried (and retried) when the item runs.
    check_text("field 'query'", query)
    if not query.strip():  # a paid run about nothing (as `rlm run --query ""`)
        raise ValueError("field 'query' is empty")
    has_text, has_path = "context" in data, "context_path" in data
    if has_text == has_path:
        raise ValueError("give exactly one of 'context' and 'context_path'")
    if has_text:
        return BatchItem(item_id, query, context=_field(data, "context"), line=line)
    raw = _field(data, "context_path")
    if not raw:
        raise ValueError("field 'context_path' is empty")
    path = Path(raw)
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    _check_readable(path)
    return BatchItem(item_id, query, context_path=path, line=line)


def _usable_id(data: Any) -> str | None:
    if isinstance(data, Mapping):
        value = data.get("id")
        if isinstance(value, str) and value:
            return value
    return None


def read_input(path: Path) -> Iterator[BatchItem | InputProblem]:
    """Every line of the JSONL file at *path*, in order, as an item or a problem (blank lines skipped).

    A problem carries the line's id when that id is usable and not seen before,
    so that a recorded error can stand for it in the output; a duplicate id's
    problem carries none. Raises ConfigurationError when the file cannot be read.
    """
    base_dir = path.resolve().parent
    seen: set[str] = set()
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise ConfigurationError(f"{path}: {exc.strerror or exc}") from None
    with fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                data = json.loads(raw)
            except UnicodeDecodeError:
                yield InputProblem(number, "not UTF-8 text")
                continue
            except ValueError as exc:
                yield InputProblem(number, f"invalid JSON ({exc})")
                continue
            except RecursionError:  # "[" * 100_000: Python's parser gives up, not a ValueError
                yield InputProblem(number, "invalid JSON (nested too deeply)")
                continue
            item_id = _usable_id(data)
            if item_id is not None and item_id in seen:
                yield InputProblem(number, f"duplicate id {item_id!r} (seen on an earlier line)")
                continue
            if item_id is not None:
                seen.add(item_id)
            try:
                yield item_from_mapping(data, base_dir=base_dir, line=number)
            except ValueError as exc:
                yield InputProblem(number, str(exc), id=item_id)
