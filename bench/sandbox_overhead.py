"""Sandbox overhead, measured in one run against in-process lower bounds.

    python bench/sandbox_overhead.py [--quick] [--policy NAME|PATH] [--out FILE.json]

Every figure is a median (and p95) over many repetitions; each ratio divides
by a lower bound measured in the same run on the same machine, so a busy
machine moves both sides. Targets (this 2-core VM):

  execute("x = 1+1") round trip          <= 8x  in-process exec(compile(...))
  host-function round trip from the child <= 12x in-process exec(compile(...))
  fresh sandbox to first result           <= 10 ms
  set_variable of a 100 MB string         >= 600 MB/s end to end (ratio: to one in-process copy)
  idle child memory (USS)                 <= 8 MB
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from sandbox import Sandbox, load_policy, shutdown

MB = 1_000_000


def sample(fn: Callable[[], object], n: int, warmup: int = 20) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def p95(xs: list[float]) -> float:
    return sorted(xs)[max(0, int(len(xs) * 0.95) - 1)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    ap.add_argument("--policy", default="default", help="policy to measure (default: default)")
    ap.add_argument(
        "--out", default="bench/results/sandbox_overhead.json", help="where to write the JSON figures"
    )
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-audit-") as tmp:
        return _measure(args, Path(tmp))


def _measure(args: argparse.Namespace, audit_dir: Path) -> int:
    n = 300 if args.quick else 3000
    policy = load_policy(args.policy)
    rows: list[dict[str, object]] = []

    scale = {"us": 1e6, "ms": 1e3}

    def row(
        name: str, xs: list[float] | None, value: float, unit: str, ratio: float | None, target: str
    ) -> None:
        # p95 of a duration, in the row's unit (rates and sizes have none)
        spread = p95(xs) * scale[unit] if xs and unit in scale else None
        rows.append(
            {"measure": name, "median": value, "p95": spread, "unit": unit, "ratio": ratio, "target": target}
        )
        print(
            f"  {name}: {value:.4g} {unit}" + (f" ({ratio:.1f}x)" if ratio is not None else ""),
            file=sys.stderr,
        )

    print(f"measuring with policy {policy.name!r} ...", file=sys.stderr)
    g: dict[str, object] = {}
    base = sample(lambda: exec(compile("x = 1+1", "<bench>", "exec"), g), n)
    lb = med(base)
    row("in-process exec(compile('x = 1+1')) [lower bound]", base, lb * 1e6, "us", 1.0, "-")

    with Sandbox(policy, host_functions={"ping": lambda: None}, audit_log=audit_dir / "a.jsonl") as sb:
        xs = sample(lambda: sb.execute("x = 1+1"), n)
        row("Sandbox.execute('x = 1+1') round trip", xs, med(xs) * 1e6, "us", med(xs) / lb, "<= 8x")
        calls = 200
        cell = sample(lambda: sb.execute("pass"), n // 10)
        loop = sample(lambda: sb.execute(f"for _ in range({calls}):\n    ping()"), n // 10)
        per_call = [(a - med(cell)) / calls for a in loop]
        row(
            "host-function round trip from child code",
            per_call,
            med(per_call) * 1e6,
            "us",
            med(per_call) / lb,
            "<= 12x",
        )
        time.sleep(0.2)
        uss = psutil.Process(sb.pid).memory_full_info().uss
        row("idle child memory (USS)", None, uss / 2**20, "MiB", None, "<= 8 MiB")

        for label, size in (("3.3 MB", 3_300_000), ("100 MB", 100_000_000)):
            text = "abcdefghij" * (size // 10)
            reps = 5 if size > 10 * MB else 30
            data = text.encode("utf-8")
            copy = sample(functools.partial(bytearray, data), reps, warmup=2)  # one in-process memory copy
            xs = sample(functools.partial(sb.set_variable, "context", text), reps, warmup=2)
            rate = size / med(xs) / MB
            row(
                f"set_variable of a {label} string",
                xs,
                rate,
                "MB/s",
                med(xs) / med(copy),
                ">= 600 MB/s" if size > 10 * MB else "-",
            )
            del text, data

    opened: list[Sandbox] = []

    def fresh() -> None:
        sb = Sandbox(policy, audit_log=audit_dir / "b.jsonl")
        sb.execute("x = 1")
        opened.append(sb)

    def fresh_timed() -> list[float]:
        times = []
        for _ in range(30 if args.quick else 200):
            t0 = time.perf_counter()
            fresh()
            times.append(time.perf_counter() - t0)
            opened.pop().close()  # closing is not part of the figure
        return times

    fresh()
    opened.pop().close()
    xs = fresh_timed()
    row("fresh sandbox: construction to first result", xs, med(xs) * 1e3, "ms", None, "<= 10 ms")
    shutdown()

    width = max(len(str(r["measure"])) for r in rows)
    print(f"\n| {'measure':<{width}} | median | p95 | ratio to lower bound | target |")
    print(f"|{'-' * (width + 2)}|-------:|----:|---------------------:|--------|")
    for r in rows:
        p = f"{r['p95']:.4g} {r['unit']}" if r["p95"] is not None else "-"
        ratio = f"{r['ratio']:.1f}x" if r["ratio"] is not None else "-"
        print(f"| {r['measure']:<{width}} | {r['median']:.4g} {r['unit']} | {p} | {ratio} | {r['target']} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"policy": policy.name, "policy_sha256": policy.sha256, "repetitions": n, "time": time.time()}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"\nwrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
