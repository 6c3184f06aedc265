"""Runnable benchmarks that print markdown tables: run each from the repo root as `python -m benchmarks.NAME`."""
