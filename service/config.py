"""Settings, read once from environment variables.

Everything the service itself needs is read here with Starlette's ``Config``. Dask's own settings
(timeouts, TLS, the scheduler address) are *not* duplicated: they are ``DASK_*`` variables read by
``dask.config``, and this module only asks ``dask.config`` for the scheduler address.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import dask.config
import dask.system
from starlette.config import Config


def default_workers() -> int:
    """One single-threaded worker per core this process may use: dask's count honours CPU affinity
    and cgroup quotas (a 1-CPU container on a 16-core node gets 1, not 16)."""
    return max(1, dask.system.CPU_COUNT)


@dataclass(frozen=True)
class Settings:
    """Service settings. Field docs are the README's configuration table."""

    host: str = "127.0.0.1"  # HOST: interface to bind
    port: int = 8000  # PORT: TCP port to bind
    scheduler_address: str | None = None  # DASK_SCHEDULER_ADDRESS: unset = embedded cluster
    embedded_workers: int = 0  # EMBEDDED_WORKERS: 0 = one per core
    worker_nice: int = 10  # WORKER_NICE: OS niceness of embedded workers, keeps the API responsive
    fib_max_n: int = 35  # FIB_MAX_N: largest n accepted by /fib/{n}
    request_timeout: float = 30.0  # REQUEST_TIMEOUT: seconds before a computation answers 504
    connect_timeout: float = 2.0  # CONNECT_TIMEOUT: seconds for one attempt to reach the scheduler
    reconnect_interval: float = 1.0  # RECONNECT_INTERVAL: seconds between reconnection attempts
    retry_after: int = 1  # RETRY_AFTER: Retry-After seconds sent with 503 when the cluster is unavailable
    coalesce: bool = True  # COALESCE: identical in-flight requests share one computation
    inline_max_cost: float = 0.0005  # INLINE_MAX_COST: seconds; cheaper work runs in the API process
    max_queue_wait: float = 10.0  # MAX_QUEUE_WAIT: seconds of estimated queued work before 503
    max_in_flight: int = 1000  # MAX_IN_FLIGHT: distinct computations in flight before 503
    cold_start_queue: int = 0  # COLD_START_QUEUE: computations held while there are no workers
    graceful_shutdown_timeout: float = 20.0  # GRACEFUL_SHUTDOWN_TIMEOUT: seconds to finish in-flight work
    keepalive_timeout: float = 75.0  # KEEPALIVE_TIMEOUT: HTTP keep-alive; above the ingress's 60 s
    log_level: str = "info"  # LOG_LEVEL
    access_log: bool = False  # ACCESS_LOG: one log line per request

    def __post_init__(self) -> None:
        checks = {
            "PORT must be 0..65535": 0 <= self.port <= 65535,
            "EMBEDDED_WORKERS must be >= 0": self.embedded_workers >= 0,
            "WORKER_NICE must be 0..19": 0 <= self.worker_nice <= 19,
            "FIB_MAX_N must be 0..90": 0 <= self.fib_max_n <= 90,
            "REQUEST_TIMEOUT must be > 0": self.request_timeout > 0,
            "CONNECT_TIMEOUT must be > 0": self.connect_timeout > 0,
            "RECONNECT_INTERVAL must be > 0": self.reconnect_interval > 0,
            "RETRY_AFTER must be >= 1": self.retry_after >= 1,
            "INLINE_MAX_COST must be >= 0": self.inline_max_cost >= 0,
            "MAX_QUEUE_WAIT must be > 0": self.max_queue_wait > 0,
            "MAX_IN_FLIGHT must be >= 1": self.max_in_flight >= 1,
            "GRACEFUL_SHUTDOWN_TIMEOUT must be >= 0": self.graceful_shutdown_timeout >= 0,
            "KEEPALIVE_TIMEOUT must be > 0": self.keepalive_timeout > 0,
        }
        errors = [message for message, ok in checks.items() if not ok]
        if errors:
            raise ValueError("invalid configuration: " + "; ".join(errors))

    @property
    def embedded(self) -> bool:
        return not self.scheduler_address

    @property
    def workers(self) -> int:
        """Embedded worker processes to start."""
        return self.embedded_workers or default_workers()

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read settings from ``environ`` (default: ``os.environ``); ``overrides`` win (CLI flags)."""
        environ = os.environ if environ is None else environ
        config = Config(environ=environ)
        d = cls()  # the defaults, declared once above
        # The scheduler address is a Dask setting: DASK_SCHEDULER_ADDRESS -> "scheduler-address".
        # For os.environ this is exactly what dask.config already holds; for any other mapping
        # (tests, embedding) the same DASK_* parsing is applied to that mapping.
        dask_env = dask.config.collect_env(dict(environ)) if environ is not os.environ else dask.config.config
        scheduler = dask.config.get("scheduler-address", default=None, config=dask_env)
        values: dict[str, Any] = {
            "host": config("HOST", default=d.host),
            "port": config("PORT", cast=int, default=d.port),
            "scheduler_address": scheduler or None,
            "embedded_workers": config("EMBEDDED_WORKERS", cast=int, default=d.embedded_workers),
            "worker_nice": config("WORKER_NICE", cast=int, default=d.worker_nice),
            "fib_max_n": config("FIB_MAX_N", cast=int, default=d.fib_max_n),
            "request_timeout": config("REQUEST_TIMEOUT", cast=float, default=d.request_timeout),
            "connect_timeout": config("CONNECT_TIMEOUT", cast=float, default=d.connect_timeout),
            "reconnect_interval": config("RECONNECT_INTERVAL", cast=float, default=d.reconnect_interval),
            "retry_after": config("RETRY_AFTER", cast=int, default=d.retry_after),
            "coalesce": config("COALESCE", cast=bool, default=d.coalesce),
            "inline_max_cost": config("INLINE_MAX_COST", cast=float, default=d.inline_max_cost),
            "max_queue_wait": config("MAX_QUEUE_WAIT", cast=float, default=d.max_queue_wait),
            "max_in_flight": config("MAX_IN_FLIGHT", cast=int, default=d.max_in_flight),
            "cold_start_queue": config("COLD_START_QUEUE", cast=int, default=d.cold_start_queue),
            "graceful_shutdown_timeout": config(
                "GRACEFUL_SHUTDOWN_TIMEOUT", cast=float, default=d.graceful_shutdown_timeout
            ),
            "keepalive_timeout": config("KEEPALIVE_TIMEOUT", cast=float, default=d.keepalive_timeout),
            "log_level": config("LOG_LEVEL", default=d.log_level).lower(),
            "access_log": config("ACCESS_LOG", cast=bool, default=d.access_log),
        }
        known = {f.name for f in fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise TypeError(f"unknown settings: {sorted(unknown)}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
