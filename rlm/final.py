"""Reading a model's reply: its ```repl code blocks and a FINAL(...) written in the text.

Rules (pinned by the project's contract):

- code to run is in fenced blocks whose info string is ``repl``;
- ``FINAL(answer)`` / ``FINAL_VAR(name)`` in the reply text count only at the
  start of a line (leading spaces allowed) and outside any fenced block;
- the argument may span lines and contain parentheses: a balanced closing
  parenthesis that ends its line closes the call; failing that, a ``)``
  ending the call's first line; failing that, the last ``)`` ending a line;
  failing that, the balanced one (text may follow it); an unclosed call takes
  the rest of the text;
- a quoted argument (``FINAL("...")``) is read as a Python string literal.
"""

from __future__ import annotations

import ast
import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

__all__ = ["FinalDirective", "count_code_blocks", "extract_code_blocks", "find_final", "strip_code"]

# Possessive quantifiers (never given back): a line of ``` and 60,000 spaces cost the old
# pattern quadratic time, a minute per 60 KB of the model's reply, holding the GIL.
_FENCE = re.compile(r"^[ \t]*+(`{3,}+|~{3,}+)([^\n`]*+)$", re.MULTILINE)
_NON_SPACE = re.compile(r"\S")
_DIRECTIVE = re.compile(r"^[ \t]*(FINAL_VAR|FINAL)[ \t]*\(", re.MULTILINE)


@dataclass(frozen=True)
class FinalDirective:
    """A FINAL found in the text: ``kind`` and the argument, unquoted if it was a string literal."""

    kind: Literal["FINAL", "FINAL_VAR"]
    argument: str
    quoted: bool = False


def _segments(text: str) -> Iterator[tuple[bool, str, int, int]]:
    """The (is_code, info_string, start, end) segments of *text*, in order, as they are found:
    a caller slices only those it needs, and stops when it has enough (a reply may hold a
    million blocks). An unclosed fence runs to the end. One pass over the fence lines: a
    block is closed by the first later fence line of its character, at least as long, with
    nothing but spaces and tabs after it."""
    pos = 0
    opening: re.Match[str] | None = None
    for line in _FENCE.finditer(text):
        if opening is None:
            yield False, "", pos, line.start()
            opening = line
            continue
        fence, info = line.group(1), line.group(2)
        if fence[0] == opening.group(1)[0] and len(fence) >= len(opening.group(1)) and not info.strip(" \t"):
            yield True, opening.group(2), opening.end() + 1, line.start()
            pos, opening = line.end(), None
    if opening is None:
        yield False, "", pos, len(text)
    else:
        yield True, opening.group(2), min(opening.end() + 1, len(text)), len(text)


def _blocks(text: str, language: str) -> Iterator[tuple[int, int]]:
    """(start, end) of each block tagged *language* that holds more than white space, without
    its trailing newlines."""
    for is_code, info, start, end in _segments(text):
        if is_code and info.split()[:1] == [language] and _NON_SPACE.search(text, start, end):
            while text[end - 1] == "\n":
                end -= 1
            yield start, end


def extract_code_blocks(text: str, language: str = "repl", *, limit: int | None = None) -> list[str]:
    """The bodies of the fenced blocks tagged *language*, in order (an unclosed last block
    counts); the first *limit* of them only, when given (the rest of the text is not read)."""
    return [text[start:end] for start, end in itertools.islice(_blocks(text, language), limit)]


def count_code_blocks(text: str, language: str = "repl") -> int:
    """How many blocks :func:`extract_code_blocks` would return, without copying any of them."""
    return sum(1 for _ in _blocks(text, language))


def strip_code(text: str) -> str:
    """*text* with every fenced block removed (each replaced by a newline)."""
    return "\n".join(text[start:end] for is_code, _, start, end in _segments(text) if not is_code)


def _balanced_close(region: str) -> int | None:
    depth = 0
    for i, ch in enumerate(region):
        if ch == "(":
            depth += 1
        elif ch == ")":
            if depth == 0:
                return i
            depth -= 1
    return None


#: White space up to the end of a line (a line ends at ``\n`` only, as the text is split).
_REST_OF_LINE = re.compile(r"[^\S\n]*+$", re.MULTILINE)
#: The last ``)`` that ends its line (nothing but white space after it on the line), found from
#: the end: the greedy ``.*`` gives back one character at a time, and keeps nothing per line.
_LAST_LINE_ENDER = re.compile(r".*(\))[^\S\n]*+$", re.DOTALL | re.MULTILINE)


def _ends_line(region: str, i: int) -> bool:
    return _REST_OF_LINE.match(region, i + 1) is not None


def _last_line_ender(region: str, end: int) -> int | None:
    """The position of the last ``)`` of ``region[:end]`` that ends its line, or None. Found by a
    pattern, not by splitting the region into lines: ``FINAL(`` and a 16 MB reply of short lines
    made a list of five million of them (332 MB of host memory)."""
    match = _LAST_LINE_ENDER.match(region, 0, end)
    return None if match is None else match.start(1)


#: One Python string literal (prefix, quotes, escapes, triple quotes), matched in linear time:
#: each literal is atomic (read once, as Python's tokenizer reads it, never split another way)
#: and its text is taken a run of plain characters at a time. With backtracking into the
#: literals, ``FINAL(`` and 80 quotes took 8 s of CPU holding the GIL (each 10 more, 6 times
#: as long), and a character at a time it kept ``FINAL("`` and 4 MB unclosed in 587 MB.
_STRING = (
    r"(?>(?:[rRuU]|[rR][bB]|[bB][rR]|[bB])?"
    r"""(?:'''[^'\\]*+(?:(?:\\.|'(?!''))[^'\\]*+)*+'''"""
    r'|"""[^"\\]*+(?:(?:\\.|"(?!""))[^"\\]*+)*+"""'
    r"""|'[^'\\\n]*+(?:\\.[^'\\\n]*+)*+'"""
    r'|"[^"\\\n]*+(?:\\.[^"\\\n]*+)*+"))'
)
#: One or more adjacent literals (they concatenate) and the ``)`` that closes the call.
_LITERAL_ARG = re.compile(rf"\s*+({_STRING}(?:\s*+{_STRING})*+)\s*+\)")


def _literal(region: str) -> tuple[str, bool] | None:
    """A string-literal argument: literals up to the ``)`` after them, read as a str.

    The literal's end is found by a regular expression, not by trying ``literal_eval`` at
    every ``)`` (a reply of ``FINAL("`` and 100,000 ``)`` took 40 s of the host's CPU)."""
    match = _LITERAL_ARG.match(region)
    if match is None:
        return None
    try:
        value = ast.literal_eval(match.group(1))
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    return (value, True) if isinstance(value, str) else None


def _argument(region: str) -> tuple[str, bool]:
    literal = _literal(region)
    if literal is not None:
        return literal
    close = _balanced_close(region)
    if close is not None and _ends_line(region, close):
        return region[:close].strip(), False
    first_line_end = region.find("\n")
    # the ``)`` ending the first line, failing that the last ``)`` ending a line
    ender = _last_line_ender(region, first_line_end) if first_line_end >= 0 else None
    if ender is None:
        ender = _last_line_ender(region, len(region))
    if ender is not None:
        return region[:ender].strip(), False
    if close is not None:
        return region[:close].strip(), False
    return region.strip(), False


def find_final(text: str) -> FinalDirective | None:
    """The first FINAL/FINAL_VAR at the start of a line outside code blocks, or None."""
    if _DIRECTIVE.search(text) is None:  # none anywhere: the blocks need not be found
        return None
    for is_code, _, start, end in _segments(text):
        if is_code:
            continue
        # searched in place, not in a copy of the segment (the whole reply, when it has no block)
        match = _DIRECTIVE.search(text, start, end)
        if match is None:
            continue
        argument, quoted = _argument(text[match.end() : end])
        if match.group(1) == "FINAL_VAR":
            return FinalDirective("FINAL_VAR", argument, quoted)
        return FinalDirective("FINAL", argument, quoted)
    return None
