"""Which cell computes a request: placement over independent Dask clusters, as pure decisions.

A cell is one Dask scheduler with its own workers. Each has its own ``InFlight`` table, so
admission and coalescing are per cell, and its own capacity. No scheduler is then a single point of
failure, and capacity grows past what one scheduler sustains (about 1,000 computations/s).

A request meets the decisions in this order (``place``):

1. an identical computation is in flight in some cell -> that cell (``Join``): overflow may have put
   it elsewhere than its preferred cell, and it is still one computation;
2. rendezvous (highest-random-weight) hashing ranks the cells for the request's key, so identical
   requests prefer the same cell (coalescing keeps working) and keys spread evenly; losing or adding
   a cell moves only the keys that cell owned. The first cell in that order that can serve decides;
3. when it refuses (overloaded, or no workers and its cold-start queue full), the least loaded
   other cell that can serve decides instead;
4. when no cell takes it, the preferred cell's refusal is the answer.

A computation whose cell loses its scheduler moves to the next cell in the same order that can serve
(``failover``): compute functions are pure, so running one again elsewhere is safe.

Tools outside the API that need to know where a computation goes (the bench, the e2e scenarios) ask
``preferred_cell``: the cell of step 2, the same ranking the API uses.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from service.inflight import Capacity, Computation, Decision, InFlight, Reject


@dataclass
class Cell:
    """What placement knows of one cell: its name (its scheduler's address), its in-flight table and
    its capacity as last seen."""

    name: str
    inflight: InFlight
    capacity: Capacity

    @property
    def serves(self) -> bool:
        return self.inflight.serves(self.capacity)

    @property
    def load(self) -> float:
        """Estimated seconds of queued work per worker thread (infinite with no threads)."""
        if self.capacity.threads == 0:
            return float("inf") if self.inflight.running else 0.0
        return self.inflight.queued_cost / self.capacity.threads


def _score(cell: str, key: Hashable) -> int:
    # A stable hash (not Python's per-process salted hash()): every API replica ranks alike, so
    # identical requests from several replicas meet in one cell.
    digest = hashlib.blake2b(f"{cell}\0{key!r}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def computation_key(name: str, args: tuple[Any, ...]) -> Hashable:
    """What placement ranks (and coalescing matches) a computation by: its function's name and its
    canonical validated arguments."""
    return (name, args)


def rank(key: Hashable, names: Sequence[str]) -> list[int]:
    """The cells' indices in the key's order of preference (rendezvous hashing)."""
    return sorted(range(len(names)), key=lambda i: _score(names[i], key), reverse=True)


def preferred_cell(name: str, args: tuple[Any, ...], addresses: Sequence[str]) -> str:
    """The scheduler address of the cell that computes ``name(*args)`` while every cell can serve and
    takes it: the one prediction of placement for tools outside the API (the bench, e2e)."""
    return addresses[rank(computation_key(name, args), addresses)[0]]


def place(key: Hashable, local_cost: float, cost: float, cells: Sequence[Cell]) -> tuple[int, Decision]:
    """The cell that decides for this request, and its decision (see the module docstring)."""
    order = rank(key, [cell.name for cell in cells])
    for i in order:
        if key in cells[i].inflight:
            return i, cells[i].inflight.decide(key, local_cost, cost, cells[i].capacity)
    serving = [i for i in order if cells[i].serves]
    preferred = serving[0] if serving else order[0]
    decision = cells[preferred].inflight.decide(key, local_cost, cost, cells[preferred].capacity)
    if not isinstance(decision, Reject):
        return preferred, decision
    # Any refusal is about that cell (overloaded, or no workers and its cold-start queue full):
    # another cell may still take the request.
    others = sorted((i for i in serving if i != preferred), key=lambda i: cells[i].load)
    for i in others:
        other = cells[i].inflight.decide(key, local_cost, cost, cells[i].capacity)
        if not isinstance(other, Reject):
            return i, other
    return preferred, decision


def failover(computation: Computation, lost: int, cells: Sequence[Cell], tried: set[int]) -> int | None:
    """The cell to run ``computation`` on after cell ``lost`` lost its scheduler: the next cell in
    the key's order that can serve and was not tried yet. The computation moves to its table."""
    for i in rank(computation.key, [cell.name for cell in cells]):
        if i != lost and i not in tried and cells[i].serves:
            cells[lost].inflight.transfer(computation, cells[i].inflight)
            return i
    return None
