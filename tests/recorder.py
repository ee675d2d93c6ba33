"""Plugins that record every computation sent to the cluster: each task the scheduler receives, and
each direct call a worker receives (service.direct). Importable by the scheduler and worker subprocesses."""

from __future__ import annotations

from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin, WorkerPlugin
from distributed.protocol import pickle

from service.direct import HANDLER


def _name(obj: Any) -> Any:
    """Functions as 'module.qualname' so the record crosses process boundaries as plain data."""
    if callable(obj):
        return f"{obj.__module__}.{obj.__qualname__}"
    return obj


class SubmissionRecorder(SchedulerPlugin):
    """Every task that enters the scheduler: its key, function and arguments."""

    name = "submission-recorder"

    def __init__(self) -> None:
        self.submitted: list[tuple[str, Any, tuple[Any, ...]]] = []

    def update_graph(self, scheduler: Any, *, keys: set[Any], **kwargs: Any) -> None:
        for key in keys:
            spec = scheduler.tasks[key].run_spec
            func = getattr(spec, "func", spec)
            self.submitted.append((str(key), _name(func), tuple(_name(a) for a in getattr(spec, "args", ()))))


def recorded(dask_scheduler: Any) -> list[tuple[str, Any, tuple[Any, ...]]]:
    return dask_scheduler.plugins[SubmissionRecorder.name].submitted


class DirectCallRecorder(WorkerPlugin):
    """Every direct call a worker receives: its function and arguments, as the handler unpickles them."""

    name = "direct-call-recorder"

    def setup(self, worker: Any) -> None:
        self.calls: list[tuple[Any, tuple[Any, ...]]] = []
        handler = worker.handlers[HANDLER]  # installed by the service.direct preload

        async def recording(function: bytes, args: bytes) -> Any:
            self.calls.append((_name(pickle.loads(function)), tuple(pickle.loads(args))))
            return await handler(function=function, args=args)

        worker.handlers[HANDLER] = recording


def direct_calls(dask_worker: Any) -> list[tuple[Any, tuple[Any, ...]]]:
    return dask_worker.plugins[DirectCallRecorder.name].calls
