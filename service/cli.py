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
from service.functions import RegistryError

# Flags spelled differently from their setting (uvicorn's and Dask's own spellings).
FLAG_NAMES = {"embedded_workers": "--workers", "graceful_shutdown_timeout": "--timeout-graceful-shutdown"}


def flag(name: str) -> str:
    return FLAG_NAMES.get(name, "--" + name.replace("_", "-"))


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting, its help and default taken from the field (service/config.py)."""
    for name, field in Settings.model_fields.items():
        env = Settings.env_name(name)
        default = "unset" if field.default is None else str(field.default).lower()
        help_text = f"{field.description} [{env}, default {default}]".replace("%", "%%")
        annotation = field.annotation
        if annotation is bool:
            parser.add_argument(flag(name), dest=name, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
        elif choices := getattr(annotation, "__args__", None) if name == "log_level" else None:
            parser.add_argument(flag(name), dest=name, choices=choices, help=help_text)
        else:
            kind = annotation if annotation in (int, float) else str
            parser.add_argument(flag(name), dest=name, type=kind, metavar=env, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="compute-api", description=__doc__)
    parser.add_argument("--version", action="version", version=f"compute-api {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="serve the HTTP API",
        description="Serve the API with uvicorn. Flags override the environment variables in brackets.",
    )
    add_setting_flags(serve)
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
        try:
            serve(settings)
        except RegistryError as exc:  # COMPUTE_TASKS names a module that cannot be served
            sys.exit(f"compute-api: {exc}")
