"""The scenario's own Locust options.

Registered through ``events.init_command_line_parser`` so they behave like Locust's built-ins: set
them on the command line, in a config file (``fib-n = 20..30``), as ``LOCUST_*`` environment
variables, or in the web UI's "Custom parameters" panel. The master forwards them to its workers.
"""

from __future__ import annotations

from typing import Any

SHAPE_NAMES = ("steady", "step", "spike", "scaleout")


def add_arguments(parser: Any) -> None:
    """Add the scenario options to Locust's parser (a configargparse ``LocustArgumentParser``)."""
    mix = parser.add_argument_group("compute-api traffic mix")
    mix.add_argument("--fast-weight", type=int, default=1, env_var="LOCUST_FAST_WEIGHT",
                     help="Relative number of FastUsers (GET /fast); 0 disables them. Default 1.")
    mix.add_argument("--fib-weight", type=int, default=1, env_var="LOCUST_FIB_WEIGHT",
                     help="Relative number of FibUsers (GET /fib/{n}); 0 disables them. Default 1.")
    mix.add_argument("--compute-weight", type=int, default=0, env_var="LOCUST_COMPUTE_WEIGHT",
                     help="Relative number of ComputeUsers (GET and POST /compute/{name}, the declared "
                          "functions); 0 (default) disables them.")
    mix.add_argument("--functions", default="", env_var="LOCUST_FUNCTIONS",
                     help="Which declared functions ComputeUsers call, with weights: derive:3,fib. "
                          "Empty (default): every declared one, equally.")
    mix.add_argument("--compute-tasks", default="", env_var="COMPUTE_TASKS",
                     help="Your own compute modules (the server's COMPUTE_TASKS), imported here to "
                          "check each answer against the same function.")
    mix.add_argument("--compute-method", default="both", choices=("get", "post", "both"),
                     env_var="LOCUST_COMPUTE_METHOD",
                     help="GET with query parameters, POST with a JSON body, or both at random. Default both.")
    mix.add_argument("--compute-wait", default="0.5..1.5", env_var="LOCUST_COMPUTE_WAIT",
                     help="ComputeUser think time in seconds: 1 or 0.5..1.5. Default 0.5..1.5.")
    mix.add_argument("--fib-n", default="20..25", env_var="LOCUST_FIB_N",
                     help="n for /fib: fixed (25), uniform range (20..30) or weighted list (20:3,25:1). "
                          "Default 20..25.")
    mix.add_argument("--fast-wait", default="0.1..0.5", env_var="LOCUST_FAST_WAIT",
                     help="FastUser think time in seconds: 0.5 or 0.1..0.5. Default 0.1..0.5.")
    mix.add_argument("--fib-wait", default="0.5..1.5", env_var="LOCUST_FIB_WAIT",
                     help="FibUser think time in seconds: 1 or 0.5..1.5. Default 0.5..1.5.")

    shape = parser.add_argument_group("compute-api load shape")
    shape.add_argument("--shape", default="", choices=("", *SHAPE_NAMES), env_var="LOCUST_SHAPE",
                       help="Load shape: steady, step, spike or scaleout, driven by --users (peak), "
                            "--spawn-rate and --run-time (whole shape). Empty (default): plain "
                            "--users/--run-time run.")
    shape.add_argument("--shape-steps", type=int, default=4, env_var="LOCUST_SHAPE_STEPS",
                       help="Number of stages of the step shape. Default 4.")

    slo = parser.add_argument_group("compute-api SLO gate (non-zero exit code when violated)")
    slo.add_argument("--slo-fail-ratio", type=float, default=0.0, env_var="LOCUST_SLO_FAIL_RATIO",
                     help="Highest allowed share of failed requests (any non-2xx or wrong value), "
                          "0..1. Default 0.")
    slo.add_argument("--slo-fast-p95-ms", type=float, default=500.0, env_var="LOCUST_SLO_FAST_P95_MS",
                     help="Highest allowed p95 of /fast in ms; 0 disables. Default 500.")
    slo.add_argument("--slo-fib-p95-ms", type=float, default=10000.0, env_var="LOCUST_SLO_FIB_P95_MS",
                     help="Highest allowed p95 of /fib/[n] in ms; 0 disables. Default 10000.")
