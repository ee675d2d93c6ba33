"""The cost model: calibrated here, corrected by what the workers report, within bounds."""

from __future__ import annotations

import pytest

from service.cost import MAX_SPEED_RATIO, MIN_SPEED_RATIO, SPEED_SMOOTHING, CostModel
from service.tasks import PHI, REGISTRY


def model() -> CostModel:
    return CostModel(relative_cost=lambda n: 2.0**n, unit=0.001)


def test_estimates_scale_with_the_relative_cost() -> None:
    m = model()
    assert m.local(10) == pytest.approx(1.024)
    assert m.estimate(10) == m.local(10)  # until a worker reports


def test_workers_twice_as_slow_are_learnt_within_a_few_tasks() -> None:
    m = model()
    for _ in range(10):
        m.learn(10, 2 * m.local(10))
    assert m.speed == pytest.approx(2.0, rel=0.05)
    assert m.estimate(5) == pytest.approx(2 * m.local(5), rel=0.05)


def test_one_report_moves_the_speed_by_the_smoothing_factor() -> None:
    m = model()
    m.learn(10, 3 * m.local(10))
    assert m.speed == pytest.approx(1 + SPEED_SMOOTHING * 2)


@pytest.mark.parametrize(("seconds", "bound"), [(0.0, MIN_SPEED_RATIO), (1e9, MAX_SPEED_RATIO)])
def test_absurd_reports_are_clamped(seconds: float, bound: float) -> None:
    m = model()
    for _ in range(100):
        m.learn(10, seconds)
    assert m.speed == pytest.approx(bound)


def test_fib_cost_grows_by_phi_per_step() -> None:
    fib = REGISTRY["fib"]
    m = CostModel(fib.relative_cost, unit=1e-7)
    assert m.local((31,)) / m.local((30,)) == pytest.approx(PHI)
