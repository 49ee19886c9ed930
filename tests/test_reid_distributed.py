"""nformer_reid.distributed.evaluate_features_distributed against the single-process metrics.

Every world runs all cases once: a world of 1 in this process (without a process group, and as an
initialised gloo group of one), gloo worlds of 2 and 3 CPU processes (tests/distributed_helpers:
spawned, one thread each, killed on failure or after WORLD_TIMEOUT_S), and NCCL over 2 GPUs where
there are two. Each rank writes its (cmc, mAP, mINP) or its error per case; the tests compare
every rank's answer with evaluate_features and evaluate_rank(compute_distance_matrix(...)) on all
rows: equal, not close.
"""
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist

from nformer_kernels import distributed as nkd
from nformer_reid import metrics
from nformer_reid.distributed import evaluate_features_distributed
from tests.distributed_helpers import error_of, world_results

ID_NAMES = ("q_pids", "g_pids", "q_camids", "g_camids")


# ------------------------------------------------------------------ data, shared by ranks and tests
def _sizes(n, world, kind):
    """Contiguous shard sizes: "uneven", "empty_q" / "empty_g" (a rank without rows; not the same
    one) or "random<seed>" (a seeded random split, empty shards likely)."""
    if world == 1:
        return [n]
    if kind.startswith("random"):
        cuts = torch.randint(0, n + 1, (world - 1,), generator=torch.Generator().manual_seed(int(kind[6:]) + world))
        edges = [0, *sorted(cuts.tolist()), n]
        return [b - a for a, b in zip(edges, edges[1:])]
    if kind == "empty_q":
        return [0, n] if world == 2 else [n // 2, 0, n - n // 2]
    if kind == "empty_g":
        return [n, 0] if world == 2 else [0, n // 3, n - n // 3]
    if world == 2:
        return [n // 3, n - n // 3]
    return [n // 6, n // 2, n - n // 6 - n // 2]


def _clustered(nq=31, ng=70, d=12, seed=0, ids=(-7, 0, 3, 12, 40, 1001, 5000), cams=(0, 5, 9)):
    """Features near a centre per identity (a non-trivial ranking), non-contiguous and negative ids."""
    g = torch.Generator().manual_seed(seed)
    centres = 1.5 * torch.randn(len(ids), d, generator=g)
    q_slot, g_slot = torch.randint(0, len(ids), (nq,), generator=g), torch.randint(0, len(ids), (ng,), generator=g)
    ids_t, cams_t = torch.tensor(ids), torch.tensor(cams)
    return {"qf": centres[q_slot] + torch.randn(nq, d, generator=g),
            "gf": centres[g_slot] + torch.randn(ng, d, generator=g),
            "q_pids": ids_t[q_slot], "g_pids": ids_t[g_slot],
            "q_camids": cams_t[torch.randint(0, len(cams), (nq,), generator=g)],
            "g_camids": cams_t[torch.randint(0, len(cams), (ng,), generator=g)]}


def _tied():
    """Copies of 5 rows of -1/0/1 entries: exact ties between matches, drops and other entries."""
    g = torch.Generator().manual_seed(3)
    protos = torch.randint(-1, 2, (5, 6), generator=g).float()
    protos[4] = 0  # a zero row: cosine distance 1 to everything
    nq, ng = 29, 64
    return {"qf": protos[torch.randint(0, 5, (nq,), generator=g)],
            "gf": protos[torch.randint(0, 5, (ng,), generator=g)],
            "q_pids": torch.randint(0, 4, (nq,), generator=g) * 10,
            "g_pids": torch.randint(0, 4, (ng,), generator=g) * 10,
            "q_camids": torch.randint(1, 3, (nq,), generator=g), "g_camids": torch.randint(1, 3, (ng,), generator=g)}


def _zero_based_numpy():
    """numpy float64 features, 0-based contiguous pids and camids."""
    data = _clustered(nq=25, ng=53, d=7, seed=4, ids=tuple(range(6)), cams=(0, 1, 2))
    return {"qf": data["qf"].double().numpy(), "gf": data["gf"].double().numpy(),
            **{k: data[k].numpy() for k in ID_NAMES}}


def _skipped():
    """Queries without a valid match: the first 8 have a pid absent from the gallery, the next 3 a pid
    the gallery has in their own camera only; a gallery of 40 (below max_rank=50)."""
    data = _clustered(nq=31, ng=40, d=10, seed=5)
    data["q_pids"][:8] = 424242
    data["g_pids"][:3], data["g_camids"][:3] = 777, 5
    data["q_pids"][8:11], data["q_camids"][8:11] = 777, 5
    return data


def _no_valid_match():
    data = _clustered(nq=12, ng=30, d=5, seed=6)
    data["q_pids"][:] = 31337
    return data


def _overflowing():
    """One query row (the last: on the last rank) whose squared distances exceed float32."""
    data = _clustered(nq=12, ng=30, d=5, seed=7)
    data["qf"][-1] = 1e20
    return data


# name: (data(), query shards, gallery shards, keyword arguments)
CASES = {
    "euclidean": (_clustered, "uneven", "uneven", {}),
    "euclidean_mINP_small_tiles": (_clustered, "uneven", "uneven",
                                   {"return_mINP": True, "query_chunk": 4, "gallery_chunk": 5}),
    "cosine_mINP": (_clustered, "uneven", "uneven", {"metric": "cosine", "return_mINP": True}),
    "normalized_euclidean": (_clustered, "uneven", "uneven", {"normalize": True, "return_mINP": True, "max_rank": 5}),
    "ties": (_tied, "uneven", "uneven", {"return_mINP": True, "query_chunk": 3, "gallery_chunk": 7}),
    "ties_cosine": (_tied, "uneven", "uneven", {"metric": "cosine", "return_mINP": True}),
    "empty_query_shard": (_clustered, "empty_q", "uneven", {"return_mINP": True}),
    "empty_gallery_shard": (_clustered, "uneven", "empty_g", {"return_mINP": True}),
    "empty_shards_ties": (_tied, "empty_q", "empty_g", {"return_mINP": True}),
    "zero_based_ids_numpy_float64": (_zero_based_numpy, "uneven", "uneven", {"metric": "cosine"}),
    "skipped_queries_small_gallery": (_skipped, "uneven", "uneven", {"return_mINP": True}),
    "random_splits": (_clustered, "random1", "random2", {"return_mINP": True, "query_chunk": 5}),
    "random_splits_ties": (_tied, "random3", "random4", {"metric": "cosine", "gallery_chunk": 9}),
}


def _last(rank, world, good, bad):
    return bad if rank == world - 1 else good


def _call(data, rank, world, device, group, q_kind="uneven", g_kind="uneven", change=None, **kwargs):
    """evaluate_features_distributed on this rank's shards; change(args) edits the arguments first."""
    q_sizes, g_sizes = _sizes(len(data["qf"]), world, q_kind), _sizes(len(data["gf"]), world, g_kind)
    qs, gs = sum(q_sizes[:rank]), sum(g_sizes[:rank])

    def shard(x, start, size):
        x = x[start:start + size]
        if device.type == "cuda":  # NCCL takes CUDA tensors only
            x = torch.as_tensor(x)
        return x.to(device) if isinstance(x, torch.Tensor) else x
    args = {"qf_shard": shard(data["qf"], qs, q_sizes[rank]), "gf_shard": shard(data["gf"], gs, g_sizes[rank]),
            **{k: shard(data[k], qs if k[0] == "q" else gs, (q_sizes if k[0] == "q" else g_sizes)[rank])
               for k in ID_NAMES}, "group": group, **kwargs}
    if change is not None:
        change(args)
    return evaluate_features_distributed(**args)


def _set(**values):
    return lambda args: args.update(values)


# name: (run(rank, world, device, group), expected type, words of its message on the failing rank,
# whether the error is found on the last rank alone in worlds above 1)
ERRORS = {
    "metric_on_one_rank": (lambda r, w, dev, g: _call(_clustered(), r, w, dev, g,
                                                      metric=_last(r, w, "euclidean", "cityblock")),
                           "ValueError", "metric must be 'euclidean' or 'cosine', got 'cityblock'", True),
    "metrics_differ": (lambda r, w, dev, g: _call(_clustered(), r, w, dev, g,
                                                  metric=_last(r, w, "euclidean", "cosine")),
                       "ValueError", "metric must be the same on every rank", False),
    "feature_dims_differ": (lambda r, w, dev, g: _call(_clustered(), r, w, dev, g, change=_last(
        r, w, None, lambda a: a.update(qf_shard=a["qf_shard"][:, 1:], gf_shard=a["gf_shard"][:, 1:]))),
        "ValueError", "the feature dim (qf_shard.shape[1]) must be the same on every rank", False),
    "q_pids_short": (lambda r, w, dev, g: _call(_clustered(), r, w, dev, g, change=_last(
        r, w, None, lambda a: a.update(q_pids=a["q_pids"][1:]))), "ValueError", "q_pids has", True),
    "g_camids_float": (lambda r, w, dev, g: _call(_clustered(), r, w, dev, g, change=_last(
        r, w, None, lambda a: a.update(g_camids=a["g_camids"].float()))), "TypeError", "g_camids must hold integers",
        True),
    "max_rank_differs": (lambda r, w, dev, g: _call(_clustered(), r, w, dev, g, max_rank=_last(r, w, 50, 10)),
                         "ValueError", "max_rank must be the same on every rank", False),
    "query_chunk_zero": (lambda r, w, dev, g: _call(_clustered(), r, w, dev, g, query_chunk=_last(r, w, None, 0)),
                         "ValueError", "query_chunk must be >= 1", True),
    "no_rows_anywhere": (lambda r, w, dev, g: _call(_clustered(), r, w, dev, g, change=lambda a: a.update(
        qf_shard=a["qf_shard"][:0], q_pids=a["q_pids"][:0], q_camids=a["q_camids"][:0])),
        "ValueError", "non-empty", False),
    "no_valid_match": (lambda r, w, dev, g: _call(_no_valid_match(), r, w, dev, g), "ValueError",
                       metrics.NO_MATCH_MESSAGE, False),
    "overflow_on_one_rank": (lambda r, w, dev, g: _call(_overflowing(), r, w, dev, g), "ValueError",
                             "exceed the float32 range", True),
}
# the ranks' arguments disagree: no error in a world of 1
RANKS_DIFFER = ("metrics_differ", "feature_dims_differ", "max_rank_differs")


def run_cases(rank, world, device, group=None):
    """This rank's results: {case: (result, warning messages, traffic) | error: (type, message)}."""
    out = {}
    for name, (data, q_kind, g_kind, kwargs) in CASES.items():
        nkd.reset_traffic()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = _call(data(), rank, world, device, group, q_kind, g_kind, **kwargs)
        out[name] = (result, [str(w.message) for w in caught], nkd.traffic())
    for name, (run, _, _, _) in ERRORS.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out[name] = error_of(lambda: run(rank, world, device, group))
    if dist.is_initialized() and world > 1:  # a group of ranks 1.. (rank 0 outside it is refused by name)
        sub = dist.new_group(list(range(1, world)))
        out["subgroup"] = error_of(lambda: _call(_clustered(), rank, world, device, sub)) if rank == 0 else \
            _call(_clustered(), rank - 1, world - 1, device, sub, return_mINP=True)
    return out


WORLDS = ["single-process", "gloo-1", "gloo-2", "gloo-3", pytest.param("nccl-2", marks=pytest.mark.gpu)]


@pytest.fixture(scope="module", params=WORLDS)
def world(request, tmp_path_factory):
    """(world size, every rank's results) of one world."""
    return (*world_results(request.param, run_cases, tmp_path_factory), request.param)


# ------------------------------------------------------------------ the single-process answers
def _single(name):
    """(evaluate_features result, its warning messages) on all rows, and evaluate_rank's on the matrix."""
    data_fn, _, _, kwargs = CASES[name]
    data = data_fn()
    kwargs = {k: v for k, v in kwargs.items() if k not in ("query_chunk", "gallery_chunk")}
    ids = [data[k] for k in ID_NAMES]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        streamed = metrics.evaluate_features(data["qf"], data["gf"], *ids, device="cpu", **kwargs)
    distmat = metrics.compute_distance_matrix(data["qf"], data["gf"], kwargs.get("metric", "euclidean"),
                                              kwargs.get("normalize", False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ranked = metrics.evaluate_rank(distmat, *ids, max_rank=kwargs.get("max_rank", 50),
                                       return_mINP=kwargs.get("return_mINP", False), device="cpu")
    return streamed, [str(w.message) for w in caught], ranked


def _assert_equal(got, expected, what, exact=True):
    """Equal cmc, mAP and mINP; exact=False (CUDA) allows mAP/mINP one rounding apart: CUDA's
    index_add_ adds a query's AP terms in no fixed order (in evaluate_features too)."""
    assert len(got) == len(expected), what
    assert got[0].dtype == expected[0].dtype and np.array_equal(got[0], expected[0]), \
        f"{what}: cmc {got[0]} != {expected[0]}"
    if exact:
        assert list(got[1:]) == list(expected[1:]), f"{what}: mAP/mINP {got[1:]} != {expected[1:]}"
    else:
        assert np.allclose(got[1:], expected[1:], rtol=1e-14, atol=0), f"{what}: mAP/mINP {got[1:]} != {expected[1:]}"


def _without_caller(messages):
    """Warning texts without their "function: " prefix (the world of 1 is evaluate_features itself)."""
    return sorted(m.split(": ", 1)[1] for m in messages)


@pytest.mark.parametrize("name", list(CASES))
def test_every_rank_equals_the_single_process_metrics(world, name):
    _, results, kind = world
    streamed, expected_warnings, ranked = _single(name)
    _assert_equal(ranked, streamed, f"{name}: evaluate_rank vs evaluate_features")  # the reference agrees
    for rank, r in enumerate(results):
        got, messages, _ = r[name]
        _assert_equal(got, streamed, f"{name}, rank {rank}", exact=not kind.startswith("nccl"))
        assert _without_caller(messages) == _without_caller(expected_warnings), f"{name}, rank {rank}"


def test_the_cases_cover_what_they_claim():
    """Ties at matches, skipped queries and a cut CMC really occur in the data."""
    tied = _tied()
    distmat = metrics.compute_distance_matrix(tied["qf"], tied["gf"])
    assert (distmat == distmat[:, :1]).sum() > distmat.shape[0] * 5
    _, messages, _ = _single("skipped_queries_small_gallery")
    assert any("11 of 31 queries have no valid gallery match" in m for m in messages)
    assert any("quite small, got 40" in m for m in messages)
    assert len(_single("skipped_queries_small_gallery")[0][0]) == 40
    assert _sizes(31, 3, "uneven")[0] <= 8  # rank 0 of a world of 3 holds only queries without a match


@pytest.mark.parametrize("name", list(ERRORS))
def test_a_bad_argument_on_one_rank_raises_on_every_rank(world, name):
    size, results, _ = world
    _, kind, words, last_rank_alone = ERRORS[name]
    if size == 1 and name in RANKS_DIFFER:
        assert results[0][name] == ("no error", "")
        return
    for rank, r in enumerate(results):
        assert r[name][0] == kind and words in r[name][1], f"rank {rank}: {r[name]}"
    if last_rank_alone and size > 1:  # the others say where it was found
        assert all(r[name][1].startswith(f"on rank {size - 1}: ") for r in results[:-1]), results
        assert not results[-1][name][1].startswith("on rank")


def test_a_subgroup_evaluates_its_own_shards(world):
    """group= is honoured: ranks 1.. of the world shard the data among themselves (a group of 1 in
    a world of 2), rank 0 is refused by name."""
    size, results, kind = world
    if size == 1:
        pytest.skip("needs a second rank")
    assert results[0]["subgroup"] == ("ValueError", "group: this process is not a member of the group")
    data = _clustered()
    expected = metrics.evaluate_features(data["qf"], data["gf"], *[data[k] for k in ID_NAMES], return_mINP=True,
                                         device="cpu")
    for rank, r in enumerate(results[1:], start=1):
        _assert_equal(r["subgroup"], expected, f"rank {rank}", exact=not kind.startswith("nccl"))


def test_single_process_errors_match():
    """The errors a world of 1 reports are evaluate_features' own."""
    assert error_of(lambda: metrics.evaluate_features(*_no_valid_match().values())) == (
        "ValueError", metrics.NO_MATCH_MESSAGE)
    kind, message = error_of(lambda: metrics.evaluate_features(*_overflowing().values()))
    assert kind == "ValueError" and "exceed the float32 range" in message


def test_gallery_travels_the_ring_twice(world):
    """Each rank sends every gallery block but the next rank's, twice: (4 d + 16) bytes a row with
    the ids, then 4 d; it never receives its own. The scores take one all_reduce."""
    size, results, _ = world
    data = _clustered()
    d, num_q = data["qf"].shape[1], len(data["qf"])
    sizes, g_total = _sizes(len(data["gf"]), size, "uneven"), len(data["gf"])
    for rank, r in enumerate(results):
        traffic = r["euclidean"][2]
        if size == 1:
            assert not traffic["sent"] and not traffic["received"]
            continue
        per_row = (4 * d + 16) + 4 * d
        assert traffic["sent"]["ring"] == (g_total - sizes[(rank + 1) % size]) * per_row
        assert traffic["received"]["ring"] == (g_total - sizes[rank]) * per_row
        assert traffic["sent"]["scores"] == 2 * (size - 1) * (num_q + 50) * 8 // size
