"""Sandbox overhead, idle and busy, against in-process lower bounds and pydantic-monty.

    python bench/sandbox_overhead.py [--quick] [--policy NAME|PATH] [--out FILE.json]

Every figure is a median (and p95) over many repetitions, measured twice in
one run: on the machine as it is ("idle") and with two CPU-bound burner
processes that this script starts and stops ("busy"). Each ratio divides by a
lower bound measured in the same phase, so a loaded machine moves both sides.
When ``pydantic-monty`` is installed (the ``bench`` extra) the same operations
are measured on it, in the same phases, as the nearest peer. Targets:

  execute("x = 1+1") round trip, idle       <= 8x in-process exec(compile(...))
  execute round trip, busy                  <= monty's feed_run round trip, busy
  host-function call, busy                  <= 2x the same call idle
  fresh sandbox to first result (warm pool) <= 1 ms
  set_variable of a 100 MB string           >= 600 MB/s
  idle child memory (USS)                   <= 8 MiB (the pool's idle cost is ready children x this)
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil

from sandbox import Sandbox, load_policy, shutdown
from sandbox.pool import SandboxPool

MB = 1_000_000
BURNERS = 2
SCALE = {"us": 1e6, "ms": 1e3}
PAUSE = 0.05  # seconds asleep before each "after a pause" sample


def sample(fn: Callable[[], object], n: int, warmup: int = 20, pause: float = 0.0) -> list[float]:
    """*n* timings of *fn* (seconds), each after *pause* seconds of sleep when given."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        if pause:
            time.sleep(pause)
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def p95(xs: list[float]) -> float:
    return sorted(xs)[max(0, int(len(xs) * 0.95) - 1)]


@contextlib.contextmanager
def burners(n: int) -> Iterator[None]:
    """*n* CPU-bound processes for the duration (always stopped, even on error)."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        time.sleep(0.3)  # let the scheduler see them
        yield
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


class Table:
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(
        self,
        name: str,
        phase: str,
        xs: list[float] | None,
        value: float,
        unit: str,
        ratio: float | None = None,
        target: str = "-",
    ) -> float:
        spread = p95(xs) * SCALE[unit] if xs and unit in SCALE else None
        self.rows.append(
            {"measure": name, "phase": phase, "median": value, "p95": spread, "unit": unit,
             "ratio": ratio, "target": target}
        )  # fmt: skip
        r = f" ({ratio:.1f}x)" if ratio is not None else ""
        print(f"  [{phase}] {name}: {value:.4g} {unit}{r}", file=sys.stderr)
        return value

    def get(self, name: str, phase: str) -> float | None:
        for r in self.rows:
            if r["measure"] == name and r["phase"] == phase:
                return float(r["median"])
        return None

    def print(self) -> None:
        width = max(len(str(r["measure"])) for r in self.rows)
        print(f"\n| {'measure':<{width}} | phase | median | p95 | ratio | target |")
        print(f"|{'-' * (width + 2)}|-------|-------:|----:|------:|--------|")
        for r in self.rows:
            p = f"{r['p95']:.4g} {r['unit']}" if r["p95"] is not None else "-"
            ratio = f"{r['ratio']:.1f}x" if r["ratio"] is not None else "-"
            print(
                f"| {r['measure']:<{width}} | {r['phase']} | {r['median']:.4g} {r['unit']} | {p} | {ratio} "
                f"| {r['target']} |"
            )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    ap.add_argument("--policy", default="default", help="policy to measure (default: default)")
    ap.add_argument("--no-monty", action="store_true", help="skip pydantic-monty even when installed")
    ap.add_argument(
        "--out", default="bench/results/sandbox_overhead.json", help="where to write the JSON figures"
    )
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-audit-") as tmp:
        return _measure(args, Path(tmp))


def _sandbox_phase(t: Table, phase: str, args: argparse.Namespace, audit: Path, pool: SandboxPool) -> None:
    n = 300 if args.quick else 2000
    policy = load_policy(args.policy)
    g: dict[str, object] = {}
    base = sample(lambda: exec(compile("x = 1+1", "<bench>", "exec"), g), n)
    lb = t.add("in-process exec(compile('x = 1+1')) [lower bound]", phase, base, med(base) * 1e6, "us", 1.0)

    xs = _pipe_floor(n)
    t.add("socket-pair round trip, two Python processes [floor]", phase, xs, med(xs) * 1e6, "us",
          med(xs) * 1e6 / lb)  # fmt: skip

    with Sandbox(policy, host_functions={"ping": lambda: None}, audit_log=audit / "a.jsonl", pool=None) as sb:
        xs = sample(lambda: sb.execute("x = 1+1"), n)
        t.add("Sandbox.execute('x = 1+1') round trip", phase, xs, med(xs) * 1e6, "us", med(xs) * 1e6 / lb,
              "<= 8x" if phase == "idle" else "<= monty busy")  # fmt: skip
        sb.set_variable("v", 1)
        xs = sample(lambda: sb.get_variable("v"), n)
        t.add(
            "  get_variable('v') round trip (no code runs)",
            phase,
            xs,
            med(xs) * 1e6,
            "us",
            med(xs) * 1e6 / lb,
        )
        per_call = _per_call(lambda code: sb.execute(code), n)
        t.add("host-function call from child code", phase, per_call, med(per_call) * 1e6, "us",
              med(per_call) * 1e6 / lb, "-" if phase == "idle" else "<= 2x idle")  # fmt: skip
        if phase == "idle":
            time.sleep(0.2)
            uss = psutil.Process(sb.pid).memory_full_info().uss
            t.add("idle child memory (USS)", phase, None, uss / 2**20, "MiB", None, "<= 8 MiB")
        text = "abcdefghij" * (100 * MB // 10)
        copy = sample(functools.partial(bytearray, text.encode()), 5, warmup=1)
        xs = sample(functools.partial(sb.set_variable, "context", text), 5, warmup=1)
        t.add("set_variable of a 100 MB string", phase, xs, 100 * MB / med(xs) / MB, "MB/s",
              med(xs) / med(copy), ">= 600 MB/s")  # fmt: skip
        xs = sample(functools.partial(sb.get_variable, "context"), 5, warmup=1)
        t.add("get_variable of the 100 MB string", phase, xs, 100 * MB / med(xs) / MB, "MB/s",
              med(xs) / med(copy))  # fmt: skip
        del text

    with Sandbox(policy.override({"audit.enabled": False}), pool=None) as sb:
        xs = sample(lambda: sb.execute("x = 1+1"), n)
        t.add(
            "  execute round trip with the audit log off", phase, xs, med(xs) * 1e6, "us", med(xs) * 1e6 / lb
        )

    # What an RLM sees: every execute comes after a model call, with both processes asleep and
    # their caches cold. Measured against the in-process exec after the same pause.
    k = 20 if args.quick else 100
    cold = sample(lambda: exec(compile("x = 1+1", "<bench>", "exec"), g), k, warmup=2, pause=PAUSE)
    cold_lb = t.add(f"in-process exec after a {PAUSE * 1e3:g} ms pause [lower bound]", phase, cold,
                    med(cold) * 1e6, "us", 1.0)  # fmt: skip
    with Sandbox(policy, audit_log=audit / "a.jsonl", pool=None) as sb:
        xs = sample(lambda: sb.execute("x = 1+1"), k, warmup=2, pause=PAUSE)
        t.add(f"execute round trip after a {PAUSE * 1e3:g} ms pause", phase, xs, med(xs) * 1e6, "us",
              med(xs) * 1e6 / cold_lb)  # fmt: skip

    reps = 30 if args.quick else 200

    def fresh(p: SandboxPool | None) -> tuple[list[float], list[float]]:
        times, built = [], []
        for _ in range(reps):
            if p is not None:
                p.wait_ready(10)  # a warm pool: what the figure is about
            t0 = time.perf_counter()
            sb = Sandbox(policy, audit_log=audit / "b.jsonl", pool=p)
            t1 = time.perf_counter()
            sb.execute("x = 1")
            times.append(time.perf_counter() - t0)
            built.append(t1 - t0)
            sb.close()  # closing is not part of the figure
        return times, built

    xs, built = fresh(pool)
    t.add("fresh sandbox to first result, warm pool", phase, xs, med(xs) * 1e3, "ms", None, "<= 1 ms")
    t.add("  of which Sandbox() (a pooled child handed out)", phase, built, med(built) * 1e3, "ms")
    xs, built = fresh(None)
    t.add("fresh sandbox to first result, no pool", phase, xs, med(xs) * 1e3, "ms")
    t.add("  of which Sandbox() (fork, layers, hello)", phase, built, med(built) * 1e3, "ms")
    if phase == "idle":
        pool.wait_ready(10)
        time.sleep(0.2)
        pids = pool.ready_pids()
        total = sum(psutil.Process(pid).memory_full_info().uss for pid in pids)
        t.add(f"pool idle cost ({len(pids)} ready children, USS)", phase, None, total / 2**20, "MiB")


def _pipe_floor(n: int) -> list[float]:
    """Round trips of a 64-byte message between this process and a Python child that echoes
    it over a socket pair, both blocking in recv: what any two-process design pays."""
    ours, theirs = socket.socketpair()
    echo = "import socket,sys\ns=socket.socket(fileno=int(sys.argv[1]))\nwhile d:=s.recv(65536): s.sendall(d)"
    proc = subprocess.Popen([sys.executable, "-c", echo, str(theirs.fileno())], pass_fds=[theirs.fileno()])
    theirs.close()
    msg = b"x" * 64
    try:
        return sample(lambda: (ours.sendall(msg), ours.recv(65536)), n)
    finally:
        ours.close()
        proc.wait(10)


def _per_call(run: Callable[[str], object], n: int, calls: int = 200) -> list[float]:
    cell = sample(lambda: run("pass"), n // 10)
    loop = sample(lambda: run(f"for _ in range({calls}):\n    ping()"), n // 10)
    return [max(0.0, a - med(cell)) / calls for a in loop]


def _monty_phase(t: Table, phase: str, args: argparse.Namespace) -> None:
    import pydantic_monty

    n = 300 if args.quick else 2000
    lb = t.get("in-process exec(compile('x = 1+1')) [lower bound]", phase) or 1.0
    ext = {"ping": lambda: None}
    with pydantic_monty.Monty() as monty:
        with monty.checkout() as session:
            xs = sample(lambda: session.feed_run("x = 1+1"), n)
            t.add("monty feed_run('x = 1+1') round trip", phase, xs, med(xs) * 1e6, "us", med(xs) * 1e6 / lb)
            cold_lb = t.get(f"in-process exec after a {PAUSE * 1e3:g} ms pause [lower bound]", phase) or 1.0
            xs = sample(lambda: session.feed_run("x = 1+1"), 20 if args.quick else 100, warmup=2, pause=PAUSE)
            t.add(f"monty feed_run after a {PAUSE * 1e3:g} ms pause", phase, xs, med(xs) * 1e6, "us",
                  med(xs) * 1e6 / cold_lb)  # fmt: skip
            text = "abcdefghij" * (100 * MB // 10)
            xs = sample(lambda: session.feed_run("context = v", inputs={"v": text}), 3, warmup=1)
            t.add("monty: a 100 MB string into the session", phase, xs, 100 * MB / med(xs) / MB, "MB/s")

        def in_new_session(code: str) -> None:
            # a session allows 1,000 suspensions (external calls) in all: one session per sample;
            # the checkout is in both samples of _per_call and cancels out
            with monty.checkout() as s:
                s.feed_run(code, external_lookup=ext)

        per_call = _per_call(in_new_session, n)
        t.add("monty external-function call", phase, per_call, med(per_call) * 1e6, "us",
              med(per_call) * 1e6 / lb)  # fmt: skip

        def fresh() -> None:
            with monty.checkout() as s:
                s.feed_run("x = 1")

        xs = sample(fresh, 30 if args.quick else 200, warmup=5)
        t.add("monty fresh session (pooled worker) to first result", phase, xs, med(xs) * 1e3, "ms")


def _measure(args: argparse.Namespace, audit: Path) -> int:
    t = Table()
    monty = not args.no_monty and importlib.util.find_spec("pydantic_monty") is not None
    print(f"measuring with policy {args.policy!r} (monty: {'yes' if monty else 'not installed'}) ...",
          file=sys.stderr)  # fmt: skip
    with SandboxPool(size=2) as pool:
        pool.warm(args.policy)
        for phase in ("idle", "busy"):
            with burners(BURNERS) if phase == "busy" else contextlib.nullcontext():
                _sandbox_phase(t, phase, args, audit, pool)
                if monty:
                    _monty_phase(t, phase, args)
    shutdown()
    t.print()
    _verdicts(t, monty)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"policy": args.policy, "burners": BURNERS, "monty": monty, "time": time.time()}
    out.write_text(json.dumps({"meta": meta, "rows": t.rows}, indent=2))
    print(f"\nwrote {out}", file=sys.stderr)
    return 0


def _verdicts(t: Table, monty: bool) -> None:
    def ok(cond: bool) -> str:
        return "met" if cond else "NOT met"

    lb = t.get("in-process exec(compile('x = 1+1')) [lower bound]", "idle") or 1.0
    ex_idle = t.get("Sandbox.execute('x = 1+1') round trip", "idle") or 0.0
    ex_busy = t.get("Sandbox.execute('x = 1+1') round trip", "busy") or 0.0
    hf_idle = t.get("host-function call from child code", "idle") or 0.0
    hf_busy = t.get("host-function call from child code", "busy") or 0.0
    fresh = t.get("fresh sandbox to first result, warm pool", "idle") or 0.0
    print("\ntargets:")
    print(f"  execute idle {ex_idle / lb:.1f}x the lower bound (<= 8x): {ok(ex_idle <= 8 * lb)}")
    if monty:
        mb = t.get("monty feed_run('x = 1+1') round trip", "busy") or 0.0
        print(f"  execute busy {ex_busy:.0f} us vs monty busy {mb:.0f} us: {ok(ex_busy <= mb)}")
    print(
        f"  host-function call busy {hf_busy / max(hf_idle, 1e-9):.1f}x idle (<= 2x): {ok(hf_busy <= 2 * hf_idle)}"
    )
    print(f"  fresh sandbox, warm pool {fresh:.3f} ms (<= 1 ms): {ok(fresh <= 1.0)}")


if __name__ == "__main__":
    sys.exit(main())
