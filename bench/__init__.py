"""Benchmarks of nformer_kernels: the nformer-bench CLI (bench.cli), dense baselines
(bench.baselines), analytic FLOPs (bench.analytic) and pytest-benchmark suites (test_bench_*.py)."""
