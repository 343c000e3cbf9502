"""Reproducible benchmarks: ``python -m benchmarks.run [--only SUITE]`` writes benchmarks/results/."""
