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


@pytest.mark.parametrize("kernel", ["knn", "attention"])
def test_tune_grids_put_the_expected_winners_first(kernel):
    """A short run (--max-configs 8) measures the launcher's choice, then the configurations expected
    to gain most: Q-resident and 128-row knn tiles; wide-value-slice attention programs."""
    import torch

    from nformer_bench import tune
    from nformer_kernels.triton import knn, sparse_attention

    if kernel == "knn":
        base = knn.choose_variant(torch.bfloat16, 20, d=256, capability=(8, 6))
        grids = [{**tune.KNN_GRID, "Q_RESIDENT": (False,)}, {**tune.KNN_GRID_RESIDENT, "BLOCK_D": (256,)}]
        order = tune.knn_gain_order
    else:
        base = sparse_attention.choose_variants(torch.bfloat16, 20)[0]
        grids, order = [tune.ATTENTION_GRID], tune.attention_gain_order
    grid = tune._grid_variants(base, grids, 0, order)
    assert grid[0] == base and base not in grid[1:] and len({v.label for v in grid}) == len(grid)
    keys = [order(v) for v in grid[1:]]
    assert keys == sorted(keys)
    first = grid[1:8]
    if kernel == "knn":
        assert all(v.constexprs["Q_RESIDENT"] for v in first)
        assert first[0].constexprs["BLOCK_M"] == first[0].constexprs["BLOCK_N"] == 128
        assert not grid[-1].constexprs["Q_RESIDENT"] and grid[-1].constexprs["BLOCK_M"] == 64
    else:
        assert all(v.constexprs["DV_BLOCK"] == max(tune.ATTENTION_GRID["DV_BLOCK"]) for v in first)
    assert tune._grid_variants(base, grids, 8, order) == grid[:8]


def test_cuda_knn_tiles_without_a_gpu_are_one_row_saying_why():
    """`--kernel cuda-knn` times the cuda backend's WMMA row tiles (launcher's choice, 128, 64); where
    that backend cannot run, one row with the reason, so the GPU check's other grids still run."""
    import torch

    from nformer_bench import tune

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: the tiles are timed, not refused")
    rows = list(tune.tune_cuda_knn(256, 16, 5, torch.float16, torch.device("cuda"), 1, 0))
    assert len(rows) == 1 and rows[0]["ms"] is None and rows[0]["error"].startswith("not run: ")
    assert tune.CUDA_KNN_ROWS[0] == "auto" and set(tune.CUDA_KNN_ROWS[1:]) == {"64", "128"}
