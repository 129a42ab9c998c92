"""A PNG of accuracy and cost against context length (matplotlib is the optional ``plot`` extra)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["PLOT_INSTALL_HINT", "PlotUnavailable", "plot_available", "write_plot"]

PLOT_INSTALL_HINT = "--plot needs matplotlib: pip install 'rlm[plot]' (or pip install matplotlib)"


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def plot_available() -> bool:
    """Whether matplotlib can be imported (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def _series(records: Sequence[dict[str, Any]], prefix: str) -> tuple[list[float], list[float], list[float]]:
    """Per size: mean context chars, accuracy, and mean cost over the runs whose cost is known."""
    xs: list[float] = []
    acc: list[float] = []
    cost: list[float] = []
    for size in sorted({r["size"] for r in records}):
        group = [r for r in records if r["size"] == size]
        xs.append(sum(r["context_chars"] for r in group) / len(group))
        acc.append(sum(1 for r in group if r[f"{prefix}_correct"]) / len(group))
        costs = [r[f"{prefix}_cost_usd"] for r in group if r[f"{prefix}_cost_usd"] is not None]
        cost.append(sum(costs) / len(costs) if costs else float("nan"))
    return xs, acc, cost


def write_plot(records: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Write accuracy (left) and mean cost per run (right) against context length to *path*."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PlotUnavailable(PLOT_INSTALL_HINT) from exc
    if not records:
        raise ValueError("no records to plot")
    fig, (ax_acc, ax_cost) = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    methods = [("RLM", "rlm", records)]
    direct = [r for r in records if r["direct_status"] != "skipped"]
    if direct:
        methods.append(("Direct", "direct", direct))
    any_cost = False
    for label, prefix, recs in methods:
        xs, acc, cost = _series(recs, prefix)
        ax_acc.plot(xs, acc, marker="o", label=label)
        ax_cost.plot(xs, cost, marker="o", label=label)
        any_cost = any_cost or any(c == c for c in cost)  # NaN != NaN: a cost is known
    if not any_cost:
        ax_cost.text(
            0.5,
            0.5,
            "cost unknown\n(no price in litellm's map for these models)",
            transform=ax_cost.transAxes,
            ha="center",
            va="center",
        )
    for ax, ylabel in ((ax_acc, "accuracy"), (ax_cost, "mean cost per run (USD)")):
        ax.set_xlabel("context length (characters)")
        ax.set_ylabel(ylabel)
        if len({r["context_chars"] for r in records}) > 1:
            ax.set_xscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend()
    ax_acc.set_ylim(-0.05, 1.05)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
