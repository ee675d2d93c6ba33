"""One PNG comparing the servers on the figures the targets are about."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: CI and servers have no display
import matplotlib.pyplot as plt  # noqa: E402

from bench.report import API, API_COALESCE, COLUMNS  # noqa: E402

COLORS = {
    "blocking": "#b0b0b0",
    "notebook_dask": "#e69f00",
    "processpool": "#56b4e9",
    API: "#009e73",
    API_COALESCE: "#006d50",
}


def _value(results: dict[str, Any], server: str, key: str, pick: Callable[[dict[str, Any]], float]) -> float:
    scenario = results["servers"].get(server, {}).get("scenarios", {}).get(key)
    if not scenario or "error" in scenario:
        return float("nan")
    return pick(scenario)


def _bars(ax: Any, title: str, labels: list[str], values: list[float], unit: str, log: bool = False) -> None:
    bars = ax.bar(range(len(labels)), values, color=[COLORS.get(label, "#999999") for label in labels])
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.set_ylabel(unit, fontsize=8)
    if not any(v == v and v > 0 for v in values):
        ax.text(0.5, 0.5, "not run", transform=ax.transAxes, ha="center", va="center", color="gray")
    elif log:
        ax.set_yscale("log")
    for bar, value in zip(bars, values, strict=True):
        if value == value:  # not NaN
            text = f"{value:.3g}"
            ax.annotate(
                text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=7
            )


def render(results: dict[str, Any], path: Path) -> None:
    plan = results["plan"]
    servers = [c for c in COLUMNS if c in results["servers"]]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5))
    (ax_d, ax_e, ax_f), (ax_g, ax_h, ax_hf) = axes

    def series(key: str, pick: Callable[[dict[str, Any]], float]) -> list[float]:
        return [_value(results, s, key, pick) for s in servers]

    _bars(
        ax_d,
        f"(d) /fast p99 beside fib({plan['fib_n']}) load (target <= 5 ms)",
        servers,
        series("d", lambda s: s["fast"]["p99"]),
        "ms",
        log=True,
    )
    ax_d.axhline(5, color="red", lw=0.8, ls="--")
    _bars(
        ax_e,
        f"(e) fib({plan['fib_n']})/s, closed loop (line: no-HTTP ceiling)",
        servers,
        series("e", lambda s: s["fib_rate"]),
        "requests/s",
    )
    ax_e.axhline(results["ceiling"]["fib_rate"], color="black", lw=0.8, ls="--")
    _bars(
        ax_f,
        "(f) fib(1) p50 end to end (target <= 1.5 ms)",
        servers,
        series("f", lambda s: s["latency"]["p50"]),
        "ms",
        log=True,
    )
    ax_f.axhline(1.5, color="red", lw=0.8, ls="--")
    g_servers = servers + ([API_COALESCE] if API_COALESCE in results["servers"] else [])
    _bars(
        ax_g,
        f"(g) {plan['coalesce_requests']} identical fib({plan['coalesce_n']}): wall",
        g_servers,
        [_value(results, s, "g", lambda s: s["wall_s"]) for s in g_servers],
        "s",
        log=True,
    )
    _bars(
        ax_h,
        f"(h) goodput at {plan['overload_factor']:g}x load, % of own peak (target >= 90 %)",
        servers,
        series("h", lambda s: 100 * s["of_peak"]),
        "%",
    )
    ax_h.axhline(90, color="red", lw=0.8, ls="--")
    _bars(
        ax_hf,
        "(h) /fast p99 under overload (target <= 10 ms)",
        servers,
        series("h", lambda s: s["fast"]["p99"]),
        "ms",
        log=True,
    )
    ax_hf.axhline(10, color="red", lw=0.8, ls="--")
    m = results["machine"]
    busy = m.get("busy_before", {}).get("cpu", 0.0)
    fig.suptitle(
        f"compute-api vs the usual ways: {m['cpu']}, {m['cores']} cores, "
        f"{results['workers']} compute processes per server"
        + (f" (CPUs {busy:.0%} busy with other work: figures are low)" if busy > 0.1 else ""),
        fontsize=11,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
