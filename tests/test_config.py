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
        ({"LOG_LEVEL": "loud"}, "LOG_LEVEL"),
        ({"MAX_IN_FLIGHT": "0"}, "MAX_IN_FLIGHT"),
        ({"RETRY_AFTER": "0"}, "RETRY_AFTER"),
        ({"INLINE_MAX_COST": "-1"}, "INLINE_MAX_COST"),
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


def test_every_setting_has_a_cli_flag_showing_its_variable_and_default() -> None:
    from service.cli import build_parser

    serve = build_parser()._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    flags = {action.dest: action for action in serve._actions if action.dest != "help"}
    assert set(flags) == set(Settings.model_fields)
    for name, action in flags.items():
        assert Settings.env_name(name) in action.help, action.help
        assert "default" in action.help


def test_cli_refuses_a_bad_value_with_the_variable_name(capsys: pytest.CaptureFixture[str]) -> None:
    from service.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--port", "70000"])
    assert "PORT" in str(exit_info.value.code) and "65535" in str(exit_info.value.code)


def test_cold_start_queue_is_a_setting() -> None:
    assert Settings.from_environ({"COLD_START_QUEUE": "8"}).cold_start_queue == 8
    with pytest.raises(ValueError, match="COLD_START_QUEUE"):
        Settings.from_environ({"COLD_START_QUEUE": "-1"})


def test_embedded_workers_default_counts_cpu_quotas() -> None:
    import dask.system

    assert Settings.from_environ({}).workers == max(1, dask.system.CPU_COUNT)


def test_settings_are_immutable() -> None:
    s = Settings.from_environ({})
    with pytest.raises(ValueError):
        s.port = 1  # type: ignore[misc]


def test_readme_configuration_table_is_rendered_from_the_settings() -> None:
    import subprocess
    import sys

    from conftest import ROOT

    check = subprocess.run([sys.executable, "scripts/render_readme.py", "--check"], cwd=ROOT, capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stderr
