"""One writer across the runs this operator reconciles ("extract once, fuse many", jobs.cache): an
in-process, thread-safe registry of claims (passes of different runs run in different threads).

A claim is the shared cache area plus a task's key by spec-level references (store_view.read_shared): two
runs whose task has the same references and inputs make the same output, whether or not a Job has yet
recorded what the references are. Before reconcile, a pass claims every ready task that the shared cache
cannot serve; the first run to claim makes the output, and another run's task with the same claim waits
(policies.memoize). After the pass (`settle`), a run keeps the claims of its Running tasks and lets go of
the others (a task that succeeded, failed, lost its Job, or did not start after all); the runs waiting for
a released claim are woken (their next pass adopts the entry, or claims it to make it themselves). A claim
not refreshed by its run's passes for `ttl` seconds (its run is no longer reconciled) is stale: taken over.
Across operators, or after a restart, the Jobs' own store lease (jobs.cache.try_lease) is what keeps one
writer; store_view reads it too.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Container
from dataclasses import dataclass

RunKey = tuple[str, str]  # (namespace, name)
CLAIM_TTL_SECONDS = 900.0  # well above the resync interval: a live run refreshes its claims every pass


@dataclass(frozen=True)
class Claim:
    run: RunKey
    task_id: str
    refreshed: float

    def describe(self, namespace: str) -> str:
        """The producer as a waiting task's message names it (the namespace only when another one)."""
        ns, name = self.run
        return f"run {name if ns == namespace else f'{ns}/{name}'} (task {self.task_id})"


class Claims:
    def __init__(self, ttl: float = CLAIM_TTL_SECONDS, clock: Callable[[], float] = time.time):
        self.ttl, self._clock = ttl, clock
        self._lock = threading.Lock()
        self._claims: dict[str, Claim] = {}
        self._waiters: dict[str, set[RunKey]] = {}  # claim -> runs with a task waiting for it
        self._released: dict[str, tuple[float, RunKey]] = {}  # claim -> when and by whom it was released

    def take(self, claim: str, run: RunKey, task_id: str) -> Claim | None:
        """Claim for (run, task): None when it is theirs now, else the live claim of another task (the run
        is noted as waiting for it and woken when it goes)."""
        with self._lock:
            now = self._clock()
            held = self._claims.get(claim)
            if held is None or (held.run, held.task_id) == (run, task_id) or now - held.refreshed > self.ttl:
                self._claims[claim] = Claim(run, task_id, now)
                return None
            self._waiters.setdefault(claim, set()).add(run)
            return held

    def settle(self, run: RunKey, keep: Container[str]) -> set[RunKey]:
        """After a pass of `run`: refresh its claims whose task is in `keep` (Running), release the others.
        Returns the runs waiting for what was released (to wake)."""
        with self._lock:
            now = self._clock()
            gone = [c for c, held in self._claims.items() if held.run == run and held.task_id not in keep]
            for c, held in self._claims.items():
                if held.run == run and held.task_id in keep:
                    self._claims[c] = Claim(run, held.task_id, now)
            self._released = {c: (t, r) for c, (t, r) in self._released.items() if now - t <= self.ttl}
            return self._release(gone, now) - {run}

    def release_run(self, run: RunKey) -> set[RunKey]:
        """The run is gone: all its claims go. Returns the runs to wake."""
        with self._lock:
            gone = [c for c, held in self._claims.items() if held.run == run]
            return self._release(gone, self._clock()) - {run}

    def _release(self, claims: list[str], now: float) -> set[RunKey]:
        wake: set[RunKey] = set()
        for c in claims:
            self._released[c] = (now, self._claims.pop(c).run)
            wake |= self._waiters.pop(c, set())
        return wake

    def recheck(self, run: RunKey) -> Callable[[str, float], bool]:
        """For store_view: whether `run`'s miss remembered at `since` must be looked up again, because
        another run claims it now (it may be done soon) or released a claim of it since (it may be done).
        Its own claims, taken and let go by its passes (a task that did not start), change nothing."""

        def again(claim: str, since: float) -> bool:
            with self._lock:
                held = self._claims.get(claim)
                when, by = self._released.get(claim, (-1.0, run))
                return (held is not None and held.run != run) or (by != run and when >= since)

        return again

    def held(self) -> dict[str, Claim]:
        with self._lock:
            return dict(self._claims)
