"""The in-flight core's decisions, as statements about the product; no processes, no network, no clock."""

from __future__ import annotations

import pytest

from service.inflight import Admit, Capacity, InFlight, Inline, Join, Limits, Phase, Reject

UP = Capacity(connected=True, workers=2, threads=2, scheduler="tcp://s:8786")
DOWN = Capacity(connected=False, scheduler="tcp://s:8786")
NO_WORKERS = Capacity(connected=True, workers=0, threads=0, scheduler="tcp://s:8786")


def admit(core: InFlight, key: object, cost: float = 1.0, capacity: Capacity = UP):
    decision = core.decide(key, local_cost=cost, cost=cost, capacity=capacity)
    assert isinstance(decision, Admit), decision
    return decision.computation


def test_work_cheaper_than_a_round_trip_runs_inline_and_is_not_tracked() -> None:
    core = InFlight(Limits(inline_max_cost=0.001))
    assert core.decide(("fib", 3), local_cost=0.0001, cost=0.0001, capacity=DOWN) == Inline()
    assert len(core) == 0


def test_identical_requests_share_one_computation() -> None:
    core = InFlight(Limits())
    first = admit(core, ("fib", 30))
    joined = core.decide(("fib", 30), 1.0, 1.0, UP)
    assert joined == Join(first) and first.waiters == 2
    assert len(core) == 1 and core.queued_cost == 1.0


def test_without_coalescing_identical_requests_compute_twice() -> None:
    core = InFlight(Limits(coalesce=False))
    assert admit(core, ("fib", 30)) is not admit(core, ("fib", 30))


def test_a_request_joins_even_when_it_would_be_refused_alone() -> None:
    # Joining costs the cluster nothing, so neither a lost scheduler nor a full queue stops it.
    core = InFlight(Limits())
    first = admit(core, ("fib", 30))
    assert core.decide(("fib", 30), 1.0, 1.0, DOWN) == Join(first)


def test_no_scheduler_is_refused_at_once() -> None:
    decision = InFlight(Limits(retry_after=3)).decide(("fib", 30), 1.0, 1.0, DOWN)
    assert decision == Reject("scheduler_unreachable", "Dask scheduler tcp://s:8786 is not reachable", 3)


def test_no_workers_is_refused_without_a_cold_start_queue() -> None:
    decision = InFlight(Limits()).decide(("fib", 30), 1.0, 1.0, NO_WORKERS)
    assert isinstance(decision, Reject) and decision.reason == "no_workers"


def test_scale_from_zero_holds_a_bounded_number_of_computations() -> None:
    core = InFlight(Limits(cold_start_queue=2))
    assert core.serves(NO_WORKERS)
    admit(core, ("fib", 30), capacity=NO_WORKERS)
    admit(core, ("fib", 31), capacity=NO_WORKERS)
    third = core.decide(("fib", 32), 1.0, 1.0, NO_WORKERS)
    assert isinstance(third, Reject) and third.reason == "no_workers" and "2 computations already wait" in third.detail
    # an identical request still joins: it adds no work
    assert isinstance(core.decide(("fib", 30), 1.0, 1.0, NO_WORKERS), Join)


def test_readiness_means_able_to_serve() -> None:
    core = InFlight(Limits())
    assert core.serves(UP)
    assert not core.serves(DOWN)
    assert not core.serves(NO_WORKERS)


def test_max_in_flight_distinct_computations() -> None:
    core = InFlight(Limits(max_in_flight=2, max_queue_wait=1e9, request_timeout=1e9))
    admit(core, 1)
    admit(core, 2)
    decision = core.decide(3, 1.0, 1.0, UP)
    assert isinstance(decision, Reject) and decision.reason == "overloaded" and "MAX_IN_FLIGHT" in decision.detail


def test_admission_exactly_at_the_limit_is_admitted_and_just_above_is_refused() -> None:
    # 2 threads drain 2 worker-seconds per second; the limit is min(max_queue_wait, request_timeout) = 5 s.
    core = InFlight(Limits(max_queue_wait=5.0, request_timeout=30.0))
    admit(core, "a", cost=4.0)
    admit(core, "b", cost=2.0)  # 2 s of waiting + 2 s
    admit(core, "c", cost=2.0)  # 3 s of waiting + 2 s == 5 s: admitted
    refused = core.decide("d", 1.5, 1.5, UP)  # 4 s of waiting + 1.5 s > 5 s
    assert isinstance(refused, Reject) and refused.reason == "overloaded"
    assert refused.detail == "estimated queue wait 4.0s exceeds 5.0s"
    assert refused.retry_after == 1  # ceil(6.0 - 5.0)


def test_retry_after_says_when_the_queue_will_have_room() -> None:
    core = InFlight(Limits(max_queue_wait=2.0, retry_after=1))
    admit(core, "a", cost=20.0)  # 10 s of waiting on 2 threads
    refused = core.decide("b", 1.0, 1.0, UP)
    assert isinstance(refused, Reject) and refused.retry_after == 9  # ceil(10 + 1 - 2)


def test_request_timeout_caps_the_queue_limit() -> None:
    assert Limits(max_queue_wait=10.0, request_timeout=3.0).queue_limit == 3.0


def test_an_idle_cluster_takes_a_computation_longer_than_the_limit() -> None:
    core = InFlight(Limits(max_queue_wait=1.0))
    admit(core, "huge", cost=100.0)


def test_shortest_job_first() -> None:
    core = InFlight(Limits())
    cheap, dear = admit(core, "cheap", cost=0.01), admit(core, "dear", cost=2.0)
    assert cheap.priority > dear.priority  # Dask runs higher priority first


def test_finish_frees_the_queue_and_the_key() -> None:
    core = InFlight(Limits())
    c = admit(core, "k", cost=3.0)
    core.finish(c)
    assert c.phase is Phase.FINISHED and len(core) == 0 and core.queued_cost == 0.0
    assert isinstance(core.decide("k", 1.0, 1.0, UP), Admit)  # a new request computes afresh
    core.finish(c)  # idempotent


def test_a_computation_is_released_only_when_its_last_waiter_leaves() -> None:
    core = InFlight(Limits())
    c = admit(core, "k")
    core.decide("k", 1.0, 1.0, UP)  # a second waiter
    assert core.leave(c) is False  # one client disconnected: the other still waits
    assert c.phase is Phase.RUNNING and len(core) == 1
    assert core.leave(c) is True  # the last one: release it on the cluster
    assert c.phase is Phase.RELEASED and len(core) == 0 and core.queued_cost == 0.0


def test_the_last_waiter_leaving_as_the_result_arrives_releases_nothing() -> None:
    core = InFlight(Limits())
    c = admit(core, "k")
    core.finish(c)  # the result won the race
    assert core.leave(c) is False


def test_a_result_arriving_after_the_release_changes_nothing() -> None:
    core = InFlight(Limits())
    c = admit(core, "k", cost=2.0)
    other = admit(core, "other", cost=1.0)
    assert core.leave(c) is True
    core.finish(c)  # the cancelled run's finally still reports
    assert c.phase is Phase.RELEASED and core.running == {other} and core.queued_cost == 1.0


@pytest.mark.parametrize("order", ["timeout first", "disconnect first"])
def test_timeout_against_disconnect_releases_once(order: str) -> None:
    # Two waiters, one timing out and one disconnecting at the same moment, in either order:
    # exactly one release.
    core = InFlight(Limits())
    c = admit(core, "k")
    core.decide("k", 1.0, 1.0, UP)
    releases = [core.leave(c), core.leave(c)]
    assert releases == [False, True]


def test_a_joiner_after_the_release_starts_a_new_computation() -> None:
    core = InFlight(Limits())
    c = admit(core, "k")
    core.leave(c)
    assert admit(core, "k") is not c
