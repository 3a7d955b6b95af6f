"""Benchmarks: each prints side-by-side comparisons (ratios) measured in one run."""
