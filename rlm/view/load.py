"""Read trajectories, their outcome files and audit logs into plain data for the page.

Reading is tolerant: a line that is not JSON (a run killed half-way through a
write) is skipped and counted, a missing ``.result.json`` means "did not
finish", a missing audit log is reported as such. A value nested deeper than
:data:`~rlm.trajectory.MAX_JSON_DEPTH` (a model's variables, a tool's
arguments, a ``parsed`` answer) is cut there, its too-deep parts replaced by
:data:`TOO_DEEP` and counted: the line, the step and its sub-calls stay on
the page (dropping the line let a model hide a step from it). A FIFO (or
anything else that is not a regular file) where a trajectory or a ``.result.json`` would be
is left out as if it were not there, and an audit log that is one is reported
unreadable: files are opened non-blocking and read through the descriptor
that was checked (:func:`rlm.files.open_regular`), so none can hang the
reader. Nothing here executes or evaluates what it reads.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rlm.core import PRELUDE
from rlm.errors import ConfigurationError
from rlm.files import open_regular, read_regular
from rlm.trajectory import MAX_JSON_DEPTH, audit_path_for, result_path_for

__all__ = [
    "MAX_AUDIT_CODE",
    "MAX_AUDIT_RECORDS",
    "TOO_DEEP",
    "load_audit",
    "load_directory",
    "load_path",
    "load_run",
]

#: Records of an audit log the page holds: the last ones (a service's log runs to millions of
#: lines; the page held them all, 46 MB of page for a 50 MB log). The chain is verified whole.
MAX_AUDIT_RECORDS = 2000
#: Characters of a record's code the page holds (the rest is in the log, the page says how much).
MAX_AUDIT_CODE = 20_000

#: What stands in for a list or an object nested deeper than MAX_JSON_DEPTH in a line or a result file.
TOO_DEEP = f"[nested deeper than {MAX_JSON_DEPTH} levels: not shown]"

#: The other code the RLM loop itself runs in the sandbox: a session's switch to its latest
#: context (after the prelude, in a fresh sandbox), and the lookup of a FINAL_VAR in a reply's text.
_CONTEXT_SWITCH = re.compile(r"\ncontext = context_[0-9]+\n")
_FINAL_VAR = re.compile(r"""FINAL_VAR\((?:'[^'\\\n]*'|"[^"\\\n]*")\)""")


def _internal(code: object) -> bool:
    """*code* is exactly what the RLM loop runs itself (marked "internal" in the audit view). Exactly,
    not by its start: a model's block beginning with ``rlm_describe_vars()`` is the model's."""
    if not isinstance(code, str):
        return False
    if code in ("rlm_describe_vars()", PRELUDE):
        return True
    code = code.removeprefix(PRELUDE)
    return bool(_CONTEXT_SWITCH.fullmatch(code) or _FINAL_VAR.fullmatch(code))


class _Skipped:
    """What reading a file left out or cut: ``unreadable`` lines (not JSON: a write cut off),
    ``too_deep`` lines (nested past what the JSON parser takes, about a thousand levels) and
    ``pruned`` values (nested past MAX_JSON_DEPTH: cut there, the rest kept)."""

    __slots__ = ("pruned", "too_deep", "unreadable")

    def __init__(self) -> None:
        self.unreadable = self.too_deep = self.pruned = 0


def _prune(value: Any, limit: int = MAX_JSON_DEPTH) -> int:
    """Replace, in place, each list or object of *value* nested *limit* levels down (or more)
    by :data:`TOO_DEEP`; return how many were replaced. Walked without recursion (any depth
    json.loads produced), and what is left nests at most *limit* levels: the recursive walks
    over the page's data (``json_safe``, ``JSON.stringify``) stay far from their limits."""
    cut = 0
    stack: list[tuple[Any, int]] = [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack:
        item, depth = stack.pop()
        keys = item.keys() if isinstance(item, dict) else range(len(item))
        for key in keys:
            child = item[key]
            if isinstance(child, (dict, list)):
                if depth >= limit:
                    item[key] = TOO_DEEP
                    cut += 1
                else:
                    stack.append((child, depth + 1))
    return cut


#: What :func:`_parse` returns for text that is not JSON (``None`` is the JSON ``null``).
_NOT_JSON = object()


def _parse(text: str, skipped: _Skipped) -> Any:
    """*text* as JSON, its too-deep parts cut (:func:`_prune`, counted in *skipped*);
    :data:`_NOT_JSON`, counted in *skipped*, when it is not JSON."""
    try:
        value = json.loads(text)
    except RecursionError:  # nested too deeply for the parser itself (no writer of ours writes that)
        skipped.too_deep += 1
        return _NOT_JSON
    except ValueError:
        skipped.unreadable += 1
        return _NOT_JSON
    if _prune(value):
        skipped.pruned += 1
    return value


def _read_jsonl(path: Path) -> tuple[list[dict[str, Any]], _Skipped]:
    skipped = _Skipped()
    entries = list(_objects(path, skipped))
    return entries, skipped


def _objects(path: Path, skipped: _Skipped) -> Iterator[dict[str, Any]]:
    """The JSON objects of *path*, a line at a time, their too-deep parts cut; *skipped* counts the
    lines that are none."""
    with open(open_regular(path), encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            value = _parse(line, skipped)
            if isinstance(value, dict):
                yield value
            elif value is not _NOT_JSON:  # JSON, but not an object (null, a list, a number)
                skipped.unreadable += 1


def _sha(code: Any) -> str:
    return hashlib.sha256(str(code).encode("utf-8", "surrogatepass")).hexdigest()


def load_audit(path: Path) -> dict[str, Any]:
    """The audit log's records (code, outcome, CPU, peak memory) and its verified hash chain.

    The chain is verified whole; the page gets the last :data:`MAX_AUDIT_RECORDS` records
    (``total`` says how many there are, ``first`` the number of the first one kept, from 1)
    and at most :data:`MAX_AUDIT_CODE` characters of each one's code (``code_cut``: how many
    more the log holds). The log is read a line at a time: memory holds what the page gets."""
    from sandbox.audit import verify
    from sandbox.errors import AuditError

    out: dict[str, Any] = {"path": str(path), "name": path.name}
    try:
        report = verify(path)
        out["verify"] = {
            "ok": report.ok,
            "lines": report.lines,
            "bad_line": report.bad_line,
            "reason": report.reason,
        }
    except AuditError as exc:
        out["verify"] = {"ok": False, "lines": 0, "bad_line": None, "reason": str(exc)}
        out["records"] = []
        out["total"], out["first"] = 0, 1
        return out
    kept: deque[dict[str, Any]] = deque(maxlen=MAX_AUDIT_RECORDS)
    total = 0
    for r in _objects(path, _Skipped()):
        total += 1
        code = r.get("code")
        cut = 0
        if isinstance(code, str) and len(code) > MAX_AUDIT_CODE:
            cut, code = len(code) - MAX_AUDIT_CODE, code[:MAX_AUDIT_CODE]
        kept.append(
            {
                "time": r.get("time"),
                "sandbox_id": r.get("sandbox_id"),
                "seq": r.get("seq"),
                "policy": r.get("policy"),
                "outcome": r.get("outcome"),
                "duration_s": r.get("duration_s"),
                "cpu_s": r.get("cpu_s"),
                "max_rss_bytes": r.get("max_rss_bytes"),
                "code": code,
                "code_cut": cut,
                "code_sha256": r.get("code_sha256"),
                "internal": _internal(r.get("code")),
            }
        )
    out["records"] = list(kept)
    out["total"], out["first"] = total, total - len(kept) + 1
    return out


def _link_audit(run: dict[str, Any]) -> None:
    """Give each code block the audit record of its execution (matched by code hash, in order)."""
    audit = run.get("audit")
    if not audit:
        return
    queue: dict[str, list[int]] = {}
    for i, record in enumerate(audit["records"]):
        if not record["internal"]:
            queue.setdefault(str(record.get("code_sha256")), []).append(i)
    blocks = [
        block
        for iteration in run["iterations"]
        for block in iteration.get("code_blocks") or []
        if isinstance(block, dict)
    ]
    if audit.get("first", 1) > 1:  # the page holds the last records only: matched from the end
        for indices in queue.values():
            indices.reverse()
        blocks.reverse()
    for block in blocks:
        waiting = queue.get(_sha(block.get("code", "")))
        if waiting:
            block["audit"] = waiting.pop(0)


def _text(value: Any) -> str | None:
    """*value* when it is a non-empty str (a run id, used as a key by the page), else None: an
    object there (``{"toString": 1}`` in a hostile log) stopped the page's script."""
    return value if isinstance(value, str) and value else None


def _count(value: Any) -> int:
    """*value* when it is a count (an int, not a bool, not negative), else 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _shape(iteration: dict[str, Any]) -> dict[str, Any]:
    """*iteration* with the containers the page reads made what they should be: ``code_blocks``
    a list of objects, each ``result`` an object, its ``rlm_calls`` a list of objects, each
    ``usage_summary`` an object of objects, ``rlm_calls_omitted`` (the calls past the block's
    cap, counted, not listed) two counts or absent. A damaged or hand-edited line (``"result":
    [1]``) made ``rlm view`` fail with a traceback; what is not of its shape is left out."""

    def objects(value: Any) -> list[dict[str, Any]]:
        return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []

    iteration["code_blocks"] = objects(iteration.get("code_blocks"))
    for block in iteration["code_blocks"]:
        result = block.get("result")
        block["result"] = result = result if isinstance(result, dict) else {}
        result["rlm_calls"] = objects(result.get("rlm_calls"))
        for call in result["rlm_calls"]:
            summary = call.get("usage_summary")
            per_model = summary.get("model_usage_summaries") if isinstance(summary, dict) else None
            if summary is not None and not (
                isinstance(per_model, dict) and all(isinstance(v, dict) for v in per_model.values())
            ):
                call["usage_summary"] = {"model_usage_summaries": {}}
        # Calls past the block's BLOCK_CALL_ENTRIES: counted, not listed.
        omitted = result.get("rlm_calls_omitted")
        omitted = omitted if isinstance(omitted, dict) else {}
        counts = {kind: _count(omitted.get(kind)) for kind in ("sub_calls", "tool_calls")}
        if any(counts.values()):
            result["rlm_calls_omitted"] = counts
        else:
            result.pop("rlm_calls_omitted", None)
    return iteration


def load_run(path: Path, *, seen: set[str] | None = None) -> dict[str, Any]:
    """One trajectory with its outcome, its audit log and (recursively) its child runs."""
    seen = set() if seen is None else seen
    entries, skipped = _read_jsonl(path)
    metadata = next((e for e in entries if e.get("type") == "metadata"), {})
    iterations = [_shape(e) for e in entries if e.get("type") not in ("metadata", "result")]
    legacy = next((e for e in entries if e.get("type") == "result"), None)  # logs written before .result.json
    run: dict[str, Any] = {
        "file": path.name,
        "path": str(path),
        "run_id": _text(metadata.get("run_id")) or path.name.removesuffix(".jsonl"),
        "metadata": metadata,
        "iterations": iterations,
        "skipped_lines": skipped.unreadable,  # not JSON: a write cut off (or a damaged file)
        "too_deep_lines": skipped.too_deep,  # JSON nested past what the parser takes
        "pruned_values": 0,  # lines (and the result) with parts nested past MAX_JSON_DEPTH, cut there
        "result": None,
        "audit": None,
        "children": {},
    }
    seen.add(str(path.resolve()))
    result_path = result_path_for(path)
    if result_path.is_file():  # a FIFO there is no result (reading it would wait for a writer)
        in_result = _Skipped()  # (a damaged result file is no skipped line: the run shows as unfinished)
        value = _parse(read_regular(result_path).decode("utf-8", errors="replace"), in_result)
        run["result"] = value if isinstance(value, dict) else None
        skipped.pruned += in_result.pruned
    run["pruned_values"] = skipped.pruned
    if run["result"] is None and legacy is not None:
        run["result"] = legacy
    audit_path = audit_path_for(path)
    if not audit_path.exists():
        audit_path = path.with_name(path.name.removesuffix(".jsonl") + ".audit.jsonl")  # the old name
    if audit_path.exists():
        run["audit"] = load_audit(audit_path)
        _link_audit(run)
    # Child runs: rlm_calls entries of type "rlm" name their trajectory file.
    for iteration in iterations:
        for block in iteration.get("code_blocks") or []:
            calls = (block.get("result") or {}).get("rlm_calls") if isinstance(block, dict) else None
            for call in calls or []:
                if not isinstance(call, dict) or call.get("type") != "rlm" or not _text(call.get("run_id")):
                    continue
                child_path = path.with_name(f"{Path(str(call['run_id'])).name}.jsonl")
                if child_path.is_file() and str(child_path.resolve()) not in seen:
                    run["children"][call["run_id"]] = load_run(child_path, seen=seen)
    return run


def load_directory(directory: Path) -> list[dict[str, Any]]:
    """The root runs of a log directory (their children nested inside), oldest first."""
    seen: set[str] = set()
    runs = []
    paths = sorted(p for p in directory.glob("*.jsonl") if p.is_file())  # a FIFO is left out
    parents: dict[Path, Any] = {}
    for path in paths:
        with open(open_regular(path), encoding="utf-8", errors="replace") as f:
            first = _parse(f.readline() or "{}", _Skipped())
        parents[path] = _text(first.get("parent_run_id")) if isinstance(first, dict) else None
    for path in paths:
        if parents[path] is None and str(path.resolve()) not in seen:
            runs.append(load_run(path, seen=seen))
    for path in paths:  # children whose parent file is gone: list them on their own
        if str(path.resolve()) not in seen:
            runs.append(load_run(path, seen=seen))
    return runs


def load_path(path: Path) -> dict[str, Any]:
    """What ``rlm view PATH`` shows: ``{"kind": "run" | "dir" | "audit", ...}``.

    Raises :class:`~rlm.errors.ConfigurationError` for a directory with no trajectory and no
    audit log, and for a file that is neither (not one line of it is an audit record): a page
    that shows nothing would hide the wrong path."""
    if path.is_dir():
        runs = load_directory(path)
        audits = [
            load_audit(p) for p in sorted(path.glob("*.audit.log")) if not _beside_a_trajectory(p, path)
        ]
        if not runs and not audits:
            raise ConfigurationError(f"{path}: no trajectory (*.jsonl) and no audit log (*.audit.log) in it")
        return {"kind": "dir", "title": str(path), "runs": runs, "audits": audits}
    if not path.is_file():
        raise ConfigurationError(f"{path}: not a regular file (nor a directory)")
    if path.name.endswith(".jsonl") and _looks_like_trajectory(path):
        return {"kind": "run", "title": path.name, "runs": [load_run(path)], "audits": []}
    audit = load_audit(path)
    if path.stat().st_size > 0 and not _any_hash(path):
        raise ConfigurationError(
            f"{path}: neither a trajectory nor an audit log (no line is a JSON object with a hash)"
        )
    return {"kind": "audit", "title": path.name, "runs": [], "audits": [audit]}


def _any_hash(path: Path) -> bool:
    """True when a line of *path* is a JSON object with a ``hash``: an audit record, maybe a bad one."""
    return any("hash" in entry for entry in _objects(path, _Skipped()))  # (read up to the first)


def _beside_a_trajectory(audit: Path, directory: Path) -> bool:
    """True when *audit* belongs to a trajectory in *directory* (it is shown with that run)."""
    return (directory / (audit.name.removesuffix(".audit.log") + ".jsonl")).is_file()


def _looks_like_trajectory(path: Path) -> bool:
    try:
        with open(open_regular(path), encoding="utf-8", errors="replace") as f:
            first = json.loads(f.readline() or "{}")
    except (ValueError, RecursionError, OSError):
        return False
    # An empty file is a run that has not written its first line yet.
    return isinstance(first, dict) and (not first or first.get("type") in ("metadata", "iteration"))
