"""A small asynchronous HTTP load driver (asyncio streams on uvloop) with exact percentiles.

The driver shares 2 cores with the server under test, so its cost per request is part of what
every server is measured against. A minimal HTTP/1.1 keep-alive client over asyncio streams costs
about a quarter of the CPU of aiohttp's (measured: ~110 vs ~430 us per request on this machine),
which is why it is used rather than a general-purpose client.

Every request becomes one ``Sample``; statistics are computed from all samples (no histograms, no
sampling). Load shapes: a burst of N concurrent requests, a sequence, a closed loop of C clients
(optionally paced), and an open loop at a fixed arrival rate with a per-request deadline.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

# Pseudo status codes for requests that got no HTTP answer.
TIMEOUT = -1  # the client's deadline passed
ERROR = 0  # connection refused/reset, malformed answer

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class _Stale(Exception):
    """A kept-alive connection the server had already closed: retry on a new one."""


@dataclass(frozen=True, slots=True)
class Sample:
    sent: float  # seconds since the driver's epoch
    latency: float  # seconds from send to the whole body received (or to the failure)
    status: int  # HTTP status, TIMEOUT or ERROR
    retry_after: bool  # the response carried a Retry-After header

    @property
    def done(self) -> float:
        return self.sent + self.latency


def percentile(ordered: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of already sorted values: an actual sample, never interpolated."""
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def latency_ms(samples: Iterable[Sample]) -> dict[str, Any]:
    """count, p50, p90, p99, max and mean latency in milliseconds."""
    ordered = sorted(s.latency * 1000 for s in samples)
    if not ordered:
        return {"count": 0}
    return {
        "count": len(ordered),
        "p50": percentile(ordered, 50),
        "p90": percentile(ordered, 90),
        "p99": percentile(ordered, 99),
        "max": ordered[-1],
        "mean": sum(ordered) / len(ordered),
    }


def status_counts(samples: Iterable[Sample]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for s in samples:
        key = {TIMEOUT: "timeout", ERROR: "error"}.get(s.status, str(s.status))
        counts[key] = counts.get(key, 0) + 1
    return counts


class Driver:
    """HTTP/1.1 GET client for one server with a pool of keep-alive connections.

    Use as ``async with Driver(url) as d: ...``. Concurrent requests each take their own
    connection, like browsers and aiohttp do; idle connections are reused.
    """

    def __init__(self, base_url: str, default_timeout: float = 120.0, host_header: str | None = None) -> None:
        url = urlsplit(base_url)
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 80
        self.default_timeout = default_timeout
        self.epoch = time.perf_counter()
        self._idle: list[Connection] = []
        # host_header: the virtual host to ask for (an ingress routes by it), if not the URL's own.
        host = host_header or f"{self.host}:{self.port}"
        self._request_tail = f" HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()

    async def __aenter__(self) -> Driver:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()

    def now(self) -> float:
        return time.perf_counter() - self.epoch

    async def _exchange(self, connection: Connection, path: str, reused: bool) -> tuple[int, bool, bytes]:
        reader, writer = connection
        writer.write(b"GET " + path.encode() + self._request_tail)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            if reused and not getattr(exc, "partial", b""):
                raise _Stale from exc
            raise
        lines = head[:-4].split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if b"content-length" in headers:
            body = await reader.readexactly(int(headers[b"content-length"]))
        elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            chunks = []
            while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                chunks.append((await reader.readexactly(size + 2))[:-2])
            await reader.readuntil(b"\r\n")  # no trailers are sent by the servers here
            body = b"".join(chunks)
        else:
            body = await reader.read()
            headers[b"connection"] = b"close"
        if headers.get(b"connection", b"").lower() == b"close":
            writer.close()
        else:
            self._idle.append(connection)
        return status, b"retry-after" in headers, body

    async def _request(self, path: str) -> tuple[int, bool, bytes]:
        while self._idle:
            connection = self._idle.pop()
            try:
                return await self._exchange(connection, path, reused=True)
            except _Stale:
                connection[1].close()
            except BaseException:
                connection[1].close()  # half-read or cancelled: the connection is unusable
                raise
        connection = await asyncio.open_connection(self.host, self.port)
        try:
            return await self._exchange(connection, path, reused=False)
        except BaseException:
            connection[1].close()
            raise

    async def get(self, path: str, timeout: float | None = None) -> Sample:
        return (await self.fetch(path, timeout))[0]

    async def fetch(self, path: str, timeout: float | None = None) -> tuple[Sample, bytes]:
        """One GET: its sample and its body (empty when there was no answer)."""
        start = time.perf_counter()
        status, retry_after, body = ERROR, False, b""
        try:
            async with asyncio.timeout(timeout or self.default_timeout):
                status, retry_after, body = await self._request(path)
        except TimeoutError:
            status = TIMEOUT
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, IndexError):
            status = ERROR
        end = time.perf_counter()
        return Sample(start - self.epoch, end - start, status, retry_after), body

    async def text(self, path: str) -> str:
        """Body of a GET that must succeed (e.g. /metrics)."""
        async with asyncio.timeout(self.default_timeout):
            status, _, body = await self._request(path)
        if status != 200:
            raise RuntimeError(f"GET {path}: HTTP {status}")
        return body.decode()

    async def burst(self, path: str, n: int) -> list[Sample]:
        """``n`` requests sent at once."""
        return list(await asyncio.gather(*(self.get(path) for _ in range(n))))

    async def sequence(self, path: str, n: int, seconds: float = math.inf) -> list[Sample]:
        """Up to ``n`` requests one after the other, stopping early after ``seconds``."""
        stop, samples = time.perf_counter() + seconds, []
        while len(samples) < n and time.perf_counter() < stop:
            samples.append(await self.get(path))
        return samples

    async def closed_loop(
        self, path: str, clients: int, duration: float, interval: float = 0.0, timeout: float | None = None
    ) -> list[Sample]:
        """``clients`` loops that each send a request when the previous one answered.

        With ``interval`` each client sends at most once per interval (a paced user); a late answer
        delays the next send rather than causing a catch-up burst.
        """
        loop = asyncio.get_running_loop()
        stop = loop.time() + duration

        async def client() -> list[Sample]:
            samples: list[Sample] = []
            next_send = loop.time()
            while (now := loop.time()) < stop:
                if next_send > now:
                    await asyncio.sleep(next_send - now)
                next_send = max(next_send + interval, loop.time())
                samples.append(await self.get(path, timeout))
            return samples

        results = await asyncio.gather(*(client() for _ in range(clients)))
        return [s for samples in results for s in samples]

    async def open_loop(self, path: str, rate: float, duration: float, timeout: float) -> list[Sample]:
        """Requests at a fixed rate for ``duration`` whatever the answers, each abandoned after ``timeout``.

        Arrivals are evenly spaced (not Poisson) so every server sees exactly the same load.
        """
        return [sample for _, sample, _ in await self.open_loop_bodies([path], rate, duration, timeout)]

    async def open_loop_bodies(
        self, paths: Sequence[str], rate: float, duration: float, timeout: float
    ) -> list[tuple[str, Sample, bytes]]:
        """``open_loop`` over ``paths`` in turn, keeping each answer's path and body (to check values)."""
        loop = asyncio.get_running_loop()
        start, interval = loop.time(), 1.0 / rate

        async def one(path: str) -> tuple[str, Sample, bytes]:
            sample, body = await self.fetch(path, timeout)
            return path, sample, body

        tasks: list[asyncio.Task[tuple[str, Sample, bytes]]] = []
        for k in range(math.ceil(rate * duration)):
            delay = start + k * interval - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(paths[k % len(paths)])))
        return list(await asyncio.gather(*tasks))
