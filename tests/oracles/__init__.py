"""Test oracles and catalogues: references the package does not ship (the host dispatcher, the Python-loop
solver, a trace counter, the bad-input catalogue, the record fuzzer).

Imported as `oracles.X` by the tests (pytest puts tests/ on sys.path) and as `tests.oracles.X` by the
benchmarks (run as `python -m benchmarks.NAME` from the repo root); inside the package imports are relative,
so either name works.
"""
