"""bench.timing, the one timing helper of the benchmarks: variants interleaved in rotating order, compared
per round, a busy moment in one round does not move the figure."""

from __future__ import annotations

import pytest

from bench import timing


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def test_rounds_rotate_and_warm_up_off_the_clock(monkeypatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(timing, "time", clock)
    calls: list[str] = []
    seen: list[tuple[str, object]] = []

    def variant(name: str, cost: float):
        def run() -> str:
            calls.append(name)
            clock.now += cost
            return name.upper()

        return run

    t = timing.interleave(
        {"a": variant("a", 2.0), "b": variant("b", 1.0), "c": variant("c", 4.0)},
        rounds=4,
        after=lambda name, result: seen.append((name, result)),
    )
    assert calls == ["a", "b", "c", "a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert seen[:3] == [("a", "A"), ("b", "B"), ("c", "C")]  # after: only the timed calls
    assert t.seconds == {"a": [2.0] * 4, "b": [1.0] * 4, "c": [4.0] * 4}
    assert t.rounds == 4 and t.ratio("c", "b") == timing.Spread(4.0, 4.0, 4.0, 4, 4.0, 4.0)
    assert t.ratio("a", "b", scale=10).median == 20.0


def test_a_busy_moment_in_one_round_does_not_flip_the_ratio() -> None:
    # fused 1.10 s, clm 1.00 s a step; a busy 3 s lands on fused's step in round 1 and on clm's in round 3
    t = timing.Timings({"fused": [1.1, 4.1, 1.1, 1.1, 1.1], "clm": [1.0, 1.0, 1.0, 4.0, 1.0]})
    r = t.ratio("fused", "clm")
    assert r.median == pytest.approx(1.1) and r.n == 5
    assert (r.min, r.max) == (pytest.approx(1.1 / 4.0), pytest.approx(4.1))
    assert r.fmt("x") == "1.10x (IQR 1.10x-1.10x, 5 rounds)"
    assert timing.spread([3.0]).fmt(" s") == "3.00 s (1 round: no spread)"
    with pytest.raises(ValueError):
        timing.spread([])


def test_the_verdict_is_the_one_the_spread_supports() -> None:
    tight = timing.spread([1.08, 1.09, 1.10, 1.11, 1.12])
    assert tight.against(1.15) == "meets the goal"
    assert tight.against(1.05) == "MISSES the goal"
    assert timing.spread([0.9, 1.0, 1.1, 1.4, 1.5]).against(1.15).startswith("undecided")
    assert timing.spread([150.0, 190.0, 200.0]).against(100, higher_is_better=True) == "meets the goal"
    assert timing.spread([50.0, 90.0, 95.0]).against(100, higher_is_better=True) == "MISSES the goal"
