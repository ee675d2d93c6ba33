"""The capacity model's arithmetic (bench/capacity_model.py): rates per process and a sizing."""

from __future__ import annotations

import math

import pytest

from bench.capacity import share
from bench.capacity_model import Profile, capacity_model, rates, worker_efficiency

CHEAP = Profile(api_ms=0.5, scheduler_ms=0.4, worker_ms=1.4, scheduler_idle_ms_per_s=20)
HEAVY = Profile(api_ms=0.8, scheduler_ms=1.5, worker_ms=35.0)


def test_rates_are_the_headroom_of_one_core_over_cpu_per_request() -> None:
    r = rates(CHEAP, headroom=0.7)
    assert r.api_pod == pytest.approx(700 / 0.5)
    assert r.scheduler == pytest.approx((700 - 20) / 0.4)  # housekeeping comes off the budget first
    assert r.worker == pytest.approx(700 / 1.4)
    assert r.workers_per_cell == 4  # 1,700/s of scheduler need ceil(1700 / 500) workers


def test_a_mix_adds_cpu_per_role_and_rounds_each_up() -> None:
    per_size, sizing = capacity_model({"cheap": CHEAP, "heavy": HEAVY}, {"cheap": 2000, "heavy": 200}, 0.7)
    assert set(per_size) == {"cheap", "heavy"}
    assert sizing is not None
    assert sizing.api_cores == pytest.approx(2000 * 0.5e-3 + 200 * 0.8e-3)  # 1.16 cores
    assert sizing.api_replicas == 2  # ceil(1.16 / 0.7)
    assert sizing.scheduler_cores == pytest.approx(0.8 + 0.3)
    assert sizing.cells == 2  # ceil(1.1 / (0.7 - 0.02))
    assert sizing.worker_cores == pytest.approx(2.8 + 7.0)
    assert sizing.workers_per_cell == 7  # ceil(ceil(9.8 / 0.7) / 2)
    assert sizing.workers == 14


def test_a_small_load_still_gets_one_of_each() -> None:
    _, sizing = capacity_model({"cheap": CHEAP}, {"cheap": 1})
    assert sizing is not None and (sizing.api_replicas, sizing.cells, sizing.workers) == (1, 1, 1)


def test_without_a_load_there_is_no_sizing() -> None:
    assert capacity_model({"cheap": CHEAP})[1] is None


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: Profile(0, 1, 1), "api_ms"),
        (lambda: capacity_model({"cheap": CHEAP}, {"heavy": 1}), "heavy"),
        (lambda: capacity_model({"cheap": CHEAP}, headroom=1.5), "headroom"),
        (lambda: capacity_model({"c": Profile(1, 1, 1, scheduler_idle_ms_per_s=800)}, {"c": 1}), "housekeeping"),
    ],
)
def test_bad_input_names_what_is_wrong(call, message: str) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match=message):
        call()


def test_a_share_of_nothing_is_not_a_number_not_a_crash() -> None:
    # A tiny load's lone scheduler, less its housekeeping, can measure 0 ms (10 ms CPU ticks).
    assert math.isnan(share(0.5, 0.0)) and share(1.0, 2.0) == 0.5


def test_worker_efficiency_compares_each_worker_round_with_the_bare_rounds_either_side() -> None:
    # The machine speeds up between rounds: 10, 12, 14 fib/s bare; the worker does 95 % of its neighbours.
    e = worker_efficiency(bare=[10, 12, 14], worker=[0.95 * 11, 0.95 * 13])
    assert e.ratios == pytest.approx((0.95, 0.95))
    assert e.median == e.low == e.high == pytest.approx(0.95)


def test_a_last_worker_round_is_compared_with_the_bare_round_before_it() -> None:
    e = worker_efficiency(bare=[10, 10], worker=[9, 9.5])
    assert e.ratios == pytest.approx((0.9, 0.95))


def test_worker_efficiency_reports_the_median_pair_and_the_spread() -> None:
    # One round spoiled by a neighbour's burst moves the spread, not the median.
    e = worker_efficiency(bare=[10, 10, 10, 10], worker=[9.4, 6.0, 9.3])
    assert e.median == pytest.approx(0.93)
    assert (e.low, e.high) == pytest.approx((0.60, 0.94))


@pytest.mark.parametrize(("bare", "worker"), [([10], []), ([10], [9, 9]), ([10, 10, 10, 10], [9]), ([0, 10], [9])])
def test_worker_efficiency_needs_interleaved_rounds_and_positive_bare_rates(bare: list[float],
                                                                            worker: list[float]) -> None:
    with pytest.raises(ValueError):
        worker_efficiency(bare, worker)
