"""Measuring the pipeline: run comparisons, benchmarks, the load test and a reference result."""
