"""Direct calls' decisions and bookkeeping (service.direct), as statements about the product.

``Lane`` (which worker takes a direct call) and ``demand`` (the scheduler's adaptive target) are pure;
``DirectCalls`` (a worker's side) runs here against a fake worker that has a real thread pool. No
clock assumption: every bound below holds at any speed.

(Named test_direct_calls.py, not test_direct.py: tests/test_direct.py exists, and pytest cannot
import two test modules of the same name from directories without ``__init__.py``.)
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
from distributed import get_worker
from distributed.protocol import pickle

from service.direct import CALLS_PER_THREAD, TARGET_UTILISATION, DirectCalls, Lane, demand

# -- Lane.pick: the API's choice of a worker -------------------------------------------------------


def test_a_cell_takes_calls_per_thread_calls_and_tasks_then_none() -> None:
    lane = Lane()
    workers = {"a": 1, "b": 1}  # 2 threads: 2 x CALLS_PER_THREAD calls and Dask tasks in all
    assert CALLS_PER_THREAD == 2
    for _ in range(4):
        address = lane.pick(workers, tasks_in_flight=0)
        assert address is not None
        lane.start(address)
    assert lane.in_flight == 4 and lane.calls == {"a": 2, "b": 2}
    assert lane.pick(workers, tasks_in_flight=0) is None
    lane.finish("a")
    assert lane.pick(workers, tasks_in_flight=0) == "a"
    # the cell's Dask tasks take their share: 3 tasks + 0 calls of 4 -> one more call, 4 -> none
    assert Lane().pick(workers, tasks_in_flight=3) is not None
    assert Lane().pick(workers, tasks_in_flight=4) is None


def test_no_workers_no_direct_call() -> None:
    assert Lane().pick({}, tasks_in_flight=0) is None


def test_the_least_loaded_worker_takes_the_call() -> None:
    lane = Lane()
    workers = {"a": 2, "b": 1, "c": 1}  # free slots: a 4, b 2, c 2
    lane.start("a")
    lane.start("a")
    lane.start("a")  # a: 1 free
    lane.start("c")  # c: 1 free, b: 2 free
    for _ in range(5):  # whatever the turn
        assert lane.pick(workers, tasks_in_flight=0) == "b"


def test_a_worker_at_its_limit_is_not_picked_while_others_have_room() -> None:
    lane = Lane()
    lane.start("a")
    lane.start("a")
    for _ in range(5):
        assert lane.pick({"a": 1, "b": 1}, tasks_in_flight=0) == "b"


def test_idle_workers_are_taken_in_turn() -> None:
    lane = Lane()
    picks = [lane.pick({"a": 1, "b": 1, "c": 1}, tasks_in_flight=0) for _ in range(3)]
    assert sorted(picks) == ["a", "b", "c"]  # type: ignore[type-var]


def test_calls_per_thread_bounds_each_workers_calls() -> None:
    for per in (1, 3):
        lane = Lane(calls_per_thread=per)
        for _ in range(per):
            assert lane.pick({"a": 1}, tasks_in_flight=0) == "a"
            lane.start("a")
        assert lane.pick({"a": 1}, tasks_in_flight=0) is None
        assert lane.pick({"a": 2}, tasks_in_flight=0) == "a"  # the same worker with a second thread


def test_finished_calls_free_their_slot_and_leave_no_trace() -> None:
    lane = Lane()
    lane.start("a")
    lane.start("a")
    lane.finish("a")
    lane.finish("a")
    assert lane.in_flight == 0 and dict(lane.calls) == {}


def test_a_refused_worker_is_skipped_while_listed_and_forgotten_once_unlisted() -> None:
    lane = Lane()
    lane.refuse("a")
    for _ in range(4):  # b has room for two calls, a is never chosen, not even when b is full
        address = lane.pick({"a": 1, "b": 1}, tasks_in_flight=0)
        assert address in ("b", None)
        if address is not None:
            lane.start(address)
    assert lane.calls == {"b": 2}
    assert lane.pick({"a": 1, "b": 1}, tasks_in_flight=0) is None
    lane.refuse("b")
    lane.finish("b")
    lane.finish("b")
    assert lane.pick({"a": 1, "b": 1}, tasks_in_flight=0) is None  # every listed worker refused
    # a leaves the scheduler's list (and may come back later at the same address): it starts afresh
    assert lane.pick({"b": 1}, tasks_in_flight=0) is None
    assert lane.pick({"a": 1, "b": 1}, tasks_in_flight=0) == "a"
    assert lane.refused == {"b"}


# -- demand(): the scheduler's adaptive target with direct calls in it ------------------------------


def test_without_direct_calls_the_target_is_dasks() -> None:
    assert demand(0, [], []) == 0
    assert demand(3, [0.0, 0.0], [1, 1]) == 3
    assert demand(0, [0.0, 0.0], [4, 4]) == 0


def test_busy_threads_ask_for_workers_at_target_utilisation() -> None:
    assert TARGET_UTILISATION == 0.8
    # one single-threaded worker fully busy: that worker is needed (and a second only above 80 %)
    assert demand(0, [0.8], [1]) == 1
    assert demand(0, [0.81], [1]) == 2
    assert demand(0, [1.0], [1]) == 2
    # four fully busy single-threaded workers: 4 / 0.8 = 5
    assert demand(0, [1.0] * 4, [1] * 4) == 5
    # two 4-thread workers, half busy: 4 busy threads / (4 threads x 0.8) = 1.25 -> 2 workers
    assert demand(0, [2.0, 2.0], [4, 4]) == 2
    # a little direct work keeps one worker
    assert demand(0, [0.01, 0.0], [1, 1]) == 1


def test_direct_calls_never_lower_dasks_target() -> None:
    assert demand(7, [1.0, 1.0], [1, 1]) == 7
    assert demand(2, [0.1], [1]) == 2


# -- DirectCalls: a worker's side ------------------------------------------------------------------

GATES: dict[str, threading.Event] = {}  # the functions below travel pickled by name, their events cannot


def held(name: str, started: str) -> str:
    """Runs until the test opens gate ``name``; says it started by opening ``started``."""
    GATES[started].set()
    assert GATES[name].wait(60), f"gate {name} never opened"
    return name


def boom(x: int) -> int:
    raise ZeroDivisionError(f"on purpose {x}")


def worker_name() -> str:
    return get_worker().name


def fake_worker(threads: int, executing: int = 0) -> SimpleNamespace:
    """What DirectCalls reads of a distributed Worker: its state and its thread pool."""
    return SimpleNamespace(
        name=f"fake-{threads}",
        state=SimpleNamespace(executing={f"task-{i}" for i in range(executing)}, nthreads=threads),
        executors={"default": ThreadPoolExecutor(threads)},
    )


def gates(*names: str) -> list[threading.Event]:
    for name in names:
        GATES[name] = threading.Event()
    return [GATES[name] for name in names]


async def started(event: threading.Event) -> None:
    assert await asyncio.to_thread(event.wait, 60), "the call never started"


def send(calls: DirectCalls, func, *arg) -> asyncio.Task:
    return asyncio.ensure_future(calls.call(function=pickle.dumps(func), args=pickle.dumps(arg)))


def test_a_call_runs_the_function_in_the_workers_pool_and_returns_value_and_seconds() -> None:
    worker = fake_worker(1)

    async def scenario() -> dict:
        calls = DirectCalls(worker)
        go, running = gates("go-1", "running-1")
        go.set()
        return await send(calls, held, "go-1", "running-1")

    try:
        reply = asyncio.run(scenario())
    finally:
        worker.executors["default"].shutdown()
    assert reply["ok"] is True
    value, seconds = pickle.loads(reply["result"])
    assert value == "go-1" and seconds >= 0


def test_the_function_sees_its_worker_as_in_a_task() -> None:
    worker = fake_worker(1)
    try:
        reply = asyncio.run(DirectCalls(worker).call(function=pickle.dumps(worker_name), args=pickle.dumps(())))
    finally:
        worker.executors["default"].shutdown()
    assert pickle.loads(reply["result"])[0] == "fake-1"
    with pytest.raises(ValueError, match="No worker found"):  # and only inside the call
        get_worker()


def test_the_functions_error_is_the_answer() -> None:
    worker = fake_worker(1)
    try:
        reply = asyncio.run(DirectCalls(worker).call(function=pickle.dumps(boom), args=pickle.dumps((3,))))
    finally:
        worker.executors["default"].shutdown()
    assert reply == {"ok": False, "error": "ZeroDivisionError: on purpose 3"}


def test_a_worker_whose_threads_all_run_dask_tasks_answers_busy_without_running_anything() -> None:
    worker = fake_worker(2, executing=2)
    try:
        calls = DirectCalls(worker)
        reply = asyncio.run(calls.call(function=pickle.dumps(boom), args=pickle.dumps((1,))))
        assert reply == {"busy": True}
        assert calls.busy() == 0.0
        worker.state.executing.pop()  # one thread free: the call runs (and its function raises)
        assert asyncio.run(calls.call(function=pickle.dumps(boom), args=pickle.dumps((1,))))["ok"] is False
    finally:
        worker.executors["default"].shutdown()


def test_busy_is_the_share_of_each_interval_spent_in_calls() -> None:
    worker = fake_worker(1)
    calls = DirectCalls(worker)

    async def scenario() -> None:
        # No call: nothing busy.
        await asyncio.sleep(0)
        assert calls.busy() == 0.0

        # A call running from before one reading to after the next: the whole interval, exactly.
        go, running = gates("go-2", "running-2")
        call = send(calls, held, "go-2", "running-2")
        await started(running)
        calls.busy()
        await asyncio.sleep(0.01)
        assert calls.busy() == 1.0
        await asyncio.sleep(0)
        assert calls.busy() == 1.0

        # It ends during the next interval: a share of it, at least what it ran after the reading.
        before = time.monotonic()
        calls.busy()
        after_reading = time.monotonic()
        opened = time.monotonic()
        go.set()
        assert (await call)["ok"]
        ended = time.monotonic()
        await asyncio.sleep(0.01)
        before_reading = time.monotonic()
        share = calls.busy()
        after = time.monotonic()
        # In the call from the reading (between before and after_reading) to its end (between opened
        # and ended), over the interval from that reading to this one (before_reading to after).
        assert (opened - after_reading) / (after - before) <= share < 1.0
        assert share <= (ended - before) / (before_reading - after_reading)

        # Finished calls are counted once: the next interval is idle again.
        assert calls.busy() == 0.0

        # A call that starts and ends between two readings counts for its duration only.
        go, running = gates("go-3", "running-3")
        go.set()
        calls.busy()
        sent = time.monotonic()
        assert (await send(calls, held, "go-3", "running-3"))["ok"]
        done = time.monotonic()
        await asyncio.sleep(0.01)
        last = time.monotonic()
        share = calls.busy()
        assert 0.0 < share <= (done - sent) / (last - sent) <= 1.0

    try:
        asyncio.run(scenario())
    finally:
        for gate in GATES.values():
            gate.set()
        worker.executors["default"].shutdown()


@pytest.mark.parametrize("threads", [1, 2])
def test_busy_counts_threads_not_calls_waiting_for_one(threads: int) -> None:
    """The API sends up to CALLS_PER_THREAD calls per thread: the ones waiting in the pool for a thread
    keep no thread busy. BUSY is threads busy (demand() divides it by threads per worker), so it never
    exceeds the worker's threads."""
    worker = fake_worker(threads)
    calls = DirectCalls(worker)

    async def scenario() -> tuple[float, float]:
        names = [f"go-4-{threads}-{i}" for i in range(CALLS_PER_THREAD * threads)]
        opened = gates(*names, *(f"running-{name}" for name in names))
        pending = [send(calls, held, name, f"running-{name}") for name in names]
        for event in opened[len(names):len(names) + threads]:  # the first `threads` calls hold every thread
            await started(event)
        calls.busy()
        await asyncio.sleep(0.05)
        full = calls.busy()  # every thread held the whole interval, more calls waiting
        for gate in opened:
            gate.set()
        await asyncio.gather(*pending)
        return full, calls.busy()

    try:
        full, after = asyncio.run(scenario())
    finally:
        for gate in GATES.values():
            gate.set()
        worker.executors["default"].shutdown()
    print(f"{threads} thread(s), {CALLS_PER_THREAD * threads} calls in flight: busy {full:.2f}, then {after:.2f}")
    assert full == pytest.approx(threads), f"{threads} threads busy, {full:.2f} reported"
    assert 0.0 < after <= threads
