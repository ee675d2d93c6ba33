"""Baseline 1: the notebook's first server. Tornado computes fib inside its only event loop.

Every /fib request blocks the loop, so /fast waits behind it and only one core is ever used.
"""

from __future__ import annotations

import asyncio

import tornado.web

from bench.servers.common import fib, parse_args


class FibHandler(tornado.web.RequestHandler):
    def get(self, n: str) -> None:
        value = int(n)
        self.write({"n": value, "value": fib(value)})


class FastHandler(tornado.web.RequestHandler):
    def get(self) -> None:
        self.write({"message": "Hello!"})


async def serve(host: str, port: int) -> None:
    app = tornado.web.Application([(r"/fast", FastHandler), (r"/fib/(\d+)", FibHandler)])
    app.listen(port, address=host)
    await asyncio.Event().wait()  # the harness stops us with a signal


if __name__ == "__main__":
    args = parse_args(__doc__ or "")
    asyncio.run(serve(args.host, args.port))
