"""Baseline 3: Starlette on uvicorn (uvloop + httptools) with a ``ProcessPoolExecutor``.

The common do-it-yourself answer: ``loop.run_in_executor(pool, fib, n)``. No coalescing, no
priorities, no admission control; the executor's queue is unbounded and FIFO.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from concurrent.futures import ProcessPoolExecutor

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from bench.servers.common import fib, parse_args


def create_app(workers: int) -> Starlette:
    pool = ProcessPoolExecutor(max_workers=workers)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # The pool forks its processes lazily; start them all now so the first requests are not slower.
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(pool, fib, 15) for _ in range(workers)))
        yield
        pool.shutdown(wait=False, cancel_futures=True)

    async def fast(request: Request) -> JSONResponse:
        return JSONResponse({"message": "Hello!"})

    async def fib_route(request: Request) -> JSONResponse:
        n = request.path_params["n"]
        value = await asyncio.get_running_loop().run_in_executor(pool, fib, n)
        return JSONResponse({"n": n, "value": value})

    routes = [Route("/fast", fast), Route("/fib/{n:int}", fib_route)]
    return Starlette(routes=routes, lifespan=lifespan)


if __name__ == "__main__":
    args = parse_args(__doc__ or "")
    uvicorn.run(
        create_app(args.workers),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
    )
