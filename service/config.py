"""Settings: each one declared once, here, with its type, default, bounds and meaning.

Everything else is derived from these fields: the environment variable (the field's name in upper
case), the ``compute-api serve`` flags and their help (service/cli.py), the README's configuration
table (``make readme``, with a drift test) and the chart's list of accepted ``api.config`` keys.
pydantic validates and converts; a bad value is refused at start-up with a message naming the
variable.

Dask's own settings (timeouts, TLS, the scheduler address) are *not* duplicated: they are ``DASK_*``
variables read by ``dask.config``; only the scheduler address is asked of ``dask.config`` here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

import dask.config
import dask.system
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict


def default_workers() -> int:
    """One single-threaded worker per core this process may use: dask's count honours CPU affinity
    and cgroup quotas (a 1-CPU container on a 16-core node gets 1, not 16)."""
    return max(1, dask.system.CPU_COUNT)


class Settings(BaseSettings):
    """The service's settings; the README's configuration table is rendered from these fields."""

    model_config = SettingsConfigDict(frozen=True, extra="forbid")

    host: str = Field("127.0.0.1", description="interface to bind")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to bind")
    scheduler_address: str | None = Field(
        None,
        description="Dask scheduler to use, e.g. `tcp://scheduler:8786`; unset = an embedded cluster. "
        "Read through `dask.config` (variable `DASK_SCHEDULER_ADDRESS`, key `scheduler-address`)",
    )
    scheduler_addresses: str | None = Field(
        None,
        description="several Dask schedulers, one per cell, comma-separated (`tcp://a:8786,tcp://b:8786`): "
        "each request is placed on one cell, identical requests on the same one, and moves to another "
        "if its cell's scheduler is lost; instead of `DASK_SCHEDULER_ADDRESS`",
    )
    embedded_cells: int = Field(
        1, ge=1, le=16, description="embedded mode: independent Dask clusters (cells), sharing the embedded workers"
    )
    embedded_workers: int = Field(0, ge=0, description="embedded worker processes, one thread each; 0 = one per core")
    worker_nice: int = Field(
        10, ge=0, le=19, description="OS niceness of embedded workers, so the API keeps a core (0 = same as the API)"
    )
    compute_tasks: str = Field(
        "",
        description="your own compute functions: comma-separated Python modules (e.g. `mypackage.tasks`) "
        "importable by the API and the workers, whose `@declare`d functions are served at "
        "`/compute/{name}` beside the built-ins (`fib`, `derive`)",
    )
    fib_max_n: int = Field(35, ge=0, le=90, description="largest `n` accepted by `/fib/{n}`")
    request_timeout: float = Field(30.0, gt=0, description="seconds a request waits for its result before 504")
    connect_timeout: float = Field(2.0, gt=0, description="seconds for one attempt to reach the scheduler")
    reconnect_interval: float = Field(
        1.0, gt=0, description="seconds between attempts to build a new Client after distributed gave up"
    )
    retry_after: int = Field(1, ge=1, description="`Retry-After` seconds on 503s (scheduler unreachable, no workers)")
    coalesce: bool = Field(True, description="identical in-flight requests share one computation")
    inline_max_cost: float = Field(
        0.0005, ge=0, description="seconds; work estimated cheaper than this runs in the API process (0 = never)"
    )
    max_queue_wait: float = Field(
        10.0, gt=0, description="admission control: 503 when the estimated wait for queued work exceeds this (s)"
    )
    max_in_flight: int = Field(1000, ge=1, description="503 beyond this many distinct computations in flight")
    cold_start_queue: int = Field(
        0,
        ge=0,
        description="computations admitted and held while the cluster has no workers, so an autoscaler "
        "can start one (scale from zero); 0 = answer 503 at once",
    )
    direct_max_cost: float = Field(
        0.01,
        ge=0,
        le=10,
        description="seconds; computations estimated cheaper than this go from the API straight to a worker "
        "thread that is free, past the scheduler (its bookkeeping costs more than such work; 0 = never)",
    )
    batch_max_size: int = Field(
        16,
        ge=1,
        le=1000,
        description="adaptive micro-batching: at most this many cheap computations in one Dask task, "
        "formed only while every worker thread of the cell is busy (1 = never batch)",
    )
    batch_max_cost: float = Field(
        0.025,
        gt=0,
        le=10,
        description="seconds of estimated work in one batch; a computation is batched only if twice its "
        "cost fits",
    )
    batch_linger: float = Field(
        0.02, ge=0, le=1, description="seconds the first computation of a batch waits for others at most"
    )
    graceful_shutdown_timeout: float = Field(
        20.0, ge=0, description="on SIGTERM, seconds to finish in-flight requests"
    )
    keepalive_timeout: float = Field(
        75.0, gt=0, description="HTTP keep-alive seconds; keep above the ingress's upstream keep-alive (nginx: 60)"
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field("info", description="log level")
    access_log: bool = Field(False, description="one log line per request")

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource, *args: Any, **kwargs: Any
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # ``from_environ`` reads the environment itself, so that any mapping (tests, embedding)
        # is read exactly like os.environ.
        return (init_settings,)

    @staticmethod
    def env_name(field: str) -> str:
        return "DASK_SCHEDULER_ADDRESS" if field == "scheduler_address" else field.upper()

    @field_validator("scheduler_addresses")
    @classmethod
    def _addresses(cls, value: str | None) -> str | None:
        if value is None:
            return None
        addresses = [address.strip() for address in value.split(",")]
        if not all(addresses):
            raise ValueError("an empty address in the comma-separated list")
        if len(set(addresses)) != len(addresses):
            raise ValueError("the same scheduler twice: each cell is a different scheduler")
        return ",".join(addresses)

    @model_validator(mode="after")
    def _one_way_to_name_schedulers(self) -> Settings:
        if self.scheduler_address and self.scheduler_addresses:
            raise ValueError("set DASK_SCHEDULER_ADDRESS (one scheduler) or SCHEDULER_ADDRESSES (cells), not both")
        return self

    @property
    def embedded(self) -> bool:
        return not (self.scheduler_address or self.scheduler_addresses)

    @property
    def cell_addresses(self) -> list[str | None]:
        """One scheduler address per cell; None for an embedded cell (its address comes at start)."""
        if self.scheduler_addresses:
            return self.scheduler_addresses.split(",")
        if self.scheduler_address:
            return [self.scheduler_address]
        return [None] * self.embedded_cells

    @property
    def workers(self) -> int:
        """Embedded worker processes to start."""
        return self.embedded_workers or default_workers()

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read settings from ``environ`` (default: ``os.environ``); ``overrides`` win (CLI flags, None = unset).

        Raises ``ValueError`` naming each variable with a bad value, ``TypeError`` for an unknown override.
        """
        environ = os.environ if environ is None else environ
        unknown = set(overrides) - set(cls.model_fields)
        if unknown:
            raise TypeError(f"unknown settings: {sorted(unknown)}")
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            if name == "scheduler_address":
                # A Dask setting: for os.environ dask.config already holds it; any other mapping
                # gets the same DASK_* parsing.
                config = dask.config.config if environ is os.environ else dask.config.collect_env(dict(environ))
                value = dask.config.get("scheduler-address", default=None, config=config) or None
            else:
                value = environ.get(cls.env_name(name))
                if name == "log_level" and value is not None:
                    value = value.lower()
            if overrides.get(name) is not None:
                value = overrides[name]
            if value is not None:
                values[name] = value
        try:
            return cls(**values)
        except ValidationError as exc:
            problems = [
                f"{cls.env_name(str(error['loc'][0]))}: {error['msg']}, got {error.get('input')!r}"
                if error["loc"] else error["msg"].removeprefix("Value error, ")  # a rule across settings
                for error in exc.errors()
            ]
            raise ValueError("invalid configuration: " + "; ".join(problems)) from None
