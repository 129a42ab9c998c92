"""``python -m bench.tasks``: RLM against a direct call on generated long-context tasks.

Exit status: 0 when every run finished, 1 when the run was aborted (bad key,
unknown model, unusable RLM setting), 2 for usage errors (including no model
configured), 130 when interrupted (the finished runs are already in the JSONL).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.tasks.generators import TASKS, UNITS, generate
from bench.tasks.runner import BenchAborted, BenchConfig, run_benchmark

__all__ = ["build_parser", "main", "parse_sizes"]

EXIT_OK, EXIT_ABORTED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
PROG = "python -m bench.tasks"
NO_MODEL = (
    f"{PROG}: no model configured: pass --model MODEL or set RLM_MODEL "
    "(any litellm model string, e.g. RLM_MODEL=gpt-4o-mini, with the provider's key in its usual "
    "variable such as OPENAI_API_KEY)"
)

_EPILOG = """\
Units of --sizes: records for salary, characters for niah, lines for aggregate and pairs
(k and m suffixes are accepted: 8k, 1m).

Every model of the run (--model, --sub-model, --direct-model) goes through litellm, so any
litellm model string works; keys come from the provider's usual environment variables
(OPENAI_API_KEY, ANTHROPIC_API_KEY, ...), never from the command line.

Example (the reference table, with your own key):
  export ANTHROPIC_API_KEY=...
  python -m bench.tasks --task salary --sizes 100,200 \\
      --model anthropic/claude-haiku-4-5 --direct-model anthropic/claude-opus-4-5

Output: the Markdown table on stdout, then one accuracy line per method; progress on
stderr; one JSONL record per (task, size, repeat) appended to --out.
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # usage errors: one line, exit 2
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def parse_sizes(text: str) -> list[int]:
    """``"100,200,8k,1m"`` -> ``[100, 200, 8000, 1000000]``."""
    sizes: list[int] = []
    for raw in text.split(","):
        item = raw.strip().lower().replace("_", "")
        if not item:
            continue
        scale = 1
        if item[-1] in "km":
            scale = 1000 if item[-1] == "k" else 1_000_000
            item = item[:-1]
        try:
            value = float(item) * scale
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a size: {raw.strip()!r}") from None
        if value < 1 or value != int(value):
            raise argparse.ArgumentTypeError(f"sizes must be positive whole numbers, got {raw.strip()!r}")
        sizes.append(int(value))
    if not sizes:
        raise argparse.ArgumentTypeError("no sizes given")
    return sizes


def _depth(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"depth must be between 0.0 and 1.0, got {text}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    units = "; ".join(f"{t}: {UNITS[t][1]}" for t in TASKS)
    p = _Parser(
        prog=PROG,
        description=(
            "Long-context task benchmark: run an RLM and (optionally) a model called directly with\n"
            "the whole context on the same generated tasks, print the Markdown results table and\n"
            "append every run to a JSONL file."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--task", choices=TASKS, default="salary", help="task family (default: salary)")
    p.add_argument(
        "--sizes",
        type=parse_sizes,
        default=[100, 200],
        metavar="N[,N...]",
        help=f"comma-separated sizes, in the task's unit ({units}); default: 100,200",
    )
    p.add_argument(
        "-m",
        "--model",
        metavar="MODEL",
        help="root model of the RLM, any litellm model string (default: $RLM_MODEL)",
    )
    p.add_argument(
        "--direct-model",
        metavar="MODEL",
        help="model called directly with the whole context for comparison (default: none, the "
        "direct columns show '-')",
    )
    p.add_argument(
        "--sub-model", metavar="MODEL", help="model of the RLM's llm_query sub-calls (default: --model)"
    )
    p.add_argument(
        "--repeats",
        type=_positive,
        default=1,
        metavar="K",
        help="runs per size; repeat i uses seed --seed + i (default: 1)",
    )
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the first repeat (default: 0)")
    p.add_argument(
        "--depth",
        type=_depth,
        default=0.5,
        metavar="D",
        help="niah only: where the fact sits, 0.0 (start) .. 1.0 (end) (default: 0.5)",
    )
    p.add_argument(
        "--api-base",
        metavar="URL",
        help="API base URL used for every model of the run (e.g. a local OpenAI-compatible server)",
    )
    p.add_argument(
        "--log-dir",
        type=Path,
        default=Path("bench-logs"),
        metavar="DIR",
        help="where every RLM trajectory (and its sandbox audit log) is kept (default: ./bench-logs)",
    )
    p.add_argument(
        "--out",
        type=Path,
        metavar="FILE",
        help="JSONL file each run's record is appended to (default: LOG_DIR/results.jsonl)",
    )
    p.add_argument(
        "--plot",
        type=Path,
        metavar="FILE.png",
        help="also write a PNG of accuracy and cost against context length (needs the 'plot' extra: "
        "pip install 'rlm[plot]')",
    )
    p.add_argument(
        "--max-iterations",
        type=_positive,
        default=20,
        metavar="N",
        help="RLM root turns per run (default: 20)",
    )
    p.add_argument("--max-depth", type=_positive, metavar="N", help="RLM recursion depth (default: rlm's, 1)")
    p.add_argument("--policy", metavar="NAME|FILE", help="sandbox policy of the RLM's REPL (default: rlm's)")
    p.add_argument(
        "--budget-usd",
        type=float,
        metavar="X",
        help="stop any single RLM run that spends more than X dollars (default: no limit)",
    )
    p.add_argument(
        "--workers",
        type=_positive,
        default=1,
        metavar="N",
        help="RLM runs at once, each with its own sandbox (default: 1); direct calls stay one at a time",
    )
    p.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="where the RLM runs happen, as in `rlm batch`: threads here, or Ray tasks (default: local)",
    )
    p.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="with --engine ray: the cluster to join ('auto': the one on this machine; default: a local one)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    return p


def _title(cfg: BenchConfig) -> str:
    rlm = f"RLM with {cfg.model}"
    if cfg.sub_model and cfg.sub_model != cfg.model:
        rlm += f" (sub-calls: {cfg.sub_model})"
    direct = f"{cfg.direct_model} called directly" if cfg.direct_model else "no direct model"
    return f"{cfg.task}: {rlm} vs {direct}"


def main(argv: Sequence[str] | None = None) -> int:
    from bench.tasks.plot import PLOT_INSTALL_HINT, plot_available, write_plot
    from bench.tasks.table import format_report

    args = build_parser().parse_args(argv)
    model = args.model or os.environ.get("RLM_MODEL", "").strip()
    if not model:
        print(NO_MODEL, file=sys.stderr)
        return EXIT_USAGE
    if args.plot is not None and not plot_available():
        print(f"{PROG}: {PLOT_INSTALL_HINT}", file=sys.stderr)
        return EXIT_USAGE
    options: dict[str, Any] = {}
    if args.max_depth is not None:
        options["max_depth"] = args.max_depth
    if args.policy is not None:
        options["policy"] = args.policy
    if args.budget_usd is not None:
        options["max_cost_usd"] = args.budget_usd
    cfg = BenchConfig(
        task=args.task,
        sizes=args.sizes,
        model=model,
        direct_model=args.direct_model,
        sub_model=args.sub_model,
        repeats=args.repeats,
        seed=args.seed,
        depth=args.depth,
        api_base=args.api_base,
        log_dir=args.log_dir,
        out=args.out if args.out is not None else args.log_dir / "results.jsonl",
        max_iterations=args.max_iterations,
        rlm_options=options,
        workers=args.workers,
        engine=args.engine,
        ray_address=args.ray_address,
    )
    try:  # a size a generator cannot make (e.g. niah shorter than its fact) is a usage error
        for size in cfg.sizes:
            generate(cfg.task, size, cfg.seed, depth=cfg.depth)
    except ValueError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_USAGE

    def progress(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    try:
        records = run_benchmark(cfg, progress)
    except BenchAborted as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_ABORTED
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; the runs that finished are in {cfg.out}", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(format_report(records, _title(cfg)))
    progress(f"records appended to {cfg.out}")
    if args.plot is not None:
        write_plot(records, args.plot, _title(cfg))
        progress(f"plot written to {args.plot}")
    return EXIT_OK
