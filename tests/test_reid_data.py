"""Dataset parsers on generated folder trees (right and wrong layouts), synthetic data, sampler."""
import logging
import os

import numpy as np
import pytest
import torch

from nformer_reid.data import (CUHK03, MSMT17, DatasetLayoutError, DukeMTMCreID, FeatureSet, Market1501,
                               build_dataset, load_features, load_query_gallery, make_feature_benchmark,
                               make_synthetic_market, save_features, save_query_gallery)
from nformer_reid.data.loader import RandomIdentitySampler, build_transforms


def touch(folder, *names):
    os.makedirs(folder, exist_ok=True)
    for name in names:
        open(os.path.join(folder, name), "wb").close()


def market_tree(root):
    touch(os.path.join(root, "bounding_box_train"), "0002_c1s1_000451_03.jpg", "0002_c2s1_000551_01.jpg",
          "0007_c3s3_064069_01.jpg", "Thumbs.db")
    touch(os.path.join(root, "query"), "0001_c1s1_001051_00.jpg", "0003_c2s1_000100_00.jpg")
    touch(os.path.join(root, "bounding_box_test"), "0001_c2s1_000301_01.jpg", "0003_c5s1_000100_02.jpg",
          "0000_c6s1_000001_01.jpg", "-1_c1s1_000401_03.jpg", "-1_c3s1_000501_01.jpg")


def test_market_parser_drops_junk_keeps_distractors_relabels_train(tmp_path, capsys, caplog):
    root = tmp_path / "Market-1501-v15.09.15"
    market_tree(str(root))
    with caplog.at_level(logging.INFO, logger="nformer_reid"):
        ds = Market1501(str(tmp_path))  # found in its standard subfolder
    assert sorted(p for _, p, _ in ds.train) == [0, 0, 1]  # 2 -> 0, 7 -> 1
    assert {(os.path.basename(f), p, c) for f, p, c in ds.query} == {
        ("0001_c1s1_001051_00.jpg", 1, 0), ("0003_c2s1_000100_00.jpg", 3, 1)}
    gallery = sorted((p, c) for _, p, c in ds.gallery)
    assert gallery == [(0, 5), (1, 1), (3, 4)]  # junk (-1) dropped, distractor (0) kept, camids 0-based
    assert ds.num_train_pids == 2
    out = caplog.text  # the statistics are logged (a library call prints nothing)
    assert "subset   | # ids | # images | # cameras" in out and "train    |     2 |        3 |         3" in out
    assert capsys.readouterr().out == ""


def test_market_wrong_layout_names_expected_folders(tmp_path):
    touch(str(tmp_path / "images"), "0001_c1s1_001051_00.jpg")
    with pytest.raises(DatasetLayoutError, match="bounding_box_train.*\n.*query.*\n.*bounding_box_test"):
        Market1501(str(tmp_path))


def test_market_bad_file_name_and_empty_folder(tmp_path):
    market_tree(str(tmp_path))
    touch(str(tmp_path / "query"), "person.jpg")
    with pytest.raises(DatasetLayoutError, match="person.jpg"):
        Market1501(str(tmp_path), verbose=False)
    for name in os.listdir(tmp_path / "query"):
        os.remove(tmp_path / "query" / name)
    with pytest.raises(DatasetLayoutError, match="no images"):
        Market1501(str(tmp_path), verbose=False)


def test_market_camera_out_of_range(tmp_path):
    market_tree(str(tmp_path))
    touch(str(tmp_path / "query"), "0001_c9s1_001051_00.jpg")
    with pytest.raises(DatasetLayoutError, match="camera 9"):
        Market1501(str(tmp_path), verbose=False)


def test_duke_parser(tmp_path):
    root = tmp_path / "DukeMTMC-reID"
    touch(str(root / "bounding_box_train"), "0005_c2_f0046985.jpg", "0008_c8_f0044087.jpg")
    touch(str(root / "query"), "0005_c2_f0046985.jpg")
    touch(str(root / "bounding_box_test"), "0005_c7_f0046985.jpg", "0009_c8_f0044087.jpg")
    ds = build_dataset("DukeMTMC-reID", str(tmp_path), verbose=False)
    assert isinstance(ds, DukeMTMCreID)
    assert sorted((p, c) for _, p, c in ds.gallery) == [(5, 6), (9, 7)]


def msmt_tree(root, version="MSMT17_V1", train="train", test="test"):
    base = os.path.join(root, version)
    touch(os.path.join(base, train, "0000"), "0000_000_01_0303morning_0015_0.jpg")
    touch(os.path.join(base, train, "0001"), "0001_000_05_0303noon_0020_1.jpg")
    touch(os.path.join(base, test, "0000"), "0000_000_03_0303morning_0001_0.jpg", "0000_001_12_0303noon_0002_0.jpg")
    lists = {"train": "0000/0000_000_01_0303morning_0015_0.jpg 0\n",
             "val": "0001/0001_000_05_0303noon_0020_1.jpg 1\n",
             "query": "0000/0000_000_03_0303morning_0001_0.jpg 0\n",
             "gallery": "0000/0000_001_12_0303noon_0002_0.jpg 0\n"}
    for split, text in lists.items():
        with open(os.path.join(base, f"list_{split}.txt"), "w") as fh:
            fh.write(text)
    return base


@pytest.mark.parametrize("version,train,test", [("MSMT17_V1", "train", "test"),
                                                ("MSMT17_V2", "mask_train_v2", "mask_test_v2")])
def test_msmt17_lists_keep_train_and_test_ids_apart(tmp_path, version, train, test):
    msmt_tree(str(tmp_path), version, train, test)
    ds = MSMT17(str(tmp_path), verbose=False)
    assert sorted((p, c) for _, p, c in ds.train) == [(0, 0), (1, 4)]  # train + val, relabelled
    # test pid 0 is a real identity, kept as the list gives it (evaluate_rank has no special ids)
    assert [(p, c) for _, p, c in ds.query] == [(0, 2)]
    assert [(p, c) for _, p, c in ds.gallery] == [(0, 11)]
    assert ds.query[0][0].endswith(os.path.join(test, "0000", "0000_000_03_0303morning_0001_0.jpg"))


def test_msmt17_missing_list_and_bad_line(tmp_path):
    base = msmt_tree(str(tmp_path))
    os.remove(os.path.join(base, "list_val.txt"))
    with pytest.raises(DatasetLayoutError, match="list_val.txt"):
        MSMT17(str(tmp_path), verbose=False)
    with open(os.path.join(base, "list_val.txt"), "w") as fh:
        fh.write("garbage\n")
    with pytest.raises(DatasetLayoutError, match="list_val.txt:1"):
        MSMT17(str(tmp_path), verbose=False)
    with pytest.raises(DatasetLayoutError, match="MSMT17_V1/list_"):
        MSMT17(str(tmp_path / "nowhere"), verbose=False)


def cuhk03_tree(root, subset):
    from scipy.io import savemat

    names = ["1_001_1_01.png", "1_001_2_06.png", "1_002_1_01.png", "1_002_2_07.png",
             "2_010_1_01.png", "2_010_2_08.png", "2_011_1_02.png", "2_011_2_09.png"]
    labels = np.array([1, 1, 2, 2, 10, 10, 11, 11])
    touch(os.path.join(root, f"images_{subset}"), *names)
    filelist = np.empty((len(names), 1), dtype=object)
    for i, n in enumerate(names):
        filelist[i, 0] = np.array([n])
    savemat(os.path.join(root, f"cuhk03_new_protocol_config_{subset}.mat"),
            {"filelist": filelist, "labels": labels[:, None], "train_idx": np.array([[1], [2], [3], [4]]),
             "query_idx": np.array([[5], [7]]), "gallery_idx": np.array([[6], [8]])})


@pytest.mark.parametrize("subset", ["labeled", "detected"])
def test_cuhk03_new_protocol(tmp_path, subset):
    cuhk03_tree(str(tmp_path / "cuhk03"), subset)
    ds = build_dataset(f"cuhk03_{subset}", str(tmp_path), verbose=False)
    assert isinstance(ds, CUHK03) and ds.name == f"CUHK03-{subset}"
    assert sorted((p, c) for _, p, c in ds.train) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [(os.path.basename(f), p, c) for f, p, c in ds.query] == [("2_010_1_01.png", 10, 0),
                                                                     ("2_011_1_02.png", 11, 0)]
    assert [(p, c) for _, p, c in ds.gallery] == [(10, 1), (11, 1)]
    assert all(f.startswith(str(tmp_path / "cuhk03" / f"images_{subset}")) for f, _, _ in ds.gallery)


def test_cuhk03_wrong_layout(tmp_path):
    cuhk03_tree(str(tmp_path), "labeled")
    with pytest.raises(DatasetLayoutError, match="images_detected"):
        CUHK03(str(tmp_path), subset="detected")
    os.remove(tmp_path / "images_labeled" / "2_010_2_08.png")
    with pytest.raises(DatasetLayoutError, match="2_010_2_08.png"):
        CUHK03(str(tmp_path), subset="labeled", verbose=False)
    with pytest.raises(ValueError, match="subset"):
        CUHK03(str(tmp_path), subset="both")


def test_build_dataset_unknown_name(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'viper'"):
        build_dataset("viper", str(tmp_path))


def test_synthetic_market_layout_parses(tmp_path):
    root = make_synthetic_market(str(tmp_path / "syn"), num_train_ids=4, num_test_ids=3, num_cams=3,
                                 images_per_cam=2, num_distractors=2, num_junk=2, size=(32, 16))
    ds = Market1501(root, verbose=False)
    assert ds.num_train_pids == 4 and len(ds.train) == 4 * 3 * 2
    assert len(ds.query) == 3 * 2
    assert sum(p == 0 for _, p, _ in ds.gallery) == 2 and all(p != -1 for _, p, _ in ds.gallery)
    from PIL import Image

    assert Image.open(ds.query[0][0]).size == (16, 32)
    mtime = os.path.getmtime(ds.query[0][0])
    make_synthetic_market(root, num_train_ids=4, num_test_ids=3, num_cams=3, images_per_cam=2, num_distractors=2,
                          num_junk=2, size=(32, 16))  # same arguments: kept as is
    assert os.path.getmtime(ds.query[0][0]) == mtime


def test_feature_benchmark_structure():
    b = make_feature_benchmark(num_train_ids=20, num_test_ids=10, num_cams=4, images_per_cam=2, cams_per_id=3,
                               dim=32, num_distractors=5, seed=1)
    assert b.train.feats.shape == (20 * 3 * 2, 32) and set(b.train.pids.tolist()) == set(range(20))
    assert b.query.feats.shape[0] == 10 * 2 and int(b.query.pids.min()) >= 1
    assert int((b.gallery.pids == 0).sum()) == 5
    assert torch.allclose(b.gallery.feats.norm(dim=1), torch.ones(b.gallery.feats.shape[0]), atol=1e-5)
    q_views = set(zip(b.query.pids.tolist(), b.query.camids.tolist()))
    assert len(q_views) == b.query.feats.shape[0]  # one query per (identity, camera)
    again = make_feature_benchmark(num_train_ids=20, num_test_ids=10, num_cams=4, images_per_cam=2, cams_per_id=3,
                                   dim=32, num_distractors=5, seed=1)
    assert torch.equal(again.gallery.feats, b.gallery.feats)



@pytest.mark.parametrize("suffix", [".pt", ".npz"])
def test_feature_benchmark_sets_reload_from_feature_files(tmp_path, suffix):
    """The synthetic sets are checked FeatureSets (float32 features, int64 labels) that the feature
    files give back unchanged: one set per file, and query + gallery in the torchreid layout."""
    b = make_feature_benchmark(num_train_ids=6, num_test_ids=4, num_cams=3, images_per_cam=2, cams_per_id=2, dim=8,
                               num_distractors=3, seed=2)
    for fs in (b.train, b.query, b.gallery):
        assert isinstance(fs, FeatureSet) and fs.labelled
        assert fs.feats.dtype == torch.float32 and fs.pids.dtype == fs.camids.dtype == torch.int64
    path = save_features(str(tmp_path / f"train{suffix}"), b.train)
    train = load_features(path, "--train")
    assert torch.equal(train.feats, b.train.feats) and torch.equal(train.pids, b.train.pids)
    query, gallery = load_query_gallery(save_query_gallery(str(tmp_path / f"test{suffix}"), b.query, b.gallery))
    for got, want in ((query, b.query), (gallery, b.gallery)):
        assert torch.equal(got.feats, want.feats) and torch.equal(got.pids, want.pids)
        assert torch.equal(got.camids, want.camids)

def test_pk_sampler_batches():
    items = [(f"{i}.jpg", pid, 0) for i, pid in enumerate([0] * 5 + [1] * 2 + [2] * 4 + [3] * 6)]
    sampler = RandomIdentitySampler(items, batch_size=4, num_instances=2, seed=0)
    order = list(sampler)
    assert len(order) % 4 == 0 and len(order) > 0
    for b in range(0, len(order), 4):
        pids = [items[i][1] for i in order[b:b + 4]]
        assert len(set(pids)) == 2 and all(pids.count(p) == 2 for p in set(pids))
    with pytest.raises(ValueError, match="multiple"):
        RandomIdentitySampler(items, batch_size=5, num_instances=2)


def test_transforms_shapes():
    from PIL import Image

    img = Image.fromarray(np.zeros((50, 20, 3), dtype=np.uint8))
    assert build_transforms((32, 16), True)(img).shape == (3, 32, 16)
    assert build_transforms((32, 16), False)(img).shape == (3, 32, 16)
