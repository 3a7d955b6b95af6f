"""When passes run: one at a time per run (a lock per run), coalesced (an event that arrives while that run
is being reconciled makes the running pass go round once more instead of starting a second one), a wake-up
timer for a retry due before the next resync, and the resync thread that walks every known run each
resync interval (retries after backoff, training progress, deadlines).

No kopf.timer: kopf gives every object with a timer a finalizer, which would block deleting runs whenever
the operator is down; the only finalizer we want is the one for spec.deleteArtifacts.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Callable

from fusionrun_operator.logs import RateLimited, describe_error

RunKey = tuple[str, str]  # (namespace, name)
PassFn = Callable[[str, str, logging.Logger], "float | None"]  # one pass -> seconds until a retry is due


class Scheduler:
    def __init__(
        self,
        run_pass: PassFn,
        resync_seconds: float,
        log: logging.Logger,
        warnings: RateLimited | None = None,
    ):
        self._run_pass, self.resync_seconds, self._log = run_pass, resync_seconds, log
        self._warnings = warnings or RateLimited(log)  # a pass failing every resync is written once
        self._locks: dict[RunKey, threading.Lock] = {}
        self._pending: set[RunKey] = set()
        self._wakeups: dict[RunKey, threading.Timer] = {}
        self._known: set[RunKey] = set()
        self._meta = threading.Lock()  # guards the four collections above
        self._stop = threading.Event()

    def reconcile_run(self, namespace: str, name: str, logger: logging.Logger | None = None) -> float | None:
        """Reconcile one run now (or, if a pass for it is under way, make that pass repeat). Returns seconds
        until a retry is due, if any."""
        key = (namespace, name)
        with self._meta:
            lock = self._locks.setdefault(key, threading.Lock())
            if lock.locked():
                self._pending.add(key)
                return None
            lock.acquire()
        try:
            while True:
                requeue = self._run_pass(namespace, name, logger or self._log)
                with self._meta:
                    if key not in self._pending:
                        break
                    self._pending.discard(key)
        finally:
            lock.release()
        if requeue is not None and requeue < self.resync_seconds:
            self._wake_later(key, requeue)  # a retry due before the next resync: be on time for it
        return requeue

    def wake(self, namespace: str, name: str) -> None:
        """A pass of the run soon, in a thread of its own (another run released what it waits for)."""
        self._wake_later((namespace, name), 0.0)

    def _wake_later(self, key: RunKey, seconds: float) -> None:
        """One pending wake-up per run (a newer one replaces it), in this context (kopf.event needs it)."""
        ctx = contextvars.copy_context()
        timer = threading.Timer(seconds + 0.2, ctx.run, args=(self._wake, key))
        timer.daemon = True
        with self._meta:
            old = self._wakeups.pop(key, None)
            if old is not None:
                old.cancel()
            self._wakeups[key] = timer
        timer.start()

    def _wake(self, key: RunKey) -> None:
        try:
            self.reconcile_run(*key)
        except Exception as err:
            self._warnings.warning(
                (*key, "PassFailed"), f"retry pass of {key[0]}/{key[1]} failed: {describe_error(err)}"
            )

    def track(self, namespace: str, name: str, deleted: bool) -> None:
        """Keep the set of runs the resync thread walks."""
        with self._meta:
            if deleted:
                self._known.discard((namespace, name))
            else:
                self._known.add((namespace, name))

    def start_resync(self) -> None:
        # Run in a copy of the caller's context (kopf's startup handler): kopf.event() needs its queue.
        ctx = contextvars.copy_context()
        self._stop.clear()
        thread = threading.Thread(
            target=ctx.run, args=(self._resync_loop,), name="fusionrun-resync", daemon=True
        )
        thread.start()

    def stop_resync(self) -> None:
        self._stop.set()

    def _resync_loop(self) -> None:
        while not self._stop.wait(self.resync_seconds):
            with self._meta:
                runs = sorted(self._known)
            for namespace, name in runs:
                try:
                    self.reconcile_run(namespace, name)
                except Exception as err:  # one broken run must not stop the others' resync
                    self._warnings.warning(
                        (namespace, name, "PassFailed"),
                        f"resync of {namespace}/{name} failed: {describe_error(err)}",
                    )
