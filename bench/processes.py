"""Real Dask and compute-api processes for the CPU benches, and their CPU time read from the OS.

Shared by ``bench.batching`` and ``bench.capacity``: a ``dask scheduler`` with single-threaded
``dask worker`` processes, ``compute-api serve`` in remote mode pointed at them, and the CPU seconds
each process tree has used (a ``dask worker`` is a nanny with the worker as its child, so a tree).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil
from prometheus_client.parser import text_string_to_metric_families

from bench.server import HOST, ROOT, ServerSpec, free_port
from service.tasks import fib

DASK = Path(sys.executable).parent / "dask"
# compute-api's settings for every Dask process (profiler off, slower monitors: see the file), read by
# the spawned scheduler and workers as they are by the image's (DASK_CONFIG may name a file). The API
# process reads it itself (service/backend.py).
DASK_SETTINGS = ROOT / "service" / "dask.yaml"


def fib_n_for(seconds: float) -> int:
    """The smallest n whose fib(n) takes at least ``seconds`` here (sized from this machine); the best
    of 3 timings, so that a neighbour's burst on a shared machine does not pass for a slow fib."""
    n = 10
    while True:
        best = math.inf
        for _ in range(3):
            start = time.perf_counter()
            fib(n)
            best = min(best, time.perf_counter() - start)
        if best >= seconds:
            return n
        n += 1


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its live descendants."""
    total = 0.0
    root = psutil.Process(pid)
    for proc in (root, *root.children(recursive=True)):
        with contextlib.suppress(psutil.NoSuchProcess):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


async def housekeeping(pids: Sequence[int], seconds: float) -> list[float]:
    """CPU seconds per second that each of ``pids`` (process trees) spends with no request to serve:
    a scheduler's heartbeats, periodic callbacks and the API Client's polls, paid with or without
    load. Measured for as long as the load it is subtracted from (``seconds``): the OS counts CPU in
    10 ms ticks, so a shorter window would read it coarser than the load (3 s reads 7 ms/s as 3.3-10)."""
    before = [cpu_seconds(pid) for pid in pids]
    await asyncio.sleep(seconds)
    return [(cpu_seconds(pid) - b) / seconds for pid, b in zip(pids, before, strict=True)]


def listening_pid(url: str) -> int:
    """The process listening on ``url``'s port (the API itself, not a wrapper)."""
    port = int(url.rsplit(":", 1)[1])
    return next(c.pid for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port)


def metric(text: str, name: str, **labels: str) -> float:
    """One sample of a Prometheus exposition (NaN when absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return math.nan


@dataclass(frozen=True)
class Cluster:
    address: str
    scheduler_pid: int
    worker_pids: tuple[int, ...]  # each a nanny whose child is the worker


def pinned_to(cpus: set[int] | None) -> Callable[[], None] | None:
    """A ``preexec_fn`` that pins the child (and so all its threads and children) to ``cpus``."""
    if cpus is None:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


@contextlib.contextmanager
def dask_cluster(workers: int, log_dir: Path, name: str = "dask", port: int | None = None,
                 worker_cpus: set[int] | None = None) -> Iterator[Cluster]:
    """A scheduler (on ``port``, or a free one) and ``workers`` single-threaded workers (nanny and
    worker pinned to ``worker_cpus`` if given), with compute-api's Dask settings, logging to
    ``log_dir/NAME.log``."""
    port = port or free_port()
    address = f"tcp://{HOST}:{port}"
    procs: list[subprocess.Popen[bytes]] = []
    env = {**os.environ, "DASK_CONFIG": str(DASK_SETTINGS)}
    with open(log_dir / f"{name}.log", "wb") as log:
        def spawn(*args: str, cpus: set[int] | None = None) -> subprocess.Popen[bytes]:
            proc = subprocess.Popen([str(DASK), *args], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, preexec_fn=pinned_to(cpus))
            procs.append(proc)
            return proc

        try:
            scheduler = spawn("scheduler", "--host", HOST, "--port", str(port), "--no-dashboard")
            pids = tuple(spawn("worker", address, "--nthreads", "1", "--no-dashboard", "--host", HOST,
                               cpus=worker_cpus).pid
                         for _ in range(workers))
            yield Cluster(address, scheduler.pid, pids)
        finally:
            for proc in reversed(procs):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 15)
            for proc in procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)


def remote_api(label: str, env: Mapping[str, str]) -> ServerSpec:
    """``compute-api serve`` in remote mode; ``env`` names the scheduler(s) and the settings tried.

    ``INLINE_MAX_COST=0`` so no request runs in the API, ``COALESCE=false`` so every request computes.
    """
    return ServerSpec(
        "compute-api", label,
        (sys.executable, "-m", "service", "serve", "--port", "{port}", "--log-level", "warning"),
        "/readyz",
        env={"INLINE_MAX_COST": "0", "COALESCE": "false", "FIB_MAX_N": "40", **env},
    )
