"""The long-context task benchmark: generators, scoring, table, CLI and the runner end to end.

Expected answers are re-derived here by an independent reading of the
generated text (separate regexes and a separate label classifier), never by
calling the generator's own bookkeeping. The end-to-end tests drive
``python -m bench.tasks`` in process against the loopback OpenAI-compatible
server of the model-loop tests (no network, no real key).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bench.tasks as bt
from bench.tasks import (
    RECORD_FIELDS,
    Task,
    decide_winner,
    format_report,
    generate,
    is_correct,
    markdown_table,
    normalize_answer,
    numbers_match,
    pairs_f1,
    parse_pairs,
    score,
)
from bench.tasks.cli import main, parse_sizes
from tests.llm_server import LLMServer, Reply

REPO = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------ independent readers
SALARY_LINE = re.compile(r"^- (?P<name>[^:]+): (?P<dept>[A-Za-z ]+), \$(?P<salary>[0-9,]+)\. ")


def engineering_total(context: str) -> int:
    """Sum the salary field of lines whose department field is exactly Engineering."""
    total = 0
    for line in context.splitlines()[1:]:
        m = SALARY_LINE.match(line)
        assert m, f"record not in the reference shape: {line!r}"
        if m["dept"] == "Engineering":
            total += int(m["salary"].replace(",", ""))
    return total


# Rules written for the test from the label definitions, not from the generator's templates table.
LABEL_RULES: list[tuple[str, re.Pattern[str]]] = [
    ("location", re.compile(r"^(Where (is|do)|Which country|In which city)\b")),
    ("numeric value", re.compile(r"^(How many|In what year|How tall|How long)\b")),
    ("human being", re.compile(r"^(Who|Which scientist)\b")),
    ("description", re.compile(r"^(Why|What does the word|How does|What is the purpose)\b")),
    ("abbreviation", re.compile(r"(stand for\?$|^What is the (abbreviation|acronym))")),
]
LINE = re.compile(
    r"^Date: [A-Z][a-z]{2} \d{2}, \d{4} \|\| User: (?P<user>\d{5}) \|\| Instance: (?P<text>.+)$"
)


def classify(text: str) -> str:
    hits = [label for label, rule in LABEL_RULES if rule.search(text)]
    assert len(hits) == 1, f"{text!r} matches {hits}"
    return hits[0]


def read_lines(context: str) -> list[tuple[int, str]]:
    out = []
    for line in context.splitlines():
        m = LINE.match(line)
        assert m, line
        out.append((int(m["user"]), classify(m["text"])))
    return out


# --------------------------------------------------------------------- generators
@pytest.mark.parametrize(("task", "size"), [("salary", 50), ("niah", 5000), ("aggregate", 80), ("pairs", 80)])
def test_generate_is_deterministic_and_seeded(task: str, size: int) -> None:
    a, b = generate(task, size, seed=3), generate(task, size, seed=3)
    assert a == b and a.context == b.context and a.expected == b.expected
    assert generate(task, size, seed=4).context != a.context
    assert generate(task, size).seed == 0 and a.name == task and a.size == size
    assert isinstance(a, Task) and isinstance(a.question, str) and a.question


def test_generators_do_not_touch_global_random_state() -> None:
    import random

    random.seed(1234)
    before = random.getstate()
    generate("salary", 30, seed=1)
    generate("pairs", 30, seed=1)
    assert random.getstate() == before
    random.seed(99)  # global state has no effect on the output either
    assert generate("aggregate", 40, seed=2) == generate("aggregate", 40, seed=2)


def test_same_task_in_another_process_with_another_hash_seed() -> None:
    code = (
        "import hashlib, json; from bench.tasks import generate;"
        "print(hashlib.sha256(json.dumps([(t.context, t.question, t.expected) for t in "
        "[generate(n, s, 7) for n, s in [('salary', 40), ('niah', 3000), ('aggregate', 40), ('pairs', 40)]]])"
        ".encode()).hexdigest())"
    )
    digests = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True
        )
        digests.add(out.stdout.strip())
    here = [
        (t.context, t.question, t.expected)
        for t in [
            generate(n, s, 7) for n, s in [("salary", 40), ("niah", 3000), ("aggregate", 40), ("pairs", 40)]
        ]
    ]
    digests.add(hashlib.sha256(json.dumps(here).encode()).hexdigest())
    assert len(digests) == 1


def test_generate_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown task"):
        generate("oolong", 10)
    with pytest.raises(ValueError, match="positive"):
        generate("salary", 0)
    with pytest.raises(ValueError, match="depth"):
        generate("niah", 1000, depth=1.5)
    with pytest.raises(ValueError, match="niah needs size"):
        generate("niah", 20)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("size", [1, 7, 100, 200])
def test_salary_expected_is_the_engineering_total(size: int, seed: int) -> None:
    t = generate("salary", size, seed)
    assert t.question == "What is the total salary of all Engineering employees?"
    assert len(t.context.splitlines()) == size + 1  # header + one line per record
    assert t.expected == f"${engineering_total(t.context):,}"
    assert is_correct("salary", t.expected, t.expected)


def test_salary_records_have_the_reference_shape_length_and_distractors() -> None:
    t = generate("salary", 200, seed=0)
    records = t.context.splitlines()[1:]
    mean = sum(len(r) for r in records) / len(records)
    assert 220 <= mean <= 265, mean  # reference: 24,390 chars for 100 records
    assert 100 * 220 <= len(generate("salary", 100).context) <= 100 * 265
    depts = {SALARY_LINE.match(r)["dept"] for r in records}  # type: ignore[index]
    assert {"Engineering", "Engineering Recruiting"} <= depts and len(depts) >= 6
    assert any("Engineering Recruiting team is part of HR" in r for r in records)
    assert any("bonus" in r for r in records) and any("Past salary" in r or "Earned $" in r for r in records)
    assert any("Transferred from Engineering" in r for r in records)
    assert any("Works closely with the Engineering team" in r for r in records)
    # A careless reader who sums every line mentioning Engineering, or every dollar figure, is wrong.
    careless = sum(
        int(SALARY_LINE.match(r)["salary"].replace(",", "")) for r in records if "Engineering" in r
    )  # type: ignore[index]
    assert f"${careless:,}" != t.expected
    names = [SALARY_LINE.match(r)["name"] for r in records]  # type: ignore[index]
    assert len(set(names)) == len(names)


@given(size=st.integers(1, 120), seed=st.integers(0, 10_000))
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_salary_expected_property(size: int, seed: int) -> None:
    t = generate("salary", size, seed)
    assert t.expected == f"${engineering_total(t.context):,}"
    assert engineering_total(t.context) > 0  # every task has at least one Engineering employee


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.25, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("size", [300, 4_000, 50_000])
def test_niah_fact_sits_at_the_depth(size: int, depth: float) -> None:
    t = generate("niah", size, seed=5, depth=depth)
    assert len(t.context) == size
    facts = re.findall(r"The special magic number for ([A-Za-z ]+) is (\d+)\.", t.context)
    assert len(facts) == 1
    key, number = facts[0]
    assert t.expected == number and key in t.question
    assert re.findall(r"\d", t.context.replace(number, "")) == []  # no other digits in the filler
    pos = t.context.index("The special magic number")
    needle_len = len(f"The special magic number for {key} is {number}.")
    # Snapped to a sentence start: within one filler sentence (< 200 chars) of the asked depth.
    assert abs(pos - depth * (size - needle_len - 1)) <= 200
    assert generate("niah", size, seed=5, depth=0.0).context.startswith("The special magic number")


def test_niah_filler_is_the_same_at_every_depth() -> None:
    a, b = generate("niah", 5000, 1, depth=0.2), generate("niah", 5000, 1, depth=0.8)
    strip = re.compile(r"The special magic number for [A-Za-z ]+ is \d+\. ?")
    assert strip.sub("", a.context) == strip.sub("", b.context)
    assert a.expected == b.expected and a != b


@given(size=st.integers(1, 150), seed=st.integers(0, 10_000))
@settings(max_examples=30, deadline=None)
def test_aggregate_expected_is_the_count(size: int, seed: int) -> None:
    t = generate("aggregate", size, seed)
    rows = read_lines(t.context)
    assert len(rows) == size
    m = re.search(r"How many lines have the label '([a-z ]+)'\?", t.question)
    assert m and m[1] in bt.LABELS
    assert t.expected == str(sum(1 for _, label in rows if label == m[1]))


def independent_pairs(t: Task) -> list[tuple[int, int]]:
    labels = re.findall(r"at least one line with the label '([a-z ]+)'", t.question)
    assert 1 <= len(labels) <= 2
    has: dict[int, set[str]] = {}
    for user, label in read_lines(t.context):
        has.setdefault(user, set()).add(label)
    ok = sorted(u for u, got in has.items() if set(labels) <= got)
    return list(itertools.combinations(ok, 2))


@given(size=st.integers(4, 200), seed=st.integers(0, 10_000))
@settings(max_examples=40, deadline=None)
def test_pairs_expected_are_the_qualifying_pairs(size: int, seed: int) -> None:
    t = generate("pairs", size, seed)
    assert len(t.context.splitlines()) == size
    assert t.expected == independent_pairs(t)
    assert 1 <= len(t.expected) <= 28  # bounded answer: at most 8 qualifying users
    assert pairs_f1("\n".join(f"({a}, {b})" for a, b in t.expected), t.expected) == 1.0


def test_pairs_uses_both_condition_shapes() -> None:
    shapes = {len(re.findall(r"with the label '", generate("pairs", 60, s).question)) for s in range(12)}
    assert shapes == {1, 2}  # "has X" and "has X and Y"


# ------------------------------------------------------------------------ scoring
@pytest.mark.parametrize(
    ("answer", "expected", "ok"),
    [
        ("$1,105,000", "$1,105,000", True),
        ("1105000", "$1,105,000", True),
        ("1 105 000", "$1,105,000", True),
        ("$ 1,105,000.", "$1,105,000", True),
        ("1105000.00", "$1,105,000", True),
        ("The total is $1,105,000.", "$1,105,000", True),
        ("$145,000", "$1,105,000", False),
        ("$1,105,001", "$1,105,000", False),
        ("between $1,000 and $1,105,000", "$1,105,000", False),
        ("", "$1,105,000", False),
        (None, "$1,105,000", False),
        ("€42", "42", True),
        ("4 2", "42", True),
        ("Forty-two", "42", False),
        ("  7340012 ", "7340012", True),
        ("Paris", "paris", True),
        ("Paris, France", "paris", False),
    ],
)
def test_numbers_match(answer: str | None, expected: str, ok: bool) -> None:
    assert numbers_match(answer, expected) is ok
    assert score("salary", answer, expected) == (1.0 if ok else 0.0)


def test_normalize_answer() -> None:
    assert normalize_answer("$1,105,000.") == "1105000"
    assert normalize_answer(" £ 3 ,000 ") == "3000"
    assert normalize_answer(None) == ""


def test_parse_pairs_formats() -> None:
    want = {(10001, 20002), (30003, 40004)}
    assert parse_pairs("(10001, 20002)\n(30003, 40004)") == want
    assert parse_pairs("[(20002, 10001), (30003, 40004)]") == want  # order inside a pair does not matter
    assert parse_pairs('[["10001", "20002"], ["40004", "30003"]]') == want
    assert parse_pairs("10001 - 20002\n30003 and 40004\nthere are 2 pairs") == want
    assert parse_pairs([[10001, 20002], (40004, 30003)]) == want
    assert parse_pairs("") == set() and parse_pairs(None) == set()


def test_pairs_f1_edge_cases() -> None:
    exp = [(1, 2), (1, 3), (2, 3), (3, 4)]
    assert pairs_f1("(1, 2) (1, 3) (2, 3) (3, 4)", exp) == 1.0
    assert pairs_f1("(2, 1) (1, 3) (1, 3) (3, 2) (4, 3)", exp) == 1.0  # duplicates and order ignored
    # 2 of 3 predicted are right (precision 2/3) and 2 of 4 expected are found (recall 1/2): F1 = 4/7
    assert pairs_f1("(1, 2) (1, 3) (5, 6)", exp) == pytest.approx(4 / 7)
    assert pairs_f1("nothing", exp) == 0.0 and pairs_f1(None, exp) == 0.0
    assert pairs_f1("", []) == 1.0 and pairs_f1("(1, 2)", []) == 0.0
    assert not is_correct("pairs", "(1, 2) (1, 3) (2, 3)", exp) and is_correct(
        "pairs", "(3,4)(2,3)(1,3)(1,2)", exp
    )
    t = generate("pairs", 50, 1)
    assert t.score("(1, 2)") == 0.0 and t.is_correct("\n".join(map(str, t.expected)))


# ------------------------------------------------------------------------- winner
@pytest.mark.parametrize(
    ("args", "winner"),
    [
        ((True, 0.04, 40.0, "ok", False, 0.04, 3.0), "rlm"),
        ((False, 0.04, 40.0, "ok", True, 0.08, 3.0), "direct"),
        ((False, 0.04, 40.0, "ok", False, 0.04, 3.0), "none"),
        ((True, 0.04, 40.0, "ok", True, 0.08, 3.0), "rlm"),  # both right: cheaper
        ((True, 0.09, 40.0, "ok", True, 0.08, 3.0), "direct"),
        ((True, 0.05, 40.0, "ok", True, 0.05, 3.0), "direct"),  # same cost: faster
        ((True, None, 2.0, "ok", True, 0.08, 3.0), "rlm"),  # unknown cost does not decide
        ((True, 0.04, 40.0, "does not fit", False, None, None), "rlm"),
        ((False, 0.04, 40.0, "does not fit", False, None, None), "none"),
        ((False, 0.04, 40.0, "error", False, None, 1.0), "none"),
        ((True, 0.04, 40.0, "skipped", None, None, None), "-"),
        ((False, 0.04, 40.0, "skipped", None, None, None), "-"),
    ],
)
def test_decide_winner(args: tuple[Any, ...], winner: str) -> None:
    assert decide_winner(*args) == winner


# -------------------------------------------------------------------------- table
def _record(**kw: Any) -> dict[str, Any]:
    base = dict.fromkeys(RECORD_FIELDS)
    base.update(
        task="salary",
        size=100,
        seed=0,
        context_chars=24390,
        question="q",
        expected="$1,105,000",
        rlm_answer="$1,105,000",
        rlm_correct=True,
        rlm_cost_usd=0.0437,
        rlm_time_s=43.91,
        direct_answer="$145,000",
        direct_correct=False,
        direct_cost_usd=0.041,
        direct_time_s=3.3,
        direct_status="ok",
        winner="rlm",
    )
    base.update(kw)
    return base


def test_markdown_table_has_the_reference_columns() -> None:
    recs = [
        _record(),
        _record(
            size=200,
            context_chars=48835,
            expected="$2,822,000",
            rlm_answer="a | b\nc",
            rlm_correct=False,
            rlm_cost_usd=None,
            direct_answer=None,
            direct_correct=False,
            direct_cost_usd=None,
            direct_time_s=None,
            direct_status="does not fit",
            winner="none",
        ),
    ]
    table = markdown_table(recs).splitlines()
    assert table[0] == (
        "| Records | Context | Expected | RLM Answer | Direct Answer | RLM Cost | Direct Cost "
        "| RLM Time | Direct Time | Winner |"
    )
    assert table[1] == "|---|---|---|---|---|---|---|---|---|---|"
    assert table[2] == (
        "| 100 | 24,390 chars | $1,105,000 | $1,105,000 | $145,000 | $0.0437 | $0.0410 | 43.9s | 3.3s | RLM |"
    )
    assert (
        table[3]
        == "| 200 | 48,835 chars | $2,822,000 | a \\| b c | does not fit | n/a | - | 43.9s | - | none |"
    )
    report = format_report(recs, "salary: title")
    assert report.splitlines()[0] == "salary: title"
    assert report.splitlines()[-2:] == [
        "RLM accuracy: 1/2 (50%) (by size 100: 1/1, 200: 0/1)",
        "Direct accuracy: 0/2 (0%) (by size 100: 0/1, 200: 0/1); 1 did not fit",
    ]


def test_accuracy_lines_without_direct_model_and_for_pairs() -> None:
    recs = [
        _record(
            direct_status="skipped",
            direct_answer=None,
            direct_correct=None,
            direct_cost_usd=None,
            direct_time_s=None,
            winner="-",
        )
    ]
    lines = format_report(recs).splitlines()
    assert lines[2].endswith("| - | $0.0437 | - | 43.9s | - | - |")
    assert lines[-2:] == ["RLM accuracy: 1/1 (100%)", "Direct accuracy: - (no --direct-model given)"]
    pairs = [
        _record(
            task="pairs",
            expected=[[1, 2], [1, 3]],
            rlm_answer="(1, 2)",
            rlm_correct=False,
            direct_answer="(1, 2) (1, 3)",
            direct_correct=True,
            winner="direct",
        )
    ]
    text = format_report(pairs)
    assert "| Lines |" in text and "| 2 pairs | F1 0.67 | F1 1.00 |" in text
    assert (
        "RLM accuracy: 0/1 (0%), mean F1 0.67" in text and "Direct accuracy: 1/1 (100%), mean F1 1.00" in text
    )


def test_write_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from bench.tasks.plot import write_plot

    recs = [
        _record(),
        _record(
            size=200,
            context_chars=48835,
            direct_status="does not fit",
            direct_correct=False,
            direct_cost_usd=None,
        ),
    ]
    out = write_plot(recs, tmp_path / "p" / "bench.png", "salary")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------- CLI
def test_parse_sizes() -> None:
    assert parse_sizes("100,200, 1000") == [100, 200, 1000]
    assert parse_sizes("8k,1m,1.5k") == [8000, 1_000_000, 1500]
    for bad in ("", "0", "-5", "abc", "1.5"):
        with pytest.raises(Exception, match="size"):
            parse_sizes(bad)


def _run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "RLM_MODEL"}
    return subprocess.run(
        [sys.executable, "-m", "bench.tasks", *args],
        cwd=REPO,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_help_documents_every_option() -> None:
    out = _run_cli("--help")
    assert out.returncode == 0
    for opt in (
        "--task",
        "--sizes",
        "--model",
        "--direct-model",
        "--sub-model",
        "--repeats",
        "--seed",
        "--depth",
        "--api-base",
        "--log-dir",
        "--out",
        "--plot",
        "--max-iterations",
        "RLM_MODEL",
        "./bench-logs",
        "salary",
        "niah",
        "aggregate",
        "pairs",
        "records",
        "characters",
        "lines",
    ):
        assert opt in out.stdout, opt


def test_no_model_configured_is_one_clear_line() -> None:
    out = _run_cli("--task", "salary", "--sizes", "10")
    assert out.returncode == 2 and out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1
    assert "--model" in out.stderr and "RLM_MODEL" in out.stderr


def test_usage_errors_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _run_cli("--task", "salary", "--sizes", "ten", "--model", "m").returncode == 2
    assert _run_cli("--task", "niah", "--depth", "2", "--model", "m").returncode == 2
    monkeypatch.delenv("RLM_MODEL", raising=False)
    assert main(["--task", "niah", "--sizes", "10", "--model", "m", "--log-dir", str(tmp_path)]) == 2
    assert "niah needs size" in capsys.readouterr().err
    import bench.tasks.plot as plot_mod

    monkeypatch.setattr(plot_mod, "plot_available", lambda: False)
    assert (
        main(["--sizes", "5", "--model", "m", "--plot", str(tmp_path / "x.png"), "--log-dir", str(tmp_path)])
        == 2
    )
    assert "pip install 'rlm[plot]'" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing ran, nothing written


# ------------------------------------------------- direct calls, loopback server

WRONG = "$145,000"


def _direct_reply(req: Any) -> str | Reply:
    if req.model == "ctx-small":
        return Reply(
            "This model's maximum context length is 100 tokens",
            status=400,
            error_code="context_length_exceeded",
        )
    if req.model == "denied":
        return Reply("Incorrect API key provided", status=401, error_code="invalid_api_key")
    if req.model == "broken":
        return Reply("the server could not read the request", status=400)
    return WRONG


def test_run_direct_statuses_against_the_loopback_server() -> None:
    from bench.tasks.runner import BenchConfig, direct_messages, run_direct

    small = generate("salary", 5)
    with LLMServer(_direct_reply) as srv:

        def direct(model: str | None, task: Task = small) -> Any:
            cfg = BenchConfig(
                task=task.name, sizes=[task.size], model="unused", direct_model=model, api_base=srv.base_url
            )
            return run_direct(task, cfg)

        ok = direct("openai/plain")
        assert (ok.status, ok.answer, ok.cost_usd, ok.error) == ("ok", WRONG, None, None)
        assert ok.time_s is not None and ok.time_s >= 0
        req = srv.requests[-1]
        assert req.messages == direct_messages(small) and small.context in req.last_user
        priced = direct("openai/gpt-4o-mini")  # in litellm's price map: a cost is known
        assert priced.status == "ok" and priced.cost_usd is not None and priced.cost_usd > 0
        # Unknown window: the call is tried and the provider's context-length error means "does not fit".
        unfit = direct("openai/ctx-small")
        assert unfit.status == "does not fit" and unfit.answer is None and "context" in (unfit.error or "")
        assert direct("openai/denied").status == "error"  # a rejected key is recorded, not raised
        assert direct("openai/broken").status == "error"
        assert direct(None).status == "skipped"
        # Known window (16,385 tokens) and a ~26k-token prompt: no call is made at all.
        before = len(srv.requests)
        big = direct("openai/gpt-3.5-turbo", generate("niah", 120_000))
        assert big.status == "does not fit" and big.time_s is None and "window" in (big.error or "")
        assert len(srv.requests) == before
        assert [r.model for r in srv.requests] == ["plain", "gpt-4o-mini", "ctx-small", "denied", "broken"]


# ------------------------------------------------------ the runner, end to end
# The scripted root model answers like a careful RLM: a first turn of code that reads
# `context` in the sandbox, then FINAL_VAR naming the variable the code filled.
SALARY_CODE = """Let me sum the Engineering salaries in code.
```repl
import re
total = 0
for line in context.splitlines():
    m = re.match(r"- [^:]+: ([^,]+), \\$([0-9,]+)\\.", line)
    if m and m.group(1) == "Engineering":
        total += int(m.group(2).replace(",", ""))
answer = "${:,}".format(total)
print(answer)
```"""
NIAH_CODE = """```repl
import re
answer = re.search(r"special magic number for .+? is (\\d+)", context).group(1)
print(answer)
```"""


def scripted(req: Any) -> str | Reply:
    """Root model: code, then FINAL_VAR. Direct model: a wrong figure, or the right one if named so."""
    from bench.tasks.runner import SYSTEM_PROMPT

    first = str(req.messages[0].get("content")) if req.messages else ""
    if first == SYSTEM_PROMPT:  # the direct call
        if req.model.endswith("denied"):
            return Reply("Incorrect API key provided", status=401, error_code="invalid_api_key")
        if req.model.endswith("right") or req.model == "gpt-4o-mini":
            context = req.last_user.split("\n\nQuestion: ")[0]
            return f"${engineering_total(context):,}"
        return WRONG
    if req.model == "root-denied":
        return Reply("Incorrect API key provided", status=401, error_code="invalid_api_key")
    if any(m.get("role") == "assistant" for m in req.messages):
        return "FINAL_VAR(answer)"
    return NIAH_CODE if "magic number" in req.prompt_text else SALARY_CODE


@pytest.fixture
def server() -> Any:
    with LLMServer(scripted) as srv:
        yield srv


def _bench(srv: LLMServer, tmp_path: Path, *args: str) -> list[str]:
    return [
        *args,
        "--api-base",
        srv.base_url,
        "--log-dir",
        str(tmp_path / "logs"),
        "--out",
        str(tmp_path / "r.jsonl"),
    ]


def _records(tmp_path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]


def test_runner_salary_table_and_jsonl(
    server: LLMServer, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RLM_MODEL", "openai/root")  # --model falls back to RLM_MODEL
    argv = _bench(
        server,
        tmp_path,
        "--task",
        "salary",
        "--sizes",
        "5,12",
        "--repeats",
        "2",
        "--seed",
        "3",
        "--direct-model",
        "openai/direct",
    )
    assert main(argv) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0] == "salary: RLM with openai/root vs openai/direct called directly"
    i = lines.index(
        "| Records | Context | Expected | RLM Answer | Direct Answer | RLM Cost | Direct Cost | RLM Time | Direct Time | Winner |"
    )
    rows = lines[i + 2 : i + 6]
    tasks = [generate("salary", size, seed) for size in (5, 12) for seed in (3, 4)]
    for row, t in zip(rows, tasks, strict=True):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[:5] == [str(t.size), f"{len(t.context):,} chars", t.expected, t.expected, WRONG]
        assert cells[5:7] == ["n/a", "n/a"]  # the loopback models have no price
        assert re.fullmatch(r"\d+\.\ds", cells[7]) and re.fullmatch(r"\d+\.\ds", cells[8])
        assert cells[9] == "RLM"
    assert lines[i + 6] == ""
    assert lines[i + 7 :] == [
        "RLM accuracy: 4/4 (100%) (by size 5: 2/2, 12: 2/2)",
        "Direct accuracy: 0/4 (0%) (by size 5: 0/2, 12: 0/2)",
    ]
    assert "[1/4] salary size=5 seed=3" in err and "[4/4] salary size=12 seed=4" in err
    records = _records(tmp_path)
    assert len(records) == 4
    for rec, t in zip(records, tasks, strict=True):
        assert tuple(rec) == RECORD_FIELDS
        assert (rec["task"], rec["size"], rec["seed"]) == ("salary", t.size, t.seed)
        assert rec["context_chars"] == len(t.context) and rec["question"] == t.question
        assert rec["expected"] == rec["rlm_answer"] == t.expected == f"${engineering_total(t.context):,}"
        assert rec["rlm_correct"] is True and rec["direct_correct"] is False
        assert rec["direct_answer"] == WRONG and rec["direct_status"] == "ok" and rec["winner"] == "rlm"
        assert rec["rlm_cost_usd"] is None and rec["direct_cost_usd"] is None
        assert rec["rlm_time_s"] > 0 and rec["direct_time_s"] >= 0
    # Each run: two root turns and one direct call reached the server; every trajectory was kept.
    models = [r.model for r in server.requests]
    assert models.count("root") == 8 and models.count("direct") == 4
    trajectories = [p for p in (tmp_path / "logs").iterdir() if p.suffix == ".jsonl"]
    assert len(trajectories) == 4
    # A second run appends to the same file.
    assert main([*argv[:4], "--sizes", "5", "--repeats", "1", *argv[8:], "-q"]) == 0
    assert len(_records(tmp_path)) == 5 and capsys.readouterr().err == ""


def test_runner_does_not_fit_no_direct_model_and_plot(
    server: LLMServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    # gpt-3.5-turbo has a 16,385-token window in litellm's model info; 120k characters do not fit.
    argv = _bench(
        server,
        tmp_path,
        "--task",
        "niah",
        "--sizes",
        "2000,120k",
        "--depth",
        "0.25",
        "--model",
        "openai/root",
        "--direct-model",
        "openai/gpt-3.5-turbo",
        "--plot",
        str(tmp_path / "niah.png"),
    )
    assert main(argv) == 0
    out = capsys.readouterr().out
    records = _records(tmp_path)
    assert [r["direct_status"] for r in records] == ["ok", "does not fit"]
    assert all(r["rlm_correct"] for r in records) and [r["winner"] for r in records] == ["rlm", "rlm"]
    assert records[1]["direct_answer"] is None and records[1]["direct_time_s"] is None
    assert records[0]["expected"] == generate("niah", 2000, 0, depth=0.25).expected
    assert "| 120,000 | 120,000 chars |" in out and "| does not fit |" in out
    assert "Direct accuracy: 0/2 (0%) (by size 2,000: 0/1, 120,000: 0/1); 1 did not fit" in out
    assert [r.model for r in server.requests].count("gpt-3.5-turbo") == 1  # only the run that fits was sent
    assert (tmp_path / "niah.png").read_bytes()[:4] == b"\x89PNG"
    # Without --direct-model the direct side is skipped and the winner is "-".
    assert (
        main(_bench(server, tmp_path, "--task", "salary", "--sizes", "3", "--model", "openai/root", "-q"))
        == 0
    )
    rec = _records(tmp_path)[-1]
    assert (rec["direct_status"], rec["direct_answer"], rec["direct_correct"], rec["winner"]) == (
        "skipped",
        None,
        None,
        "-",
    )
    assert "Direct accuracy: - (no --direct-model given)" in capsys.readouterr().out


def test_runner_direct_error_is_recorded_and_cheaper_wins(
    server: LLMServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = _bench(
        server, tmp_path, "--sizes", "4", "--model", "openai/root", "--direct-model", "openai/denied"
    )
    assert main(argv) == 0
    rec = _records(tmp_path)[-1]
    assert (rec["direct_status"], rec["direct_correct"], rec["winner"]) == ("error", False, "rlm")
    out, err = capsys.readouterr()
    assert "| error |" in out and "1 failed with an error" in out and "direct: error" in err
    # Both right, both priced (gpt-4o-mini is in litellm's price map): the cheaper one wins.
    argv = _bench(
        server,
        tmp_path,
        "--sizes",
        "4",
        "--model",
        "openai/gpt-4o-mini",
        "--direct-model",
        "openai/gpt-4o-mini",
    )
    assert main(argv) == 0
    rec = _records(tmp_path)[-1]
    assert rec["rlm_correct"] and rec["direct_correct"]
    assert (
        rec["rlm_cost_usd"] > 0
        and rec["direct_cost_usd"] > 0
        and rec["rlm_cost_usd"] != rec["direct_cost_usd"]
    )
    assert rec["winner"] == ("rlm" if rec["rlm_cost_usd"] < rec["direct_cost_usd"] else "direct")
    assert re.search(r"\| \$0\.\d{4} \| \$0\.\d{4} \|", capsys.readouterr().out)


def test_runner_rejected_root_key_stops_with_one_line(
    server: LLMServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_bench(server, tmp_path, "--sizes", "4,5", "--model", "openai/root-denied", "-q")) == 1
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and "root-denied" in err
    assert not (tmp_path / "r.jsonl").exists()
    assert (
        main(_bench(server, tmp_path, "--sizes", "4", "--model", "openai/root", "--policy", "no-such-policy"))
        == 1
    )
    err = capsys.readouterr().err
    assert "no-such-policy" in err and "Traceback" not in err


def test_salary_names_stay_unique_past_the_plain_names() -> None:
    t = generate("salary", 3000, seed=2)
    names = [SALARY_LINE.match(r)["name"] for r in t.context.splitlines()[1:]]  # type: ignore[index]
    assert len(set(names)) == 3000 and any(re.search(r" [A-Z]\. ", n) for n in names)
    assert t.expected == f"${engineering_total(t.context):,}"


def test_runner_runs_the_rlm_runs_through_the_batch_engine_with_workers(
    server: LLMServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server.set_latency(0.2)
    argv = _bench(
        server, tmp_path, "--sizes", "5,12", "--repeats", "2", "--model", "openai/root", "--workers", "4"
    )
    assert main([*argv, "-q"]) == 0
    records = _records(tmp_path)
    tasks = [generate("salary", size, seed) for size in (5, 12) for seed in (0, 1)]
    assert sorted((r["size"], r["seed"]) for r in records) == [(t.size, t.seed) for t in tasks]
    assert all(r["rlm_correct"] and r["rlm_answer"] == r["expected"] for r in records)
    # the four runs overlapped: their first root calls reached the server within one latency of each other
    firsts = sorted(q.received_at for q in server.requests if len(q.messages) == 2)
    assert len(firsts) == 4 and firsts[-1] - firsts[0] < 0.2 * 4
    out = capsys.readouterr().out
    assert "RLM accuracy: 4/4 (100%)" in out
