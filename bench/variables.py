"""Large values in and out of a sandbox, against one in-process memory copy.

    python -m bench.variables [--runs N] [--policy NAME|PATH]

Medians of N runs (after one warm-up) of set_variable and get_variable of a
100 MB ASCII str, 100 MB of bytes and a list of 999,999 short strings (just
under the host's element budget), on one Sandbox. "copy" is
``bytearray(data)`` of the same 100 MB in this process, measured right before
and after: the in-process lower bound for a value that must land in fresh
memory. Ratios divide by the first copy's median. The machine's load moves
every figure; compare the ratios.
"""

from __future__ import annotations

import argparse
import functools
import os
from collections.abc import Callable

from bench.sandbox_overhead import med, sample
from sandbox import Sandbox

MB = 1_000_000


def median_time(fn: Callable[[], object], runs: int) -> float:
    return med(sample(fn, runs, warmup=1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=7, help="timed runs per figure (default 7)")
    ap.add_argument("--policy", default="default", help="policy (default: default)")
    args = ap.parse_args(argv)
    text = "abcdefghij" * (100 * MB // 10)
    blob = text.encode()
    short = [str(i) for i in range(999_999)]
    print(f"load average {os.getloadavg()[0]:.1f}; medians of {args.runs} runs")
    copy = median_time(functools.partial(bytearray, blob), args.runs)

    def row(what: str, seconds: float, size: int | None) -> None:
        rate = f"{size / seconds / MB:7.0f} MB/s" if size else "         -"
        print(f"  {what:<34} {seconds * 1e3:7.1f} ms {rate} {seconds / copy:5.2f}x copy")

    row("copy: bytearray of 100 MB", copy, 100 * MB)
    with Sandbox(args.policy, pool=None) as sb:
        for name, value, size in (("100 MB str", text, 100 * MB), ("100 MB bytes", blob, 100 * MB)):
            row(
                f"set_variable {name}",
                median_time(functools.partial(sb.set_variable, "v", value), args.runs),
                size,
            )
            row(f"get_variable {name}", median_time(functools.partial(sb.get_variable, "v"), args.runs), size)
            sb.execute("del v")
        row(
            "set_variable 999,999 short strs",
            median_time(functools.partial(sb.set_variable, "v", short), args.runs),
            None,
        )
        row(
            "get_variable 999,999 short strs",
            median_time(functools.partial(sb.get_variable, "v"), args.runs),
            None,
        )
    row("copy again", median_time(functools.partial(bytearray, blob), args.runs), 100 * MB)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
