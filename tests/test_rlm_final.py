"""Reading replies: ```repl blocks and FINAL(...) in the text (rlm.final)."""

from __future__ import annotations

import ast

from hypothesis import given, settings
from hypothesis import strategies as st

from rlm.backend import _count_words
from rlm.final import count_code_blocks, extract_code_blocks, find_final, strip_code

# Answer text: anything but backticks (a fence would start a code block) and carriage returns.
TEXT = st.text(
    st.characters(blacklist_characters="`\r", blacklist_categories=("Cs",)), min_size=1, max_size=80
)


def _balanced(s: str) -> bool:
    depth = 0
    for ch in s:
        depth += ch == "("
        depth -= ch == ")"
        if depth < 0:
            return False
    return depth == 0


def test_plain_and_nested_parentheses():
    assert find_final("FINAL(42)").argument == "42"
    assert (
        find_final("so:\n  FINAL(The total (approx.) is $160,000)\n").argument
        == "The total (approx.) is $160,000"
    )


def test_unbalanced_closing_parenthesis_inside_the_answer():
    assert find_final("FINAL(Steps: 1) parse 2) sum)\nThanks!").argument == "Steps: 1) parse 2) sum"
    assert find_final("FINAL(1) first\n2) second)").argument == "1) first\n2) second"


def test_multiline_answer_and_trailing_prose():
    reply = "Done.\nFINAL(line one\nline two (with parens)\nline three)\n\nHope this helps (really)."
    assert find_final(reply).argument == "line one\nline two (with parens)\nline three"


def test_quoted_answer_is_a_string_literal():
    d = find_final('FINAL("a ) b\\nc")')
    assert d.quoted and d.argument == "a ) b\nc"


def test_only_at_line_start_and_outside_code():
    assert find_final("the answer is FINAL(3)") is None
    assert find_final("```repl\nFINAL(1)\n```\nno final here") is None
    assert find_final("```python\nFINAL(1)\n```\nFINAL_VAR(total)").kind == "FINAL_VAR"
    assert find_final("```repl\nx = 1\n") is None  # unclosed fence: the rest is code


def test_final_var_and_unclosed_call():
    assert find_final("FINAL_VAR(total)").argument == "total"
    assert find_final("FINAL_VAR('total')").argument == "total"
    assert find_final("FINAL(42").argument == "42"


def test_code_blocks():
    reply = "look:\n```repl\nx = 1\n```\n```python\nnot run\n```\n~~~repl\ny = 2\n~~~\n```repl\nprint(x)"
    assert extract_code_blocks(reply) == ["x = 1", "y = 2", "print(x)"]
    assert extract_code_blocks("```repl\n\n```") == []


@settings(max_examples=300, deadline=None)
@given(
    TEXT.filter(_balanced),
    st.sampled_from(["", "Some words.\n", "```repl\nx = 1\n```\n"]),
    st.sampled_from(["", "\n", "\n\nThat is all."]),
)
def test_balanced_answers_round_trip(answer, before, after):
    if not answer.strip() or ("\n" in answer and after.strip()):
        answer = answer.replace("\n", " ")
    d = find_final(f"{before}FINAL({answer}){after}")
    assert d is not None and d.kind == "FINAL"
    assert d.argument == answer.strip()


@settings(max_examples=300, deadline=None)
@given(TEXT.map(lambda s: s.replace("\n", " ")))
def test_single_line_answers_with_any_parentheses(answer):
    d = find_final(f"Result below.\nFINAL({answer})\n")
    assert d is not None
    # an answer that is itself a string literal ('""', "'a' 'b'") is read as one: its value
    assert d.argument == (_literal(answer.strip()) if d.quoted else answer.strip())


def _literal(text: str) -> str:
    value = ast.literal_eval(text)
    assert isinstance(value, str)
    return value


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_quoted_answers_are_exact(answer):
    d = find_final(f"FINAL({answer!r})\nbye (for now)")
    assert d is not None and d.quoted and d.argument == answer


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_never_crashes(text):
    find_final(text)
    extract_code_blocks(text)


def test_a_hostile_quoted_answer_is_read_in_one_pass(monkeypatch):
    """``FINAL("`` then 100,000 ``)``: the literal was tried with ``literal_eval`` at every ``)``
    (40 s of the host's CPU, and no budget or cancel could stop it). Now at most once."""
    import rlm.final as final_module

    calls = []
    real = final_module.ast.literal_eval

    def counting(text):
        calls.append(len(text))
        return real(text)

    monkeypatch.setattr(final_module.ast, "literal_eval", counting)
    d = find_final('FINAL("' + ")" * 100_000)
    assert d is not None and not d.quoted and len(calls) <= 1
    calls.clear()
    d = find_final('FINAL("a ) b" "c")\nmore)')
    assert d.quoted and d.argument == "a ) bc" and len(calls) == 1
    assert find_final("FINAL(x\n" + "y)\n" * 50_000).argument.endswith("y")


# Replies made of fences, tags, blank and white-space-only bodies, and FINAL lines.
FENCED = st.lists(
    st.sampled_from(
        ["```", "````", "~~~", "~~~~", "`", "repl", " repl x", "python", "\n", " ", "\t", "x = 1", "FINAL(1)"]
    ),
    max_size=40,
).map("".join)


@settings(max_examples=400, deadline=None)
@given(FENCED, st.integers(0, 4))
def test_a_limit_keeps_the_first_blocks_and_the_count_counts_them_all(text, limit):
    blocks = extract_code_blocks(text)
    assert extract_code_blocks(text, limit=limit) == blocks[:limit]
    assert count_code_blocks(text) == len(blocks)
    assert count_code_blocks(text, "python") == len(extract_code_blocks(text, "python"))
    for block in blocks:
        assert block.strip() and not block.endswith("\n")


def test_a_fence_closes_only_with_its_own_character_and_at_least_its_length():
    reply = "````repl\na\n```\n~~~~\nb\n````  \n```repl\nc\n~~~\n"
    assert extract_code_blocks(reply) == ["a\n```\n~~~~\nb", "c\n~~~"]
    assert count_code_blocks(reply) == 2
    assert strip_code("x\n```repl\ny\n```\nz") == "x\n\n\nz"


@settings(max_examples=300, deadline=None)
@given(st.text(st.sampled_from("ab \n\t\u3000\x1c\u2028"), max_size=60), st.integers(1, 5))
def test_the_scripted_backend_counts_words_as_split_does(text, step):
    assert _count_words(text, step) == len(text.split())
