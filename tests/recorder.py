"""A scheduler plugin that records every task submitted; importable by the scheduler subprocess."""

from __future__ import annotations

from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin


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
