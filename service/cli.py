"""Command line: ``compute-api serve`` (also ``python -m service serve``)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import uvicorn

from service import __version__
from service.app import create_app
from service.config import Settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="compute-api", description=__doc__)
    parser.add_argument("--version", action="version", version=f"compute-api {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="serve the HTTP API",
        description="Serve the API with uvicorn. Flags override the environment variables in brackets.",
    )
    serve.add_argument("--host", help="interface to bind [HOST, default 127.0.0.1]")
    serve.add_argument("--port", type=int, help="TCP port [PORT, default 8000]")
    serve.add_argument(
        "--workers",
        type=int,
        dest="embedded_workers",
        help="embedded Dask worker processes, ignored in remote mode [EMBEDDED_WORKERS, default: one per core]",
    )
    serve.add_argument(
        "--scheduler-address",
        help="use this Dask scheduler, e.g. tcp://host:8786, instead of an embedded cluster [DASK_SCHEDULER_ADDRESS]",
    )
    serve.add_argument("--fib-max-n", type=int, help="largest n accepted by /fib/{n} [FIB_MAX_N, default 35]")
    serve.add_argument("--request-timeout", type=float, help="seconds before 504 [REQUEST_TIMEOUT, default 30]")
    serve.add_argument(
        "--timeout-graceful-shutdown",
        type=float,
        dest="graceful_shutdown_timeout",
        help="seconds to finish in-flight requests on SIGTERM [GRACEFUL_SHUTDOWN_TIMEOUT, default 20]",
    )
    serve.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"], help="[LOG_LEVEL]")
    serve.add_argument(
        "--access-log", action=argparse.BooleanOptionalAction, default=None, help="log every request [ACCESS_LOG]"
    )
    return parser


def serve(settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        log_level=settings.log_level,
        access_log=settings.access_log,
        timeout_keep_alive=int(settings.keepalive_timeout),
        timeout_graceful_shutdown=int(settings.graceful_shutdown_timeout),
        server_header=False,
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = vars(build_parser().parse_args(argv))
    command = args.pop("command")
    try:
        settings = Settings.from_environ(**args)
    except (ValueError, TypeError) as exc:
        sys.exit(f"compute-api: {exc}")
    if command == "serve":
        serve(settings)
