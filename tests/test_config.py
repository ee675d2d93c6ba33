import pytest

from service.config import Settings, default_workers


def test_defaults_without_environment() -> None:
    s = Settings.from_environ({})
    assert (s.host, s.port, s.fib_max_n, s.request_timeout) == ("127.0.0.1", 8000, 35, 30.0)
    assert s.embedded and s.scheduler_address is None
    assert s.workers == default_workers() >= 1
    assert s.coalesce is True


def test_environment_is_read_and_cast() -> None:
    s = Settings.from_environ(
        {"FIB_MAX_N": "30", "REQUEST_TIMEOUT": "2.5", "COALESCE": "false", "EMBEDDED_WORKERS": "3", "PORT": "9000"}
    )
    assert (s.fib_max_n, s.request_timeout, s.coalesce, s.workers, s.port) == (30, 2.5, False, 3, 9000)


def test_scheduler_address_comes_from_dask_config() -> None:
    s = Settings.from_environ({"DASK_SCHEDULER_ADDRESS": "tcp://scheduler:8786"})
    assert s.scheduler_address == "tcp://scheduler:8786"
    assert not s.embedded


def test_cli_overrides_win_and_none_means_unset() -> None:
    s = Settings.from_environ({"PORT": "9000", "FIB_MAX_N": "20"}, port=9100, fib_max_n=None)
    assert (s.port, s.fib_max_n) == (9100, 20)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"FIB_MAX_N": "-1"}, "FIB_MAX_N"),
        ({"REQUEST_TIMEOUT": "0"}, "REQUEST_TIMEOUT"),
        ({"PORT": "70000"}, "PORT"),
        ({"WORKER_NICE": "40"}, "WORKER_NICE"),
    ],
)
def test_invalid_values_are_rejected_with_the_variable_name(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Settings.from_environ(env)


def test_non_numeric_values_are_rejected() -> None:
    with pytest.raises(ValueError):
        Settings.from_environ({"FIB_MAX_N": "lots"})
    with pytest.raises(ValueError):
        Settings.from_environ({"COALESCE": "maybe"})


def test_unknown_override_is_a_programming_error() -> None:
    with pytest.raises(TypeError):
        Settings.from_environ({}, fib_max=3)
