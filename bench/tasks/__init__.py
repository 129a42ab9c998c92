"""Long-context task benchmark: RLM against a direct call on generated, seeded tasks.

``generate(task, size, seed=0)`` gives a :class:`Task` (context, question,
exact expected answer) for the families ``salary``, ``niah``, ``aggregate``
and ``pairs``; the scoring functions judge answers; ``python -m bench.tasks``
runs the comparison and prints the results table. Importing this package does
not import litellm or ``rlm``.
"""

from __future__ import annotations

from bench.tasks.generators import LABELS, TASKS, UNITS, Task, generate
from bench.tasks.runner import RECORD_FIELDS, BenchConfig, decide_winner, run_benchmark
from bench.tasks.scoring import is_correct, normalize_answer, numbers_match, pairs_f1, parse_pairs, score
from bench.tasks.table import accuracy_lines, format_report, markdown_table

__all__ = [
    "LABELS",
    "RECORD_FIELDS",
    "TASKS",
    "UNITS",
    "BenchConfig",
    "Task",
    "accuracy_lines",
    "decide_winner",
    "format_report",
    "generate",
    "is_correct",
    "markdown_table",
    "normalize_answer",
    "numbers_match",
    "pairs_f1",
    "parse_pairs",
    "run_benchmark",
    "score",
]
