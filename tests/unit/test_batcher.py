"""Adaptive micro-batching's decisions (service.batching), as statements about the product; no clock."""

from __future__ import annotations

from service.batching import Batcher, BatchLimits

LIMITS = BatchLimits(max_size=4, max_cost=0.025, linger=0.02)
CHEAP = 0.002  # seconds: cheap enough to batch (2 x 0.002 <= 0.025)


def test_batches_only_cheap_work_while_every_thread_is_busy() -> None:
    batcher: Batcher[str] = Batcher(LIMITS)
    assert batcher.batches(CHEAP, threads=2, tasks_in_flight=2)
    assert batcher.batches(CHEAP, threads=2, tasks_in_flight=7)


def test_never_serialises_work_that_an_idle_thread_could_run() -> None:
    assert not Batcher(LIMITS).batches(CHEAP, threads=2, tasks_in_flight=1)
    assert not Batcher(LIMITS).batches(CHEAP, threads=2, tasks_in_flight=0)


def test_no_threads_no_batching() -> None:
    # scale from zero: nothing runs anyway, and a batch would only hide the computations from failover
    assert not Batcher(LIMITS).batches(CHEAP, threads=0, tasks_in_flight=0)


def test_work_too_costly_for_two_in_a_batch_runs_alone() -> None:
    assert Batcher(LIMITS).batches(0.0125, threads=1, tasks_in_flight=1)
    assert not Batcher(LIMITS).batches(0.0126, threads=1, tasks_in_flight=1)


def test_batch_max_size_one_turns_batching_off() -> None:
    assert not Batcher(BatchLimits(max_size=1)).batches(CHEAP, threads=1, tasks_in_flight=5)


def test_a_full_batch_is_sent_at_once() -> None:
    batcher: Batcher[str] = Batcher(LIMITS)
    assert batcher.add("a", CHEAP, now=0.0) == []
    assert batcher.add("b", CHEAP, now=0.001) == []
    assert batcher.add("c", CHEAP, now=0.002) == []
    [batch] = batcher.add("d", CHEAP, now=0.003)
    assert batch.members == ["a", "b", "c", "d"] and batch.since == 0.0
    assert batcher.deadline() is None and batcher.flush() is None


def test_the_cost_cap_sends_a_batch_before_it_would_be_exceeded() -> None:
    batcher: Batcher[str] = Batcher(BatchLimits(max_size=16, max_cost=0.025))
    batcher.add("a", 0.01, now=0.0)
    batcher.add("b", 0.01, now=0.0)
    [batch] = batcher.add("c", 0.01, now=0.5)  # 0.03 > 0.025: a and b go, c starts the next batch
    assert batch.members == ["a", "b"] and abs(batch.cost - 0.02) < 1e-12
    assert batcher.pending.members == ["c"] and batcher.deadline() == 0.5 + 0.02


def test_reaching_the_cost_cap_exactly_sends_the_batch() -> None:
    batcher: Batcher[str] = Batcher(BatchLimits(max_size=16, max_cost=0.02))
    batcher.add("a", 0.01, now=0.0)
    [batch] = batcher.add("b", 0.01, now=0.0)
    assert batch.members == ["a", "b"]


def test_a_batch_lingers_at_most_batch_linger_after_its_first_member() -> None:
    batcher: Batcher[str] = Batcher(LIMITS)
    batcher.add("a", CHEAP, now=1.0)
    batcher.add("b", CHEAP, now=1.015)
    assert batcher.deadline() == 1.0 + 0.02
    assert batcher.due(now=1.019) is None
    batch = batcher.due(now=1.02)
    assert batch is not None and batch.members == ["a", "b"]
    assert batcher.due(now=9.0) is None  # nothing pending


def test_a_freed_thread_takes_the_pending_batch() -> None:
    batcher: Batcher[str] = Batcher(LIMITS)
    batcher.add("a", CHEAP, now=0.0)
    assert batcher.freed(threads=2, tasks_in_flight=2) is None  # still every thread busy
    batch = batcher.freed(threads=2, tasks_in_flight=1)
    assert batch is not None and batch.members == ["a"]
    assert batcher.freed(threads=2, tasks_in_flight=0) is None  # nothing pending


def test_a_released_member_leaves_its_pending_batch_only() -> None:
    batcher: Batcher[str] = Batcher(LIMITS)
    batcher.add("a", CHEAP, now=0.0)
    batcher.add("b", 0.003, now=0.0)
    assert batcher.remove("a")
    assert not batcher.remove("a")  # already gone (or already sent)
    assert batcher.pending.members == ["b"] and batcher.pending.cost == 0.003


def test_members_are_told_apart_by_identity_not_equality() -> None:
    # two equal requests with coalescing off are two computations: releasing one keeps the other
    first, second = ["fib", 20], ["fib", 20]
    batcher: Batcher[list[object]] = Batcher(LIMITS)
    batcher.add(first, CHEAP, now=0.0)
    batcher.add(second, CHEAP, now=0.0)
    assert batcher.remove(second)
    assert batcher.pending.members[0] is first and len(batcher.pending) == 1
