"""Placement over cells, as statements about the product; no processes, no network, no clock."""

from __future__ import annotations

from collections import Counter

from service.cells import Cell, computation_key, failover, place, preferred_cell, rank
from service.inflight import Admit, Capacity, InFlight, Inline, Join, Limits, Reject

NAMES = ("tcp://cell-a:8786", "tcp://cell-b:8786", "tcp://cell-c:8786")


def up(name: str, threads: int = 2) -> Capacity:
    return Capacity(connected=True, workers=threads, threads=threads, scheduler=name)


def cells(*names: str, limits: Limits | None = None, threads: int = 2) -> list[Cell]:
    return [Cell(name, InFlight(limits or Limits()), up(name, threads)) for name in names]


def test_identical_requests_prefer_the_same_cell_and_keys_spread_evenly() -> None:
    keys = [("fib", n) for n in range(3000)]
    owners = Counter(rank(key, NAMES)[0] for key in keys)
    assert set(owners) == {0, 1, 2}
    assert all(abs(count - 1000) < 120 for count in owners.values()), owners  # within 12 % of even
    assert rank(("fib", 30), NAMES) == rank(("fib", 30), NAMES)


def test_losing_a_cell_moves_only_the_keys_it_owned() -> None:
    keys = [("fib", n) for n in range(3000)]
    before = {key: NAMES[rank(key, NAMES)[0]] for key in keys}
    survivors = NAMES[:2]
    after = {key: survivors[rank(key, survivors)[0]] for key in keys}
    moved = [key for key in keys if before[key] != after[key]]
    assert moved and all(before[key] == NAMES[2] for key in moved)


def test_a_request_is_admitted_by_its_preferred_cell() -> None:
    group = cells(*NAMES)
    index, decision = place(("fib", 30), 1.0, 1.0, group)
    assert index == rank(("fib", 30), NAMES)[0] and isinstance(decision, Admit)
    assert len(group[index].inflight) == 1 and sum(len(c.inflight) for c in group) == 1


def test_the_predicted_cell_is_where_idle_cells_admit_a_computation() -> None:
    # What the bench and the e2e scenarios rely on to load chosen cells.
    for n in range(60):
        index, decision = place(computation_key("fib", (n,)), 1.0, 1.0, cells(*NAMES))
        assert isinstance(decision, Admit) and NAMES[index] == preferred_cell("fib", (n,), NAMES)
    assert {preferred_cell("fib", (n,), NAMES) for n in range(60)} == set(NAMES)


def test_cheap_work_runs_inline_whatever_the_cells_state() -> None:
    group = [Cell(name, InFlight(Limits(inline_max_cost=0.01)), Capacity(connected=False)) for name in NAMES]
    assert place(("fib", 3), 0.0001, 0.0001, group)[1] == Inline()


def test_identical_requests_share_one_computation_even_after_an_overflow() -> None:
    group = cells(*NAMES)
    key = ("fib", 30)
    preferred = rank(key, NAMES)[0]
    group[preferred].capacity = Capacity(connected=False, scheduler=NAMES[preferred])
    first_cell, first = place(key, 1.0, 1.0, group)
    assert first_cell != preferred and isinstance(first, Admit)
    group[preferred].capacity = up(NAMES[preferred])  # back: the key's owner again
    index, joined = place(key, 1.0, 1.0, group)
    assert (index, joined) == (first_cell, Join(first.computation))


def test_an_overloaded_cell_hands_over_to_the_least_loaded_other() -> None:
    limits = Limits(max_queue_wait=5.0)
    group = cells(*NAMES, limits=limits)
    key = ("fib", 40)
    order = rank(key, NAMES)
    preferred, second, third = order
    group[preferred].inflight.decide(("busy", 1), 9.0, 9.0, group[preferred].capacity)  # 4.5 s a thread
    group[second].inflight.decide(("busy", 2), 4.0, 4.0, group[second].capacity)  # 2 s a thread
    index, decision = place(key, 2.0, 2.0, group)
    assert index == third and isinstance(decision, Admit)


def test_when_every_cell_refuses_the_preferred_cells_refusal_is_the_answer() -> None:
    group = cells(*NAMES, limits=Limits(max_in_flight=1))
    for i, cell in enumerate(group):
        cell.inflight.decide(("busy", i), 1.0, 1.0, cell.capacity)
    key = ("fib", 30)
    index, decision = place(key, 1.0, 1.0, group)
    assert index == rank(key, NAMES)[0]
    assert isinstance(decision, Reject) and decision.reason == "overloaded"


def test_a_cold_cell_with_a_full_cold_start_queue_hands_over_to_a_cell_with_workers() -> None:
    limits = Limits(cold_start_queue=2)
    group = cells(*NAMES[:2], limits=limits)
    group[0].capacity = Capacity(connected=True, scheduler=NAMES[0])  # scaled to zero
    cold = [("fib", n) for n in range(100) if rank(("fib", n), NAMES[:2])[0] == 0][:3]
    placed = [place(key, 1.0, 1.0, group) for key in cold]
    # the first two wait for the cold cell's autoscaler; the third is computed by the warm cell now
    assert [index for index, _ in placed] == [0, 0, 1]
    assert all(isinstance(decision, Admit) for _, decision in placed)


def test_a_cell_without_a_scheduler_is_avoided() -> None:
    group = cells(*NAMES)
    key = ("fib", 30)
    preferred, second, _ = rank(key, NAMES)
    group[preferred].capacity = Capacity(connected=False, scheduler=NAMES[preferred])
    index, decision = place(key, 1.0, 1.0, group)
    assert index == second and isinstance(decision, Admit)


def test_a_request_fails_only_when_no_cell_can_take_it() -> None:
    group = [Cell(name, InFlight(Limits()), Capacity(connected=False, scheduler=name)) for name in NAMES]
    key = ("fib", 30)
    index, decision = place(key, 1.0, 1.0, group)
    assert index == rank(key, NAMES)[0]
    assert isinstance(decision, Reject) and decision.reason == "scheduler_unreachable"


def test_a_lost_cells_computation_moves_with_its_waiters_and_cost() -> None:
    group = cells(*NAMES)
    key = ("fib", 30)
    lost, _ = place(key, 1.0, 1.0, group)
    computation = next(iter(group[lost].inflight.running))
    group[lost].inflight.decide(key, 1.0, 1.0, group[lost].capacity)  # a second waiter
    group[lost].capacity = Capacity(connected=False, scheduler=NAMES[lost])
    target = failover(computation, lost, group, tried={lost})
    assert target == next(i for i in rank(key, NAMES) if i != lost)
    assert len(group[lost].inflight) == 0 and group[lost].inflight.queued_cost == 0
    assert group[target].inflight.running == {computation} and computation.waiters == 2
    assert place(key, 1.0, 1.0, group) == (target, Join(computation))  # identical requests follow it


def test_failover_gives_up_when_every_other_cell_is_lost_or_tried() -> None:
    group = cells(*NAMES)
    key = ("fib", 30)
    lost, _ = place(key, 1.0, 1.0, group)
    computation = next(iter(group[lost].inflight.running))
    others = [i for i in range(3) if i != lost]
    group[others[0]].capacity = Capacity(connected=False)
    assert failover(computation, lost, group, tried={lost, others[1]}) is None
    assert group[lost].inflight.running == {computation}  # nothing moved
