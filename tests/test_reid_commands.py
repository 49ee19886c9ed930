"""The torchreid / fast-reid user's commands: options from YAML, KEY=VALUE and the command line (with
their precedence and the required ones checked after merging), config.yaml, results.json, `refine`
(label-free), `rerank` (standalone), `features --features` (one combined file), --nformer-dim,
--rerank-k1/k2/lambda and --save-model. Tiny synthetic features: seconds on a CPU."""
import json
import os
import re

import numpy as np
import pytest
import torch
import yaml

import nformer_kernels as nk
from nformer_reid.cli import main, parse_args, parse_config
from nformer_reid.config import SYNTHETIC, FeaturesConfig, config_values
from nformer_reid.data import (load_features, load_query_gallery, make_feature_benchmark, save_features,
                               save_query_gallery)
from nformer_reid.engine import save_checkpoint
from nformer_reid.metrics import compute_distance_matrix, evaluate_rank
from nformer_reid.rerank import re_ranking_sparse
from nformer_reid.utils.io import MANIFEST
from tests.test_reid_cli import user_error

DIM = 16


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Feature files of a small benchmark (train / query / gallery .pt, the combined layout, an
    unlabelled .npy gallery) and an NFormer saved as `features --train` saves it."""
    tmp = tmp_path_factory.mktemp("commands")
    bench = make_feature_benchmark(num_train_ids=20, num_test_ids=10, num_cams=3, images_per_cam=2, cams_per_id=2,
                                   dim=DIM, noise=1.0, num_distractors=5, seed=0)
    paths = {"dir": tmp, "bench": bench}
    for split in ("train", "query", "gallery"):
        paths[split] = str(tmp / f"{split}.pt")
        save_features(paths[split], getattr(bench, split))
    paths["combined"] = str(tmp / "query_gallery.pt")
    save_query_gallery(paths["combined"], bench.query, bench.gallery)
    paths["gallery_npy"] = str(tmp / "gallery.npy")
    np.save(paths["gallery_npy"], bench.gallery.feats.numpy())
    torch.manual_seed(0)
    nformer = nk.NFormer(dim=DIM, depth=1, num_landmarks=3, topk=4, num_classes=20)
    paths["nformer"] = save_checkpoint(str(tmp / "nformer.pth"), nformer, stage=2, epoch=0, config=nformer.config)
    return paths


def run(argv):
    assert main(argv) == 0, argv


def results(out):
    return json.loads((out / "results.json").read_text())


def weights_run(files, out, *extra):
    return ["features", "--query", files["query"], "--gallery", files["gallery"], "--weights", files["nformer"],
            "--device", "cpu", "--out", str(out), *extra]


# ------------------------------------------------------------------------------------------------ options
def test_yaml_can_supply_every_option_required_ones_included(files, tmp_path):
    cfg_file = tmp_path / "features.yaml"
    cfg_file.write_text(yaml.safe_dump({"query": files["query"], "gallery": files["gallery"],
                                        "weights": files["nformer"], "device": "cpu", "out": str(tmp_path / "run")}))
    run(["features", "--config", str(cfg_file)])
    assert (tmp_path / "run" / "results.json").is_file()
    cfg_file.write_text(f"root: {tmp_path}\n")
    assert parse_config(["datasets", "--config", str(cfg_file)]).root == str(tmp_path)
    cfg_file.write_text(f"input: {files['gallery']}\noutput: {tmp_path / 'refined.pt'}\nofficial: o.pth\n")
    cfg = parse_config(["refine", "--config", str(cfg_file)])
    assert (cfg.input, cfg.output, cfg.official) == (files["gallery"], str(tmp_path / "refined.pt"), "o.pth")


@pytest.mark.parametrize("argv,message", [
    (["datasets"], "--root is required"),
    (["refine", "--weights", "w.pth", "--output", "o.npy"], "--input is required"),
    (["refine", "--weights", "w.pth", "--input", "i.npy"], "--output is required"),
    (["refine", "--input", "i.npy", "--output", "o.npy"], "exactly one of --weights .* or --official"),
    (["features", "--gallery", "g.pt", "--train", "t.pt"], "--query required: give --query and --gallery, or "
                                                           "--features"),
    (["features", "--train", "t.pt"], "--query and --gallery required"),
    (["features", "--features", "qg.pt", "--query", "q.pt"], "not --features with --query"),
    (["rerank", "--query", "q.pt"], "--gallery required"),
    (["rerank", "--features", "qg.pt", "--gallery", "g.pt"], "not --features with --gallery"),
])
def test_missing_or_conflicting_options_are_named_after_merging(capsys, tmp_path, argv, message):
    user_error(capsys, [*argv, "--out", str(tmp_path / "o")] if argv[0] in ("features", "rerank") else argv, message)
    assert not (tmp_path / "o").exists()


def test_precedence_key_value_over_options_over_yaml_over_recipe_over_defaults(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("seq_len: 100\nnformer-lr: 0.001\nquery: q.pt\ngallery: g.pt\n")
    base = ["features", "--config", str(cfg_file)]
    assert parse_config(["features", "--query", "q.pt", "--gallery", "g.pt"]).seq_len == FeaturesConfig.seq_len
    assert parse_config(base).seq_len == 100  # YAML over the default
    assert parse_config([*base, "--seq-len", "200"]).seq_len == 200  # option over YAML
    assert parse_config([*base, "--seq-len", "200", "seq_len=300"]).seq_len == 300  # KEY=VALUE over the option
    assert parse_config([*base, "--set", "seq-len=400", "--seq-len", "200"]).seq_len == 400  # --set: the same
    cfg = parse_config([*base, "nformer_steps=7", "rerank=true", "out=2024", "nformer_dim=null", "rerank_lambda=0.5",
                        "gallery=other.pt"])
    assert (cfg.nformer_steps, cfg.rerank, cfg.out, cfg.nformer_dim, cfg.rerank_lambda, cfg.gallery) == (
        7, True, "2024", None, 0.5, "other.pt")  # YAML scalars; a str option keeps the text
    assert cfg.nformer_lr == 1e-3 and cfg.query == "q.pt"
    # the recipe of --data synthetic sits between the defaults and the YAML
    assert parse_config(["train", "--data", "synthetic"]).seq_len == SYNTHETIC["seq_len"]
    recipe_file = tmp_path / "t.yaml"
    recipe_file.write_text("seq_len: 99\n")
    assert parse_config(["train", "--data", "synthetic", "--config", str(recipe_file)]).seq_len == 99
    assert parse_config(["train", "data=synthetic", "size=[32, 16]"]).size == (32, 16)
    assert parse_config(["train", "data=synthetic"]).arch == SYNTHETIC["arch"]
    # the standalone rerank command's short names are the same options
    cfg = parse_config(["rerank", "--features", "qg.pt", "--k1", "7", "--lambda", "0.1", "k2=2"])
    assert (cfg.rerank_k1, cfg.rerank_k2, cfg.rerank_lambda) == (7, 2, 0.1)
    assert parse_config(["rerank", "--features", "qg.pt", "--rerank-k1", "9"]).rerank_k1 == 9


@pytest.mark.parametrize("override,message", [
    ("nformer_stepz=3", r"KEY=VALUE: unknown option\(s\) for 'features': \['nformer_stepz'\]"),
    ("seq_len=1", "KEY=VALUE: seq_len must be >= 2, got 1"),
    ("seq_len=many", "KEY=VALUE: seq_len must be one value of type int"),
    ("rerank=maybe", "KEY=VALUE: rerank must be true or false"),
    ("nformer_lr=[1, 2", "KEY=VALUE nformer_lr=\\[1, 2: the value is not valid YAML"),
    ("seq_len", "expected KEY=VALUE after the options"),
    ("=3", "expected KEY=VALUE after the options"),
    ("mode=joint", "KEY=VALUE: mode must be one of"),
    ("rerank_lambda=2", "KEY=VALUE: rerank_lambda must be in \\[0, 1\\]"),
])
def test_bad_key_value_is_one_line_naming_it(files, tmp_path, capsys, override, message):
    user_error(capsys, [*weights_run(files, tmp_path / "o"), override], message)
    assert not (tmp_path / "o").exists()


def test_rerank_help_names_the_parameters_not_fixed_values(capsys):
    for command in ("features", "eval", "train"):
        with pytest.raises(SystemExit) as exc:
            main([command, "--help"])
        text = capsys.readouterr().out
        assert exc.value.code == 0
        assert "--rerank-k1" in text and "--rerank-lambda" in text
        assert "k1=20" not in text and "(k1=20, k2=6, 0.3)" not in text


def test_config_yaml_is_the_effective_config_and_reruns(files, tmp_path):
    out = tmp_path / "first"
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("rerank: true\nrerank_k1: 5\n")
    argv = [*weights_run(files, out), "--config", str(cfg_file), "rerank_k2=2"]
    run(argv)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    cfg, _ = parse_args(argv)
    assert saved == config_values(cfg) and "overwrite" not in saved
    assert (saved["rerank"], saved["rerank_k1"], saved["rerank_k2"], saved["out"]) == (True, 5, 2, str(out))
    again = tmp_path / "again"
    run(["features", "--config", str(out / "config.yaml"), f"out={again}"])
    first, second = results(out), results(again)
    assert second["methods"] == first["methods"]
    assert {**second["config"], "out": str(out)} == first["config"]


def test_config_yaml_of_the_run_is_never_overwritten_by_a_rerun_in_place(files, tmp_path, capsys):
    out = tmp_path / "run"
    run(weights_run(files, out))
    before = (out / "config.yaml").read_bytes()
    user_error(capsys, ["features", "--config", str(out / "config.yaml"), "--overwrite"], "--config .* is also an "
               "output of this run")
    assert (out / "config.yaml").read_bytes() == before


# ------------------------------------------------------------------------------------------- results.json
def test_results_json_holds_metrics_full_cmc_config_versions_device_timings_command(files, tmp_path):
    out = tmp_path / "run"
    argv = [*weights_run(files, out), "--rerank"]
    run(argv)
    doc = results(out)
    assert set(doc) == {"methods", "config", "command", "versions", "device", "timings"}
    assert list(doc["methods"]) == ["input features", "input features + re-ranking", "NFormer (official)",
                                    "NFormer + re-ranking"]
    bench = files["bench"]
    q, g = bench.query, bench.gallery
    num_g = g.feats.shape[0]
    for name, res in doc["methods"].items():
        assert set(res) == {"mAP", "mINP", "R1", "R5", "R10", "cmc"}, name
        assert len(res["cmc"]) == min(50, num_g)
        assert (res["R1"], res["R5"], res["R10"]) == (res["cmc"][0], res["cmc"][4], res["cmc"][9])
        assert 0 <= res["mINP"] <= res["mAP"] + 1e-12 <= 1 + 1e-12
    cmc, mAP, mINP = evaluate_rank(compute_distance_matrix(q.feats, g.feats, normalize=True), q.pids, g.pids,
                                   q.camids, g.camids, return_mINP=True)
    base = doc["methods"]["input features"]
    assert base["mAP"] == pytest.approx(mAP) and base["mINP"] == pytest.approx(mINP)
    assert base["cmc"] == pytest.approx(cmc.tolist())
    assert doc["config"] == config_values(parse_config(argv))
    assert doc["command"] == ["nformer-reid", *argv]
    assert doc["device"] == "cpu"
    assert {"nformer_kernels", "torch", "numpy", "python"} <= set(doc["versions"])
    assert doc["versions"]["nformer_kernels"] == nk.__version__ and doc["versions"]["torch"] == torch.__version__
    timings = doc["timings"]
    assert set(timings) == {"features", "evaluation", "re-ranking", "refinement"}
    assert set(timings["refinement"]) == {"official"}
    assert all(t >= 0 for t in (timings["features"], timings["evaluation"], timings["re-ranking"],
                                timings["refinement"]["official"]))


# ----------------------------------------------------------------------------------------------- features
def test_features_combined_layout_equals_query_gallery_files_and_refined_reloads(files, tmp_path, capsys):
    run(weights_run(files, tmp_path / "separate"))
    run(["features", "--features", files["combined"], "--weights", files["nformer"], "--device", "cpu", "--out",
         str(tmp_path / "combined")])
    assert results(tmp_path / "combined")["methods"] == results(tmp_path / "separate")["methods"]
    # refined_features.pt is the combined layout with the labels: it reloads with --features
    refined = str(tmp_path / "combined" / "refined_features.pt")
    rq, rg = load_query_gallery(refined)
    q, g = files["bench"].query, files["bench"].gallery
    assert torch.equal(rq.pids, q.pids) and torch.equal(rg.camids, g.camids) and rq.feats.shape == q.feats.shape
    run(["features", "--features", refined, "--weights", files["nformer"], "--device", "cpu", "--out",
         str(tmp_path / "again")])
    refined_score = results(tmp_path / "again")["methods"]["input features"]
    assert refined_score == results(tmp_path / "combined")["methods"]["NFormer (official)"]
    user_error(capsys, ["features", "--features", files["query"], "--weights", files["nformer"], "--out",
                        str(tmp_path / "bad")], "--features")
    assert not (tmp_path / "bad").exists()


def test_rerank_parameters_reach_the_computation(files, tmp_path, monkeypatch):
    import nformer_reid.engine.evaluation as evaluation

    calls = []

    def spy(q, g, k1, k2, lambda_value, **kwargs):
        calls.append((k1, k2, lambda_value))
        return re_ranking_sparse(q, g, k1, k2, lambda_value, **kwargs)

    monkeypatch.setattr(evaluation, "re_ranking_sparse", spy)
    run([*weights_run(files, tmp_path / "default"), "--rerank"])
    assert calls == [(20, 6, 0.3)] * 2  # the input and the refined features
    calls.clear()
    run([*weights_run(files, tmp_path / "k1"), "--rerank", "--rerank-k1", "3", "rerank_k2=2", "--rerank-lambda", "0.5"])
    assert calls == [(3, 2, 0.5)] * 2
    default, changed = (results(tmp_path / name)["methods"]["input features + re-ranking"]
                        for name in ("default", "k1"))
    assert default != changed
    q, g = files["bench"].query, files["bench"].gallery
    cmc, mAP = evaluate_rank(re_ranking_sparse(q.feats, g.feats, 3, 2, 0.5), q.pids, g.pids, q.camids, g.camids)
    assert changed["mAP"] == pytest.approx(mAP) and changed["cmc"] == pytest.approx(cmc.tolist())


def _train_args(files, out, *extra):
    return ["features", "--query", files["query"], "--gallery", files["gallery"], "--train", files["train"],
            "--nformer-depth", "1", "--nformer-steps", "2", "--seq-len", "32", "--device", "cpu", "--amp", "none",
            "--out", str(out), *extra]


def test_save_model_decides_the_checkpoints_of_features(files, tmp_path):
    run(_train_args(files, tmp_path / "plain"))
    names = set(os.listdir(tmp_path / "plain"))
    assert {"nformer.pth", "refined_features.pt", "results.json", "cmc.png", "loss.png", "config.yaml",
            "log.txt", MANIFEST} == names  # no resumable stage2_last.pth
    run(_train_args(files, tmp_path / "saved", "--save-model"))
    assert set(os.listdir(tmp_path / "saved")) == names | {"stage2_last.pth"}
    run(weights_run(files, tmp_path / "weights"))
    assert "nformer.pth" not in os.listdir(tmp_path / "weights")  # no training: no model file


def test_nformer_dim_projects_wider_features(files, tmp_path):
    from nformer_reid.engine import load_model

    run(_train_args(files, tmp_path / "narrow", "--nformer-dim", "8"))
    nformer = load_model(str(tmp_path / "narrow" / "nformer.pth"), "NFormer")
    assert (nformer.in_dim, nformer.dim) == (DIM, 8)
    rq, rg = load_query_gallery(str(tmp_path / "narrow" / "refined_features.pt"))
    assert rq.feats.shape[1] == rg.feats.shape[1] == 8
    run(_train_args(files, tmp_path / "default"))  # 16-d features, narrower than 256: kept at 16
    nformer = load_model(str(tmp_path / "default" / "nformer.pth"), "NFormer")
    assert (nformer.in_dim, nformer.dim) == (DIM, DIM)
    # --nformer-dim checks the width of --weights
    assert main(weights_run(files, tmp_path / "w", "--nformer-dim", "32")) == 2


# ------------------------------------------------------------------------------------------------- refine
def _library_refinement(files, feats, seed=0):
    from nformer_reid.engine import load_model

    nformer = load_model(files["nformer"], "NFormer").eval()
    x = torch.nn.functional.normalize(feats.float(), dim=1)
    with torch.no_grad():
        out = nformer(x, generator=torch.Generator().manual_seed(seed))
    return out, nk.knn(nformer.project(x), min(nformer.topk, x.shape[0]))


def test_refine_unlabelled_npy_equals_the_library_nformer(files, tmp_path):
    out = tmp_path / "refined.npy"
    run(["refine", "--input", files["gallery_npy"], "--output", str(out), "--weights", files["nformer"],
         "--device", "cpu", "--save-neighbors", str(tmp_path / "neighbors.npy"), "--seed", "3"])
    got = np.load(out)
    expected, neighbours = _library_refinement(files, files["bench"].gallery.feats, seed=3)
    assert got.dtype == np.float32 and got.shape == tuple(expected.shape)
    np.testing.assert_array_equal(got, expected.numpy())
    saved = np.load(tmp_path / "neighbors.npy")
    assert saved.dtype == np.int64 and saved.shape == (len(got), 4)
    np.testing.assert_array_equal(saved, neighbours.numpy())
    assert (saved[:, 0] == np.arange(len(got))).all()  # self first
    assert sorted(os.listdir(tmp_path)) == ["neighbors.npy", "refined.npy"]  # no folder, no log beside them


def test_refine_pt_with_labels_keeps_them(files, tmp_path):
    out = tmp_path / "sub" / "refined.pt"
    run(["refine", "--input", files["gallery"], "--output", str(out), "--weights", files["nformer"], "--device", "cpu",
         "--save-neighbors", str(tmp_path / "nb.pt")])
    got = load_features(str(out), "refined")
    g = files["bench"].gallery
    assert torch.equal(got.pids, g.pids) and torch.equal(got.camids, g.camids)
    expected, neighbours = _library_refinement(files, g.feats)
    assert torch.equal(got.feats, expected)
    assert torch.equal(torch.load(tmp_path / "nb.pt", weights_only=True), neighbours)
    # .npz keeps them too; .npy is features only
    run(["refine", "--input", files["gallery"], "--output", str(tmp_path / "r.npz"), "--weights", files["nformer"]])
    assert torch.equal(load_features(str(tmp_path / "r.npz"), "r").pids, g.pids)
    run(["refine", "--input", files["gallery"], "--output", str(tmp_path / "r.npy"), "--weights", files["nformer"]])
    assert load_features(str(tmp_path / "r.npy"), "r", need_pids=False, need_camids=False).pids is None


def test_refine_refuses_to_replace_files(files, tmp_path, capsys):
    inp = tmp_path / "in.npy"
    np.save(inp, files["bench"].gallery.feats.numpy())
    data = inp.read_bytes()
    base = ["refine", "--input", str(inp), "--weights", files["nformer"]]
    user_error(capsys, [*base, "--output", str(inp), "--overwrite"], "--output .* is the input --input")
    out = tmp_path / "out.npy"
    out.write_bytes(b"x")
    user_error(capsys, [*base, "--output", str(out)], "--output .* already exists; pass --overwrite")
    assert out.read_bytes() == b"x"
    run([*base, "--output", str(out), "--overwrite"])
    assert np.load(out).shape == files["bench"].gallery.feats.shape
    user_error(capsys, [*base, "--output", str(tmp_path / "o.txt")], "--output .* must end in")
    user_error(capsys, [*base, "--output", str(tmp_path / "o.npy"), "--save-neighbors", str(tmp_path / "n.csv")],
               "--save-neighbors .* must end in")
    user_error(capsys, [*base, "--output", str(tmp_path / "o.npy"), "--save-neighbors", str(tmp_path / "o.npy")],
               "--output and --save-neighbors name the same file")
    (tmp_path / "folder.npy").mkdir()
    user_error(capsys, [*base, "--output", str(tmp_path / "folder.npy")], "is a folder")
    wide = tmp_path / "wide.npy"
    np.save(wide, np.ones((5, DIM * 2), dtype=np.float32))
    user_error(capsys, ["refine", "--input", str(wide), "--output", str(tmp_path / "w.npy"), "--weights",
                        files["nformer"]], f"takes {DIM}-d features but the features of --input .* are {2 * DIM}-d")
    assert inp.read_bytes() == data and not (tmp_path / "o.npy").exists() and not (tmp_path / "w.npy").exists()


# ------------------------------------------------------------------------------------------------- rerank
def test_rerank_with_labels_scores_and_saves_what_re_ranking_sparse_gives(files, tmp_path):
    out = tmp_path / "rr"
    run(["rerank", "--features", files["combined"], "--out", str(out), "--k1", "5", "--k2", "2", "--lambda", "0.4",
         "--save-distmat", "--save-ranks", "7", "--device", "cpu"])
    q, g = files["bench"].query, files["bench"].gallery
    expected = re_ranking_sparse(q.feats, g.feats, 5, 2, 0.4)
    dist = np.load(out / "distmat.npy")
    assert dist.dtype == np.float32
    np.testing.assert_array_equal(dist, expected)
    ranks = np.load(out / "ranks.npy")
    assert ranks.dtype == np.int64 and ranks.shape == (q.feats.shape[0], 7)
    np.testing.assert_array_equal(ranks, np.argsort(expected, axis=1, kind="stable")[:, :7])
    doc = results(out)
    assert list(doc["methods"]) == ["input features", "input features + re-ranking"]
    cmc, mAP, mINP = evaluate_rank(expected, q.pids, g.pids, q.camids, g.camids, return_mINP=True)
    got = doc["methods"]["input features + re-ranking"]
    assert (got["mAP"], got["mINP"]) == (pytest.approx(mAP), pytest.approx(mINP))
    assert got["cmc"] == pytest.approx(cmc.tolist())
    assert doc["config"]["rerank_k1"] == 5 and "re-ranking" in doc["timings"]
    assert {"config.yaml", "log.txt", "cmc.png"} <= set(os.listdir(out))


def test_rerank_without_labels_writes_the_outputs_only(files, tmp_path, capsys):
    qf = tmp_path / "q.npy"
    np.save(qf, files["bench"].query.feats.numpy())
    out = tmp_path / "rr"
    run(["rerank", "--query", str(qf), "--gallery", files["gallery_npy"], "--out", str(out), "--save-ranks", "3"])
    assert sorted(os.listdir(out)) == sorted(["config.yaml", "log.txt", "ranks.npy", MANIFEST])
    expected = re_ranking_sparse(files["bench"].query.feats, files["bench"].gallery.feats)
    np.testing.assert_array_equal(np.load(out / "ranks.npy"), np.argsort(expected, axis=1, kind="stable")[:, :3])
    base = ["rerank", "--query", str(qf), "--gallery", files["gallery_npy"], "--out", str(tmp_path / "x")]
    user_error(capsys, base, "holds no labels to score .* give --save-distmat and/or --save-ranks")
    user_error(capsys, [*base, "--save-ranks", "1000"], "--save-ranks 1000 exceeds the 25 gallery features")
    user_error(capsys, [*base, "--save-distmat", "k1=100"], "--rerank-k1 100 \\+ 1 .* must not exceed the 45")
    assert not (tmp_path / "x").exists()
    run([*base, "--save-distmat"])
    user_error(capsys, [*base, "--save-distmat"], re.escape(f"--out {tmp_path / 'x'} already holds distmat.npy"))


def test_rerank_bounds_are_checked_before_training(files, tmp_path, capsys):
    """features --rerank with k1 beyond the query + gallery features: one line, exit 2, before the
    NFormer trains and before --out exists."""
    out = tmp_path / "never"
    argv = ["features", "--query", files["query"], "--gallery", files["gallery"], "--train", files["train"],
            "--rerank", "--rerank-k1", "100000", "--device", "cpu", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--rerank-k1 100000 + 1" in err and not out.exists()
