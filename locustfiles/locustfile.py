"""compute-api load test: cheap /fast traffic next to CPU-heavy /fib/{n} traffic.

Run from the repository root (``make load`` does this)::

    locust --config locustfiles/locust.conf --headless --host http://127.0.0.1:8000

The traffic mix, n distribution, think times, load shape and SLO thresholds are Locust options
defined in arguments.py (Locust 2.47's --help does not list a locustfile's own options), settable
on the command line, in locust.conf, as LOCUST_* variables or in the web UI. ``--tags fast`` / ``--tags fib``
send only one kind of traffic. The run exits non-zero when the SLO gate fails.

``--compute-weight N`` adds ComputeUsers calling the declared functions (``/compute/{name}``,
``--functions``, ``--tags compute``), your own among them with ``--compute-tasks`` (COMPUTE_TASKS).
"""

from __future__ import annotations

import logging
import random
import sys
from pathlib import Path
from typing import Any

# The compute functions are checked against the service's own code: run from a checkout (or an
# image) where ``service`` sits next to locustfiles/.
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from arguments import add_arguments
from compute import parse_functions
from load_shapes import shape_tick
from locust import LoadTestShape, events, tag, task
from locust.contrib.fasthttp import FastHttpUser
from locust.env import Environment
from locust.runners import WorkerRunner
from slo_gate import FAST_NAME, FIB_NAME, Thresholds, Verdict, evaluate
from workload import KNOWN_FIB_VALUES, SpecError, parse_n_distribution, parse_wait_range

logger = logging.getLogger("compute_api.loadtest")


def response_problem(response: Any, expected: dict[str, Any]) -> str | None:
    """Why a response does not count as success, or None. Messages stay stable so failures group."""
    if response.status_code == 0:
        return f"no response: {type(response.error).__name__}: {response.error}"
    if response.status_code != 200:
        try:
            error = response.json().get("error", "?")
        except Exception:  # not JSON: a proxy's error page, for example
            error = "non-JSON body"
        retry = " (Retry-After)" if response.headers.get("Retry-After") is not None else ""
        return f"HTTP {response.status_code} {error}{retry}"
    try:
        body = response.json()
    except ValueError:
        return "HTTP 200 with a non-JSON body"
    if body != expected:
        return f"wrong body: got {body!r}, expected {expected!r}"
    return None


class ComputeApiUser(FastHttpUser):
    """Shared plumbing: option-driven think time and validated JSON GETs."""

    abstract = True
    # Which tag this user's traffic carries and which option sets its think time.
    traffic_tag: str
    wait_option: str

    def on_start(self) -> None:
        self.retry_after = 0.0

    def wait_time(self) -> float:
        # Read per call: workers receive the master's options only with the spawn message.
        think = parse_wait_range(getattr(self.environment.parsed_options, self.wait_option)).sample()
        # Back off as told by a 503's Retry-After, like a well-behaved client; the 503 still counts
        # as a failure, but the user does not hammer an overloaded service.
        wait, self.retry_after = max(think, self.retry_after), 0.0
        return wait

    def get_json(self, path: str, name: str, expected: dict[str, Any], body: Any = None) -> None:
        """GET ``path`` (or POST ``body`` as JSON when given) and check the answer is ``expected``."""
        request = self.client.get(path, name=name, catch_response=True) if body is None else \
            self.client.post(path, name=name, json=body, catch_response=True)
        with request as response:
            problem = response_problem(response, expected)
            if response.status_code == 503:
                try:
                    self.retry_after = float(response.headers.get("Retry-After") or 0)
                except ValueError:  # an HTTP-date: not sent by compute-api, not worth parsing
                    self.retry_after = 1.0
            if problem:
                response.failure(problem)
            else:
                response.success()


class FastUser(ComputeApiUser):
    traffic_tag = "fast"
    wait_option = "fast_wait"

    @tag("fast")
    @task
    def fast(self) -> None:
        self.get_json("/fast", FAST_NAME, {"message": "Hello!"})


class FibUser(ComputeApiUser):
    traffic_tag = "fib"
    wait_option = "fib_wait"

    @tag("fib")
    @task
    def fib(self) -> None:
        n = parse_n_distribution(self.environment.parsed_options.fib_n).sample()
        self.get_json(f"/fib/{n}", FIB_NAME, {"n": n, "value": KNOWN_FIB_VALUES[n]})


class ComputeUser(ComputeApiUser):
    """The declared compute functions, by GET or POST, each answer checked against the same function."""

    traffic_tag = "compute"
    wait_option = "compute_wait"

    @tag("compute")
    @task
    def compute(self) -> None:
        options = self.environment.parsed_options
        call = parse_functions(options.functions, options.compute_tasks).sample()
        method = options.compute_method if options.compute_method != "both" else random.choice(("get", "post"))
        if method == "get":
            self.get_json(call.query(), call.path, dict(call.expected))
        else:
            self.get_json(call.path, call.path, dict(call.expected), body=dict(call.arguments))


class NamedShape(LoadTestShape):
    """The one shape class: the shape named by ``--shape`` (see load_shapes.py).

    Locust activates any LoadTestShape it finds here, so the init hook detaches this one when no
    shape is named, leaving Locust's plain --users/--spawn-rate/--run-time behaviour.
    """

    use_common_options = True  # the shapes scale with --users, --spawn-rate and --run-time

    def tick(self) -> tuple[int, float] | None:
        options = self.runner.environment.parsed_options
        # The shape can be cleared in the web UI's form after start-up: treat that as steady.
        return shape_tick(options.shape or "steady", self.get_run_time(), options)


USER_CLASSES: tuple[type[ComputeApiUser], ...] = (FastUser, FibUser, ComputeUser)


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any, **_: Any) -> None:
    add_arguments(parser)


def _active_user_classes(options: Any) -> list[type[ComputeApiUser]]:
    """User classes with a positive weight whose traffic --tags/--exclude-tags let through.

    Dropping them here (rather than leaving a user with no tasks, which Locust reports as an
    exception on every iteration) is what makes ``--tags fast`` a clean fast-only run.
    """
    weights = {FastUser: options.fast_weight, FibUser: options.fib_weight, ComputeUser: options.compute_weight}
    tags, excluded = set(options.tags or ()), set(options.exclude_tags or ())
    active = []
    for user_class in USER_CLASSES:
        user_class.weight = weights[user_class]
        if weights[user_class] > 0 and (not tags or user_class.traffic_tag in tags) \
                and user_class.traffic_tag not in excluded:
            active.append(user_class)
    return active


def _describe(options: Any, active: list[type[ComputeApiUser]]) -> str:
    users = []
    for user_class in active:
        wait = getattr(options, user_class.wait_option)
        extra = f", {parse_n_distribution(options.fib_n).describe()}" if user_class is FibUser else ""
        if user_class is ComputeUser:
            plan = parse_functions(options.functions, options.compute_tasks)
            extra = f", functions {plan.describe()}, {options.compute_method}"
        users.append(f"{user_class.__name__} (weight {user_class.weight}, wait {wait} s{extra})")
    return f"{'; '.join(users)}; shape: {options.shape or 'none'}; SLO: {Thresholds.from_options(options).describe()}"


@events.init.add_listener
def _configure(environment: Environment, runner: Any, **_: Any) -> None:
    options = environment.parsed_options
    if isinstance(runner, WorkerRunner):
        # Reports are the master's job: a worker in the same directory would overwrite them.
        if options.html_file or options.csv_prefix:
            logger.warning("worker started with --html/--csv (locust.conf?): start workers without "
                           "--config, the master writes the reports")
            options.html_file = None
        return
    try:
        parse_n_distribution(options.fib_n)
        parse_wait_range(options.fast_wait)
        parse_wait_range(options.fib_wait)
        parse_wait_range(options.compute_wait)
        if options.compute_weight > 0:
            parse_functions(options.functions, options.compute_tasks)
    except SpecError as error:
        logger.error("invalid workload option: %s", error)
        sys.exit(1)
    active = _active_user_classes(options)
    if not active:
        logger.error("no users left to run: check the --*-weight options and --tags/--exclude-tags")
        sys.exit(1)
    environment.user_classes[:] = active
    if not options.shape:
        environment.shape_class = None  # plain --users/--spawn-rate/--run-time run
    logger.info("workload: %s", _describe(options, active))


@events.test_start.add_listener
def _log_worker_options(environment: Environment, **_: Any) -> None:
    # Workers get the scenario options from the master's spawn message: show what arrived.
    if isinstance(environment.runner, WorkerRunner):
        options = environment.parsed_options
        logger.info("options from master: fib-n=%s fast-wait=%s fib-wait=%s functions=%s",
                    options.fib_n, options.fast_wait, options.fib_wait, options.functions)


_verdict: Verdict | None = None


@events.quitting.add_listener
def _slo_gate(environment: Environment, **_: Any) -> None:
    global _verdict
    runner = environment.runner
    if runner is None or isinstance(runner, WorkerRunner):
        return  # only the master sees every worker's stats
    _verdict = evaluate(environment.stats, Thresholds.from_options(environment.parsed_options),
                        unhandled_exceptions=len(runner.exceptions))
    # The gate is the single source of the exit code: failures below --slo-fail-ratio are allowed.
    environment.process_exit_code = 0 if _verdict.passed else 1
    if not _verdict.passed:
        logger.error("SLO gate failed: %s", "; ".join(_verdict.violations))


@events.quit.add_listener
def _print_verdict(exit_code: int, **_: Any) -> None:
    # Printed last, after Locust's summary tables, so the verdict is what a reader sees first.
    if _verdict is not None:
        print(_verdict.report(), flush=True)
