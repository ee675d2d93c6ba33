"""The Locust scenarios (locustfiles/): real Locust processes against a real embedded server.

Runs are short and use small n (15..22) so two cores cope; the end-to-end runs take about a minute.
The pure pieces (spec parsing, shape plans, the gate's arithmetic) are tested directly first.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from conftest import BIN, ROOT, ServerProcess, free_port, wait_until

LOCUSTFILES = ROOT / "locustfiles"
LOCUSTFILE = LOCUSTFILES / "locustfile.py"
LOCUST_CONF = LOCUSTFILES / "locust.conf"
# The helpers are top-level modules, as Locust imports them. Only the locust-free ones are imported
# here: importing locust itself would monkey-patch this pytest process with gevent.
sys.path.insert(0, str(LOCUSTFILES))

from compute import parse_functions  # noqa: E402
from load_shapes import DEFAULT_DURATION_S, PLANS, shape_tick  # noqa: E402
from slo_gate import FAST_NAME, FIB_NAME  # noqa: E402
from workload import KNOWN_FIB_VALUES, SpecError, parse_n_distribution, parse_wait_range  # noqa: E402

from service.tasks import fib  # noqa: E402

SMALL_N = "15..22"


# --- pure pieces -------------------------------------------------------------------------------

def test_known_values_match_the_service_and_the_recurrence() -> None:
    assert [fib(n) for n in range(26)] == list(KNOWN_FIB_VALUES[:26])
    assert all(KNOWN_FIB_VALUES[n] == KNOWN_FIB_VALUES[n - 1] + KNOWN_FIB_VALUES[n - 2]
               for n in range(2, len(KNOWN_FIB_VALUES)))


def test_n_specs() -> None:
    assert parse_n_distribution("25").values == (25,)
    uniform = parse_n_distribution("20..23")
    assert uniform.values == (20, 21, 22, 23) and len(set(uniform.weights)) == 1
    weighted = parse_n_distribution("20:3, 25:1,30")
    assert weighted.values == (20, 25, 30) and weighted.weights == (3.0, 1.0, 1.0)
    samples = [weighted.sample() for _ in range(4000)]
    # 3:1:1 -> n=20 is about 60 % of draws; a wide band keeps this deterministic enough.
    assert 0.5 < samples.count(20) / len(samples) < 0.7
    assert set(samples) == {20, 25, 30}
    for bad in ("", "x", "30..20", "20:0", "20:-1", "-1", "41", "0..99"):
        with pytest.raises(SpecError):
            parse_n_distribution(bad)


def test_function_specs_and_calls_checked_against_the_same_function() -> None:
    every = parse_functions("")
    assert {f.name for f in every.functions} == {"fib", "derive"}
    plan = parse_functions("derive:3, fib")
    assert [f.name for f in plan.functions] == ["derive", "fib"] and plan.weights == (3.0, 1.0)
    call = parse_functions("fib").sample()
    n = call.arguments["n"]
    assert call.path == "/compute/fib" and call.query() == f"/compute/fib?n={n}"
    assert call.expected == {"function": "fib", "arguments": {"n": n}, "value": KNOWN_FIB_VALUES[n]}
    for bad in ("nope", "fib:0", "fib:x"):
        with pytest.raises(SpecError):
            parse_functions(bad)
    with pytest.raises(SpecError, match="cannot import 'no_such_module'"):
        parse_functions("", "no_such_module")


def test_wait_specs() -> None:
    assert parse_wait_range("0.5") == parse_wait_range("0.5..0.5")
    assert 0.1 <= parse_wait_range("0.1..0.2").sample() <= 0.2
    for bad in ("", "fast", "2..1", "-1"):
        with pytest.raises(SpecError):
            parse_wait_range(bad)


def test_shape_plans() -> None:
    peak, rate, duration = 20, 5.0, 100.0
    assert PLANS["steady"](50, duration, peak, rate, 4) == (peak, rate)
    steps = [PLANS["step"](t, duration, peak, rate, 4)[0] for t in (0, 30, 60, 99)]
    assert steps == [5, 10, 15, 20]
    spike = [PLANS["spike"](t, duration, peak, rate, 4)[0] for t in (10, 50, 90)]
    assert spike == [4, 20, 4]
    assert PLANS["spike"](50, duration, peak, rate, 4)[1] >= peak  # the spike arrives at once
    scaleout = [PLANS["scaleout"](t, duration, peak, rate, 4)[0] for t in (5, 24.9, 50, 74, 80)]
    assert scaleout[0] < scaleout[1] == peak == scaleout[2] == scaleout[3] and scaleout[4] == 1
    assert set(DEFAULT_DURATION_S) == set(PLANS)


def test_shape_ends_after_run_time() -> None:
    options = SimpleNamespace(run_time=10, num_users=8, spawn_rate=2.0, shape_steps=4)
    assert shape_tick("step", 9.9, options) == (8, 2.0)
    assert shape_tick("step", 10, options) is None  # None tells Locust the shape is over
    assert shape_tick("spike", DEFAULT_DURATION_S["spike"] - 1, SimpleNamespace(**{**vars(options), "run_time": None}))


# Runs in a child interpreter with real Locust stats, so this pytest process is never monkey-patched.
GATE_ARITHMETIC = """
import sys
sys.path.insert(0, sys.argv[1])
from locust.stats import RequestStats
from slo_gate import FAST_NAME, FIB_NAME, Thresholds, evaluate

stats = RequestStats()
for ms in range(1, 101):  # /fast: 1..100 ms -> p95 about 95 ms
    stats.log_request("GET", FAST_NAME, ms, 20)
stats.log_request("GET", FIB_NAME, 400, 20)
assert evaluate(stats, Thresholds(0.0, 100, 1000), unhandled_exceptions=0).passed
verdict = evaluate(stats, Thresholds(0.0, 90, 1000), unhandled_exceptions=0)
assert len(verdict.violations) == 1 and verdict.violations[0].startswith(f"{FAST_NAME} p95: 9"), verdict
assert verdict.violations[0].endswith("(limit 90 ms)"), verdict.violations
assert evaluate(stats, Thresholds(0.0, 0, 0), unhandled_exceptions=0).passed  # 0 disables
stats.log_error("GET", FIB_NAME, "HTTP 503 unavailable (Retry-After)")  # a 503 is a failure
assert not evaluate(stats, Thresholds(0.0, 100, 1000), unhandled_exceptions=0).passed
assert evaluate(stats, Thresholds(0.01, 100, 1000), unhandled_exceptions=0).passed
assert not evaluate(stats, Thresholds(0.01, 100, 1000), unhandled_exceptions=1).passed
assert not evaluate(RequestStats(), Thresholds(1.0, 0, 0), unhandled_exceptions=0).passed
print(evaluate(stats, Thresholds(0.0, 90, 1000), unhandled_exceptions=0).report())
"""


def test_gate_arithmetic_on_real_stats() -> None:
    result = subprocess.run([sys.executable, "-c", GATE_ARITHMETIC, str(LOCUSTFILES)], capture_output=True,
                            text=True, env=locust_env(), timeout=60)
    assert result.returncode == 0, result.stderr
    assert "SLO gate: FAILED (2 violated)" in result.stdout, result.stdout


# --- real Locust runs ----------------------------------------------------------------------------

def locust_command() -> list[str]:
    locust = BIN / "locust"
    if not locust.exists():
        pytest.fail(f"locust is not installed in {BIN}: run `make venv` (or pip install -e '.[loadtest]')")
    return [str(locust)]


def locust_env() -> dict[str, str]:
    # A developer's LOCUST_* variables must not change what the tests run.
    return {k: v for k, v in os.environ.items() if not k.startswith("LOCUST_")}


def start_locust(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([*locust_command(), *args], cwd=cwd, env=locust_env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"locust did not finish within {timeout}s\n{out}\n{err}")
    return proc.returncode, out, err


def run_headless(server_url: str, cwd: Path, *extra: str, run_time: int) -> tuple[int, str, str]:
    """Headless run with the shipped locust.conf, from ``cwd`` so its default reports land there."""
    args = ["--config", str(LOCUST_CONF), "-f", str(LOCUSTFILE), "--headless", "--host", server_url,
            "-t", f"{run_time}s", "--only-summary", "--fib-n", SMALL_N, *extra]
    return finish(start_locust(args, cwd), timeout=run_time + 60)


def stats_rows(csv_path: Path) -> dict[str, dict[str, str]]:
    with csv_path.open(newline="") as f:
        return {row["Name"]: row for row in csv.DictReader(f)}


def test_headless_run_passes_and_writes_reports(embedded_server: ServerProcess, tmp_path: Path) -> None:
    code, out, err = run_headless(embedded_server.url, tmp_path, "-u", "6", "-r", "6", run_time=20)
    print(out, err[-3000:])  # the summary, for the CI log
    assert code == 0, f"{out}\n{err}"
    assert "SLO gate: PASSED" in out
    reports = tmp_path / "results" / "locust"  # the default folder from locust.conf
    rows = stats_rows(reports / "locust_stats.csv")
    for name in (FAST_NAME, FIB_NAME):
        assert int(rows[name]["Request Count"]) > 0, rows
        assert int(rows[name]["Failure Count"]) == 0, rows
    assert int(rows[FAST_NAME]["Request Count"]) > int(rows[FIB_NAME]["Request Count"])  # faster wait
    assert (reports / "locust_stats_history.csv").stat().st_size > 0
    html = (reports / "report.html").read_text()
    assert FIB_NAME in html and FAST_NAME in html


def test_gate_fails_on_unreachable_fib_p95(embedded_server: ServerProcess, tmp_path: Path) -> None:
    code, out, err = run_headless(embedded_server.url, tmp_path, "-u", "4", "-r", "4",
                                  "--slo-fib-p95-ms", "0.001", run_time=6)
    assert code == 1, f"{out}\n{err}"
    assert "SLO gate: FAILED (1 violated)" in out
    assert "[FAIL] /fib/[n] p95:" in out and "(limit 0.001 ms)" in out
    assert "SLO gate failed: /fib/[n] p95:" in err  # the log line says why, too


def test_tags_select_one_kind_of_traffic(embedded_server: ServerProcess, tmp_path: Path) -> None:
    code, out, err = run_headless(embedded_server.url, tmp_path, "-u", "2", "-r", "2", "--tags", "fast",
                                  "--csv", str(tmp_path / "fast"), run_time=4)
    assert code == 0, f"{out}\n{err}"
    rows = stats_rows(tmp_path / "fast_stats.csv")
    assert int(rows[FAST_NAME]["Request Count"]) > 0 and FIB_NAME not in rows
    assert "[skip] /fib/[n] p95: no requests" in out


def test_invalid_n_is_refused_before_any_request(tmp_path: Path) -> None:
    # No server needed: the spec is checked at start-up, so a typo can never turn into 422s.
    code, out, err = run_headless("http://127.0.0.1:9", tmp_path, "--fib-n", "20..60", run_time=5)
    assert code == 1
    assert "invalid workload option" in err and "0..40" in err


def test_distributed_master_and_two_workers(embedded_server: ServerProcess, tmp_path: Path) -> None:
    port = free_port()
    master = start_locust(
        ["--config", str(LOCUST_CONF), "-f", str(LOCUSTFILE), "--headless", "--master",
         "--master-bind-host", "127.0.0.1", "--master-bind-port", str(port), "--expect-workers", "2",
         "--expect-workers-max-wait", "30", "--host", embedded_server.url, "-u", "4", "-r", "4",
         "-t", "12s", "--only-summary", "--fib-n", "16", "--fast-wait", "5",
         "--shape", "step", "--shape-steps", "2"],  # the shape runs on the master only
        tmp_path,
    )
    # Workers run without --config (the master writes the reports) and get the options from it.
    workers = [start_locust(["-f", str(LOCUSTFILE), "--worker", "--master-host", "127.0.0.1",
                             "--master-port", str(port)], tmp_path) for _ in range(2)]
    code, out, err = finish(master, timeout=90)
    worker_results = [finish(w, timeout=30) for w in workers]
    assert code == 0, f"{out}\n{err}"
    assert "2 workers connected" in err and "SLO gate: PASSED" in out
    assert "Shape test updating to 2 users" in err and "Shape test updating to 4 users" in err
    for worker_code, _, worker_err in worker_results:
        assert worker_code == 0, worker_err
        assert "options from master: fib-n=16 fast-wait=5" in worker_err
    rows = stats_rows(tmp_path / "results" / "locust" / "locust_stats.csv")
    assert int(rows[FIB_NAME]["Request Count"]) > 0
    # At most 2 FastUsers waiting 5 s for 12 s make at most ~6 requests; the default wait would make ~60.
    assert 0 < int(rows[FAST_NAME]["Request Count"]) <= 12, rows[FAST_NAME]


def test_web_ui_run(embedded_server: ServerProcess, tmp_path: Path) -> None:
    web_port = free_port()
    proc = start_locust(["--config", str(LOCUST_CONF), "-f", str(LOCUSTFILE), "--host", embedded_server.url,
                         "--web-host", "127.0.0.1", "--web-port", str(web_port)], tmp_path)
    ui = f"http://127.0.0.1:{web_port}"
    try:
        wait_until(lambda: httpx.get(ui, timeout=2).status_code == 200, 30, what="Locust web UI")
        # Custom options are form fields of the web UI, like Locust's own.
        started = httpx.post(f"{ui}/swarm", data={"user_count": 4, "spawn_rate": 4, "host": embedded_server.url,
                                                 "fib_n": "15"}, timeout=5).json()
        assert started["success"], started
        wait_until(lambda: httpx.get(f"{ui}/stats/requests", timeout=2).json()["total_rps"] > 0, 30,
                   what="requests in the web UI's stats")
        time.sleep(2)
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl+C: how a web UI session ends
    code, out, err = finish(proc, timeout=30)
    assert code == 0, f"{out}\n{err}"
    assert "SLO gate: PASSED" in out
    assert (tmp_path / "results" / "locust" / "report.html").exists()
