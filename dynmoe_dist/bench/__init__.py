"""Benchmarks, runnable as `python -m dynmoe_dist.bench ...`."""
