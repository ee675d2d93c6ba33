"""The embedded Dask cluster of ``make run``: a scheduler and nannies in subprocesses of the API.

Not a LocalCluster: that runs the scheduler and the nannies in this process, where their periodic
work (system and memory monitors) would share the event loop that serves HTTP. Subprocesses bring
four duties, each handled here:

* configuration: they get this process's Dask configuration (service/dask.yaml, service/dask-api.yaml
  and DASK_*), the way distributed's SSHCluster hands it to remote processes;
* Ctrl+C: the terminal sends SIGINT to the whole foreground process group. If the scheduler died of
  it first, the API's shutdown would wait out distributed's connect timeout (30 s) trying to retire
  workers through it. ``dask_setup`` (a Dask preload) moves each of them into a process group of
  their own, so only the API gets the signal and closes them in order;
* orphans: if the API is killed outright, the same preload notices and closes the process;
* the scheduler's stderr is a pipe that distributed never reads: once 64 KiB of log lines filled
  it, the scheduler would block on its next log write. It is drained into the API's stderr.

Workers run at a lower OS priority (``LowerWorkerPriority``) so that the API wins the CPU when both
want it: the API's /fast must not queue behind fib on a 2-core laptop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import dask.config
import psutil
from distributed import WorkerPlugin
from distributed.deploy.spec import SpecCluster
from distributed.deploy.subprocess import SubprocessCluster

logger = logging.getLogger("compute_api.embedded")

# Seconds for the worker processes to start and register.
START_TIMEOUT = 60
# Seconds for an orderly close before the processes are killed: a shutdown never hangs on Dask.
CLOSE_TIMEOUT = 5
# How often a subprocess checks that the API that started it is still alive.
ORPHAN_CHECK_INTERVAL = 1.0

PRELOAD = __name__


class LowerWorkerPriority(WorkerPlugin):
    """Renice a worker process. Linux applies niceness per thread, so every existing thread is
    reniced; threads started later (the task executor) inherit it from the thread that creates them.
    """

    name = "compute-api-renice"

    def __init__(self, nice: int) -> None:
        self.nice = nice

    def setup(self, worker: Any) -> None:
        threads = [t.id for t in psutil.Process().threads()] or [0]
        for tid in threads:
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, tid, self.nice)


@dataclass
class EmbeddedCluster:
    workers: int
    nice: int
    cluster: SpecCluster | None = None
    _drain: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        assert self.cluster is not None
        return self.cluster.scheduler_address

    async def start(self) -> None:
        os.environ["DASK_INTERNAL_INHERIT_CONFIG"] = dask.config.serialize(dask.config.global_config)
        self.cluster = await SubprocessCluster(
            host="127.0.0.1",  # the scheduler port runs whatever pickles it receives: loopback only
            n_workers=self.workers,
            threads_per_worker=1,
            dashboard_address=None,
            # The scheduler always serves its HTTP routes (health, metrics); without an address
            # it would take port 8787 and collide with a real dashboard on the same machine.
            scheduler_kwargs={"dashboard_address": "127.0.0.1:0", "preload": [PRELOAD]},
            worker_kwargs={"preload_nanny": [PRELOAD]},
            asynchronous=True,
        )
        stderr = self.cluster.scheduler.process.stderr  # type: ignore[attr-defined]
        if stderr is not None:
            self._drain = asyncio.create_task(_forward(stderr), name="embedded-scheduler-stderr")

    async def close(self) -> None:
        if self._drain is not None:  # closing the scheduler reads what is left of its stderr
            self._drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drain
        cluster, self.cluster = self.cluster, None
        if cluster is not None:
            try:
                await asyncio.wait_for(cluster.close(), CLOSE_TIMEOUT)
            except (TimeoutError, Exception) as exc:
                logger.warning("embedded cluster did not close in %ss (%r): killing it", CLOSE_TIMEOUT, exc)
                for process in [cluster.scheduler, *cluster.workers.values()]:
                    with contextlib.suppress(Exception):
                        await process.close()  # Subprocess.close: SIGKILL, children included


async def _forward(stream: asyncio.StreamReader) -> None:
    while line := await stream.readline():
        sys.stderr.buffer.write(line)
        sys.stderr.flush()


async def dask_setup(server: Any) -> None:
    """Preload of the embedded scheduler and nannies (the nanny's worker inherits the group)."""
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    parent = os.getppid()

    async def close_when_orphaned() -> None:
        while os.getppid() == parent:
            await asyncio.sleep(ORPHAN_CHECK_INTERVAL)
        logger.warning("compute-api process %d is gone: closing %s", parent, type(server).__name__)
        await server.close()

    task = asyncio.create_task(close_when_orphaned())
    _watchers.add(task)
    task.add_done_callback(_watchers.discard)


_watchers: set[asyncio.Task[None]] = set()  # asyncio keeps only weak references to tasks
