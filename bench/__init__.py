"""Benchmark scripts; each prints its figures. Results are recorded in BENCHMARKS.md."""
