"""Throughput of ``rlm.batch``: items per second against the ideal, per engine and worker count.

Every item is a real RLM run (its own sandbox, litellm's HTTP path) against
the loopback model server of ``tests/llm_server.py`` answering after
``--latency`` seconds; each run makes one model call, so with W runs at once
the ideal is ``W / latency`` items per second. The gap is this process's own
work per item (sandbox start, litellm's client, the loop), which on a
2-core machine bounds every W from some point on: the table gives the
driver's CPU seconds per item to show it.

    .venv/bin/python bench/batch.py                      # 200 items; local at 1, 8, 32; ray at 8
    .venv/bin/python bench/batch.py --items 50 --no-ray  # quicker

litellm's first call in a process costs seconds (imports); the local rows
are measured after one warm-up call. The ray row runs on a local Ray
instance with ``--ray-workers`` CPUs started before the clock starts; it
includes its worker processes' start (each imports rlm and litellm), which
the "first result" column shows, and "steady" is the rate after it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rlm import batch  # noqa: E402
from tests.llm_server import LLMServer  # noqa: E402

SQUARE = "```repl\nn = int(context.split()[-1])\nFINAL(str(n * n))\n```"
MODEL = "openai/bench"


def _items(n: int) -> list[dict[str, str]]:
    return [
        {"id": f"i{i}", "query": "What is the square of the number?", "context": f"number {i}"}
        for i in range(n)
    ]


def _run(srv: LLMServer, n: int, engine: str, workers: int) -> dict[str, float]:
    cpu0 = sum(os.times()[:2])
    started = time.perf_counter()
    first = None
    answered = 0
    for result in batch(_items(n), model=MODEL, api_base=srv.base_url, workers=workers, engine=engine):
        first = first or time.perf_counter() - started
        answered += result.answer == str(int(result.id[1:]) ** 2)
    wall = time.perf_counter() - started
    cpu = sum(os.times()[:2]) - cpu0
    steady = (n - 1) / (wall - first) if first is not None and wall > first else 0.0
    return {
        "wall": wall,
        "rate": n / wall,
        "first": first or 0.0,
        "steady": steady,
        "cpu": cpu / n,
        "ok": answered,
    }


def _start_ray(cpus: int) -> None:
    """A local Ray instance for the ray row (its start is not timed; on a busy machine Ray's fixed
    30 s start-up wait can run out, so try a few times)."""
    import ray

    for attempt in range(3):
        try:
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
            return
        except Exception as exc:
            ray.shutdown()
            print(f"ray did not start ({exc}); attempt {attempt + 2} of 3", file=sys.stderr)
    raise SystemExit("ray did not start")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=200)
    p.add_argument("--latency", type=float, default=0.2, help="model latency in seconds (default: 0.2)")
    p.add_argument("--workers", default="1,8,32", help="local worker counts (default: 1,8,32)")
    p.add_argument("--ray-workers", type=int, default=8, help="CPUs of the local Ray instance (default: 8)")
    p.add_argument("--no-ray", action="store_true")
    args = p.parse_args()
    rows: list[tuple[str, int, dict[str, float]]] = []
    with LLMServer(SQUARE, latency_s=args.latency) as srv:
        list(batch(_items(1), model=MODEL, api_base=srv.base_url, workers=1))  # warm up litellm
        for workers in (int(w) for w in args.workers.split(",")):
            rows.append(("local", workers, _run(srv, args.items, "local", workers)))
            print(f"local x{workers}: {rows[-1][2]['rate']:.1f} items/s", file=sys.stderr, flush=True)
        if not args.no_ray:
            _start_ray(args.ray_workers)
            try:
                rows.append(("ray", args.ray_workers, _run(srv, args.items, "ray", args.ray_workers)))
            finally:
                import ray

                ray.shutdown()
    print(f"\n{args.items} items, model latency {args.latency * 1000:.0f} ms, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}\n")  # fmt: skip
    print(
        "| engine | workers | wall s | items/s | ideal items/s | % of ideal | first result s | steady items/s | driver CPU s/item | right answers |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for engine, workers, r in rows:
        ideal = workers / args.latency
        print(
            f"| {engine} | {workers} | {r['wall']:.1f} | {r['rate']:.1f} | {ideal:.0f} | {100 * r['rate'] / ideal:.0f}% "
            f"| {r['first']:.2f} | {r['steady']:.1f} | {r['cpu']:.3f} | {r['ok']:.0f}/{args.items} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
