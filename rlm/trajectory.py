"""JSONL trajectories in the reference RLM logger's shape, and the files beside them.

Per run, in ``<log_dir>``:

- ``<run_id>.jsonl``, the trajectory: a ``metadata`` line, then one
  ``iteration`` line per root turn (``prompt`` = the messages sent that turn,
  ``response``, ``code_blocks: [{code, result: {stdout, stderr, locals,
  execution_time, rlm_calls}}]``, ``final_answer``, ``iteration_time``; a
  block's calls past ``rlm.core.BLOCK_CALL_ENTRIES`` are counted in its
  result's ``rlm_calls_omitted``, not listed).
  Nothing else: the reference viewer (``visualizer/`` in the official RLM
  repository) reads every line that is not ``metadata`` as an iteration, so
  any other line type breaks it. The file is only ever appended to, one whole
  line per write, so a run that dies half-way leaves a loadable file. When
  older turns of the root conversation were replaced by a model-written
  summary (compaction), the next iteration line says so in its
  ``compaction`` field (``tokens_before``, ``tokens_after``,
  ``turns_summarized``, ``summary``): a field, not a line of its own.
- ``<run_id>.result.json``: the run's outcome (the :class:`~rlm.result.RLMResult`
  fields without ``history``, plus ``closing_response`` and a ``timestamp``), written atomically
  when the run ends. No such file: the run did not finish.
- ``<run_id>.audit.log``: the sandbox's hash-chained audit log of the run (not
  ``.jsonl``, so nobody loads it into a trajectory viewer by mistake).

Logs stay bounded: every string is cut to :data:`LOG_TEXT_CHARS` (head and
tail kept, the cut said in the text), and a message already written in full
by an earlier iteration line is repeated only as its first
:data:`REPEAT_CHARS` characters (with a pointer to that iteration); at most
:data:`REPEATED_MESSAGES` such repeats per line, the rest folded into one
note. The context itself is never logged (the prompt only describes it).

Every line is scrubbed of API keys before it is written: the secrets the
logger was given (the ``api_key`` argument) and the provider keys in the
environment (:func:`rlm.llm.secret_values`: variables ending in ``_API_KEY``,
which litellm reads when no ``api_key`` is given). Keys are replaced inside
string values only (and dictionary keys), before any text is clipped, never
in the encoded line: a short or all-digit key cannot turn a number into
``[REDACTED]`` and make the line invalid JSON.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import threading
import uuid
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from rlm.errors import ConfigurationError
from rlm.files import open_regular, replace_file
from rlm.llm import redact, secret_values

__all__ = [
    "LOG_TEXT_CHARS",
    "REPEATED_MESSAGES",
    "REPEAT_CHARS",
    "TrajectoryLogger",
    "audit_path_for",
    "json_safe",
    "new_run_id",
    "result_path_for",
]

#: Longest string written into a trajectory line (characters; longer ones keep head and tail).
LOG_TEXT_CHARS = 50_000
#: Characters kept of a message already written in full by an earlier iteration line.
REPEAT_CHARS = 200
#: Repeated messages listed per iteration line; older ones are folded into one note.
REPEATED_MESSAGES = 40


def new_run_id() -> str:
    """``rlm_<date>_<time>_<8 hex>``: sortable, unique."""
    return f"rlm_{datetime.now().strftime('%Y-%m-%d_%H-%M-%S')}_{uuid.uuid4().hex[:8]}"


def result_path_for(trajectory: str | Path) -> Path:
    """``<run_id>.result.json`` beside the trajectory ``<run_id>.jsonl``."""
    path = Path(trajectory)
    return path.with_name(path.name.removesuffix(".jsonl") + ".result.json")


def audit_path_for(trajectory: str | Path) -> Path:
    """``<run_id>.audit.log`` beside the trajectory ``<run_id>.jsonl``."""
    path = Path(trajectory)
    return path.with_name(path.name.removesuffix(".jsonl") + ".audit.log")


def clip_text(text: str, cap: int = LOG_TEXT_CHARS) -> str:
    """*text*, or its head and tail with the number of characters cut, when longer than *cap*."""
    if len(text) <= cap:
        return text
    head = cap * 3 // 5
    tail = cap - head
    return f"{text[:head]}\n[... {len(text) - head - tail:,} characters not logged ...]\n{text[-tail:]}"


#: How deep the JSON the loop reads back (``rlm_describe_vars()``) and the logs ``rlm view`` reads
#: may nest. ``json.loads`` takes about a thousand levels, and the recursive walks over a
#: value here (:func:`json_safe`, secret redaction, the result's text cleaning) fewer.
MAX_JSON_DEPTH = 100


def nested_deeper(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """*value* (decoded JSON) holds lists or dicts nested more than *limit* levels (looked at
    without recursion, so any depth json.loads produced)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        elif not isinstance(item, list):
            continue
        if depth >= limit:
            return True
        stack.extend((child, depth + 1) for child in item if isinstance(child, (dict, list)))
    return False


def json_safe(value: Any, clip: bool = False) -> Any:
    """*value* with non-finite floats as strings ("nan", "inf"; JSON has no NaN or Infinity, and
    strict readers, the viewer and ``JSON.parse``, refuse the whole line) and, with *clip*, long
    texts clipped (:func:`clip_text`)."""
    if isinstance(value, str):
        return clip_text(value) if clip else value
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {k: json_safe(v, clip) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v, clip) for v in value]
    return value


def _append(path: Path, data: bytes) -> None:
    """Append *data* to *path* whole, or not at all: a write that fails part way (a full disk)
    is cut back off, so the file never ends in a torn line that viewers cannot read. *path* must
    be a regular file (:func:`rlm.files.open_regular`: a FIFO there is refused, not waited on)."""
    fd = open_regular(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        start = os.lseek(fd, 0, os.SEEK_END)
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(fd, view) :]
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise
    finally:
        os.close(fd)


class TrajectoryLogger:
    """Appends a run's lines to ``<log_dir>/<run_id>.jsonl``; writes its outcome on :meth:`result`."""

    _secrets: tuple[str, ...] = ()  # the texts redacted from every line (rlm.llm.secret_values)

    def __init__(self, log_dir: str | Path, run_id: str, *, secrets: Iterable[str | None] = ()) -> None:
        self.dir = Path(log_dir)
        try:  # RLM() checked it; this is for a directory removed or made read-only since
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigurationError(f"log_dir {self.dir}: cannot create it: {exc.strerror or exc}") from None
        self.run_id = run_id
        self.path = self.dir / f"{run_id}.jsonl"
        self.audit_path = audit_path_for(self.path)
        self.result_path = result_path_for(self.path)
        self._secrets = tuple(secret_values(*secrets))
        self._lock = threading.Lock()
        self._iterations = 0
        self._seen: dict[str, int] = {}  # digest of a message written in full -> its iteration
        self._compaction: dict[str, Any] | None = None  # for the next iteration line

    def _redact(self, value: Any) -> Any:
        """*value* with the secrets replaced in every string in it (what ``json.dumps`` would write
        with ``default=repr`` is made a string first, so it is scrubbed too)."""
        if isinstance(value, str):
            return redact(value, self._secrets)
        if isinstance(value, dict):
            return {(self._redact(k) if isinstance(k, str) else k): self._redact(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self._redact(v) for v in value]
        if value is None or isinstance(value, (bool, int, float)):
            return value
        return self._redact(repr(value))

    def _encode(self, entry: dict[str, Any], **options: Any) -> str:
        # Scrubbed before clipping (a cut must not split a key) and before encoding (a key is
        # replaced in the text of a value, never in the JSON around it).
        clean = self._redact(entry) if self._secrets else entry
        return json.dumps(json_safe(clean, clip=True), ensure_ascii=False, default=repr, **options)

    def _write(self, entry: dict[str, Any]) -> None:
        # A lone surrogate (models and programs emit them) becomes a JSON \udXXX escape, not an error.
        line = (self._encode(entry) + "\n").encode("utf-8", "backslashreplace")
        try:
            with self._lock:
                _append(self.path, line)
        except OSError as exc:  # a full disk, a directory gone or made read-only mid-run
            raise self._unwritable(self.path, exc) from None

    def _unwritable(self, path: Path, exc: OSError) -> ConfigurationError:
        return ConfigurationError(f"log_dir {self.dir}: cannot write {path.name}: {exc.strerror or exc}")

    @staticmethod
    def _now() -> str:
        return datetime.now().isoformat()

    def metadata(self, **fields: Any) -> None:
        """The first line of the file: a directory where it cannot be written is a bad ``log_dir``
        (as is one where a later line cannot be: ConfigurationError from every write)."""
        self._write({"type": "metadata", "timestamp": self._now(), **fields})

    def _prompt(self, messages: list[dict[str, Any]]) -> list[dict[str, str]]:
        """The messages of this turn, each written in full once per file (see the module docstring)."""
        out: list[dict[str, str]] = []
        repeats: list[int] = []
        for message in messages:
            content = message.get("content")
            text = (
                content if isinstance(content, str) else json.dumps(content, ensure_ascii=False, default=str)
            )
            if self._secrets:  # before the text is cut to REPEAT_CHARS (a cut must not split a key)
                text = redact(text, self._secrets)
            role = str(message.get("role", ""))
            digest = hashlib.sha256(f"{role}\0{text}".encode("utf-8", "surrogatepass")).hexdigest()
            first = self._seen.get(digest)
            if first is None:
                self._seen[digest] = self._iterations
                out.append({"role": role, "content": text})
            else:
                if len(text) > REPEAT_CHARS:
                    text = (
                        f"{text[:REPEAT_CHARS]}\n[... {len(text) - REPEAT_CHARS:,} more characters: "
                        f"this message is logged in full in iteration {first}]"
                    )
                repeats.append(len(out))
                out.append({"role": role, "content": text})
        # Keep the first two repeats (system prompt, question) and the newest ones; fold the rest.
        if len(repeats) > REPEATED_MESSAGES:
            drop = set(repeats[2 : len(repeats) - (REPEATED_MESSAGES - 2)])
            note = {
                "role": "note",
                "content": f"[{len(drop):,} earlier messages not repeated here: see the earlier iterations]",
            }
            folded: list[dict[str, str]] = []
            for i, message in enumerate(out):
                if i not in drop:
                    folded.append(message)
                elif folded[-1] is not note:
                    folded.append(note)
            out = folded
        return out

    def iteration(self, *, prompt: list[dict[str, Any]], **fields: Any) -> None:
        with self._lock:
            self._iterations += 1
            number = self._iterations
            sent = self._prompt(prompt)
            compaction, self._compaction = self._compaction, None
        line = {"type": "iteration", "iteration": number, "timestamp": self._now(), "prompt": sent, **fields}
        if compaction is not None:
            line["compaction"] = compaction
        self._write(line)

    def compaction(self, **fields: Any) -> None:
        """Older turns of the root conversation were replaced by a summary: recorded in the
        ``compaction`` field of the next iteration line (a line of its own would break viewers)."""
        with self._lock:
            self._compaction = {"timestamp": self._now(), **fields}

    def result(self, **fields: Any) -> None:
        """Write ``<run_id>.result.json`` atomically (a new file renamed over it: see
        :func:`rlm.files.replace_file`)."""
        text = self._encode({"run_id": self.run_id, "timestamp": self._now(), **fields}, indent=1)
        try:
            replace_file(self.result_path, (text + "\n").encode("utf-8", "backslashreplace"))
        except OSError as exc:
            raise self._unwritable(self.result_path, exc) from None
