"""When the operator's passes run (scheduling.Scheduler, real threads): serialised and coalesced per run, a
wake-up for a retry due before the next resync, and the resync thread over the known runs. The pass itself is
a recording function here; the real pass is exercised against the API server in test_operator_*.py."""

from __future__ import annotations

import logging
import threading
import time

from fusionrun_operator.scheduling import Scheduler

log = logging.getLogger("test")


class Passes:
    """A pass that records (namespace, name) and can be held mid-pass."""

    def __init__(self, requeue: list[float | None] | None = None) -> None:
        self.calls: list[tuple[str, str]] = []
        self.requeue = list(requeue or [])
        self.entered, self.release = threading.Event(), threading.Event()
        self.release.set()
        self.lock = threading.Lock()

    def __call__(self, namespace: str, name: str, logger: logging.Logger) -> float | None:
        with self.lock:
            self.calls.append((namespace, name))
        self.entered.set()
        assert self.release.wait(10)
        return self.requeue.pop(0) if self.requeue else None


def wait_for(cond, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_events_during_a_pass_make_it_run_once_more() -> None:
    passes = Passes()
    sched = Scheduler(passes, resync_seconds=30, log=log)
    passes.release.clear()
    first = threading.Thread(target=sched.reconcile_run, args=("ns", "a"))
    first.start()
    assert passes.entered.wait(10)
    # three events for the same run while its pass is under way: no second pass in parallel
    assert [sched.reconcile_run("ns", "a") for _ in range(3)] == [None, None, None]
    assert passes.calls == [("ns", "a")]
    # another run is not blocked by it
    other = threading.Thread(target=sched.reconcile_run, args=("ns", "b"))
    other.start()
    wait_for(lambda: len(passes.calls) == 2)
    passes.release.set()
    first.join(10)
    other.join(10)
    assert sorted(passes.calls) == [("ns", "a"), ("ns", "a"), ("ns", "b")]  # a: one more pass, not three


def test_a_retry_due_before_the_next_resync_wakes_the_run() -> None:
    passes = Passes(requeue=[0.1, None])
    sched = Scheduler(passes, resync_seconds=30, log=log)
    t0 = time.monotonic()
    assert sched.reconcile_run("ns", "a") == 0.1
    wait_for(lambda: len(passes.calls) == 2)
    assert time.monotonic() - t0 >= 0.3  # the delay plus the timer's 0.2 s margin
    # a retry due after the next resync needs no timer: the resync comes first
    late = Passes(requeue=[31.0])
    Scheduler(late, resync_seconds=30, log=log).reconcile_run("ns", "a")
    time.sleep(0.5)
    assert late.calls == [("ns", "a")]


def test_resync_walks_the_known_runs_and_survives_a_broken_one() -> None:
    seen: list[str] = []

    def run_pass(namespace: str, name: str, logger: logging.Logger) -> None:
        seen.append(name)
        if name == "broken":
            raise RuntimeError("API down")

    sched = Scheduler(run_pass, resync_seconds=0.05, log=log)
    for name in ("broken", "ok", "gone"):
        sched.track("ns", name, deleted=False)
    sched.track("ns", "gone", deleted=True)
    sched.start_resync()
    try:
        wait_for(lambda: seen.count("ok") >= 2)
    finally:
        sched.stop_resync()
    assert "gone" not in seen and seen.count("broken") >= 2
    n = len(seen)
    time.sleep(0.2)
    assert len(seen) <= n + 2  # stopped (at most the walk under way finishes)
