"""Prometheus metrics, one registry per app (so tests can build many apps in one process)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import REASONS

# Latency buckets spanning an inline /fast (sub-millisecond) to a long fib (tens of seconds).
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

# Computations per batched Dask task (BATCH_MAX_SIZE is 16 by default).
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)

# Where a computation ran: in the API's event loop (cheaper than a round trip) or on the cluster.
WHERE = ("inline", "dask")

# The same, in the per-function counter (named for what it is, not for the library behind it).
FUNCTION_WHERE = {"inline": "inline", "cluster": "dask"}

# Label for requests that matched no route: keeps label cardinality bounded under scanning.
UNMATCHED = "<unmatched>"


@dataclass(frozen=True)
class CellReadings:
    """How to read one cell's live values."""

    in_flight: Callable[[], float]
    workers: Callable[[], float]
    connected: Callable[[], float]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # RSS, CPU, open fds of the API process
        labels = ("route", "method", "status")
        self.requests = Counter(
            "compute_api_requests", "HTTP requests answered.", labels, registry=self.registry
        )
        self.latency = Histogram(
            "compute_api_request_duration_seconds",
            "HTTP request latency.",
            labels,
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.computations = Counter(
            "compute_api_computations",
            "Computations started, by where they ran.",
            ("where",),
            registry=self.registry,
        )
        self.coalesced = Counter(
            "compute_api_coalesced_requests",
            "Requests that joined an identical computation already in flight.",
            registry=self.registry,
        )
        self.rejected = Counter(
            "compute_api_rejected_requests",
            "Requests answered 503 without computing, by reason.",
            ("reason",),
            registry=self.registry,
        )
        self.released = Counter(
            "compute_api_released_computations",
            "Computations cancelled on the cluster because no request waited for them any more.",
            registry=self.registry,
        )
        self.dask_tasks = Counter(
            "compute_api_dask_tasks",
            "Dask tasks submitted: one per computation, or one per batch of cheap computations.",
            registry=self.registry,
        )
        self.direct_calls = Counter(
            "compute_api_direct_calls",
            "Cheap computations sent straight to a worker, past the scheduler, by outcome: answered "
            "(a value or the function's error); busy (every thread of the worker ran a Dask task) or "
            "refused (the worker is gone or lacks service.direct), then run as a Dask task.",
            ("outcome",),
            registry=self.registry,
        )
        for outcome in ("answered", "busy", "refused"):
            self.direct_calls.labels(outcome)
        self.batch_size = Histogram(
            "compute_api_batch_size",
            "Computations per batched Dask task (only computations that waited in a batch).",
            buckets=BATCH_SIZES,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "compute_api_computations_in_flight",
            "Distinct computations submitted to Dask and not finished.",
            registry=self.registry,
        )
        self.workers = Gauge(
            "compute_api_dask_workers", "Dask workers connected to the scheduler.", registry=self.registry
        )
        self.connected = Gauge(
            "compute_api_scheduler_connected", "1 when connected to a running scheduler.", registry=self.registry
        )

        self.failovers = Counter(
            "compute_api_failovers",
            "Computations moved to another cell because their cell lost its scheduler.",
            registry=self.registry,
        )
        cell = ("cell",)  # the cell's index in SCHEDULER_ADDRESSES (or among EMBEDDED_CELLS)
        self.cell_computations = Counter(
            "compute_api_cell_computations", "Computations submitted to each cell (failovers included).", cell,
            registry=self.registry,
        )
        self.cell_in_flight = Gauge(
            "compute_api_cell_computations_in_flight", "Distinct computations in flight, by cell.", cell,
            registry=self.registry,
        )
        self.cell_workers = Gauge(
            "compute_api_cell_dask_workers", "Dask workers connected to each cell's scheduler.", cell,
            registry=self.registry,
        )
        self.cell_connected = Gauge(
            "compute_api_cell_scheduler_connected", "1 when connected to the cell's scheduler.", cell,
            registry=self.registry,
        )
        self.function_requests = Counter(
            "compute_api_function_requests",
            "Requests for a declared compute function (any route), by function and HTTP status.",
            ("function", "status"),
            registry=self.registry,
        )
        self.function_computations = Counter(
            "compute_api_function_computations",
            "Computations started, by declared function and where they ran (inline or cluster).",
            ("function", "where"),
            registry=self.registry,
        )
        # Labelled series exist from the first scrape, at 0 (absent is not zero to PromQL).
        for where in WHERE:
            self.computations.labels(where)
        for reason in REASONS:
            self.rejected.labels(reason)

    def declare_functions(self, names: Sequence[str]) -> None:
        """Every declared function's computation series, at 0 from the first scrape. (Only declared
        names ever become labels: an unknown /compute/{name} is not counted by function.)"""
        for name in names:
            for where in FUNCTION_WHERE:
                self.function_computations.labels(name, where)

    def computed(self, function: str, where: str) -> None:
        """A computation started ``where`` ("inline" or "cluster")."""
        self.function_computations.labels(function, where).inc()
        self.computations.labels(FUNCTION_WHERE[where]).inc()

    def answered(self, function: str, status: int) -> None:
        self.function_requests.labels(function, str(status)).inc()

    def bind(self, cells: Sequence[CellReadings]) -> None:
        """Read live values from the backend at scrape time instead of tracking them twice: per
        cell, and summed over the cells."""
        self.in_flight.set_function(lambda: sum(cell.in_flight() for cell in cells))
        self.workers.set_function(lambda: sum(cell.workers() for cell in cells))
        self.connected.set_function(lambda: float(any(cell.connected() for cell in cells)))
        for index, cell in enumerate(cells):
            self.cell_computations.labels(str(index))
            self.cell_in_flight.labels(str(index)).set_function(cell.in_flight)
            self.cell_workers.labels(str(index)).set_function(cell.workers)
            self.cell_connected.labels(str(index)).set_function(cell.connected)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """Counts and times every HTTP request by route template (not raw path) and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # if the app raises before starting a response, the server answers 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            # The router stores the matched route in the (shared) scope.
            template = getattr(route, "path_format", None) or UNMATCHED
            labels = (template, scope["method"], str(status))
            self.metrics.requests.labels(*labels).inc()
            self.metrics.latency.labels(*labels).observe(time.perf_counter() - start)
