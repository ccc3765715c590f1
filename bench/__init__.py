"""Benchmarks, run as modules from the repository root (`python -m bench.core`); see bench/README.md."""
