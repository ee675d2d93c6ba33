import pytest

from service import tasks

KNOWN = {0: 0, 1: 1, 2: 1, 3: 2, 10: 55, 20: 6765, 25: 75025}


@pytest.mark.parametrize(("n", "value"), sorted(KNOWN.items()))
def test_fib_known_values(n: int, value: int) -> None:
    assert tasks.fib(n) == value


def test_registry_holds_fib_with_a_growing_cost_model() -> None:
    task = tasks.REGISTRY["fib"]
    assert task.func is tasks.fib
    costs = [task.relative_cost((n,)) for n in range(30)]
    assert costs == sorted(costs)
    # naive fib's call tree grows by phi per step
    assert task.relative_cost((21,)) / task.relative_cost((20,)) == pytest.approx(tasks.PHI)


def test_calibration_gives_seconds_per_unit() -> None:
    unit = tasks.REGISTRY["fib"].calibrate(repeat=1)
    assert 0 < unit < 1e-3


def test_derive_is_pbkdf2_with_its_defaults() -> None:
    import hashlib

    expected = hashlib.pbkdf2_hmac("sha256", b"text", b"salt", 1000, dklen=32).hex()
    assert tasks.derive("text", "salt", 1000) == expected
    assert len(tasks.derive("text", "salt", 1000, "sha512", 64)) == 128


def test_derive_cost_follows_iterations_and_hash() -> None:
    derive = tasks.REGISTRY["derive"]
    cheap = derive.relative_cost(derive.validate({"text": "t", "salt": "s", "iterations": 1000}))
    double = derive.relative_cost(derive.validate({"text": "t", "salt": "s", "iterations": 2000}))
    sha512 = derive.relative_cost(derive.validate({"text": "t", "salt": "s", "iterations": 1000, "hash": "sha512"}))
    assert double == sha512 == 2 * cheap
    assert 0 < derive.calibrate(repeat=1) < 1e-3  # seconds per iteration
