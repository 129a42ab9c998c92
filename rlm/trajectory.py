"""JSONL trajectories in the reference RLM logger's shape.

One file per run, ``<log_dir>/<run_id>.jsonl``: a ``metadata`` line, then one
``iteration`` line per root turn (``prompt`` = the full message list sent that
turn, ``response``, ``code_blocks: [{code, result: {stdout, stderr, locals,
execution_time, rlm_calls}}]``, ``final_answer``, ``iteration_time``), then a
closing ``result`` line with the run's outcome (viewers that only know
``metadata`` and ``iteration`` skip it). A ``compaction`` line, before the
iteration it preceded, records older turns replaced by a model-written
summary (``tokens_before``, ``tokens_after``, ``turns_summarized``, ``summary``). The sandbox audit log of the run is
``<run_id>.audit.jsonl`` next to it.

Every line is scrubbed of the secrets the logger was given (API keys) before
it is written.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

__all__ = ["TrajectoryLogger", "new_run_id"]


def new_run_id() -> str:
    """``rlm_<date>_<time>_<8 hex>``: sortable, unique."""
    return f"rlm_{datetime.now().strftime('%Y-%m-%d_%H-%M-%S')}_{uuid.uuid4().hex[:8]}"


class TrajectoryLogger:
    """Appends a run's lines to ``<log_dir>/<run_id>.jsonl``."""

    def __init__(self, log_dir: str | Path, run_id: str, *, secrets: Iterable[str | None] = ()) -> None:
        self.dir = Path(log_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.run_id = run_id
        self.path = self.dir / f"{run_id}.jsonl"
        self.audit_path = self.dir / f"{run_id}.audit.jsonl"
        self._secrets = [s for s in secrets if s and len(s) >= 4]
        self._lock = threading.Lock()
        self._iterations = 0

    def _write(self, entry: dict[str, Any]) -> None:
        line = json.dumps(entry, ensure_ascii=False, default=repr)
        for secret in self._secrets:
            line = line.replace(secret, "[REDACTED]")
        with self._lock, self.path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")

    @staticmethod
    def _now() -> str:
        return datetime.now().isoformat()

    def metadata(self, **fields: Any) -> None:
        self._write({"type": "metadata", "timestamp": self._now(), **fields})

    def iteration(self, **fields: Any) -> None:
        self._iterations += 1
        self._write({"type": "iteration", "iteration": self._iterations, "timestamp": self._now(), **fields})

    def compaction(self, **fields: Any) -> None:
        """A ``compaction`` line: older turns of the root conversation were replaced by a summary."""
        self._write({"type": "compaction", "timestamp": self._now(), **fields})

    def result(self, **fields: Any) -> None:
        self._write({"type": "result", "timestamp": self._now(), **fields})
