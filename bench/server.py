"""Start and stop one server under test as a real subprocess on an ephemeral loopback port."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"


@dataclass(frozen=True)
class ServerSpec:
    name: str  # column in the table
    description: str
    argv: tuple[str, ...]  # "{port}" and "{workers}" are substituted
    ready_path: str  # answers 200 once the server can compute
    env: Mapping[str, str] = field(default_factory=dict)
    scenarios: frozenset[str] | None = None  # None = every scenario
    reads_metrics: bool = False  # exposes compute-api's /metrics


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exited with status {process.returncode} before becoming ready")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"not ready after {timeout:.0f} s")


def _stop(process: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM the server's process group (Dask workers, pool processes), then SIGKILL what is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(grace)
    # Always: worker processes may outlive their parent, and a busy baseline ignores SIGTERM.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(10)


@contextlib.contextmanager
def running(spec: ServerSpec, workers: int, log_dir: Path, ready_timeout: float = 90.0) -> Iterator[str]:
    """Run ``spec`` until the block exits; yields its base URL. The log goes to ``log_dir/NAME.log``."""
    port = free_port()
    argv = [a.format(port=port, workers=workers) for a in spec.argv]
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{spec.name}.log"
    env = {**os.environ, **spec.env}
    with open(log_path, "wb") as log:
        # A new session makes the server the leader of a process group we can signal as a whole.
        process = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    base_url = f"http://{HOST}:{port}"
    try:
        try:
            _wait_ready(base_url + spec.ready_path, process, ready_timeout)
        except RuntimeError as exc:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{spec.name} ({' '.join(argv)}): {exc}\n--- {log_path} ---\n{tail}") from None
        yield base_url
    finally:
        # The overload scenario leaves baselines with minutes of queued work: do not wait for it.
        _stop(process, grace=1.0)


def specs(max_queue_wait: float, api_env: Mapping[str, str] | None = None) -> list[ServerSpec]:
    """The servers, in the order they run. compute-api runs twice: coalescing off, then on for (g).

    ``max_queue_wait`` aligns compute-api's admission control with the overload client's deadline;
    ``api_env`` adds to (and wins over) compute-api's environment, to try other settings.
    """
    module = (sys.executable, "-m")
    compute_api = (*module, "service", "serve", "--port", "{port}", "--workers", "{workers}", "--log-level", "warning")
    api_env = {"MAX_QUEUE_WAIT": str(max_queue_wait), **(api_env or {})}
    return [
        ServerSpec(
            "blocking",
            "Tornado, fib computed in the event loop (the notebook's first server)",
            (*module, "bench.servers.blocking", "--port", "{port}"),
            "/fast",
        ),
        ServerSpec(
            "notebook_dask",
            "Tornado + Dask Client(asynchronous=True), submit(pure=False) (the notebook's second server)",
            (*module, "bench.servers.notebook_dask", "--port", "{port}", "--workers", "{workers}"),
            "/fast",
        ),
        ServerSpec(
            "processpool",
            "Starlette/uvicorn + ProcessPoolExecutor + run_in_executor",
            (*module, "bench.servers.processpool", "--port", "{port}", "--workers", "{workers}"),
            "/fast",
        ),
        ServerSpec(
            "compute-api",
            "compute-api serve, embedded Dask workers, COALESCE=false",
            compute_api,
            "/readyz",
            env={"COALESCE": "false", **api_env},
            reads_metrics=True,
        ),
        ServerSpec(
            "compute-api+coalesce",
            "compute-api serve, COALESCE=true (its default): scenario (g) only",
            compute_api,
            "/readyz",
            env={"COALESCE": "true", **api_env},
            scenarios=frozenset("g"),
            reads_metrics=True,
        ),
    ]
