"""Baseline 2: the notebook's Tornado server offloading fib to Dask with ``Client(asynchronous=True)``.

Same as the notebook, with two changes the comparison needs: ``pure=False``, because with the
default identical ``n`` share one task key and the "parallel" speed-up would be deduplication, and
an explicit worker count (single-threaded workers, one per core, like compute-api's embedded mode).
"""

from __future__ import annotations

import asyncio

import tornado.web
from dask.distributed import Client

from bench.servers.common import fib, parse_args


class FibHandler(tornado.web.RequestHandler):
    def initialize(self, client: Client) -> None:
        self.client = client

    async def get(self, n: str) -> None:
        value = int(n)
        result = await self.client.submit(fib, value, pure=False)
        self.write({"n": value, "value": result})


class FastHandler(tornado.web.RequestHandler):
    async def get(self) -> None:
        self.write({"message": "Hello!"})


async def serve(host: str, port: int, workers: int) -> None:
    # dashboard_address=None: the notebook's dashboard would only add a port clash between parallel runs.
    client = await Client(asynchronous=True, n_workers=workers, threads_per_worker=1, dashboard_address=None)
    app = tornado.web.Application([(r"/fast", FastHandler), (r"/fib/(\d+)", FibHandler, {"client": client})])
    app.listen(port, address=host)
    await asyncio.Event().wait()  # the harness stops us with a signal


if __name__ == "__main__":
    args = parse_args(__doc__ or "")
    asyncio.run(serve(args.host, args.port, args.workers))
