"""Scoring of answers: exact match after normalising numbers, F1 over sets of pairs.

- ``salary``, ``niah``, ``aggregate``: the answer is compared with the expected
  one after dropping currency signs, commas and spaces (and letter case and a
  trailing full stop). Numeric strings that differ only in form (``1105000``
  and ``1105000.00``) are equal. An answer that is a sentence with exactly one
  number in it (``The total is $1,105,000.``) is judged on that number.
- ``pairs``: the answer's pairs of IDs are parsed into a set of unordered pairs
  and compared with the expected set by F1; the answer is correct when F1 = 1.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from decimal import Decimal, InvalidOperation
from typing import Any

__all__ = [
    "is_correct",
    "normalize_answer",
    "numbers_match",
    "pairs_f1",
    "parse_pairs",
    "score",
]

_DROP = re.compile(r"[\s,$€£¥]")
_NUMBER = re.compile(r"(?<![\w.])[-+]?[$€£¥]?\s?\d[\d,]*(?:\.\d+)?(?![\w])")
_TUPLE = re.compile(r"[(\[]\s*['\"]?(\d+)['\"]?\s*,\s*['\"]?(\d+)['\"]?\s*[)\]]")
_INT = re.compile(r"(?<!\d)\d+(?!\d)")


def normalize_answer(text: object) -> str:
    """The answer with currency signs, commas and whitespace dropped, lower-cased, no final full stop."""
    if text is None:
        return ""
    out = _DROP.sub("", str(text)).lower()
    return out[:-1] if out.endswith(".") else out


def _as_decimal(text: str) -> Decimal | None:
    try:
        value = Decimal(text)
    except (InvalidOperation, ValueError):
        return None
    return value if value.is_finite() else None


def numbers_match(answer: object, expected: object) -> bool:
    """True when *answer* equals *expected* once numbers and currency are normalised."""
    want = normalize_answer(expected)
    got = normalize_answer(answer)
    if not got:
        return False
    if got == want:
        return True
    want_num = _as_decimal(want)
    if want_num is None:
        return False
    got_num = _as_decimal(got)
    if got_num is not None:
        return got_num == want_num
    # A sentence around a single number: judge the number.
    found = _NUMBER.findall(str(answer))
    if len(found) == 1:
        one = _as_decimal(normalize_answer(found[0]))
        return one is not None and one == want_num
    return False


def _pair(a: object, b: object) -> tuple[int, int]:
    x, y = int(str(a)), int(str(b))
    return (x, y) if x <= y else (y, x)


def parse_pairs(answer: object) -> set[tuple[int, int]]:
    """The unordered pairs of integer IDs in *answer*, each as ``(lower, higher)``.

    Accepts text with ``(a, b)`` / ``[a, b]`` tuples anywhere in it; failing
    that, every line holding exactly two integers is one pair. A list or tuple
    of pairs (as in the JSONL ``expected`` field) is accepted as is.
    """
    if answer is None:
        return set()
    if isinstance(answer, (list, tuple, set)):
        return {_pair(a, b) for a, b in answer}
    text = str(answer)
    found = _TUPLE.findall(text)
    if found:
        return {_pair(a, b) for a, b in found}
    pairs: set[tuple[int, int]] = set()
    for line in text.splitlines():
        ints = _INT.findall(line)
        if len(ints) == 2:
            pairs.add(_pair(*ints))
    return pairs


def pairs_f1(answer: object, expected: Iterable[Any]) -> float:
    """F1 of the answer's pairs against the expected pairs (1.0 when both are empty)."""
    want = parse_pairs(list(expected))
    got = parse_pairs(answer)
    if not want and not got:
        return 1.0
    hit = len(want & got)
    if hit == 0:
        return 0.0
    precision, recall = hit / len(got), hit / len(want)
    return 2 * precision * recall / (precision + recall)


def score(task: str, answer: object, expected: Any) -> float:
    """The score of *answer* for *task*: F1 for ``pairs``, else 1.0 when it matches, 0.0 otherwise."""
    if task == "pairs":
        return pairs_f1(answer, expected)
    return 1.0 if numbers_match(answer, expected) else 0.0


def is_correct(task: str, answer: object, expected: Any) -> bool:
    """Whether *answer* is right: exact match, or F1 = 1 for ``pairs``."""
    return score(task, answer, expected) == 1.0
