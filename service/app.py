"""HTTP routes. The app is declared in one call in ``create_app``; its lifespan owns the backend."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

from starlette.applications import Starlette
from starlette.convertors import Convertor, register_url_convertor
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.schemas import SchemaGenerator

from service import __version__
from service.backend import Abandoned, Backend, ComputeFailed, ComputeTimeout, Unavailable, task_label
from service.config import Settings
from service.functions import Function, InvalidArguments, Registry
from service.metrics import Metrics, MetricsMiddleware
from service.openapi import function_paths

logger = logging.getLogger("compute_api.app")

# Longest accepted spelling of n: FIB_MAX_N is at most 90, and "0000000035" is still 35. Anything
# longer is rejected before int() ever sees it (no quadratic parsing of a 100 kB path).
MAX_N_DIGITS = 10

# Largest POST /compute/{name} body: declared parameters are bounded, so a valid body is small; a
# larger one is refused (413) before it is read into memory, let alone parsed.
MAX_BODY_BYTES = 64 * 1024

# nginx's convention for "the client went away before we answered"; only ever seen in metrics.
CLIENT_CLOSED_REQUEST = 499


class AnythingConvertor(Convertor[str]):
    """Like Starlette's ``path`` convertor, but also across newlines (``%0A`` in a path)."""

    regex = r"[\s\S]*"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("anything", AnythingConvertor())


def error(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


def parse_n(raw: str, max_n: int) -> int:
    """Validate the path parameter of /fib/{n}; ``ValueError`` says what is wrong with it."""
    if raw == "":
        raise ValueError("n is required: /fib/{n}")
    if len(raw) > MAX_N_DIGITS:
        raise ValueError(f"n must be an integer from 0 to {max_n}")
    # str.isdigit() accepts non-ASCII digits ("٣", "³") that int() would parse or choke on.
    if not (raw.isascii() and raw.isdigit()):
        raise ValueError(f"n must be a non-negative integer written with digits 0-9, got {raw!r}")
    n = int(raw)
    if n > max_n:
        raise ValueError(f"n must be at most {max_n} (FIB_MAX_N), got {n}")
    return n


async def _client_gone(request: Request) -> None:
    """Return when the HTTP client disconnects (a GET has no body left to read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def index(request: Request) -> JSONResponse:
    """
    responses:
      '200':
        description: The service's name, version and endpoints.
    """
    max_n = request.app.state.settings.fib_max_n
    return JSONResponse(
        {
            "name": "compute-api",
            "version": __version__,
            "endpoints": {
                "/fast": "answers at once, no computation",
                "/fib/{n}": f"naive recursive Fibonacci on the Dask cluster, 0 <= n <= {max_n}",
                "/compute/{name}": "a declared compute function: GET with query parameters, POST with a JSON "
                f"body ({', '.join(sorted(request.app.state.registry))}; see /openapi.json)",
                "/healthz": "liveness: the process and its event loop are alive",
                "/readyz": "readiness: able to compute (a scheduler with workers, or scale from zero)",
                "/metrics": "Prometheus metrics",
                "/openapi.json": "OpenAPI schema",
            },
        }
    )


async def fast(request: Request) -> JSONResponse:
    """
    responses:
      '200':
        description: A tiny answer that never touches Dask.
    """
    return JSONResponse({"message": "Hello!"})


async def fib(request: Request) -> Response:
    """
    parameters:
      - name: n
        in: path
        required: true
        description: Non-negative integer, at most FIB_MAX_N (default 35), ASCII digits only.
        schema:
          type: integer
          minimum: 0
          maximum: 35
    responses:
      '200':
        description: 'fib(n), computed on a Dask worker: {"n": n, "value": fib(n)}'
      '422':
        description: n is not an integer in range.
      '500':
        description: The computation failed on the cluster (e.g. it killed every worker it ran on).
      '503':
        description: The cluster is unreachable, has no workers, or is overloaded; see Retry-After.
      '504':
        description: No result within REQUEST_TIMEOUT.
    """
    settings: Settings = request.app.state.settings
    try:
        n = parse_n(request.path_params["n"], settings.fib_max_n)
    except ValueError as exc:
        return answered(request, "fib", error(422, "invalid_n", str(exc)))
    return await run(request, request.app.state.registry["fib"], (n,), lambda value: {"n": n, "value": value})


def caps(settings: Settings, function: Function) -> dict[str, float]:
    """Settings that lower a declared bound at run time (FIB_MAX_N: /compute/fib as /fib/{n})."""
    return {"n": settings.fib_max_n} if function.name == "fib" and function.module == "service.tasks" else {}


def answered(request: Request, function: str, response: Response) -> Response:
    request.app.state.metrics.answered(function, response.status_code)
    return response


async def run(request: Request, function: Function, args: tuple[Any, ...], body: Any) -> Response:
    """Compute a declared function's validated arguments and answer ``body(value)`` or the error."""
    backend: Backend = request.app.state.backend
    try:
        value = await backend.compute(function.name, args, disconnected=lambda: _client_gone(request))
    except Unavailable as exc:
        response = error(503, "unavailable", exc.detail, headers={"Retry-After": str(exc.retry_after)})
    except ComputeTimeout as exc:
        response = error(504, "timeout", str(exc))
    except ComputeFailed as exc:
        # Arguments may be secrets (derive's text): the log names them by digest only.
        logger.warning("%s(%s) failed: %s", function.name, task_label(args), exc)
        response = error(500, "compute_failed", str(exc))
    except Abandoned:
        response = error(CLIENT_CLOSED_REQUEST, "client_closed_request", "the client disconnected")
    else:
        try:
            response = JSONResponse(body(value))
        except (TypeError, ValueError) as exc:  # the function returned something JSON cannot carry
            response = error(500, "compute_failed", f"{type(exc).__name__}: {exc}")
    return answered(request, function.name, response)


def invalid(exc: InvalidArguments) -> JSONResponse:
    return JSONResponse({"error": "invalid_argument", "detail": str(exc), "parameters": exc.problems},
                        status_code=422)


async def _read_body(request: Request) -> bytes | None:
    """The request body, or None when it exceeds MAX_BODY_BYTES (read no further than that)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY_BYTES):
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def query_arguments(request: Request, function: Function) -> dict[str, Any]:
    """Query parameters as the declaration expects them: repeated keys (``xs=1&xs=2``) make a list
    parameter's items; a scalar given twice is passed as a list so that it fails validation."""
    raw: dict[str, Any] = {}
    for key in request.query_params:
        values = request.query_params.getlist(key)
        raw[key] = values if function.is_list(key) or len(values) > 1 else values[0]
    return raw


async def compute(request: Request) -> Response:
    """A declared compute function: GET with query parameters, POST with a JSON object."""
    registry: Registry = request.app.state.registry
    name = request.path_params["name"]
    function = registry.get(name)
    if function is None:
        known = ", ".join(sorted(registry))
        return error(404, "unknown_function", f"no compute function {name[:100]!r}; declared: {known}")
    caps_now = caps(request.app.state.settings, function)
    try:
        if request.method == "POST":
            body = await _read_body(request)
            if body is None:
                return answered(request, name, error(413, "body_too_large", f"the body exceeds {MAX_BODY_BYTES} bytes"))
            args = function.validate_json(body, caps_now)
        else:
            args = function.validate_query(query_arguments(request, function), caps_now)
    except InvalidArguments as exc:
        return answered(request, name, invalid(exc))
    return await run(request, function, args,
                     lambda value: {"function": name, "arguments": function.kwargs(args), "value": value})


async def healthz(request: Request) -> JSONResponse:
    """
    responses:
      '200':
        description: The process and its event loop are alive (never depends on Dask).
    """
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> JSONResponse:
    """
    responses:
      '200':
        description: Able to serve a computation (a running scheduler with workers, or scale from zero).
      '503':
        description: No scheduler connected (yet, or any more), or no workers and no cold-start queue.
    """
    backend: Backend = request.app.state.backend
    ready, cells = await backend.readiness()
    body: dict[str, Any] = {
        "scheduler": backend.address,
        "workers": sum(capacity.workers for _, capacity in cells),
        "cells": [
            {"scheduler": capacity.scheduler, "connected": capacity.connected, "workers": capacity.workers,
             "ready": cell_ready}
            for cell_ready, capacity in cells
        ],
    }
    if ready:
        return JSONResponse({"status": "ready", **body})
    connected = any(capacity.connected for _, capacity in cells)
    detail = "the Dask cluster has no workers" if connected else "not connected to a Dask scheduler"
    return JSONResponse(
        {"status": "not ready", "error": "unavailable", "detail": detail, **body},
        status_code=503,
        headers={"Retry-After": str(request.app.state.settings.retry_after)},
    )


async def metrics(request: Request) -> Response:
    """
    responses:
      '200':
        description: Prometheus text exposition format.
    """
    body, content_type = request.app.state.metrics.render()
    return Response(body, media_type=content_type)


schemas = SchemaGenerator(
    {"openapi": "3.1.0", "info": {"title": "compute-api", "version": __version__}}
)


async def openapi(request: Request) -> Response:
    """
    responses:
      '200':
        description: This OpenAPI schema.
    """
    schema = schemas.get_schema(routes=request.app.routes)
    # The documented range of n is the configured one, not the docstring's default.
    for parameter in schema["paths"]["/fib/{n}"]["get"]["parameters"]:
        if parameter["name"] == "n":
            parameter["schema"]["maximum"] = request.app.state.settings.fib_max_n
    settings: Settings = request.app.state.settings
    for function in request.app.state.registry.values():
        schema["paths"].update(function_paths(function, caps(settings, function)))
    return JSONResponse(schema)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error(exc.status_code, code, str(exc.detail), headers=exc.headers)


def create_app(settings: Settings | None = None, registry: Mapping[str, Function] | None = None) -> Starlette:
    """The app. ``registry`` replaces the declared functions (tests only: /fib/{n} runs its "fib");
    by default the built-ins and COMPUTE_TASKS's (``RegistryError`` names a module that fails)."""
    settings = settings or Settings.from_environ()
    functions = Registry.load(settings.compute_tasks) if registry is None else registry
    metrics_registry = Metrics()
    metrics_registry.declare_functions(list(functions))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        backend = Backend(settings, metrics_registry, functions)
        app.state.backend = backend
        await backend.start()
        try:
            yield
        finally:
            await backend.close()

    app = Starlette(
        routes=[
            Route("/", index, methods=["GET"]),
            Route("/fast", fast, methods=["GET"]),
            # `anything` so that an empty n, or one with slashes or newlines, reaches the validator
            # (422, not 404).
            Route("/fib/{n:anything}", fib, methods=["GET"]),
            # One route for every declared function; /openapi.json documents each by its own path.
            Route("/compute/{name}", compute, methods=["GET", "POST"], include_in_schema=False),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/openapi.json", openapi, methods=["GET"]),
        ],
        middleware=[Middleware(MetricsMiddleware, metrics=metrics_registry)],
        exception_handlers={HTTPException: http_error},
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.registry = functions
    app.state.metrics = metrics_registry
    return app
