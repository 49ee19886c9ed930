"""nformer-bench tune (python/nformer_bench/tune.py), the Triton tuning harness, on tiny CPU inputs
under the Triton interpreter: every configuration runs, is timed and matches the launcher's choice."""
import json

import pytest

import nformer_kernels as nk


@pytest.fixture(autouse=True)
def triton_on_cpu():
    if "triton" not in nk.available_backends("cpu"):
        from nformer_kernels import triton as nf_triton
        pytest.skip("the triton backend does not run CPU tensors here ("
                    + (nf_triton.reason or "TRITON_INTERPRET=1 was not set before triton was imported") + ")")


@pytest.mark.parametrize("kernel", ["knn", "attention"])
def test_bench_tune_harness(tmp_path, kernel):
    from nformer_bench import tune

    path = tune.main(["--kernel", kernel, "--n", "40", "--d", "16", "--k", "5", "--dtype", "float32",
                      "--max-configs", "3", "--repeats", "1", "--out", str(tmp_path)])
    rows = json.loads(path.with_suffix(".json").read_text())["rows"]
    assert len(rows) == 3, kernel
    assert all(r["error"] is None and r["ms"] > 0 for r in rows), rows
    assert all(r["match"] >= 0.95 for r in rows), rows  # same result as the launcher's choice
    assert len({(r["variant"]) for r in rows}) == 3
    assert "| variant |" in path.with_suffix(".md").read_text()
