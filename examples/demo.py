"""`make demo`: run real attacks and resource hogs through `rlm exec` and show what stopped each.

Every script in examples/untrusted/ runs twice in a fresh sandbox: under the
shipped `default` policy, and under the same policy with the Python guard off
(`guard = "none"`), where only the kernel layers stand in the way. A fake API
key is put in the environment of `rlm exec` to show it never reaches the code.
Then, if a model is configured, a small Recursive Language Model run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CANARY = "sk-demo-canary-0123456789abcdef"


def demo_policies(directory: Path) -> tuple[Path, Path]:
    """The shipped default policy with demo-sized timings, with and without the Python guard."""
    text = (ROOT / "policies" / "default.toml").read_text()
    text = (
        text.replace("cpu_seconds = 10", "cpu_seconds = 2")
        .replace("wall_seconds = 30", "wall_seconds = 3")
        .replace("memory_mb = 1024", "memory_mb = 256")  # reached well before the 2 s of CPU
    )
    guarded = directory / "default.toml"
    guarded.write_text(text)
    unguarded = directory / "default-guard-off.toml"
    unguarded.write_text(
        text.replace('name = "default"', 'name = "default-guard-off"').replace(
            'guard = "allowlist"', 'guard = "none"'
        )
    )
    return guarded, unguarded


def run(script: Path, policy: str, audit: Path, context: Path) -> dict:
    env = dict(os.environ, OPENAI_API_KEY=CANARY, DEMO_SECRET_TOKEN=CANARY)
    cmd = [sys.executable, "-m", "rlm", "exec", "--json", "--policy", policy, "--audit-log", str(audit)]
    cmd += ["--set", f"context=@{context}", str(script)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    if out.returncode == 2:
        raise SystemExit(f"rlm exec failed: {out.stderr.strip()}")
    result = json.loads(out.stdout)
    if CANARY in out.stdout:
        raise SystemExit(f"LEAK: the canary key reached the output of {script.name}")
    return result


def verdict(r: dict) -> str:
    if r["limit"]:
        return f"stopped: {r['limit']} limit ({r['error_type']})"
    lines = [x for x in r["stdout"].splitlines() if x.startswith("RESULT:")]
    if r["ok"]:
        return "ran: " + (lines[-1][8:] if lines else "ok")
    msg = (r["error_message"] or "")[:70]
    if r["error_type"] in ("ImportError", "GuardError") or "not allowed by policy" in msg:
        return f"blocked by the Python guard: {msg}"
    if r["crashed"]:
        return f"crashed: {msg}"
    return f"failed: {r['error_type']}: {msg}"


def main() -> int:
    from rlm.cli import main as _  # noqa: F401  (fail early if the package is not installed)

    with tempfile.TemporaryDirectory(prefix="rlm-demo-") as tmp:
        tmpdir = Path(tmp)
        context = tmpdir / "context.txt"
        context.write_text("the quick brown fox jumps over the lazy dog " * 200)
        audit = ROOT / "logs" / "demo.audit.log"
        audit.parent.mkdir(exist_ok=True)
        guarded, no_guard = (str(p) for p in demo_policies(tmpdir))
        print("Each script runs in a fresh sandbox, once with the Python guard and once without it,")
        print(
            "under the shipped default policy (CPU, wall and memory limits cut to 2 s, 3 s and 256 MiB"
            " to keep the demo short)."
        )
        print(f"A fake key ({CANARY[:12]}...) sits in the environment of `rlm exec`.\n")
        print(f"{'script':<20} {'policy default (guard on)':<58} policy default, guard = none (kernel only)")
        print("-" * 150)
        for script in sorted((HERE / "untrusted").glob("*.py")):
            a = run(script, guarded, audit, context)
            b = run(script, no_guard, audit, context)
            print(f"{script.name:<20} {verdict(a)[:57]:<58} {verdict(b)}")
        layers = a["layers"]
        print("\nProtection layers of the last sandbox:", ", ".join(f"{k}={v}" for k, v in layers.items()))
        print(f"Audit log of every run above: {audit}  (check it: rlm audit verify {audit})")
        pwned = Path("/tmp/pwned-by-sandbox")
        print("Host file /tmp/pwned-by-sandbox exists:", pwned.exists())
    rlm_demo = HERE / "rlm_demo.py"
    if rlm_demo.exists():
        print("\n== Recursive Language Model ==")
        return subprocess.run([sys.executable, str(rlm_demo)]).returncode
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C: stop quietly, as a shell command does
        sys.exit(130)
