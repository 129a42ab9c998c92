"""The RLM part of ``make demo``: one small Recursive Language Model job, if a model is configured.

``main()`` runs a short job and prints the answer and usage when ``RLM_MODEL``
is set or a provider key is in the environment (OPENAI_API_KEY ->
gpt-4o-mini, ANTHROPIC_API_KEY -> a Claude Haiku model); otherwise it says
how to configure one, and runs the same job with a scripted model (replies
written in advance, no network; the code still runs in the real sandbox) so
there is a run to look at. It returns 0 either way: the demo never fails for
lack of a model, and a model error is printed as one line. It ends by writing
the run's ``rlm view`` page under ``logs/rlm-demo/`` and printing its path.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

LOG_DIR = Path(__file__).resolve().parent.parent / "logs" / "rlm-demo"

# What a model typically does on this job: look, split, batch the chunks, add up.
SCRIPT = [
    "Let me look at the records first.\n```repl\nprint(len(context))\nprint(context[:200])\n```",
    "Each line has a department and a salary. I will check the departments with sub-calls on chunks, "
    "and sum in code.\n```repl\nimport re\nrows = context.splitlines()[1:]\n"
    "chunks = ['\\n'.join(rows[i:i + 40]) for i in range(0, len(rows), 40)]\n"
    "counts = llm_query_batched(['How many Engineering lines are there?\\n' + c for c in chunks])\n"
    "eng = [r for r in rows if ', Engineering,' in r or ': Engineering,' in r]\n"
    "total = sum(int(r.rsplit('$', 1)[1].replace(',', '')) for r in eng)\n"
    "print(len(eng), counts, total)\n```",
    "FINAL_VAR(total)",
]


def _scripted() -> Any:
    from rlm.backend import ScriptedBackend

    def reply(model: str, messages: list[dict[str, Any]]) -> str:
        if model == "scripted-sub":
            text = str(messages[-1]["content"])
            return f"{text.count('Engineering') - 1} Engineering lines"
        turn = sum(1 for m in messages if m.get("role") == "assistant")
        return SCRIPT[min(turn, len(SCRIPT) - 1)]

    return ScriptedBackend(reply, price_per_token=1e-7)


def _write_page(result: Any) -> None:
    if not result.log_path:
        return
    from rlm.view import write_page

    page = write_page(result.log_path)
    print(f"  trajectory {result.log_path}")
    print(f"  rlm view page: {page}   (open it in a browser; `rlm view {LOG_DIR}` lists every demo run)")

_DEFAULTS = (("OPENAI_API_KEY", "gpt-4o-mini"), ("ANTHROPIC_API_KEY", "anthropic/claude-3-5-haiku-latest"))


def _model() -> str | None:
    if os.environ.get("RLM_MODEL"):
        return os.environ["RLM_MODEL"]
    return next((model for key, model in _DEFAULTS if os.environ.get(key)), None)


def _records() -> str:
    depts = ["Engineering", "Marketing", "Sales", "Support"]
    rows = [
        f"{i:03d}. Employee {i}: {depts[i * 7 % 4]}, ${40_000 + (i * 7919) % 60_000:,}" for i in range(1, 121)
    ]
    return "Staff list\n" + "\n".join(rows)


def main() -> int:
    model = _model()
    backend = None
    if model is None:
        print("No model configured: this run uses a scripted model (replies written in advance, no network).")
        print("  Set RLM_MODEL to any litellm model string (plus its provider's API key), e.g.")
        print(
            "  RLM_MODEL=gpt-4o-mini OPENAI_API_KEY=sk-... make demo   (or RLM_API_BASE=http://host/v1 for a local server)"
        )
        model, backend = "scripted-root", _scripted()
    import rlm

    text = _records()
    expected = sum(
        int(line.rsplit("$", 1)[1].replace(",", ""))
        for line in text.splitlines()[1:]
        if "Engineering" in line
    )
    print(f"RLM demo: model {model}, {len(text):,} characters of records in the sandbox")
    try:
        result = rlm.run(
            "What is the total salary of all Engineering employees? Answer with the number.",
            text,
            model=model,
            api_base=os.environ.get("RLM_API_BASE"),
            max_iterations=8,
            max_time_s=180,
            log_dir=LOG_DIR,
            **({"backend": backend, "sub_model": "scripted-sub"} if backend is not None else {}),
        )
    except rlm.RLMError as exc:  # the configured model failed (a key, a server): make demo says so
        print(f"RLM demo: {exc}")
        return 1
    cost = "unknown" if result.cost_usd is None else f"${result.cost_usd:.4f}"
    print(f"  answer: {result.answer}   (expected {expected:,})")
    print(f"  {result.iterations} turns, {result.code_executions} code blocks, {result.sub_calls} sub-calls, "
          f"{result.total_input_tokens:,} in / {result.total_output_tokens:,} out tokens, cost {cost}, "
          f"{result.execution_time:.1f} s, stop: {result.stop_reason}")  # fmt: skip
    _write_page(result)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
