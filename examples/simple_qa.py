"""Ask a question about a small list of records with a Recursive Language Model.

    RLM_MODEL=gpt-4o-mini OPENAI_API_KEY=... python examples/simple_qa.py
    RLM_MODEL=openai/my-model RLM_API_BASE=http://127.0.0.1:8000/v1 python examples/simple_qa.py

The records go into the sandboxed REPL as ``context``; the model only sees
their size and a short preview, and answers by writing code.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

RECORDS = """Employee records
- Alice: Engineering, $75,000
- Bob: Marketing, $65,000
- Charlie: Engineering, $85,000
- Dana: Sales, $58,000
- Evan: Engineering, $92,000
"""


def main() -> int:
    model = os.environ.get("RLM_MODEL")
    if not model:
        print("Set RLM_MODEL to a litellm model string (and its provider's API key), e.g.\n"
              "  RLM_MODEL=gpt-4o-mini OPENAI_API_KEY=sk-... python examples/simple_qa.py")  # fmt: skip
        return 0
    import rlm

    try:
        result = rlm.run(
            query="What is the total salary of all Engineering employees?",
            context=RECORDS,
            model=model,
            api_base=os.environ.get("RLM_API_BASE"),
            max_iterations=10,
            verbose="-v" in sys.argv,
        )
    except rlm.RLMError as exc:  # a missing key, an unreachable server, ...: one line, not a traceback
        print(f"{Path(__file__).name}: {exc}", file=sys.stderr)
        return 1
    print(f"answer: {result.answer}  (expected $252,000)")
    cost = "unknown" if result.cost_usd is None else f"${result.cost_usd:.4f}"
    print(f"{result.iterations} turns, {result.code_executions} code blocks, {result.sub_calls} sub-calls, "
          f"{result.total_input_tokens}+{result.total_output_tokens} tokens, cost {cost}, stop: {result.stop_reason}")  # fmt: skip
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
