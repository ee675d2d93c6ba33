"""Dask preload for the embedded cluster's processes: exit when the API process that started them dies.

The embedded scheduler and nannies run as subprocesses of the API (so their periodic work never
competes with the API's event loop). On a clean shutdown the API closes them; if the API is killed
outright, this keeps them from living on as orphans holding ports and memory.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

logger = logging.getLogger("compute_api.watchdog")

CHECK_INTERVAL = 1.0
_watchers: set[asyncio.Task[None]] = set()


async def dask_setup(server: Any) -> None:
    parent = os.getppid()

    async def watch() -> None:
        while os.getppid() == parent:
            await asyncio.sleep(CHECK_INTERVAL)
        logger.warning("compute-api process %d is gone: closing %s", parent, type(server).__name__)
        await server.close()

    task = asyncio.create_task(watch())
    _watchers.add(task)
    task.add_done_callback(_watchers.discard)
