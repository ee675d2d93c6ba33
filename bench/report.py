"""The comparison table (markdown, for stdout and the README) and compute-api's targets from issue 5."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

COLUMNS = ("blocking", "notebook_dask", "processpool", "compute-api")
API, API_COALESCE = "compute-api", "compute-api+coalesce"

Scenario = dict[str, Any]


def num(value: float) -> str:
    """Three significant figures at most, never scientific notation."""
    if value != value:  # NaN
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _scenario(results: dict[str, Any], server: str, key: str) -> Scenario | str:
    """The scenario's figures, or the reason the cell is empty."""
    entry = results["servers"].get(server)
    if entry is None:
        return "not run"
    if "error" in entry:
        return "server failed"
    scenario = entry.get("scenarios", {}).get(key)
    if scenario is None:
        return "not run"
    if "error" in scenario:
        return "error: " + scenario["error"][:60]
    return scenario


def _failures(s: Scenario) -> str:
    failures = s.get("failures") or {}
    return " (" + ", ".join(f"{n} x {status}" for status, n in failures.items()) + ")" if failures else ""


# Each row: label (from the plan), scenario letter, cell text from that scenario's figures.
Row = tuple[Callable[[dict[str, Any]], str], str, Callable[[Scenario], str]]

ROWS: list[Row] = [
    (
        lambda p: "(a) /fast x1 p50 / p99 ms",
        "a",
        lambda s: f"{num(s['x1']['p50'])} / {num(s['x1']['p99'])}" + _failures(s),
    ),
    (
        lambda p: f"(a) /fast x{p['fast_burst']} concurrent: p99 ms, burst wall ms",
        "a",
        lambda s: f"{num(s['burst']['p99'])}, {num(s['burst_wall_ms'])}",
    ),
    (
        lambda p: f"(b) fib({p['fib_n']}) x{p['fib_burst']} concurrent: wall s",
        "b",
        lambda s: num(s["wall_s"]) + _failures(s),
    ),
    (
        lambda p: f"(c) /fast while fib({p['slow_n']}) runs: p50 / max ms",
        "c",
        lambda s: f"{num(s['fast']['p50'])} / {num(s['fast']['max'])}" + _failures(s),
    ),
    (
        lambda p: f"(d) /fast idle ({p['fast_clients']} paced clients): p99 ms",
        "d",
        lambda s: num(s["idle_fast"]["p99"]),
    ),
    (
        lambda p: "(d) /fast beside fib load: p50 / p99 / max ms",
        "d",
        lambda s: f"{num(s['fast']['p50'])} / {num(s['fast']['p99'])} / {num(s['fast']['max'])}" + _failures(s),
    ),
    (lambda p: f"(d) fib({p['fib_n']})/s beside /fast", "d", lambda s: num(s["fib_rate"])),
    (
        lambda p: f"(e) fib({p['fib_n']})/s closed loop (% of ceiling)",
        "e",
        lambda s: f"{num(s['fib_rate'])} ({s['of_ceiling']:.0%})" + _failures(s),
    ),
    (
        lambda p: "(f) fib(1) p50 / p99 ms",
        "f",
        lambda s: f"{num(s['latency']['p50'])} / {num(s['latency']['p99'])}" + _failures(s),
    ),
    (
        lambda p: f"(g) fib({p['coalesce_n']}) x{p['coalesce_requests']} identical: wall s [computations]",
        "g",
        lambda s: (
            num(s["wall_s"])
            + (f" [{s['computations']:.0f}]" if s.get("computations") is not None else "")
            + _failures(s)
        ),
    ),
    (
        lambda p: f"(h) goodput fib({p['fib_n']})/s (% of own (e) peak)",
        "h",
        lambda s: f"{num(s['goodput'])} ({s['of_peak']:.0%})",
    ),
    (
        lambda p: f"(h) client timeouts (> {p['overload_deadline']:g} s) / offered",
        "h",
        lambda s: f"{s['statuses'].get('timeout', 0)} / {sum(s['statuses'].values())}",
    ),
    (
        lambda p: "(h) 503 rejections: count, p99 ms, with Retry-After",
        "h",
        lambda s: (
            f"{s['rejected']['count']}, {num(s['rejected']['p99'])}, {s['rejected_with_retry_after']}"
            if s["rejected"]["count"]
            else "none"
        ),
    ),
    (
        lambda p: "(h) /fast p99 ms",
        "h",
        lambda s: (
            num(s["fast"]["p99"])
            + (f" ({s['fast_statuses'].get('timeout', 0)} timed out)" if s["fast_statuses"].get("timeout") else "")
        ),
    ),
    (
        lambda p: f"(i) fib({p['band_short_n']}) beside fib({p['band_long_n']}) load: p50 / p99 ms",
        "i",
        lambda s: f"{num(s['short']['p50'])} / {num(s['short']['p99'])}" + _failures(s),
    ),
    (
        lambda p: f"(i) fib({p['band_long_n']}) meanwhile: p50 / p99 ms",
        "i",
        lambda s: f"{num(s['long']['p50'])} / {num(s['long']['p99'])}",
    ),
    (
        lambda p: f"(j) derive({p.get('derive_iterations', '?')} iterations)/s closed loop, p50 / p99 ms",
        "j",
        lambda s: f"{num(s['rate'])}, {num(s['latency']['p50'])} / {num(s['latency']['p99'])}" + _failures(s),
    ),
]


def _coalesce_cell(results: dict[str, Any], server: str) -> str:
    if server != API:
        return "n/a: no coalescing"
    s = _scenario(results, API_COALESCE, "g")
    if isinstance(s, str):
        return s
    return f"{num(s['wall_s'])} [{s['computations']:.0f}], {s['coalesced']:.0f} coalesced"


def markdown(results: dict[str, Any]) -> str:
    plan, m, ceiling = results["plan"], results["machine"], results["ceiling"]
    columns = [c for c in COLUMNS if c in results["servers"]]
    max_queue_wait = results["servers"].get(API, {}).get("env", {}).get("MAX_QUEUE_WAIT", "its default")
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Python {m['python']}; "
        f"{results['workers']} compute processes per server; run {results['date']}, {results['elapsed_s']:.0f} s; "
        f"CPUs {m['busy_before']['cpu']:.0%} busy with other work before the run.",
        f"Ceiling: ProcessPoolExecutor({ceiling['workers']}).map(fib, [{ceiling['n']}] x {ceiling['tasks']}), "
        f"no HTTP: {num(ceiling['fib_rate'])} fib({ceiling['n']})/s.",
        "",
        "| scenario | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for label, key, cell in ROWS:
        cells = []
        for server in columns:
            s = _scenario(results, server, key)
            cells.append(s if isinstance(s, str) else cell(s))
        lines.append(f"| {label(plan)} | " + " | ".join(cells) + " |")
        if key == "g":  # compute-api's coalescing instance, right under the row it differs from
            lines.append(
                "| (g) same, compute-api with COALESCE=true | "
                + " | ".join(_coalesce_cell(results, c) for c in columns)
                + " |"
            )
    lines += [
        "",
        f"compute-api runs with COALESCE=false except in the COALESCE=true row; baselines compute every request "
        f"(notebook_dask submits with pure=False). (h) offers {plan['overload_factor']:g}x the ceiling for "
        f"{plan['overload_seconds']:g} s, open loop; clients give up after {plan['overload_deadline']:g} s; goodput "
        f"counts 200s completed inside the window; compute-api runs with MAX_QUEUE_WAIT={max_queue_wait}.",
    ]
    targets = results.get("targets") or []
    if targets:
        lines += ["", "compute-api targets (issue 5):", ""]
        lines += [f"- {'MET' if t['met'] else 'MISSED'}: {t['target']}: {t['value']}" for t in targets]
    return "\n".join(lines) + "\n"


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 5's targets, checked on compute-api's figures (skipped for scenarios that did not run)."""

    def get(server: str, key: str) -> Scenario | None:
        s = _scenario(results, server, key)
        return None if isinstance(s, str) else s

    out: list[dict[str, Any]] = []

    def check(target: str, met: bool, value: str) -> None:
        out.append({"target": target, "met": bool(met), "value": value})

    if d := get(API, "d"):
        p99, idle = d["fast"]["p99"], d["idle_fast"]["p99"]
        check(
            "isolation (d): /fast p99 <= 2x idle p99 and <= 5 ms",
            p99 <= 2 * idle and p99 <= 5,
            f"p99 {num(p99)} ms = {p99 / idle:.1f}x idle {num(idle)} ms",
        )
    if e := get(API, "e"):
        check(
            "efficiency (e): >= 90 % of the ceiling",
            e["of_ceiling"] >= 0.9,
            f"{num(e['fib_rate'])}/s = {e['of_ceiling']:.0%} of {num(results['ceiling']['fib_rate'])}/s",
        )
    if f := get(API, "f"):
        check("overhead (f): fib(1) p50 <= 1.5 ms", f["latency"]["p50"] <= 1.5, f"p50 {num(f['latency']['p50'])} ms")
    if g := get(API_COALESCE, "g"):
        check(
            "coalescing (g): one computation",
            g["computations"] == 1,
            f"{g['computations']:.0f} computation(s), wall {num(g['wall_s'])} s",
        )
    if (g_off := get(API, "g")) and g_off.get("computations") is not None:
        # Admission control may answer 503 to part of the burst; every admitted request computes.
        rejected = g_off["failures"].get("503", 0)
        check(
            "coalescing switchable off (g, COALESCE=false): one computation per admitted request",
            g_off["computations"] == g_off["requests"] - rejected,
            f"{g_off['computations']:.0f} computations for {g_off['requests']} requests, {rejected} rejected (503)",
        )
    if h := get(API, "h"):
        rejected = h["rejected"]
        check(
            "overload (h): goodput >= 90 % of peak",
            h["of_peak"] >= 0.9,
            f"{num(h['goodput'])}/s = {h['of_peak']:.0%} of {num(h['peak'])}/s",
        )
        check(
            "overload (h): excess rejected in < 10 ms with 503 + Retry-After",
            rejected["count"] > 0 and rejected["p99"] < 10 and h["rejected_with_retry_after"] == rejected["count"],
            f"{rejected['count']} rejected, p99 {num(rejected.get('p99', float('nan')))} ms, "
            f"{h['rejected_with_retry_after']} with Retry-After; {h['statuses'].get('timeout', 0)} client timeouts",
        )
        check("overload (h): /fast p99 <= 10 ms", h["fast"]["p99"] <= 10, f"p99 {num(h['fast']['p99'])} ms")
    return out
