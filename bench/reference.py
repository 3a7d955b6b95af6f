"""Straightforward pure-Python implementations written for comparison: the benchmark's baseline and the
tests' oracle.

`fusion.vocab` (MinED map) and `fusion.align` (DTW) are vectorised; these are the same algorithms, cell by
cell and candidate by candidate, with the same costs and tie-breaks. `bench.align` times them as the slow
baseline and asserts identical outputs; `tests/test_vocab.py` and `tests/test_align.py` use them as
independent oracles. One copy, so the baseline and the oracle cannot drift apart.

Tokens are `str` or `bytes` (both arguments the same type): edit distance compares elements, so latin-1
text and its bytes give the same answers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TypeVar

Text = TypeVar("Text", str, bytes)


def levenshtein(a: Text, b: Text) -> int:
    """Unit-cost edit distance by the plain two-row dynamic programme (no banding, no early exit)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def nearest(query: Text, texts: Sequence[Text], candidates: Sequence[int], exact: Mapping[Text, int]) -> int:
    """MinED for one source token: its exact match if any, else the first of `candidates` (in the order
    given, which is `fusion.vocab`'s tie order) at minimum distance; -1 when there are no candidates."""
    if query in exact:
        return exact[query]
    best, best_id = None, -1
    for c in candidates:
        d = levenshtein(query, texts[c])
        if best is None or d < best:
            best, best_id = d, c
    return best_id


def dtw(src: Sequence[Text], tgt: Sequence[Text]) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """DTW over token edit distances: the accumulated matrix D and the path from (0, 0) to (n-1, m-1).

    D[i][j] = cost(i, j) + min(D[i-1][j], D[i][j-1], D[i-1][j-1]). Backtracking from the end takes the
    smallest predecessor; ties prefer the diagonal, then i-1, then j-1 (as `fusion.align.dtw_backtrack`).
    """
    n, m = len(src), len(tgt)
    inf = float("inf")
    d = [[0] * m for _ in range(n)]
    for i in range(n):
        for j in range(m):
            prev = (
                0
                if i == j == 0
                else min(
                    d[i - 1][j] if i else inf, d[i][j - 1] if j else inf, d[i - 1][j - 1] if i and j else inf
                )
            )
            d[i][j] = levenshtein(src[i], tgt[j]) + prev
    i, j, path = n - 1, m - 1, [(n - 1, m - 1)]
    while i or j:
        # (value, rank): min() picks the smallest value, ties by rank: diagonal 0, up 1, left 2.
        options = [
            (d[i - 1][j - 1] if i and j else inf, 0),
            (d[i - 1][j] if i else inf, 1),
            (d[i][j - 1] if j else inf, 2),
        ]
        move = min(options)[1]
        i, j = (i - 1, j - 1) if move == 0 else (i - 1, j) if move == 1 else (i, j - 1)
        path.append((i, j))
    return d, path[::-1]
