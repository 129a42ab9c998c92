"""The RLM part of ``make demo``: one small Recursive Language Model job, if a model is configured.

``main()`` runs a short job and prints the answer and usage when ``RLM_MODEL``
is set or a provider key is in the environment (OPENAI_API_KEY ->
gpt-4o-mini, ANTHROPIC_API_KEY -> a Claude Haiku model); otherwise it says
how to configure one. It returns 0 either way: the demo never fails for lack
of a model, and a model error is printed as one line.
"""

from __future__ import annotations

import os
import sys

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
    if model is None:
        print("RLM demo skipped: no model configured.")
        print("  Set RLM_MODEL to any litellm model string (plus its provider's API key), e.g.")
        print(
            "  RLM_MODEL=gpt-4o-mini OPENAI_API_KEY=sk-... make demo   (or RLM_API_BASE=http://host/v1 for a local server)"
        )
        return 0
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
        )
    except rlm.RLMError as exc:
        print(f"RLM demo: {exc}")
        return 0
    cost = "unknown" if result.cost_usd is None else f"${result.cost_usd:.4f}"
    print(f"  answer: {result.answer}   (expected {expected:,})")
    print(f"  {result.iterations} turns, {result.code_executions} code blocks, {result.sub_calls} sub-calls, "
          f"{result.total_input_tokens:,} in / {result.total_output_tokens:,} out tokens, cost {cost}, "
          f"{result.execution_time:.1f} s, stop: {result.stop_reason}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
