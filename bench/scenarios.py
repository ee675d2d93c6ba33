"""Scenarios (a)-(h) of issue 5, identical for every server, and the plans that size them."""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from bench.driver import Driver, Sample, latency_ms, status_counts


@dataclass(frozen=True)
class Plan:
    """Sizes of every scenario. ``FULL`` is ``make bench``; ``QUICK`` only checks the plumbing."""

    fib_n: int = 28  # the unit of work of (b), (d), (e), (h)
    fast_sequence: int = 300  # (a) x1: sequential /fast requests
    fast_burst: int = 100  # (a) concurrent /fast requests per round
    fast_burst_rounds: int = 10
    fib_burst: int = 20  # (b)
    slow_n: int = 33  # (c)
    fast_clients: int = 8  # (d) /fast clients...
    fast_interval: float = 0.01  # ...each sending at most every 10 ms (~100 requests/s)
    idle_seconds: float = 2.0  # (d) the same /fast clients with no fib load: the idle p99
    mixed_seconds: float = 10.0  # (d)
    fib_clients_per_worker: int = 2  # (d), (e): two per worker keep a queue, so no worker idles
    throughput_seconds: float = 10.0  # (e)
    overhead_requests: int = 500  # (f), or as many as fit in...
    overhead_seconds: float = 3.0  # ...(the notebook's Dask server needs ~20 ms per request)
    coalesce_n: int = 30  # (g)
    coalesce_requests: int = 100
    overload_factor: float = 10.0  # (h): offered fib rate = factor x the ceiling
    overload_seconds: float = 6.0
    overload_deadline: float = 3.0  # (h): the client gives up after this long
    overload_fast_clients: int = 4
    ceiling_tasks_per_worker: int = 40
    band_short_n: int = 22  # (i) short jobs...
    band_long_n: int = 30  # ...beside long ones that keep every worker busy with a queue
    band_short_clients: int = 2
    band_seconds: float = 6.0
    derive_iterations: int = 200_000  # (j) PBKDF2-SHA256 iterations per request (GIL released)
    derive_seconds: float = 10.0

    @property
    def api_max_queue_wait(self) -> float:
        """compute-api's MAX_QUEUE_WAIT for the run: admitted work must finish before (h)'s clients give
        up, with a margin for the cost model's error."""
        return self.overload_deadline / 2


FULL = Plan()
QUICK = Plan(
    fib_n=24,
    fast_sequence=30,
    fast_burst=20,
    fast_burst_rounds=2,
    fib_burst=6,
    slow_n=27,
    fast_clients=2,
    idle_seconds=0.3,
    mixed_seconds=0.6,
    throughput_seconds=0.6,
    overhead_requests=30,
    coalesce_n=25,
    coalesce_requests=10,
    overload_factor=3.0,
    overload_seconds=0.6,
    overload_deadline=1.0,
    overload_fast_clients=1,
    ceiling_tasks_per_worker=20,
    band_short_n=18,
    band_long_n=25,
    band_seconds=0.6,
    derive_iterations=5_000,
    derive_seconds=0.6,
)


@dataclass
class Context:
    driver: Driver
    plan: Plan
    workers: int
    ceiling: float  # fib(plan.fib_n) per second with no HTTP at all
    reads_metrics: bool  # the server is compute-api and has /metrics
    peak: float | None = None  # this server's (e) throughput, the reference for (h)

    @property
    def fib_path(self) -> str:
        return f"/fib/{self.plan.fib_n}"

    @property
    def fib_clients(self) -> int:
        return self.plan.fib_clients_per_worker * self.workers


def _wall(samples: list[Sample]) -> float:
    return max(s.done for s in samples) - min(s.sent for s in samples)


def _rate(samples: list[Sample], start: float, seconds: float) -> float:
    """Successful answers completed inside [start, start + seconds], per second."""
    return sum(1 for s in samples if s.status == 200 and start <= s.done <= start + seconds) / seconds


def _failures(samples: list[Sample]) -> dict[str, int]:
    """Answers other than 200, by status (e.g. compute-api's admission control answers 503)."""
    return {k: v for k, v in status_counts(samples).items() if k != "200"}


async def _counters(ctx: Context) -> dict[str, float]:
    """compute-api's counters, summed over labels (``{}`` for servers without /metrics)."""
    if not ctx.reads_metrics:
        return {}
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(await ctx.driver.text("/metrics")):
        for sample in family.samples:
            if sample.name.endswith("_total"):
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def _delta(before: dict[str, float], after: dict[str, float], name: str) -> float | None:
    return after.get(name, 0.0) - before.get(name, 0.0) if after else None


async def warm_up(ctx: Context) -> None:
    """Unmeasured: open connections, ship the function to workers, fault in code paths."""
    d = ctx.driver
    await d.burst("/fast", ctx.plan.fast_burst)
    await d.burst("/fib/20", 2 * ctx.workers)
    await d.sequence("/fib/1", 5)


async def fast_alone(ctx: Context) -> dict[str, Any]:
    """(a) /fast one at a time, then bursts of 100 concurrent."""
    d, plan = ctx.driver, ctx.plan
    sequence = await d.sequence("/fast", plan.fast_sequence)
    bursts = [await d.burst("/fast", plan.fast_burst) for _ in range(plan.fast_burst_rounds)]
    everything = [s for burst in bursts for s in burst]
    return {
        "x1": latency_ms(sequence),
        "burst": latency_ms(everything),
        "burst_size": plan.fast_burst,
        "burst_wall_ms": statistics.median(_wall(b) for b in bursts) * 1000,
        "failures": _failures(sequence + everything),
    }


async def fib_burst(ctx: Context) -> dict[str, Any]:
    """(b) fib(28) x20 concurrent, every request its own computation."""
    samples = await ctx.driver.burst(ctx.fib_path, ctx.plan.fib_burst)
    return {
        "n": ctx.plan.fib_n,
        "requests": len(samples),
        "wall_s": _wall(samples),
        "latency": latency_ms(samples),
        "failures": _failures(samples),
    }


async def fast_beside_slow(ctx: Context) -> dict[str, Any]:
    """(c) /fast, one request after another, while a single fib(33) runs."""
    d, plan = ctx.driver, ctx.plan
    slow = asyncio.create_task(d.get(f"/fib/{plan.slow_n}"))
    await asyncio.sleep(0.02)  # let the slow request reach the server first
    fast: list[Sample] = []
    while True:
        fast.append(await d.get("/fast"))
        if slow.done():
            break
        await asyncio.sleep(plan.fast_interval)
    slow_sample = await slow
    return {
        "slow_n": plan.slow_n,
        "slow_s": slow_sample.latency,
        "fast": latency_ms(fast),
        "failures": _failures([*fast, slow_sample]),
    }


async def mixed(ctx: Context) -> dict[str, Any]:
    """(d) paced /fast clients alone (idle), then beside closed-loop fib clients that fill every worker."""
    d, plan = ctx.driver, ctx.plan
    idle = await d.closed_loop("/fast", plan.fast_clients, plan.idle_seconds, plan.fast_interval)
    start = d.now()
    fast, fibs = await asyncio.gather(
        d.closed_loop("/fast", plan.fast_clients, plan.mixed_seconds, plan.fast_interval),
        d.closed_loop(ctx.fib_path, ctx.fib_clients, plan.mixed_seconds),
    )
    idle_stats, fast_stats = latency_ms(idle), latency_ms(fast)
    return {
        "fast_clients": plan.fast_clients,
        "fib_clients": ctx.fib_clients,
        "seconds": plan.mixed_seconds,
        "idle_fast": idle_stats,
        "fast": fast_stats,
        "fast_p99_vs_idle": fast_stats["p99"] / idle_stats["p99"],
        "fast_rate": _rate(fast, start, plan.mixed_seconds),
        "fib_rate": _rate(fibs, start, plan.mixed_seconds),
        "fib_latency": latency_ms(fibs),
        "failures": _failures(idle + fast + fibs),
    }


async def throughput(ctx: Context) -> dict[str, Any]:
    """(e) closed-loop fib only: answers per second against the no-HTTP ceiling."""
    d, plan = ctx.driver, ctx.plan
    start = d.now()
    samples = await d.closed_loop(ctx.fib_path, ctx.fib_clients, plan.throughput_seconds)
    rate = _rate(samples, start, plan.throughput_seconds)
    ctx.peak = rate
    return {
        "clients": ctx.fib_clients,
        "seconds": plan.throughput_seconds,
        "fib_rate": rate,
        "latency": latency_ms(samples),
        "failures": _failures(samples),
    }


async def overhead(ctx: Context) -> dict[str, Any]:
    """(f) fib(1) one at a time: the cost of the request path itself."""
    samples = await ctx.driver.sequence("/fib/1", ctx.plan.overhead_requests, ctx.plan.overhead_seconds)
    return {"latency": latency_ms(samples), "failures": _failures(samples)}


async def identical(ctx: Context) -> dict[str, Any]:
    """(g) 100 concurrent identical fib(30); compute-api's /metrics tells how many computations ran."""
    before = await _counters(ctx)
    samples = await ctx.driver.burst(f"/fib/{ctx.plan.coalesce_n}", ctx.plan.coalesce_requests)
    after = await _counters(ctx)
    return {
        "n": ctx.plan.coalesce_n,
        "requests": len(samples),
        "wall_s": _wall(samples),
        "latency": latency_ms(samples),
        "computations": _delta(before, after, "compute_api_computations_total"),
        "coalesced": _delta(before, after, "compute_api_coalesced_requests_total"),
        "failures": _failures(samples),
    }


async def overload(ctx: Context) -> dict[str, Any]:
    """(h) fib offered at 10x the ceiling (open loop, clients give up after a deadline) plus /fast probes."""
    d, plan = ctx.driver, ctx.plan
    rate = plan.overload_factor * ctx.ceiling
    before = await _counters(ctx)
    start = d.now()
    fibs, fast = await asyncio.gather(
        d.open_loop(ctx.fib_path, rate, plan.overload_seconds, plan.overload_deadline),
        d.closed_loop(
            "/fast",
            plan.overload_fast_clients,
            plan.overload_seconds,
            plan.fast_interval,
            timeout=plan.overload_deadline,
        ),
    )
    after = await _counters(ctx)
    rejected = [s for s in fibs if s.status == 503]
    goodput = _rate(fibs, start, plan.overload_seconds)
    peak = ctx.peak or ctx.ceiling
    return {
        "offered_rate": rate,
        "seconds": plan.overload_seconds,
        "deadline_s": plan.overload_deadline,
        "statuses": status_counts(fibs),
        "goodput": goodput,
        "peak": peak,
        "of_peak": goodput / peak,
        "ok_latency": latency_ms(s for s in fibs if s.status == 200),
        "rejected": latency_ms(rejected),
        "rejected_with_retry_after": sum(s.retry_after for s in rejected),
        "fast": latency_ms(fast),
        "fast_statuses": status_counts(fast),
        "computations": _delta(before, after, "compute_api_computations_total"),
    }


Scenario = Callable[[Context], Awaitable[dict[str, Any]]]

# Run in this order for every server; (h) last, since it leaves the baselines minutes of backlog.
async def bands(ctx: Context) -> dict[str, Any]:
    """(i) short fib jobs beside long ones that saturate the workers: latency per n band.

    A FIFO queue makes a short job wait behind every long one queued before it; compute-api gives
    each task its estimated cost as Dask priority, so short jobs overtake the queue.
    """
    d, plan = ctx.driver, ctx.plan
    start = d.now()
    short, long = await asyncio.gather(
        d.closed_loop(f"/fib/{plan.band_short_n}", plan.band_short_clients, plan.band_seconds),
        d.closed_loop(f"/fib/{plan.band_long_n}", ctx.fib_clients, plan.band_seconds),
    )
    return {
        "short_n": plan.band_short_n,
        "long_n": plan.band_long_n,
        "short": latency_ms(short),
        "long": latency_ms(long),
        "short_rate": _rate(short, start, plan.band_seconds),
        "long_rate": _rate(long, start, plan.band_seconds),
        "failures": _failures(short + long),
    }


async def derive(ctx: Context) -> dict[str, Any]:
    """(j) a second declared function, derive (PBKDF2 via hashlib, which releases the GIL), closed
    loop through GET /compute/derive: the path any declared function takes, cost model included."""
    d, plan = ctx.driver, ctx.plan
    path = f"/compute/derive?text=bench&salt=salt&iterations={plan.derive_iterations}"
    start = d.now()
    samples = await d.closed_loop(path, ctx.fib_clients, plan.derive_seconds)
    return {
        "iterations": plan.derive_iterations,
        "clients": ctx.fib_clients,
        "seconds": plan.derive_seconds,
        "rate": _rate(samples, start, plan.derive_seconds),
        "latency": latency_ms(samples),
        "failures": _failures(samples),
    }


# Scenarios of compute-api's own features (declared functions): the baselines only serve fib.
COMPUTE_API_ONLY = frozenset("j")

SCENARIOS: dict[str, tuple[str, Scenario]] = {
    "a": ("/fast x1 and x100 concurrent", fast_alone),
    "b": ("fib(28) x20 concurrent, distinct work", fib_burst),
    "c": ("/fast while one fib(33) runs", fast_beside_slow),
    "d": ("mixed closed loop: paced /fast + fib on every worker", mixed),
    "e": ("fib-only closed loop vs the ceiling", throughput),
    "f": ("fib(1) end to end", overhead),
    "g": ("100 concurrent identical fib(30)", identical),
    # (i) runs before (h): the baselines cannot cancel work, so (h) leaves them a backlog of
    # minutes that would land on whatever is measured after it.
    "i": ("short fib jobs beside long ones: latency per n band", bands),
    "h": ("offered load at 10x capacity", overload),
    "j": ("derive (PBKDF2, a declared function) closed loop", derive),
}
