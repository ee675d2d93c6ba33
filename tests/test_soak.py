"""The soak runner (``make soak`` runs it for 10 minutes) for 60 s in CI, with bounds on its figures."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT

DURATION = 60
MAX_P99_DRIFT = 3.0  # p99 of the last 10 % vs the first 10 %; generous: 6 s windows on a shared 2-core box
MAX_RSS_SLOPE_MB_PER_MIN = 10.0  # in 54 s a leak must be gross to show; the 10-minute soak measures finely


def test_soak_60s() -> None:
    done = subprocess.run([sys.executable, "-m", "tests.soak", "--duration", str(DURATION)],
                          cwd=ROOT, capture_output=True, text=True, timeout=DURATION + 120)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    summary = done.stderr.strip().splitlines()[-1]
    print(summary)
    assert figures["requests"] > 0 and set(figures["per_route"]) >= {"/fast", "/fib/25"}, figures
    assert figures["error_rate"] == 0, (summary, figures["statuses"])
    assert figures["p99_drift"] < MAX_P99_DRIFT and figures["fast_p99_drift"] < MAX_P99_DRIFT, (summary, figures)
    assert figures["rss_samples"] >= DURATION / 4, figures
    assert figures["rss_slope_mb_per_min"] < MAX_RSS_SLOPE_MB_PER_MIN, (summary, figures)
