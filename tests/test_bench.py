"""The benchmark harness end to end on its tiny plan: every server, every scenario, real processes.

Checks that ``python -m bench --quick`` produces the JSON, the table and the PNG, and that the
figures are sane (positive, complete, no failed requests where none may fail). No timing target is
asserted: those are the benchmark's own output, printed by ``make bench``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dask.config
import pytest
from dask_settings import project_settings
from distributed import Client

from bench.processes import dask_cluster

ROOT = Path(__file__).resolve().parent.parent
SERVERS = ("blocking", "notebook_dask", "processpool", "compute-api")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=170,
    )
    return done, out


@pytest.mark.timeout(180)
def test_quick_run_writes_json_table_and_png(run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    done, out = run
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert (out / "latest.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    table = (out / "latest.md").read_text()
    assert table in done.stdout
    assert "| scenario | " + " | ".join(SERVERS) + " |" in table
    assert len(list(out.glob("bench-*.json"))) == 1


@pytest.mark.timeout(180)
def test_quick_run_figures_are_complete_and_sane(run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    done, out = run
    results = json.loads((out / "latest.json").read_text())
    assert results["ceiling"]["fib_rate"] > 0
    for name in SERVERS:
        scenarios = results["servers"][name]["scenarios"]
        assert sorted(scenarios) == list("abcdefghij" if name == "compute-api" else "abcdefghi"), name
        assert all("error" not in s for s in scenarios.values()), (name, scenarios)
        # Unloaded scenarios: every request must succeed.
        for key in "abcdefg":
            assert not scenarios[key].get("failures"), (name, key, scenarios[key])
        assert 0 < scenarios["a"]["x1"]["p50"] <= scenarios["a"]["x1"]["max"]
        assert scenarios["a"]["x1"]["count"] == results["plan"]["fast_sequence"]
        assert scenarios["b"]["requests"] == results["plan"]["fib_burst"]
        assert scenarios["c"]["fast"]["count"] >= 1 and scenarios["c"]["slow_s"] > 0
        assert scenarios["d"]["fib_rate"] > 0 and scenarios["d"]["fast"]["count"] > 0
        assert scenarios["e"]["fib_rate"] > 0 and scenarios["e"]["of_ceiling"] > 0
        assert 0 < scenarios["f"]["latency"]["count"] <= results["plan"]["overhead_requests"]
        # (h): every offered request is accounted for, answered or not.
        h = scenarios["h"]
        assert sum(h["statuses"].values()) >= h["offered_rate"] * h["seconds"] - 1
        assert h["fast"]["count"] > 0
        # (j): derive, a declared function, is only compute-api's
        if name == "compute-api":
            assert scenarios["j"]["rate"] > 0 and not scenarios["j"]["failures"], scenarios["j"]
        # (i): both bands were measured
        assert scenarios["i"]["short"]["count"] > 0 and scenarios["i"]["long"]["count"] > 0

    off = results["servers"]["compute-api"]["scenarios"]["g"]
    assert off["computations"] == off["requests"], "COALESCE=false must compute every request"
    on = results["servers"]["compute-api+coalesce"]["scenarios"]
    assert sorted(on) == ["g"]
    # Every request either started a computation or joined one; at least one joined.
    assert on["g"]["computations"] >= 1 and on["g"]["coalesced"] >= 1
    assert on["g"]["computations"] + on["g"]["coalesced"] == on["g"]["requests"]
    assert {t["target"].split(":")[0] for t in results["targets"]} >= {
        "isolation (d)",
        "efficiency (e)",
        "overhead (f)",
        "coalescing (g)",
        "overload (h)",
    }


@pytest.mark.timeout(180)
def test_batching_bench_measures_every_run() -> None:
    # The plumbing of `python -m bench.batching` on a tiny load: the three runs (direct + batching,
    # batching only, neither) answer every request and report their CPU; the figures themselves are
    # the bench's output, not asserted.
    done = subprocess.run(
        [sys.executable, "-m", "bench.batching", "--rate", "50", "--seconds", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=170,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    labels = ("direct + batching (defaults)", "batching only (DIRECT_MAX_COST=0)",
              "neither (DIRECT_MAX_COST=0, BATCH_MAX_SIZE=1)")
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0].removeprefix("| ") for row in rows[2:]] == list(labels), done.stdout
    assert done.stdout.count("statuses {'200': 50}") == 3, done.stdout


@pytest.mark.timeout(120)
def test_bench_dask_processes_run_with_the_project_dask_settings(tmp_path: Path) -> None:
    # The scheduler and workers that `python -m bench capacity` and `python -m bench.batching` spawn
    # read service/dask.yaml, as the image's do: their CPU figures are the product's.
    with dask_cluster(1, tmp_path) as cluster, Client(cluster.address, timeout=60) as client:
        client.wait_for_workers(1, timeout=60)
        for key, value in project_settings().items():
            assert client.run_on_scheduler(dask.config.get, key) == value, key
            assert list(client.run(dask.config.get, key).values()) == [value], key


@pytest.mark.timeout(180)
def test_capacity_bench_measures_every_process(tmp_path: Path) -> None:
    # `python -m bench capacity` on a tiny load: a few requests/s of ~1 ms and of ~20 ms work (sized
    # by the bench from this machine), a few percent of one worker. Behaviour only: every request is
    # answered with the right value, both cells get requests, every process's CPU is measured.
    figures = tmp_path / "capacity.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "capacity", "--rate", "20", "--heavy-rate", "2", "--seconds", "2",
         "--efficiency-rounds", "1", "--efficiency-seconds", "1", "--json", str(figures)],
        cwd=ROOT, capture_output=True, text=True, timeout=170,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(figures.read_text())
    assert sorted(results["runs"]) == ["cheap/1", "cheap/2", "heavy/1", "heavy/2"]
    for key, row in results["runs"].items():
        assert row["offered"] == row["rate"] * 2 and row["answered"] == row["offered"], (key, row)
        assert row["wrong"] == 0 and row["failed"] == 0, (key, row)
        assert row["api_ms"] > 0 and row["worker_ms"] > 0, (key, row)
        # A scheduler's CPU over a 2 s window: its housekeeping (~4 ms/s) plus its Dask tasks, read in
        # the OS's 10 ms ticks, so a cell that direct calls kept out of the way may read 0.
        assert len(row["scheduler_ms"]) == row["cells"] and all(ms >= 0 for ms in row["scheduler_ms"]), (key, row)
        # Placement split the requests over the cells as the bench intended: half each.
        assert row["cell_computations"] == [row["answered"] / row["cells"]] * row["cells"], (key, row)
    # Heavy requests are Dask tasks (over DIRECT_MAX_COST): they cost the schedulers CPU.
    assert sum(results["runs"]["heavy/1"]["scheduler_cpu_s"] + results["runs"]["heavy/2"]["scheduler_cpu_s"]) > 0
    assert results["model"]["sizing"]["cells"] >= 1
    assert "| load | cells |" in done.stdout and "Target: each of 2 cells' schedulers" in done.stdout
    # The worker's efficiency: one pair of rounds (bare, worker, bare) on a machine with 2 cores or more.
    efficiency = results["efficiency"]
    if len(os.sched_getaffinity(0)) < 2:
        assert "skipped" in efficiency
    else:
        assert len(efficiency["bare_rates"]) == 2 and len(efficiency["worker_rates"]) == 1, efficiency
        assert efficiency["median"] > 0 and efficiency["cpu"]["median"] > 0, efficiency
        assert efficiency["worker_core"] not in efficiency["other_cores"], efficiency
        assert "Target: each worker >= 95% of a bare fib loop" in done.stdout
