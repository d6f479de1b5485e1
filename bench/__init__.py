"""Benchmarks: each module prints its figures; bench/RESULTS.md records them."""
