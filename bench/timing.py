"""Timings that one busy moment cannot flip, shared by every timing benchmark.

On a shared machine a variant timed in a block of its own can catch a busy second the other never sees
(bench.train_step once printed fused / CLM = 3.09x in one run and 1.10x in the next). So:

- `interleave` runs the variants round by round, each once per round, back to back, starting each round
  with the next variant (a, b, c / b, c, a / c, a, b ...), after untimed warm-up calls;
- `Timings.ratio` compares two variants per round (a_i / b_i, the two measured seconds apart) and reports
  the median over rounds of those ratios with its spread (the quartiles of the per-round ratios): a busy
  moment inflates the ratio of the one round it falls into, which the median ignores, and a wide spread
  says the machine was too busy for the figure to mean much;
- `spread` summarizes samples of one kind (the operator's latencies) the same way;
- `Spread.against(goal)` gives the verdict the spread supports: met or missed only when the whole
  interquartile range is on one side of the goal, else undecided.

    timings = interleave({"clm": clm_step, "fused": fused_step}, rounds=11)
    print(f"fused / clm: {timings.ratio('fused', 'clm').fmt('x')}")   # 1.09x (IQR 1.06-1.12, 11 rounds)
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Spread:
    """The median of some values and their first and third quartiles (both the median when n < 2)."""

    median: float
    q1: float
    q3: float
    n: int
    min: float
    max: float

    def fmt(self, unit: str = "", digits: int = 2, what: str = "rounds") -> str:
        def f(x: float) -> str:
            return f"{x:.{digits}f}{unit}"

        if self.n < 2:
            return f"{f(self.median)} (1 {what.rstrip('s')}: no spread)"
        return f"{f(self.median)} (IQR {f(self.q1)}-{f(self.q3)}, {self.n} {what})"

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)

    def against(self, goal: float, higher_is_better: bool = False) -> str:
        """The verdict on a goal that the spread supports: met or missed when the whole interquartile range
        is on one side of it, else undecided (the machine was too busy to tell; rerun when it is quieter)."""
        if higher_is_better:
            met, missed = self.q1 >= goal, self.q3 < goal
        else:
            met, missed = self.q3 <= goal, self.q1 > goal
        if met:
            return "meets the goal"
        if missed:
            return "MISSES the goal"
        return "undecided: the spread straddles the goal (a busy machine; rerun when it is quieter)"


def spread(values: Iterable[float]) -> Spread:
    xs = sorted(values)
    if not xs:
        raise ValueError("no values")
    if len(xs) < 2:
        return Spread(xs[0], xs[0], xs[0], 1, xs[0], xs[0])
    q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return Spread(statistics.median(xs), q1, q3, len(xs), xs[0], xs[-1])


@dataclass
class Timings:
    """Seconds per variant, one per round (index i of every list: the same round)."""

    seconds: dict[str, list[float]]

    @property
    def rounds(self) -> int:
        return min((len(v) for v in self.seconds.values()), default=0)

    def median(self, name: str) -> float:
        return statistics.median(self.seconds[name])

    def summary(self, name: str) -> Spread:
        return spread(self.seconds[name])

    def per_round(self, a: str, b: str, scale: float = 1.0) -> list[float]:
        """a's seconds times `scale` over b's seconds, round by round."""
        return [x * scale / y for x, y in zip(self.seconds[a], self.seconds[b], strict=True)]

    def ratio(self, a: str, b: str, scale: float = 1.0) -> Spread:
        """The median over rounds of a_i * scale / b_i, with the quartiles of those per-round ratios (scale:
        e.g. an extrapolation factor when a ran on a subset of b's work)."""
        return spread(self.per_round(a, b, scale))

    def as_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "rounds": self.rounds}


def interleave(
    variants: Mapping[str, Callable[[], Any]],
    rounds: int,
    warmup: int = 1,
    sync: Callable[[], None] | None = None,
    after: Callable[[str, Any], None] | None = None,
) -> Timings:
    """Time each variant once per round, rounds after `warmup` untimed calls of each, in an order that
    rotates by one variant every round. sync: called before the clock starts and before it stops (e.g.
    torch.cuda.synchronize); after(name, result): called after each timed call, off the clock (cleanup,
    checks of the result)."""
    if rounds < 1:
        raise ValueError("rounds must be >= 1")
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    seconds: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            if sync:
                sync()
            t0 = time.perf_counter()
            result = variants[name]()
            if sync:
                sync()
            seconds[name].append(time.perf_counter() - t0)
            if after:
                after(name, result)
    return Timings(seconds)


def machine_load() -> str:
    """The 1-minute load average against the CPUs, to print beside figures measured on a shared machine."""
    try:
        load = f"{os.getloadavg()[0]:.1f}"
    except OSError:
        load = "?"
    return f"load average {load} on {os.cpu_count()} CPUs"
