import pytest

from service import tasks

KNOWN = {0: 0, 1: 1, 2: 1, 3: 2, 10: 55, 20: 6765, 25: 75025}


@pytest.mark.parametrize(("n", "value"), sorted(KNOWN.items()))
def test_fib_known_values(n: int, value: int) -> None:
    assert tasks.fib(n) == value


def test_registry_holds_fib_with_a_growing_cost_model() -> None:
    task = tasks.REGISTRY["fib"]
    assert task.func is tasks.fib
    costs = [task.relative_cost(n) for n in range(30)]
    assert costs == sorted(costs)
    # naive fib's call tree grows by phi per step
    assert task.relative_cost(21) / task.relative_cost(20) == pytest.approx(tasks.PHI)


def test_calibration_gives_seconds_per_unit() -> None:
    unit = tasks.REGISTRY["fib"].calibrate(repeat=1)
    assert 0 < unit < 1e-3
