"""A question that needs the whole of a long document, answered by a Recursive Language Model.

The script writes a long public-domain-style chronicle itself (about 800 KB,
no download): the logbook of a harbour over 1,200 days, in plain prose. Ships
come and go; the question asks how many times one ship put into port, which
no excerpt can answer. The true answer is computed locally and printed next
to the model's.

    RLM_MODEL=gpt-4o-mini OPENAI_API_KEY=... python examples/long_document.py [--verbose] [--log-dir logs]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

SHIPS = [
    "Albatross",
    "Bright Morning",
    "Cormorant",
    "Dauntless",
    "Evening Star",
    "Fair Wind",
    "Gannet",
    "Heron",
]
WEATHER = [
    "a grey drizzle",
    "a hard north wind",
    "fog until noon",
    "a calm, bright sky",
    "squalls from the west",
]
CHORES = [
    "The harbour-master walked the quay and counted the bollards, as was his habit.",
    "Fishwives argued over the price of herring by the market steps.",
    "A cooper mended barrels in the shade of the customs house.",
    "Children raced paper boats along the gutter by the chandlery.",
    "The bell of Saint Anselm rang the hours, a little late as always.",
    "Gulls quarrelled over the nets drying on the shingle.",
]


def chronicle(days: int = 1200, seed: int = 7) -> tuple[str, dict[str, int]]:
    """The text and, per ship, how many times it put into port."""
    rng = random.Random(seed)
    arrivals = dict.fromkeys(SHIPS, 0)
    parts = ["THE LOGBOOK OF THE HARBOUR AT WESTERMOUTH\n\nKept by the harbour-master, in his own words.\n"]
    for day in range(1, days + 1):
        lines = [f"\nDay {day}. The weather was {rng.choice(WEATHER)}."]
        for _ in range(rng.randint(6, 10)):
            lines.append(rng.choice(CHORES))
            if rng.random() < 0.18:
                ship = rng.choice(SHIPS)
                if rng.random() < 0.5:
                    arrivals[ship] += 1
                    lines.append(
                        f"In the afternoon the {ship} put into port, low in the water with her cargo."
                    )
                else:
                    lines.append(
                        f"The {ship} was sighted off the point but stood out to sea again without calling."
                    )
        parts.append(" ".join(lines))
    return "\n".join(parts), arrivals


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--log-dir")
    args = parser.parse_args()
    text, arrivals = chronicle()
    ship = "Cormorant"
    print(f"document: {len(text):,} characters; the {ship} put into port {arrivals[ship]} times")
    model = os.environ.get("RLM_MODEL")
    if not model:
        print("Set RLM_MODEL (and the provider's API key) to have a model answer it, e.g.\n"
              "  RLM_MODEL=gpt-4o-mini OPENAI_API_KEY=sk-... python examples/long_document.py")  # fmt: skip
        return 0
    import rlm

    try:
        result = rlm.run(
            query=(
                f"How many times in the whole logbook did the ship {ship} put into port? "
                "Sightings without calling do not count. Answer with a number."
            ),
            context=text,
            model=model,
            api_base=os.environ.get("RLM_API_BASE"),
            max_iterations=15,
            verbose=args.verbose,
            log_dir=args.log_dir,
        )
    except rlm.RLMError as exc:  # a missing key, an unreachable server, ...: one line, not a traceback
        print(f"{Path(__file__).name}: {exc}", file=sys.stderr)
        return 1
    print(f"answer: {result.answer}  (expected {arrivals[ship]})")
    cost = "unknown" if result.cost_usd is None else f"${result.cost_usd:.4f}"
    print(f"stop: {result.stop_reason}, {result.iterations} turns, {result.sub_calls} sub-calls, cost {cost}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
