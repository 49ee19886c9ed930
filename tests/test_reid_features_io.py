"""Feature files as torchreid / fast-reid users have them: every format (.pt, .pth, .npz, .npy,
a bare tensor), every key alias, numpy ids inside torch files, the combined query + gallery layout,
unlabelled sets, extra keys, hostile pickles, bad layouts, and exact save -> load round trips."""
import io
import logging
import os
import pickle
import stat
import tempfile
import zipfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from nformer_reid.data import (FeatureSet, count_feature_rows, load_feature_rows, load_features, load_query_gallery,
                               save_features, save_query_gallery)
from nformer_reid.data.features import ALIASES, QUERY_GALLERY_ALIASES
from nformer_reid.utils import ReIDInputError
from tests.helpers import RunsACommand

LOGGER = "nformer_reid.data.features"


def sample(n=6, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, 50, (n,), generator=g), torch.randint(0, 6, (n,),
                                                                                                   generator=g)


def same_bits(a, b):
    return a.dtype == b.dtype == torch.float32 and torch.equal(a.view(torch.int32), b.view(torch.int32))


def write(path, obj):
    """obj to path in the format its suffix names (torch.save for .pt / .pth)."""
    path = str(path)
    if path.endswith(".npz"):
        np.savez(path, **{k: np.asarray(v) for k, v in obj.items()})
    elif path.endswith(".npy"):
        np.save(path, obj)
    else:
        torch.save(obj, path)
    return path


# ----------------------------------------------------------------------------------------- FeatureSet
def test_feature_set_converts_numpy_lists_and_tensors():
    feats, pids, camids = sample()
    fs = FeatureSet(feats.double().numpy(), pids.numpy().astype(np.int32), camids.tolist())  # positional
    assert fs.feats.dtype == torch.float32 and torch.equal(fs.feats, feats)
    assert fs.pids.dtype == fs.camids.dtype == torch.int64
    assert torch.equal(fs.pids, pids) and torch.equal(fs.camids, camids) and fs.labelled and len(fs) == 6
    bare = FeatureSet(feats.half())
    assert bare.pids is None and bare.camids is None and not bare.labelled and bare.feats.dtype == torch.float32
    assert "unlabelled" in repr(bare) and "6 x 4" in repr(bare)
    assert torch.equal(FeatureSet(feats, np.array([1, 2, 3, 4, 5, 6], dtype=np.uint32)).pids,
                       torch.arange(1, 7))


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(feats=np.zeros((3, 2), dtype=np.int64)), TypeError,
     r"feats must be a 2-D float array \(N, d\), got \(3, 2\)"),
    (dict(feats=np.zeros(3)), ValueError, r"feats must be a 2-D float array \(N, d\), got \(3,\)"),
    (dict(feats=[["a", "b"]]), TypeError, "feats is not a numeric array"),
    (dict(feats="features.pt"), TypeError, "feats must be a tensor, a numpy array or a list of numbers, got str"),
    (dict(feats=np.zeros((0, 4), np.float32)), ValueError, "feats is empty"),
    (dict(feats=np.zeros((2, 0), np.float32)), ValueError, "feats is empty"),
    (dict(feats=np.array([[0.0, np.inf]])), ValueError, r"feats contain NaN or Inf \(1 rows, first row 0\)"),
    (dict(feats=np.array([[1e39, 0.0]])), ValueError, "feats exceed the float32 range"),
    (dict(feats=np.ones((2, 2), np.complex64)), TypeError, "feats must be a 2-D float array"),
    (dict(feats=np.ones((2, 2)), pids=[1.0, 2.0]), TypeError, r"pids must be integers of shape \(2,\)"),
    (dict(feats=np.ones((2, 2)), pids=[1, 2, 3]), ValueError, r"pids must be integers of shape \(2,\) like feats"),
    (dict(feats=np.ones((2, 2)), pids=[True, False]), TypeError, "pids must be integers"),
    (dict(feats=np.ones((2, 2)), pids=[[1, 2], [3]]), TypeError, "pids is not a numeric array"),
    (dict(feats=np.ones((2, 2)), camids=np.array([0, -1])), ValueError, "camids must be >= 0, got -1"),
    (dict(feats=np.ones((2, 2)), camids=np.array([0, 2 ** 63], dtype=np.uint64)), TypeError,
     "camids holds values above the int64 range"),
])
def test_feature_set_refuses_bad_fields_by_name(kwargs, error, message):
    with pytest.raises(error, match=message):
        FeatureSet(**kwargs)


# ---------------------------------------------------------------------------------- formats and aliases
def test_torchreid_engine_output_saved_with_torch_save_loads(tmp_path):
    """torchreid's Engine._feature_extraction returns a feature tensor and numpy id arrays."""
    feats, pids, camids = sample()
    path = write(tmp_path / "query.pt", {"feats": feats, "pids": np.asarray(pids.tolist()),
                                         "camids": np.asarray(camids.tolist())})
    fs = load_features(path, "--query")
    assert same_bits(fs.feats, feats) and torch.equal(fs.pids, pids) and torch.equal(fs.camids, camids)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, ">f4"])
def test_numpy_features_and_id_dtypes_in_torch_files(tmp_path, dtype):
    feats, pids, camids = sample()
    path = write(tmp_path / "g.pth", {"feats": feats.numpy().astype(dtype), "pids": pids.numpy().astype(np.int16),
                                      "camids": camids.numpy().astype(np.uint8)})
    fs = load_features(path, "--gallery")
    assert torch.equal(fs.feats, torch.from_numpy(feats.numpy().astype(dtype).astype(np.float32)))
    assert torch.equal(fs.pids, pids) and torch.equal(fs.camids, camids)


def test_lists_of_numbers_in_torch_files(tmp_path):
    feats, pids, camids = sample()
    path = write(tmp_path / "q.pt", {"feats": feats.tolist(), "pids": tuple(pids.tolist()), "camids": camids.tolist()})
    fs = load_features(path)
    assert torch.allclose(fs.feats, feats) and torch.equal(fs.pids, pids) and torch.equal(fs.camids, camids)


def test_fastreid_evaluator_and_batch_names(tmp_path, caplog):
    """fast-reid's ReidEvaluator holds features / pids / camids; its batches name pids "targets"."""
    feats, pids, camids = sample()
    evaluator = write(tmp_path / "eval.pt", {"features": feats, "pids": pids.numpy(), "camids": camids.numpy()})
    fs = load_features(evaluator)
    assert same_bits(fs.feats, feats) and torch.equal(fs.pids, pids)
    batch = write(tmp_path / "batch.pt", {"feats": feats, "targets": pids, "camids": camids,
                                          "img_paths": [f"{i}.jpg" for i in range(6)]})
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        fs = load_features(batch, "--query")
    assert torch.equal(fs.pids, pids) and torch.equal(fs.camids, camids)
    assert "ignoring keys ['img_paths']" in caplog.text


@pytest.mark.parametrize("suffix", [".pt", ".npz"])
@pytest.mark.parametrize("field", ["feats", "pids", "camids"])
def test_every_alias(tmp_path, suffix, field):
    feats, pids, camids = sample()
    base = {"feats": feats, "pids": pids, "camids": camids}
    for alias in ALIASES[field]:
        arrays = {**{k: v for k, v in base.items() if k != field}, alias: base[field]}
        fs = load_features(write(tmp_path / f"{alias}{suffix}", arrays))
        assert same_bits(fs.feats, feats) and torch.equal(fs.pids, pids) and torch.equal(fs.camids, camids)


@pytest.mark.parametrize("suffix", [".pt", ".npz"])
def test_two_aliases_of_one_field_are_refused_naming_both(tmp_path, suffix):
    feats, pids, camids = sample()
    path = write(tmp_path / f"twice{suffix}", {"feats": feats, "embeddings": feats, "pids": pids, "camids": camids})
    with pytest.raises(ReIDInputError, match=r"--query file .*twice.*keys 'feats' and 'embeddings' both name"):
        load_features(path, "--query")
    path = write(tmp_path / f"ids{suffix}", {"feats": feats, "pids": pids, "labels": pids, "camids": camids})
    with pytest.raises(ReIDInputError, match="keys 'pids' and 'labels'"):
        load_features(path, "--query")


def test_npy_and_bare_tensors_are_features_only(tmp_path):
    feats, _, _ = sample()
    for path in (write(tmp_path / "f.npy", feats.numpy()), write(tmp_path / "t.pt", feats),
                 write(tmp_path / "a.pt", feats.numpy())):
        fs = load_features(path, "--gallery", need_pids=False, need_camids=False)
        assert same_bits(fs.feats, feats) and fs.pids is None and fs.camids is None
        with pytest.raises(ReIDInputError, match=rf"--gallery file {path}: holds one array .* pids and camids are "
                                                 "needed"):
            load_features(path, "--gallery")


@pytest.mark.parametrize("suffix", [".pt", ".npz"])
def test_unlabelled_and_partly_labelled_files(tmp_path, suffix):
    feats, pids, camids = sample()
    path = write(tmp_path / f"u{suffix}", {"feats": feats})
    fs = load_features(path, "--gallery", need_pids=False, need_camids=False)
    assert fs.pids is None and fs.camids is None and not fs.labelled
    with pytest.raises(ReIDInputError, match=rf"--gallery file {path}: missing pids\|pid\|labels\|targets, "
                                             r"camids\|camid\|cams \(has \['feats'\]\)"):
        load_features(path, "--gallery")
    fs = load_features(write(tmp_path / f"p{suffix}", {"feats": feats, "pids": pids}), "--train", need_camids=False)
    assert torch.equal(fs.pids, pids) and fs.camids is None  # the old need_camids=False call
    bad = write(tmp_path / f"bad{suffix}", {"feats": feats, "cams": camids - 9})
    with pytest.raises(ReIDInputError, match=r"bad.*: cams must be >= 0"):  # present labels are still checked
        load_features(bad, "--gallery", need_pids=False, need_camids=False)


# ------------------------------------------------------------------------------------ query + gallery
@pytest.mark.parametrize("suffix", [".pt", ".pth", ".npz"])
def test_torchreid_combined_layout(tmp_path, suffix, caplog):
    (qf, qp, qc), (gf, gp, gc) = sample(4, 8, 1), sample(9, 8, 2)
    path = write(tmp_path / f"qg{suffix}", {"qf": qf, "q_pids": qp.numpy(), "q_camids": qc.numpy(), "gf": gf,
                                            "g_pids": gp.numpy(), "g_camids": gc.numpy(), "q_img_paths": ["a"] * 4})
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        query, gallery = load_query_gallery(path)
    assert same_bits(query.feats, qf) and torch.equal(query.pids, qp) and torch.equal(query.camids, qc)
    assert same_bits(gallery.feats, gf) and torch.equal(gallery.pids, gp) and torch.equal(gallery.camids, gc)
    assert [r.getMessage().count("ignoring keys") for r in caplog.records] == [1]
    assert "['q_img_paths']" in caplog.text


def test_combined_layout_aliases_and_earlier_refined_features(tmp_path):
    (qf, qp, qc), (gf, gp, gc) = sample(4, 8, 1), sample(9, 8, 2)
    for q_key, g_key in zip(QUERY_GALLERY_ALIASES["qf"], QUERY_GALLERY_ALIASES["gf"]):
        path = write(tmp_path / f"{q_key}.pt", {q_key: qf, "query_pids": qp, "query_camids": qc, g_key: gf,
                                                "gallery_pids": gp, "gallery_camids": gc})
        query, gallery = load_query_gallery(path)
        assert same_bits(query.feats, qf) and torch.equal(gallery.camids, gc)
    # what the features command wrote as refined_features.pt before: {"query": tensor, "gallery": tensor}
    path = write(tmp_path / "refined_features.pt", {"query": qf, "gallery": gf})
    query, gallery = load_query_gallery(path, need_pids=False, need_camids=False)
    assert same_bits(query.feats, qf) and same_bits(gallery.feats, gf) and query.pids is None


def test_combined_layout_errors_name_the_key(tmp_path):
    (qf, qp, qc), (gf, gp, gc) = sample(4, 8, 1), sample(9, 8, 2)
    full = {"qf": qf, "q_pids": qp, "q_camids": qc, "gf": gf, "g_pids": gp, "g_camids": gc}
    path = write(tmp_path / "no_gpids.pt", {k: v for k, v in full.items() if k != "g_pids"})
    with pytest.raises(ReIDInputError, match=r"--features file .*no_gpids.pt: missing g_pids\|gallery_pids"):
        load_query_gallery(path)
    assert load_query_gallery(path, need_pids=False)[1].pids is None
    path = write(tmp_path / "dims.pt", {**full, "gf": gf[:, :5]})
    with pytest.raises(ReIDInputError, match=r"query features \(qf\) are 8-d but gallery features \(gf\) are 5-d"):
        load_query_gallery(path)
    path = write(tmp_path / "short.npz", {**full, "q_camids": qc[:2]})
    with pytest.raises(ReIDInputError, match=r"short.npz: q_camids must be integers of shape \(4,\) like qf"):
        load_query_gallery(path, "--refined")
    path = write(tmp_path / "nan.pt", {**full, "gf": gf.clone().index_fill_(0, torch.tensor([5]), float("nan"))})
    with pytest.raises(ReIDInputError, match=r"gf contain NaN or Inf \(1 rows, first row 5\)"):
        load_query_gallery(path)
    with pytest.raises(ReIDInputError, match=r"--query file .*holds query and gallery features together"):
        load_features(write(tmp_path / "qg.pt", full), "--query")
    with pytest.raises(ReIDInputError, match=r"holds one feature set \(feats\), not query and gallery"):
        load_query_gallery(write(tmp_path / "one.pt", {"feats": qf, "pids": qp, "camids": qc}))
    with pytest.raises(ReIDInputError, match=r"holds one array, but query and gallery are needed"):
        load_query_gallery(write(tmp_path / "bare.pt", qf))
    with pytest.raises(ReIDInputError, match=r"a .npy file holds one array"):
        load_query_gallery(write(tmp_path / "bare.npy", qf.numpy()))


# ------------------------------------------------------------------------------------- hostile files
class CallsEval:
    def __reduce__(self):
        return eval, ("__import__('os').getpid()",)


def test_a_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "it_ran"
    feats, pids, camids = sample()
    assert pickle.loads(pickle.dumps(RunsACommand(tmp_path / "probe"))) == 0  # the payload does run when unpickled
    assert (tmp_path / "probe").exists()
    for i, payload in enumerate([RunsACommand(marker), CallsEval()]):
        path = write(tmp_path / f"evil{i}.pt", {"feats": feats, "pids": pids, "camids": camids, "extra": payload})
        with pytest.raises(ReIDInputError, match=rf"--query file {path}: holds Python objects other than tensors, "
                                                 r"numeric numpy arrays.*"
                                                 r"\(found ((posix|nt|os)\.system|(builtins\.)?eval)\)"):
            load_features(path, "--query")
        with pytest.raises(ReIDInputError, match="holds Python objects"):
            load_query_gallery(path)
    assert not marker.exists()


def test_object_arrays_are_refused_in_every_format(tmp_path):
    feats, pids, camids = sample()
    names = np.array([f"{i}.jpg" for i in range(6)], dtype=object)
    path = write(tmp_path / "obj.pt", {"feats": feats, "pids": pids, "camids": camids, "img_paths": names})
    with pytest.raises(ReIDInputError, match=r"found numpy.dtypes.ObjectDType|found numpy.dtype"):
        load_features(path)
    np.save(tmp_path / "obj.npy", np.array([[1.0, "a"]], dtype=object), allow_pickle=True)
    with pytest.raises(ReIDInputError, match=r"obj.npy: not a readable .npy array.*Python objects"):
        load_features(str(tmp_path / "obj.npy"), need_pids=False, need_camids=False)
    np.savez(tmp_path / "obj.npz", feats=np.array([[1.0, "a"]], dtype=object), pids=pids.numpy(),
             camids=camids.numpy())
    with pytest.raises(ReIDInputError, match=r"obj.npz: not a readable .npz archive.*Python objects"):
        load_features(str(tmp_path / "obj.npz"))


def test_a_numpy_2_file_loads_under_numpy_1_names_and_back(tmp_path):
    """numpy 2 pickles arrays through numpy._core.multiarray, numpy 1 through numpy.core.multiarray:
    the same allow-list covers both, whichever numpy is installed."""
    feats, pids, camids = sample()
    src = write(tmp_path / "np.pt", {"feats": feats.numpy(), "pids": pids.numpy(), "camids": camids.numpy()})
    out = io.BytesIO()
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("data.pkl"):
                names = (b"numpy.core.multiarray", b"numpy._core.multiarray")
                old, new = names if names[0] in data else names[::-1]
                assert old in data
                data = data.replace(old, new)
            zout.writestr(item, data)
    other = tmp_path / "other_numpy.pt"
    other.write_bytes(out.getvalue())
    fs = load_features(str(other))
    assert same_bits(fs.feats, feats) and torch.equal(fs.pids, pids) and torch.equal(fs.camids, camids)


# ----------------------------------------------------------------------------------------- bad layouts
def test_bad_layouts_are_named(tmp_path):
    feats, pids, camids = sample()
    cases = [
        (write(tmp_path / "list.pt", [feats, pids, camids]), "expected a dict of arrays .* got a list"),
        (write(tmp_path / "str.pt", {"feats": feats, "pids": "0001 0002", "camids": camids}),
         "pids must be a tensor, a numpy array or a list of numbers, got str"),
        (write(tmp_path / "dict.pt", {"feats": {"a": feats}, "pids": pids, "camids": camids}),
         "feats must be a tensor, a numpy array or a list of numbers, got dict"),
        (write(tmp_path / "ragged.pt", {"feats": [[1.0, 2.0], [3.0]], "pids": pids[:2], "camids": camids[:2]}),
         "feats is not a numeric array"),
        (write(tmp_path / "strings.npz", {"features": np.array([["a", "b"]]), "pids": pids[:1], "camids": camids[:1]}),
         r"features is not a numeric array \(numpy dtype <U1\)"),
        (write(tmp_path / "3d.npz", {"embeddings": feats[None], "pids": pids, "camids": camids}),
         r"embeddings must be a 2-D float array \(N, d\), got \(1, 6, 4\)"),
        (write(tmp_path / "short.pt", {"feat": feats, "pid": pids[:3], "camid": camids}),
         r"pid must be integers of shape \(6,\) like feat, got \(3,\)"),
        (write(tmp_path / "none.pt", {"img_paths": ["a.jpg"]}), r"missing feats\|features\|feat\|embeddings"),
        (write(tmp_path / "state_dict.pt", {f"layer{i:02d}.weight": feats for i in range(30)}),  # a checkpoint
         r"missing feats.*\(has \['layer00.weight', .*'layer11.weight', '...'\]\)$"),
    ]
    for path, message in cases:
        with pytest.raises(ReIDInputError, match=rf"--query file {path}: {message}"):
            load_features(path, "--query")
    cut = tmp_path / "cut.npy"
    np.save(cut, feats.numpy())
    cut.write_bytes(cut.read_bytes()[:-8])
    with pytest.raises(ReIDInputError, match=r"cut.npy: not a readable .npy array"):
        load_features(str(cut), need_pids=False, need_camids=False)
    text = tmp_path / "text.pt"
    text.write_text("feats,pids\n")
    with pytest.raises(ReIDInputError, match=r"text.pt: not a readable PyTorch file"):
        load_features(str(text))
    with pytest.raises(ReIDInputError, match=r"absent.npz: no such file"):
        load_features(str(tmp_path / "absent.npz"))


def test_row_ranges_of_npy_files(tmp_path):
    feats = sample(10, 3)[0]
    path = write(tmp_path / "f.npy", feats.numpy())
    assert count_feature_rows(path) == 10
    parts = [load_feature_rows(path, a, b) for a, b in ((0, 4), (4, 7), (7, 10))]
    assert same_bits(torch.cat([p.feats for p in parts]), feats) and all(p.pids is None for p in parts)
    for start, stop in ((0, 11), (5, 5), (-1, 3), (0.0, 3), (True, 3)):
        with pytest.raises(ReIDInputError, match="not a non-empty range within its 10 rows"):
            load_feature_rows(path, start, stop, "--gallery")
    with pytest.raises(ReIDInputError, match="from .npy files only"):
        load_feature_rows(write(tmp_path / "f.pt", feats), 0, 1)
    nan = feats.numpy().copy()
    nan[8, 1] = np.nan
    path = write(tmp_path / "nan.npy", nan)
    assert load_feature_rows(path, 0, 8).feats.shape == (8, 3)  # the other rows are not read
    with pytest.raises(ReIDInputError, match=r"rows 7..9: feats contain NaN or Inf \(1 rows, first row 1\)"):
        load_feature_rows(path, 7, 10)


# ----------------------------------------------------------------------------------------- writing
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), suffix=st.sampled_from([".pt", ".pth", ".npz", ".npy", ".feats"]),
       n=st.integers(1, 5), d=st.integers(1, 4), pids_on=st.booleans(), camids_on=st.booleans())
def test_save_load_round_trips_exactly(data, suffix, n, d, pids_on, camids_on):
    finite = st.floats(width=32, allow_nan=False, allow_infinity=False)  # -0.0 and subnormals included
    feats = torch.from_numpy(data.draw(hnp.arrays(np.float32, (n, d), elements=finite)))
    ids = st.integers(-2 ** 63, 2 ** 63 - 1)
    pids = torch.tensor(data.draw(st.lists(ids, min_size=n, max_size=n))) if pids_on else None
    camids = torch.tensor(data.draw(st.lists(st.integers(0, 2 ** 63 - 1), min_size=n, max_size=n))) \
        if camids_on else None
    fs = FeatureSet(feats, pids, camids)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "set" + suffix)
        if suffix == ".npy" and (pids_on or camids_on):
            with pytest.raises(ValueError, match="save it as .pt / .pth or .npz"):
                save_features(path, fs)
            assert not os.listdir(tmp)  # refused before anything is written
            return
        assert save_features(path, fs) == path
        back = load_features(path, "--query", need_pids=pids_on, need_camids=camids_on)
        assert same_bits(back.feats, feats)
        for got, want in ((back.pids, pids), (back.camids, camids)):
            assert (got is None) if want is None else torch.equal(got, want)
        if suffix != ".npy":
            other = FeatureSet(-feats[:1])
            path = os.path.join(tmp, "qg" + suffix)
            save_query_gallery(path, fs, other)
            q, g = load_query_gallery(path, need_pids=False, need_camids=False)
            assert same_bits(q.feats, feats) and same_bits(g.feats, other.feats) and g.pids is None
            assert (q.pids is None) if pids is None else torch.equal(q.pids, pids)
            assert (q.camids is None) if camids is None else torch.equal(q.camids, camids)
        assert not [name for name in os.listdir(tmp) if ".tmp-" in name]


def test_save_refusals_and_what_is_written(tmp_path):
    feats, pids, camids = sample(100, 8)
    with pytest.raises(TypeError, match="features must be a FeatureSet, got dict"):
        save_features(str(tmp_path / "x.pt"), {"feats": feats})
    with pytest.raises(ValueError, match=r"a .npy file holds the features only, but this set has pids and camids"):
        save_features(str(tmp_path / "x.npy"), FeatureSet(feats, pids, camids))
    with pytest.raises(ValueError, match="query features are 8-d but gallery features 4-d"):
        save_query_gallery(str(tmp_path / "qg.pt"), FeatureSet(feats), FeatureSet(feats[:, :4]))
    with pytest.raises(ValueError, match="a .npy file holds one array"):
        save_query_gallery(str(tmp_path / "qg.npy"), FeatureSet(feats), FeatureSet(feats))
    with pytest.raises(TypeError, match="gallery must be a FeatureSet, got Tensor"):
        save_query_gallery(str(tmp_path / "qg.pt"), FeatureSet(feats), feats)
    assert not os.listdir(tmp_path)
    # numpy ids (what torchreid returns) go in and come back as tensors; a view of a large tensor
    # is written as its own rows, not the whole storage
    path = save_features(str(tmp_path / "view.pt"), FeatureSet(feats[:2], pids.numpy()[:2], camids.numpy()[:2]))
    assert os.path.getsize(path) < 100 * 8 * 4
    saved = torch.load(path, weights_only=True)
    assert sorted(saved) == ["camids", "feats", "pids"] and all(isinstance(v, torch.Tensor) for v in saved.values())
    path = save_query_gallery(str(tmp_path / "qg.pt"), FeatureSet(feats, pids), FeatureSet(feats[:3]))
    assert sorted(torch.load(path, weights_only=True)) == ["gf", "q_pids", "qf"]
    assert sorted(np.load(save_query_gallery(str(tmp_path / "qg.npz"), FeatureSet(feats), FeatureSet(feats))).files) \
        == ["gf", "qf"]


def test_written_files_get_the_umask_mode_like_open(tmp_path):
    from nformer_reid.utils.io import atomic_write

    old = os.umask(0o027)
    try:
        with atomic_write(str(tmp_path / "a.bin")) as fh:
            fh.write(b"x")
        with open(tmp_path / "b.bin", "wb") as fh:
            fh.write(b"x")
    finally:
        os.umask(old)
    mode = lambda name: stat.S_IMODE(os.stat(tmp_path / name).st_mode)  # noqa: E731
    assert mode("a.bin") == mode("b.bin") == 0o640


def test_forged_and_mislabelled_files_are_refused_before_any_allocation(tmp_path):
    """A .npy header declaring (1e12, 256) in a 200-byte file, text / gzip named .npy / .npz, a
    stride-0 (1e6, 1e4) tensor of 4 bytes, a sparse tensor: ReIDInputError with the right reason,
    at once."""
    import gzip

    forged = tmp_path / "forged.npy"
    with open(forged, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": "<f4", "fortran_order": False, "shape": (10 ** 12, 256)})
        fh.write(b"\0" * 64)
    (tmp_path / "text.npy").write_text("hello")
    (tmp_path / "text.npz").write_text("hello")
    with gzip.open(tmp_path / "gzip.npz", "wb") as fh:
        fh.write(b"not an archive")
    np.savez(tmp_path / "member.npz", feats=np.zeros((3, 4), np.float32))
    with zipfile.ZipFile(tmp_path / "member.npz", "a") as archive:  # a second member with a forged header
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (10 ** 9, 8)})
        archive.writestr("pids.npy", buf.getvalue())
    ids = torch.zeros(10 ** 6, dtype=torch.long)
    torch.save({"feats": torch.zeros(1, 1).expand(10 ** 6, 10 ** 4), "pids": ids, "camids": ids},
               tmp_path / "expanded.pt")
    torch.save({"feats": torch.zeros(5, 4).to_sparse(), "pids": ids[:5], "camids": ids[:5]}, tmp_path / "sparse.pt")
    for name, reason in (("forged.npy", r"declares a \(1000000000000, 256\) float32 array"),
                         ("text.npy", "not a readable .npy array: not a NumPy file"),
                         ("text.npz", "not a readable .npz archive: not a NumPy file"),
                         ("gzip.npz", "not a readable .npz archive: not a NumPy file"),
                         ("member.npz", "member pids.npy: not a readable .npy array: it declares"),
                         ("expanded.pt", "expanded view"), ("sparse.pt", "dense CPU tensor")):
        with pytest.raises(ReIDInputError, match=reason):
            load_features(str(tmp_path / name), "--query", need_pids=False)
    with pytest.raises(ReIDInputError, match="declares"):
        load_feature_rows(str(forged), 0, 1)
