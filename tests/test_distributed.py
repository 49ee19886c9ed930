"""nformer_kernels.distributed against the single-process ops and model.

Every world runs all cases once: a world of 1 in this process (without a process group, and as
an initialised gloo group of one), gloo worlds of 2 and 3 CPU processes (spawned, one thread
each, a free port, killed on failure or after WORLD_TIMEOUT_S), and NCCL over 2 GPUs where there
are two. Each rank writes its results to a file; the tests put the shards back together and
compare them with nk.knn / nk.reciprocal_mask / the NFormer on all rows.
"""
import argparse

import pytest
import torch
import torch.distributed as dist

import nformer_kernels as nk
from nformer_bench import cli
from nformer_bench import distributed as cost
from nformer_kernels import distributed as nkd
from tests.distributed_helpers import WORLD_TIMEOUT_S, error_of, world_results
from tests.helpers import assert_close, brute_knn, gapped_rows, randn, random_neighbours

DIM, DEPTH, HEADS, LANDMARKS, TOPK, FFN = 16, 2, 2, 3, 6, 32
IN_DIM = 48  # the features of the model with an input projection (IN_DIM -> DIM)


# ------------------------------------------------------------------ data, shared by ranks and tests
def _sizes(n, world, empty=False):
    """Uneven contiguous shards; empty=True leaves one rank without rows."""
    if world == 1:
        return [n]
    if empty:
        return [0, n] if world == 2 else [n // 2, 0, n - n // 2]
    if world == 2:
        return [n // 3, n - n // 3]
    return [n // 6, n // 2, n - n // 6 - n // 2]


def _features():
    return gapped_rows(1, 61, DIM, TOPK)[0]


def _near_duplicates():
    """Clusters of 15 rows 1e-6 apart: their order is decided below fp32 resolution."""
    g = torch.Generator().manual_seed(11)
    centres = torch.randn(6, DIM, generator=g)
    return centres.repeat_interleave(15, dim=0) + 1e-6 * torch.randn(90, DIM, generator=g)


def _small():
    return gapped_rows(1, 13, 8, 13)[0]


def _tied():
    """Rows with four entries of +-1/2 (unit norm, every product exact in any order), many of them
    copies, and zero rows: exact ties that every implementation scores alike."""
    g = torch.Generator().manual_seed(7)
    base = torch.zeros(9, DIM)
    for row in base[:8]:
        cols = torch.randperm(DIM, generator=g)[:4]
        row[cols] = (torch.randint(0, 2, (4,), generator=g) * 2 - 1) * 0.5
    return base[torch.randint(0, 9, (40,), generator=g)]


def _query_mask(n, seed=3):
    return torch.rand(n, generator=torch.Generator().manual_seed(seed)) < 0.3


def _model(source="input", in_dim=None):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nk.NFormer(dim=DIM, depth=DEPTH, num_heads=HEADS, num_landmarks=LANDMARKS, topk=TOPK, ffn_dim=FFN,
                           neighbor_source=source, inference_chunk_rows=8, in_dim=in_dim)
        with torch.no_grad():  # a BatchNorm head that does something
            model.bottleneck.running_mean.normal_()
            model.bottleneck.running_var.uniform_(0.5, 2.0)
            model.bottleneck.weight.uniform_(0.5, 2.0)
            if model.input_proj is not None:  # a projection with a shift, as after training
                model.input_proj.bias.normal_(0, 0.1)
    return model.eval()


def _projected_features():
    """(61, IN_DIM) rows that _model(in_dim=IN_DIM) projects onto gapped rows (one exact knn
    answer, 1e-4 apart: far above the projection's rounding), plus a component it discards."""
    proj = _model(in_dim=IN_DIM).input_proj
    w, b = proj.weight.detach().double(), proj.bias.detach().double()
    pinv = torch.linalg.pinv(w)
    noise = randn((61, IN_DIM), seed=9, dtype=torch.float64)
    x = (gapped_rows(1, 61, DIM, TOPK, gap=1e-4, dtype=torch.float64)[0] - b) @ pinv.T
    return (x + noise - noise @ (pinv @ w).T).float()


def _landmarks(n):
    g = torch.Generator().manual_seed(11)
    return torch.stack([torch.randperm(n, generator=g)[:LANDMARKS] for _ in range(DEPTH)])


def _generator():
    return torch.Generator().manual_seed(5)


def _shard(t, sizes, rank, device):
    start = sum(sizes[:rank])
    return t[start:start + sizes[rank]].to(device)


# name: (sizes(world), run(sh, device, group) -> this rank's result, expected() on all rows);
# sh(t) is this rank's shard of the rows of t, on its device.
CASES = {
    "knn": (lambda w: _sizes(61, w),
            lambda sh, dev, g: nkd.knn(sh(_features()), TOPK, g),
            lambda: nk.knn(_features(), TOPK)),
    "knn_k_above_shards": (lambda w: _sizes(13, w),
                           lambda sh, dev, g: nkd.knn(sh(_small()), 7, g),
                           lambda: nk.knn(_small(), 7)),
    "knn_k_is_n": (lambda w: _sizes(13, w),
                   lambda sh, dev, g: nkd.knn(sh(_small()), 13, g),
                   lambda: nk.knn(_small(), 13)),
    "knn_ties": (lambda w: _sizes(40, w),
                 lambda sh, dev, g: nkd.knn(sh(_tied()), 8, g),
                 lambda: nk.knn(_tied(), 8)),
    "knn_near_duplicates": (lambda w: _sizes(90, w),  # gaps far below fp32 rounding: the canonical score
                            lambda sh, dev, g: nkd.knn(sh(_near_duplicates()), 12, g),
                            lambda: nk.knn(_near_duplicates(), 12)),
    "knn_query_mask": (lambda w: _sizes(61, w),
                       lambda sh, dev, g: nkd.knn(sh(_features()), 5, g, query_mask=sh(_query_mask(61))),
                       lambda: nk.knn(_features(), 5, query_mask=_query_mask(61))),
    "knn_empty_shard": (lambda w: _sizes(61, w, empty=True),
                        lambda sh, dev, g: nkd.knn(sh(_features()), TOPK, g),
                        lambda: nk.knn(_features(), TOPK)),
    "reciprocal": (lambda w: _sizes(61, w),
                   lambda sh, dev, g: nkd.reciprocal_mask(sh(nk.knn(_features(), TOPK)), g),
                   lambda: nk.reciprocal_mask(nk.knn(_features(), TOPK))),
    "reciprocal_random": (lambda w: _sizes(40, w),
                          lambda sh, dev, g: nkd.reciprocal_mask(sh(random_neighbours(1, 40, 7)[0]), g),
                          lambda: nk.reciprocal_mask(random_neighbours(1, 40, 7)[0])),
    "reciprocal_empty_shard": (lambda w: _sizes(40, w, empty=True),
                               lambda sh, dev, g: nkd.reciprocal_mask(sh(random_neighbours(1, 40, 7)[0]), g),
                               lambda: nk.reciprocal_mask(random_neighbours(1, 40, 7)[0])),
    "nformer": (lambda w: _sizes(61, w),
                lambda sh, dev, g: nkd.nformer_forward(_model().to(dev), sh(_features()), _landmarks(61), group=g),
                lambda: _model()(_features(), landmarks=_landmarks(61))),
    "nformer_drawn_queries": (
        lambda w: _sizes(61, w),
        lambda sh, dev, g: nkd.nformer_forward(_model().to(dev), sh(_features()), generator=_generator(), group=g,
                                          query_mask=sh(_query_mask(61))),
        lambda: _model()(_features(), generator=_generator(), query_mask=_query_mask(61))),
    "nformer_projected": (
        lambda w: _sizes(61, w),
        lambda sh, dev, g: nkd.nformer_forward(_model(in_dim=IN_DIM).to(dev), sh(_projected_features()),
                                          generator=_generator(), group=g, query_mask=sh(_query_mask(61))),
        lambda: _model(in_dim=IN_DIM)(_projected_features(), generator=_generator(), query_mask=_query_mask(61))),
    "nformer_projected_empty_shard": (
        lambda w: _sizes(61, w, empty=True),
        lambda sh, dev, g: nkd.nformer_forward(_model("affinity", IN_DIM).to(dev), sh(_projected_features()),
                                          _landmarks(61), group=g),
        lambda: _model("affinity", IN_DIM)(_projected_features(), landmarks=_landmarks(61))),
    "nformer_affinity": (
        lambda w: _sizes(61, w),
        lambda sh, dev, g: nkd.nformer_forward(_model("affinity").to(dev), sh(_features()), generator=_generator(),
                                          group=g),
        lambda: _model("affinity")(_features(), generator=_generator())),
    "nformer_affinity_empty_shard": (
        lambda w: _sizes(61, w, empty=True),
        lambda sh, dev, g: nkd.nformer_forward(_model("affinity").to(dev), sh(_features()), _landmarks(61),
                                          group=g),
        lambda: _model("affinity")(_features(), landmarks=_landmarks(61))),
}
NFORMER_CASES = [name for name in CASES if name.startswith("nformer")]


def _last_rank_bad(rank, sizes, good, bad):
    return bad if rank == len(sizes) - 1 else good


# name: (run(sh, device, rank, sizes, group), raising on every rank, expected type, words of its message);
# RANKS_DIFFER: the ranks' arguments disagree (no error in a world of 1).
ERRORS = {
    "x_shard_not_2d": (lambda sh, dev, r, s, g: nkd.knn(_last_rank_bad(r, s, sh(_features()), sh(_features())[0]),
                                                   TOPK, g), "ValueError", "x_shard must be 2-D"),
    "x_shard_dims_differ": (lambda sh, dev, r, s, g: nkd.knn(
        _last_rank_bad(r, s, sh(_features()), sh(_features())[:, :8]), TOPK, g), "ValueError", "feature dim"),
    "x_shard_not_float": (lambda sh, dev, r, s, g: nkd.knn(sh(_features()).long(), TOPK, g), "TypeError", "x_shard"),
    "k_above_n": (lambda sh, dev, r, s, g: nkd.knn(sh(_features()), 62, g), "ValueError", "k must be in [1, N=61]"),
    "idx_out_of_range": (lambda sh, dev, r, s, g: nkd.reciprocal_mask(
        _last_rank_bad(r, s, sh(nk.knn(_features(), TOPK)), sh(nk.knn(_features(), TOPK)) + 61), g),
        "ValueError", "idx_shard has entries outside [0, 61)"),
    "landmarks_differ": (lambda sh, dev, r, s, g: nkd.nformer_forward(
        _model().to(dev), sh(_features()), _last_rank_bad(r, s, _landmarks(61), _landmarks(61).flip(0)),
        group=g), "ValueError", "landmarks must be the same on every rank"),
    "x_shard_not_in_dim": (lambda sh, dev, r, s, g: nkd.nformer_forward(
        _model(in_dim=IN_DIM).to(dev), sh(_features()), group=g), "ValueError",
        f"x_shard must be (n_local, {IN_DIM}) (the model's in_dim={IN_DIM}), got shape"),
    "model_not_nformer": (lambda sh, dev, r, s, g: nkd.nformer_forward(torch.nn.Linear(DIM, DIM), sh(_features()),
                                                                       group=g),
                          "TypeError", "model must be an nformer_kernels.NFormer"),
}


RANKS_DIFFER = ("x_shard_dims_differ", "landmarks_differ")


def run_cases(rank, world, device, group=None):
    """This rank's results: {case: tensor on the CPU | (error type, message)}, plus traffic counts."""
    out = {}
    for name, (sizes_of, run, _) in CASES.items():
        sizes = sizes_of(world)

        nkd.reset_traffic()
        out[name] = run(lambda t, sizes=sizes: _shard(t, sizes, rank, device), device, group).cpu()
        out[name + ":traffic"] = nkd.traffic()
    for name, (run, _, _) in ERRORS.items():
        sizes = _sizes(61, world)
        out[name] = error_of(lambda: run(lambda t: _shard(t, sizes, rank, device), device, rank, sizes, group))
    if dist.is_initialized() and world > 1:  # a process outside the group is refused by name
        sub = dist.new_group([0])
        out["not_a_member"] = error_of(lambda: nkd.knn(_features()[:5].to(device), 2, sub)) if rank else ("rank 0", "")
    return out


WORLDS = ["single-process", "gloo-1", "gloo-2", "gloo-3", pytest.param("nccl-2", marks=pytest.mark.gpu)]


@pytest.fixture(scope="module", params=WORLDS)
def world(request, tmp_path_factory):
    """(world size, every rank's results) of one world."""
    return world_results(request.param, run_cases, tmp_path_factory)


def _gathered(results, name):
    return torch.cat([r[name] for r in results])


@pytest.mark.parametrize("name", [name for name in CASES if name.startswith(("knn", "reciprocal"))])
def test_knn_and_reciprocal_equal_single_process(world, name):
    _, results = world
    assert torch.equal(_gathered(results, name), CASES[name][2]())


def test_knn_ties_by_smaller_index(world):
    _, results = world
    assert torch.equal(_gathered(results, "knn_ties"), brute_knn(_tied(), 8))


@pytest.mark.parametrize("name", NFORMER_CASES)
def test_nformer_forward_equals_model(world, name):
    _, results = world
    with torch.no_grad():
        expected = CASES[name][2]()
    assert_close(_gathered(results, name), expected, 1e-5, name)


@pytest.mark.parametrize("name", list(ERRORS))
def test_bad_arguments_raise_on_every_rank(world, name):
    size, results = world
    _, kind, words = ERRORS[name]
    if size == 1 and name in RANKS_DIFFER:
        assert results[0][name] == ("no error", "")
        return
    for rank, r in enumerate(results):
        assert r[name][0] == kind and words in r[name][1], f"rank {rank}: {r[name]}"
    if name == "x_shard_not_2d" and size > 1:  # found on the last rank alone: the others say where
        assert all(r[name][1].startswith(f"on rank {size - 1}: ") for r in results[:-1])


def test_a_process_outside_the_group_is_refused(world):
    size, results = world
    if size == 1:
        pytest.skip("needs a second rank")
    for r in results[1:]:
        assert r["not_a_member"] == ("ValueError", "group: this process is not a member of the group")


def _halo_rows(idx, sizes, rank):
    start, stop = sum(sizes[:rank]), sum(sizes[:rank + 1])
    ids = idx[start:stop].unique()
    return int(((ids < start) | (ids >= stop)).sum())


def test_traffic_matches_the_formulas(world):
    """The byte counts docs/distributed.md's cost model (nformer_bench.distributed) is checked
    against: the ring passes every block but the next rank's once, the plan asks for each halo row
    once, and each block fetches its R (H*l fp32) and v (dim fp32) rows."""
    size, results = world
    sizes, n = _sizes(61, size), 61
    idx = nk.knn(_features(), TOPK)
    for rank, r in enumerate(results):
        knn_traffic, nformer_traffic = r["knn:traffic"], r["nformer:traffic"]
        if size == 1:
            assert all(not t[way] for t in (knn_traffic, nformer_traffic) for way in ("sent", "received"))
            continue
        assert knn_traffic["sent"]["ring"] == cost.ring_bytes(n, sizes, rank, DIM, 4)
        assert knn_traffic["received"]["ring"] == (n - sizes[rank]) * DIM * 4
        assert nformer_traffic["sent"]["ring"] == knn_traffic["sent"]["ring"]
        halo = _halo_rows(idx, sizes, rank)
        assert cost.halo_rows(sizes, rank, nformer_traffic["sent"]["plan"]) == halo
        assert nformer_traffic["received"]["plan"] == (size - 1) * 8 + _served(idx, sizes, rank) * 8
        assert nformer_traffic["received"]["neighbours"] == halo * TOPK * 8
        assert nformer_traffic["received"]["halo"] == DEPTH * cost.halo_bytes(halo, HEADS, LANDMARKS, DIM, 4)
    for kind in ("ring", "plan", "neighbours", "halo", "landmarks"):
        sent = sum(r["nformer:traffic"]["sent"].get(kind, 0) for r in results)
        assert sent == sum(r["nformer:traffic"]["received"].get(kind, 0) for r in results), kind


def _served(idx, sizes, rank):
    """Rows of `rank` that the other ranks' neighbour lists name."""
    start, stop = sum(sizes[:rank]), sum(sizes[:rank + 1])
    total = 0
    for other in range(len(sizes)):
        if other != rank:
            ids = idx[sum(sizes[:other]):sum(sizes[:other + 1])].unique()
            total += int(((ids >= start) & (ids < stop)).sum())
    return total


def test_bench_plan_and_a_measured_world(capsys):
    """nformer-bench distributed: the 10M-row plan, and a gloo world of 2 whose byte counts agree
    with the cost model."""
    assert cli.main(["distributed", "--plan"]) == 0
    out = capsys.readouterr().out
    assert "8 GPUs, NVLink: n_local 1,250,000; knn 6.4e+15 FLOP/rank" in out
    assert "ring 10.08 GB/rank in 63 blocks of 0.160 GB" in out
    rows = cost.run(_bench_args(["--n", "300", "--procs", "2", "--ops", "nformer", "--depth", "1", "--d", "32",
                                 "--ffn", "64", "--timeout-s", str(WORLD_TIMEOUT_S)]))
    assert [row["status"] for row in rows] == ["ok"] and rows[0]["byte_check"] == "ok"
    assert [r["rows"] for r in rows[0]["ranks"]] == [150, 150]
    assert all(r["out_shape"] == [150, 32] and r["rss_peak_bytes"] > r["peak_bytes"] >= 0 and r["wall_s"] > 0
               for r in rows[0]["ranks"])


def _bench_args(argv):
    parser = argparse.ArgumentParser()
    cost.add_arguments(parser)
    return parser.parse_args(argv)
