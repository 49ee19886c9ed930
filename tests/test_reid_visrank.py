"""Ranked-list pictures (nformer_reid.visualize) on a small synthetic Market-1501 image set:
files and names, picture geometry, border colours and thumbnails read back from the pixels,
the same-pid same-camera drop, and the argument errors."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nformer_reid.data.datasets import Market1501
from nformer_reid.data.synthetic import make_synthetic_market
from nformer_reid.metrics import compute_distance_matrix
from nformer_reid.utils.errors import ReIDInputError
from nformer_reid.visualize import (EMPTY_CELL, MATCH_COLOR, NON_MATCH_COLOR, QUERY_COLOR, DEFAULT_MAX_QUERIES,
                                    MAX_LABEL_WIDTH, rank_gallery, ranked_file_name, ranked_file_names,
                                    ranked_list_layout, select_queries,
                                    visualize_ranked_features, visualize_ranked_results)

SMALL = (32, 16)  # thumbnails of most tests: small pictures, fast to write


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    """4 test ids x 3 cameras: 8 query images, 24 gallery images + 2 distractors (pid 0)."""
    root = make_synthetic_market(str(tmp_path_factory.mktemp("visrank") / "market"), num_train_ids=1,
                                 num_test_ids=4, num_cams=3, images_per_cam=2, num_distractors=2, num_junk=1)
    return Market1501(root, verbose=False)


def random_dist(market, seed=0):
    return np.random.default_rng(seed).random((len(market.query), len(market.gallery)))


def pixels(path):
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def thumbnail(path, size):
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB").resize((size[1], size[0]), Image.BILINEAR))


def border_pixels(arr, box, border):
    """All pixels of the frame of a cell (left, top, right, bottom), as an (n, 3) array."""
    left, top, right, bottom = box
    cell = arr[top:bottom, left:right]
    mask = np.ones(cell.shape[:2], dtype=bool)
    mask[border:-border, border:-border] = False
    return cell[mask]


def inner(arr, box, border):
    left, top, right, bottom = box
    return arr[top + border:bottom - border, left + border:right - border]


def order_for(market, q_idx, wanted):
    """A distance row putting gallery indices `wanted` first (in that order), the rest after."""
    row = np.arange(len(market.gallery), dtype=np.float64) + len(wanted) + 1
    for rank, g in enumerate(wanted):
        row[g] = rank
    return row


def test_one_file_per_query_named_by_index_and_pid(market, tmp_path):
    out = tmp_path / "ranked"
    dists = {"backbone": random_dist(market, 0), "NFormer (official)": random_dist(market, 1)}
    paths = visualize_ranked_results(dists, market.query, market.gallery, str(out), topk=4, max_queries=None,
                                     size=SMALL)
    assert len(paths) == len(market.query)
    expected = [str(out / ranked_file_name(i, pid, cam)) for i, (_, pid, cam) in enumerate(market.query)]
    assert paths == expected
    assert sorted(os.listdir(out)) == sorted(os.path.basename(p) for p in paths)  # no temporary files left
    _, pid, cam = market.query[3]
    assert os.path.basename(paths[3]) == f"query00003_pid{pid}_cam{cam}.jpg"
    for path in paths:
        with Image.open(path) as img:
            assert img.format == "JPEG"
    # A second run replaces the pictures (atomically) and leaves nothing else behind.
    again = visualize_ranked_results(dists, market.query, market.gallery, str(out), topk=4, max_queries=None,
                                     size=SMALL)
    assert again == paths and sorted(os.listdir(out)) == sorted(os.path.basename(p) for p in paths)


def test_default_query_selection_is_spread_evenly():
    chosen = select_queries(3368)
    assert len(chosen) == DEFAULT_MAX_QUERIES == 100
    assert chosen[0] == 0 and chosen[-1] == 3367
    assert all(b > a for a, b in zip(chosen, chosen[1:]))
    steps = np.diff(chosen)
    assert steps.max() - steps.min() <= 1  # evenly spread, not the first 100
    assert select_queries(7) == list(range(7))
    assert select_queries(7, None) == list(range(7))
    assert select_queries(7, 1) == [0]
    assert select_queries(7, 3) == [0, 3, 6]
    assert select_queries(0) == []


def test_max_queries_and_query_indices_choose_the_pictures(market, tmp_path):
    dists = {"m": random_dist(market)}
    paths = visualize_ranked_results(dists, market.query, market.gallery, str(tmp_path / "a"), topk=2,
                                     max_queries=3, size=SMALL)
    wanted = select_queries(len(market.query), 3)
    assert [os.path.basename(p) for p in paths] == [ranked_file_name(i, *market.query[i][1:]) for i in wanted]
    paths = visualize_ranked_results(dists, market.query, market.gallery, str(tmp_path / "b"), topk=2,
                                     query_indices=[5, 1], size=SMALL)
    assert [os.path.basename(p) for p in paths] == [ranked_file_name(i, *market.query[i][1:]) for i in (5, 1)]
    assert ranked_file_names(market.query, query_indices=[5, 1]) == [os.path.basename(p) for p in paths]
    assert ranked_file_names(market.query, 3, image_format="png") == [
        ranked_file_name(i, *market.query[i][1:], "png") for i in wanted]
    assert len(ranked_file_names(market.query, None)) == len(market.query)


def test_picture_size_follows_rows_and_columns_of_thumbnails(market, tmp_path):
    names = ["backbone", "NFormer (official)"]
    sizes = {}
    for rows in (1, 2):
        for topk in (3, 5):
            for size in ((128, 64), SMALL):
                dists = {name: random_dist(market, k) for k, name in enumerate(names[:rows])}
                (path,) = visualize_ranked_results(dists, market.query, market.gallery,
                                                   str(tmp_path / f"{rows}{topk}{size[0]}"), topk=topk,
                                                   query_indices=[0], size=size, image_format="png")
                with Image.open(path) as img:
                    sizes[rows, topk, size] = img.size
                assert img.size == ranked_list_layout(names[:rows], topk, size).size
    layout = ranked_list_layout(names, 5)
    cell_w, cell_h = 64 + 2 * layout.border, 128 + 2 * layout.border
    # Two more ranks: two more framed thumbnails and gaps; one more method: one more row.
    assert sizes[2, 5, (128, 64)][0] - sizes[2, 3, (128, 64)][0] == 2 * (cell_w + layout.gap)
    assert sizes[2, 5, (128, 64)][1] - sizes[1, 5, (128, 64)][1] == cell_h + layout.text_height + layout.gap
    # Thumbnails twice as large: 6 columns x 32 px wider, 2 rows x 64 px taller.
    assert sizes[2, 5, (128, 64)][0] - sizes[2, 5, SMALL][0] == 6 * (64 - 16)
    assert sizes[2, 5, (128, 64)][1] - sizes[2, 5, SMALL][1] == 2 * (128 - 32)
    assert layout.label_width >= 8 and layout.size[0] > (5 + 1) * cell_w
    # A very long method name is cut: the label column never exceeds its cap.
    long_name = "NFormer (official) + k-reciprocal re-ranking, k1 20, k2 6, lambda 0.3" * 3
    (path,) = visualize_ranked_results({long_name: random_dist(market)}, market.query, market.gallery,
                                       str(tmp_path / "long"), topk=2, query_indices=[0], size=SMALL)
    long_layout = ranked_list_layout([long_name], 2, SMALL)
    assert long_layout.label_width <= MAX_LABEL_WIDTH + 8
    with Image.open(path) as img:
        assert img.size == long_layout.size


def matches_and_others(market, q_idx):
    _, q_pid, q_cam = market.query[q_idx]
    match = [g for g, (_, p, c) in enumerate(market.gallery) if p == q_pid and c != q_cam]
    same_cam = [g for g, (_, p, c) in enumerate(market.gallery) if p == q_pid and c == q_cam]
    other = [g for g, (_, p, _) in enumerate(market.gallery) if p not in (q_pid, 0)]
    distractor = [g for g, (_, p, _) in enumerate(market.gallery) if p == 0]
    return match, same_cam, other, distractor


@pytest.mark.parametrize("image_format", ["png", "jpg"])
def test_borders_green_for_matches_red_otherwise_and_thumbnails_in_rank_order(market, tmp_path, image_format):
    q_idx = 2
    match, _, other, distractor = matches_and_others(market, q_idx)
    assert match and other and distractor
    first = [match[0], other[0], distractor[0], match[1]]
    second = [other[1], match[1], match[0], distractor[1]]
    dists = {"before": np.stack([order_for(market, q, first) for q in range(len(market.query))]),
             "after": torch.tensor(np.stack([order_for(market, q, second) for q in range(len(market.query))]))}
    (path,) = visualize_ranked_results(dists, market.query, market.gallery, str(tmp_path), topk=4,
                                       query_indices=[q_idx], size=SMALL, image_format=image_format)
    arr = pixels(path).astype(int)
    layout = ranked_list_layout(list(dists), 4, SMALL)
    assert arr.shape[:2] == layout.size[::-1]
    tol = 0 if image_format == "png" else 24  # JPEG: a few levels off on average
    for row, order in enumerate((first, second)):
        q_box = layout.cell_box(row, 0)
        assert np.abs(border_pixels(arr, q_box, layout.border) - QUERY_COLOR).mean() <= tol / 3
        expected_query = thumbnail(market.query[q_idx][0], SMALL)
        assert np.abs(inner(arr, q_box, layout.border) - expected_query).mean() <= tol / 4
        for rank, g in enumerate(order, 1):
            box = layout.cell_box(row, rank)
            colour = MATCH_COLOR if g in match else NON_MATCH_COLOR
            frame = border_pixels(arr, box, layout.border)
            if image_format == "png":
                assert (frame == colour).all(), (row, rank, g)
            else:  # JPEG rings a little where frame meets photo: nearer its colour than any other frame colour
                assert np.abs(frame - colour).mean() <= 8, (row, rank, g)
                near = {c: np.abs(frame - c).sum(1) for c in (MATCH_COLOR, NON_MATCH_COLOR, QUERY_COLOR)}
                assert all((near[colour] < near[c]).all() for c in near if c != colour), (row, rank, g)
            picture = inner(arr, box, layout.border)
            assert np.abs(picture - thumbnail(market.gallery[g][0], SMALL)).mean() <= tol / 4, (row, rank)
            if image_format == "png":  # the exact thumbnail, not just a similar one
                others = [h for h in range(len(market.gallery)) if h != g]
                assert all(not np.array_equal(picture, thumbnail(market.gallery[h][0], SMALL)) for h in others[:5])


def test_same_pid_same_camera_gallery_items_are_skipped(market, tmp_path):
    q_idx = 0
    match, same_cam, other, _ = matches_and_others(market, q_idx)
    assert same_cam  # the synthetic set has the query's camera in its gallery
    order = same_cam + [other[0], match[0]]  # the dropped items nearest of all
    dists = {"m": np.stack([order_for(market, q, order) for q in range(len(market.query))])}
    (path,) = visualize_ranked_results(dists, market.query, market.gallery, str(tmp_path), topk=2,
                                       query_indices=[q_idx], size=SMALL, image_format="png")
    arr = pixels(path).astype(int)
    layout = ranked_list_layout(["m"], 2, SMALL)
    for rank, (g, colour) in enumerate(((other[0], NON_MATCH_COLOR), (match[0], MATCH_COLOR)), 1):
        box = layout.cell_box(0, rank)
        assert np.array_equal(inner(arr, box, layout.border), thumbnail(market.gallery[g][0], SMALL))
        assert (border_pixels(arr, box, layout.border) == colour).all()

    _, q_pid, q_cam = market.query[q_idx]
    g_pids = np.array([p for _, p, _ in market.gallery])
    g_cams = np.array([c for _, _, c in market.gallery])
    top, is_match = rank_gallery(dists["m"][q_idx], q_pid, q_cam, g_pids, g_cams, len(market.gallery))
    assert len(top) == len(market.gallery) - len(same_cam)
    assert not set(top.tolist()) & set(same_cam)
    assert list(top[:2]) == [other[0], match[0]] and list(is_match[:2]) == [False, True]
    assert sorted(top[is_match].tolist()) == sorted(match)


def test_ties_rank_by_gallery_index_and_every_pid_is_an_ordinary_id():
    g_pids = np.array([5, 0, 5, 7, 5, 0])
    g_cams = np.array([1, 0, 2, 1, 1, 2])
    top, is_match = rank_gallery(np.zeros(6), 5, 1, g_pids, g_cams, 10)
    assert top.tolist() == [1, 2, 3, 5] and is_match.tolist() == [False, True, False, False]
    top, is_match = rank_gallery(np.zeros(6), 0, 0, g_pids, g_cams, 3)  # pid 0 too: same camera dropped
    assert top.tolist() == [0, 2, 3] and not is_match.any()
    top, is_match = rank_gallery(np.array([3.0, 2.0, 1.0, 0.0, 5.0, 4.0]), 0, 0, g_pids, g_cams, 10)
    assert top.tolist() == [3, 2, 0, 5, 4] and is_match.tolist() == [False, False, False, True, False]


def test_fewer_gallery_items_than_ranks_leave_empty_cells(market, tmp_path):
    q_path, q_pid, q_cam = market.query[0]
    match, same_cam, other, _ = matches_and_others(market, 0)
    gallery = [market.gallery[g] for g in (same_cam[0], match[0], other[0])]
    (path,) = visualize_ranked_results({"m": np.array([[0.0, 1.0, 2.0]])}, [market.query[0]], gallery,
                                       str(tmp_path), topk=3, size=SMALL, image_format="png")
    arr = pixels(path).astype(int)
    layout = ranked_list_layout(["m"], 3, SMALL)
    assert arr.shape[:2] == layout.size[::-1]
    left, top, right, bottom = layout.cell_box(0, 3)
    assert (arr[top:bottom, left:right] == EMPTY_CELL).all()  # one of three items was dropped
    assert (border_pixels(arr, layout.cell_box(0, 1), layout.border) == MATCH_COLOR).all()
    assert (border_pixels(arr, layout.cell_box(0, 2), layout.border) == NON_MATCH_COLOR).all()
    # topk beyond the gallery: as many columns as gallery items.
    (wide,) = visualize_ranked_results({"m": np.array([[0.0, 1.0, 2.0]])}, [market.query[0]], gallery,
                                       str(tmp_path / "wide"), topk=50, size=SMALL, image_format="png")
    assert pixels(wide).shape[:2] == layout.size[::-1]


def test_numpy_and_torch_distances_and_features_give_the_same_pictures(market, tmp_path):
    gen = torch.Generator().manual_seed(0)
    qf = torch.randn(len(market.query), 8, generator=gen)
    gf = torch.randn(len(market.gallery), 8, generator=gen)
    dist = compute_distance_matrix(qf, gf, "euclidean", normalize=True)  # the evaluation's distance
    outs = {}
    for kind, value in (("numpy", dist.numpy()), ("torch", dist), ("float64", dist.double()),
                        ("transposed", dist.T.contiguous().T)):
        paths = visualize_ranked_results({"m": value}, market.query, market.gallery, str(tmp_path / kind), topk=3,
                                         max_queries=4, size=SMALL, image_format="png")
        outs[kind] = [Path(p).read_bytes() for p in paths]
    paths = visualize_ranked_features({"m": (qf, gf)}, market.query, market.gallery, str(tmp_path / "features"),
                                      topk=3, max_queries=4, size=SMALL, image_format="png")
    outs["features"] = [Path(p).read_bytes() for p in paths]
    assert all(v == outs["numpy"] for v in outs.values())
    shuffled = visualize_ranked_results({"m": dist.flip(1)}, market.query, market.gallery, str(tmp_path / "flip"),
                                        topk=3, max_queries=4, size=SMALL, image_format="png")
    assert [Path(p).read_bytes() for p in shuffled] != outs["numpy"]  # the pictures depend on the distances


def test_bad_arguments_name_the_argument(market, tmp_path):
    q, g = market.query, market.gallery
    d = random_dist(market)
    out = str(tmp_path / "out")

    def call(distmats=None, query=q, gallery=g, **kwargs):
        return visualize_ranked_results({"m": d} if distmats is None else distmats, query, gallery, out, **kwargs)

    with pytest.raises(ValueError, match=r"distmats\['m'\] must be \(len\(query\), len\(gallery\)\)"):
        call({"m": d[:, :-1]})
    with pytest.raises(ValueError, match=r"distmats\['m'\] must be"):
        call(query=q[:-1])
    with pytest.raises(ValueError, match=r"distmats\['m'\] contains NaN or Inf \(row 3\)"):
        with_nan = d.copy()
        with_nan[3, 5] = np.nan
        call({"m": with_nan}, query_indices=[0, 3])
    with pytest.raises(ValueError, match=r"distmats\['m'\] contains NaN or Inf \(row 2\)"):
        call({"m": torch.tensor(d).index_fill(0, torch.tensor([2]), float("inf"))})
    with pytest.raises(TypeError, match="distmats must be a"):
        call(d)
    with pytest.raises(ValueError, match="distmats is empty"):
        call({})
    with pytest.raises(TypeError, match="distmats keys"):
        call({1: d})
    with pytest.raises(TypeError, match=r"distmats\['m'\] must hold real"):
        call({"m": d > 0.5})
    with pytest.raises(ValueError, match="topk must be >= 1"):
        call(topk=0)
    with pytest.raises(TypeError, match="topk must be an int"):
        call(topk=2.5)
    with pytest.raises(ValueError, match="max_queries must be >= 1"):
        call(max_queries=0)
    with pytest.raises(ValueError, match=r"query_indices\[1\] must be <="):
        call(query_indices=[0, len(q)])
    with pytest.raises(ValueError, match="query_indices must not repeat"):
        call(query_indices=[1, 1])
    with pytest.raises(ValueError, match="image_format"):
        call(image_format="gif")
    with pytest.raises(TypeError, match="size"):
        call(size=128)
    with pytest.raises(TypeError, match=r"query\[1\] must be an \(image path, pid, camid\)"):
        call(query=[q[0], ("x.jpg", 1)] + list(q[2:]))
    with pytest.raises(TypeError, match=r"gallery\[0\] pid must be an int"):
        call(gallery=[(g[0][0], "7", g[0][2])] + list(g[1:]))
    with pytest.raises(ValueError, match="query is empty"):
        visualize_ranked_results({"m": np.zeros((0, len(g)))}, [], g, out)
    with pytest.raises(TypeError, match=r"features\['m'\] must be a \(query features, gallery features\)"):
        visualize_ranked_features({"m": torch.zeros(len(q), 4)}, q, g, out)
    with pytest.raises(ValueError, match=r"features\['m'\] must be \(len\(query\), d\)"):
        visualize_ranked_features({"m": (torch.zeros(len(q) - 1, 4), torch.zeros(len(g), 4))}, q, g, out)
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    with pytest.raises(ReIDInputError, match="exists and is not a folder"):
        visualize_ranked_results({"m": d}, q, g, str(a_file))
    assert a_file.read_text() == "keep me"
    assert not os.path.exists(out)  # nothing was written by any failed call
    # Only the drawn rows are read: a NaN in another query's row does not stop the pictures.
    assert len(call({"m": with_nan}, query_indices=[0, 1], size=SMALL)) == 2


def test_missing_or_unreadable_images_name_the_file_before_anything_is_written(market, tmp_path):
    q, g = list(market.query), list(market.gallery)
    d = np.stack([order_for(market, i, [0, 1]) for i in range(len(q))])
    missing = str(tmp_path / "gone" / "0001_c1s1_000001_00.jpg")
    out = tmp_path / "out"
    with pytest.raises(ReIDInputError, match=rf"gallery\[1\] image {missing}: no such file"):
        visualize_ranked_results({"m": d}, q, [g[0], (missing, g[1][1], g[1][2])] + g[2:], str(out), topk=3,
                                 size=SMALL)
    assert not out.exists() or not os.listdir(out)  # checked before the first picture
    with pytest.raises(ReIDInputError, match=rf"query\[0\] image {missing}: no such file"):
        visualize_ranked_results({"m": d}, [(missing, q[0][1], q[0][2])] + q[1:], g, str(out), topk=3,
                                 size=SMALL)
    # A gallery image never in anyone's top 3 is not needed, so it may be missing.
    far = len(g) - 1
    paths = visualize_ranked_results({"m": d}, q, g[:far] + [(missing, g[far][1], g[far][2])], str(out), topk=3,
                                     max_queries=2, size=SMALL)
    assert len(paths) == 2
    broken = tmp_path / "0001_c1s1_000002_00.jpg"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(ReIDInputError, match=rf"gallery\[0\] image {broken}: not a readable image"):
        visualize_ranked_results({"m": d}, q, [(str(broken), g[0][1], g[0][2])] + g[1:], str(tmp_path / "o2"),
                                 topk=3, size=SMALL)
