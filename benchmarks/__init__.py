"""Benchmarks that start their own mesh and write their figures into docs/benchmarks.md."""
