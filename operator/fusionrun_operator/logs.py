"""The operator's log: one handler (kopf's), every record redacted, library loggers that print signed
request headers kept quiet, and warnings about a run's problem written once per run and problem (again
only after RATE_LIMIT_SECONDS, or after the problem went away and came back).

Users see problems as conditions and events (policies.credentials); the log is for operators of the
operator, and must neither repeat the same warning every pass nor carry key material.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable

from jobs.credentials import redact

RATE_LIMIT_SECONDS = 600.0
# botocore logs signed request headers at DEBUG; urllib3 and the kubernetes client log request details.
QUIET_LIBRARIES = ("botocore", "boto3", "s3transfer", "urllib3", "kubernetes")


class RedactingFilter(logging.Filter):
    """Credential material out of every record (jobs.credentials.redact), tracebacks included."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
            record.exc_info, record.exc_text = None, None
        record.msg, record.args = redact(text), ()
        return True


def setup_logging(verbose: bool) -> None:
    """kopf's own root handler only (a second one would write every line twice), redacted."""
    import kopf

    kopf.configure(verbose=verbose, log_prefix=True)  # "[namespace/name] ..." on a run's lines
    root = logging.getLogger()
    for handler in root.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)


def describe_error(err: BaseException) -> str:
    """One stable line: an API error's status, reason and message without its response headers (they carry
    a Date, different every time); anything else by type and redacted text."""
    from kubernetes.client.exceptions import ApiException

    if isinstance(err, ApiException):
        try:
            import json

            message = json.loads(err.body).get("message", "")  # type: ignore[arg-type]
        except Exception:
            message = ""
        return f"{err.status} {err.reason}: {message}"[:500]
    return redact(f"{type(err).__name__}: {err}")[:500]


class RateLimited:
    """Warnings keyed by (run..., problem): the first is written, repeats within `every` seconds are not."""

    def __init__(
        self,
        log: logging.Logger,
        every: float = RATE_LIMIT_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log, self._every, self._clock = log, every, clock
        self._last: dict[Hashable, float] = {}
        self._lock = threading.Lock()

    def warning(self, key: tuple[Hashable, ...], message: str) -> bool:
        """Write `message` unless the same key was written less than `every` seconds ago; True if written."""
        now = self._clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self._every:
                return False
            self._last[key] = now
        self._log.warning(redact(message))
        return True

    def forget(self, prefix: tuple[Hashable, ...]) -> None:
        """Problems under `prefix` are over: the next one is written at once."""
        with self._lock:
            for key in [k for k in self._last if isinstance(k, tuple) and k[: len(prefix)] == prefix]:
                del self._last[key]
