"""Benchmarks of nformer_kernels: the `nformer-bench` CLI (nformer_bench.cli), dense baselines
(nformer_bench.baselines), analytic FLOPs and bytes (nformer_bench.analytic), Triton launch-config
tuning (nformer_bench.tune) and the GPU validation run (nformer_bench.check)."""

RESULT_MARK = "NFORMER_BENCH_RESULT "  # prefixes a worker process's JSON result lines on stdout
