"""End-to-end on the synthetic image set (tiny images, resnet18) and CLI smoke tests."""
import json
import os
import re
import subprocess
import sys

import pytest

from nformer_reid.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--size", "32", "16", "--workers", "0"]


def user_error(capsys, argv, match):
    """main(argv) is refused as a user error: exit status 2, one stderr line matching `match`, no traceback."""
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert re.search(match, err), err
    return err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("train"))
    main(["train", "--data", "synthetic", "--out", out, "--eval", "--rerank", "--save-model", *TINY])
    return out


def methods(path):
    """The per-method metrics of a results.json."""
    return json.load(open(path))["methods"]


def test_train_synthetic_end_to_end(trained, capsys):
    for name in ("model_final.pth", "stage1_last.pth", "stage2_last.pth", "loss.png", "cmc.png", "results.json",
                 "log.txt", "config.yaml"):
        assert os.path.isfile(os.path.join(trained, name)), name
    results = methods(os.path.join(trained, "results.json"))
    assert set(results) == {"backbone", "backbone + re-ranking", "NFormer (official)", "NFormer + re-ranking"}
    assert all(0 <= r["mAP"] <= 1 and 0 <= r["R1"] <= r["R5"] <= r["R10"] <= 1 for r in results.values())
    timings = json.load(open(os.path.join(trained, "results.json")))["timings"]
    assert {"training stage 1", "training stage 2", "features", "evaluation", "re-ranking",
            "refinement"} <= set(timings)


def test_eval_checkpoint_paper_mode_with_flip_and_visrank(trained, tmp_path, capsys):
    argv = ["eval", "--data", "synthetic", "--root", os.path.join(trained, "synthetic_market"), "--out", str(tmp_path),
            "--weights", os.path.join(trained, "model_final.pth"), "--mode", "paper", "--flip", "--visrank", "3", *TINY]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "NFormer (paper)" in out and "results on Market1501" in out
    assert set(methods(tmp_path / "results.json")) == {"backbone", "NFormer (paper)"}
    pictures = os.listdir(tmp_path / "visrank")
    from nformer_reid.data import Market1501

    num_query = len(Market1501(os.path.join(trained, "synthetic_market"), verbose=False).query)
    assert len(pictures) == min(100, num_query) and all(p.startswith("query") and p.endswith(".jpg") for p in pictures)
    assert "visrank" in json.load(open(tmp_path / "results.json"))["timings"]
    other = [a if a != str(tmp_path) else str(tmp_path / "other") for a in argv]
    user_error(capsys, [*other, "--visrank", "100000"], "--visrank 100000 exceeds the")
    for name in ("results.json", "cmc.png", "config.yaml"):
        (tmp_path / name).unlink()
    user_error(capsys, argv, "already holds visrank/ pictures from an earlier run")  # kept without --overwrite
    assert sorted(os.listdir(tmp_path / "visrank")) == sorted(pictures)


def test_resume_from_the_checkpoint_save_model_wrote(trained, tmp_path):
    out = tmp_path / "resumed"
    assert main(["train", "--data", "synthetic", "--root", os.path.join(trained, "synthetic_market"), "--stage", "1",
                 "--epochs", "2", "--resume", os.path.join(trained, "stage1_last.pth"), "--save-model", "--out",
                 str(out), *TINY]) == 0
    from nformer_reid.engine import load_checkpoint

    assert load_checkpoint(str(out / "stage1_last.pth"))["epoch"] == 2  # continued from epoch 1


def test_eval_needs_exactly_one_weights_source(trained, capsys):
    user_error(capsys, ["eval", "--data", "synthetic", "--out", trained, *TINY], "exactly one")


def test_yaml_config_sets_options_and_rejects_unknown(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("stage: 1\nmax-steps: 1\nsize: [32, 16]\nworkers: 0\n")
    main(["train", "--data", "synthetic", "--out", str(tmp_path / "run"), "--config", str(cfg)])
    # checkpoints only when asked: the final model, no resumable stage checkpoints
    assert os.path.isfile(tmp_path / "run" / "model_final.pth")
    assert not os.path.exists(tmp_path / "run" / "stage1_last.pth")
    main(["train", "--data", "synthetic", "--out", str(tmp_path / "every"), "--config", str(cfg),
          "--checkpoint-every", "1"])
    assert os.path.isfile(tmp_path / "every" / "stage1_last.pth")
    assert not os.path.exists(tmp_path / "every" / "stage2_last.pth")
    cfg.write_text("mode: joint\n")
    user_error(capsys, ["train", "--data", "synthetic", "--out", str(tmp_path / "run"), "--config", str(cfg)],
               "mode must be one of")
    cfg.write_text("epochz: 3\n")
    user_error(capsys, ["train", "--data", "synthetic", "--out", str(tmp_path / "run"), "--config", str(cfg)],
               "epochz")


def test_example_configs_parse():
    from nformer_reid.cli import parse_config

    for name in sorted(os.listdir(os.path.join(ROOT, "configs"))):
        command = name.split(".")[0].split("_")[0]
        args = parse_config([command, "--config", os.path.join(ROOT, "configs", name)]
                            + (["--official", "x.pth"] if command == "eval" else []))
        assert args.command == command


def test_datasets_command(trained, capsys, tmp_path):
    main(["datasets", "--root", os.path.join(trained, "synthetic_market")])
    assert "=> Loaded Market1501" in capsys.readouterr().out
    user_error(capsys, ["datasets", "--root", str(tmp_path)], "no known dataset layout")
    user_error(capsys, ["datasets", "--root", str(tmp_path), "--name", "market1501"], "bounding_box_train")


def test_demo_quick(tmp_path, capsys):
    main(["demo", "--quick", "--steps", "2", "--seq-len", "64", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "baseline" in out and "NFormer (official)" in out and "NFormer + re-ranking" in out
    for name in ("cmc.png", "loss.png", "results.json"):
        assert os.path.isfile(tmp_path / name)


def test_module_entry_point_help():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "python")]))
    res = subprocess.run([sys.executable, "-m", "nformer_reid", "--help"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0 and "train" in res.stdout and "demo" in res.stdout


def _feature_files(tmp_path, ext):
    from nformer_reid.data import make_feature_benchmark, save_features

    bench = make_feature_benchmark(num_train_ids=40, num_test_ids=20, num_cams=3, images_per_cam=2, cams_per_id=2,
                                   dim=32, noise=1.0, num_distractors=10, seed=1)
    paths = {}
    for split in ("train", "query", "gallery"):
        paths[split] = str(tmp_path / f"{split}.{ext}")
        save_features(paths[split], getattr(bench, split))
    return paths


@pytest.mark.parametrize("ext", ["pt", "npz"])
def test_features_train_then_reuse_weights(tmp_path, ext):
    """features: train an NFormer on dumped train features, evaluate, then reload it with --weights."""
    paths = _feature_files(tmp_path, ext)
    common = ["--query", paths["query"], "--gallery", paths["gallery"], "--device", "cpu", "--amp", "none"]
    first = main_results(tmp_path / "first", ["features", *common, "--train", paths["train"], "--nformer-depth", "2",
                                              "--nformer-steps", "3", "--seq-len", "64", "--rerank"])
    assert set(first) == {"input features", "input features + re-ranking", "NFormer (official)",
                          "NFormer + re-ranking"}
    assert not (tmp_path / "first" / "stage2_last.pth").exists()  # no resumable checkpoint unless asked
    assert all(0 <= r["mAP"] <= 1 and 0 <= r["R1"] <= r["R5"] <= r["R10"] <= 1 for r in first.values())
    for name in ("nformer.pth", "refined_features.pt", "cmc.png", "loss.png", "log.txt"):
        assert (tmp_path / "first" / name).is_file(), name
    again = main_results(tmp_path / "again", ["features", *common, "--weights",
                                              str(tmp_path / "first" / "nformer.pth")])
    assert again["NFormer (official)"] == first["NFormer (official)"]  # same weights, seeded landmarks


def main_results(out, argv):
    main([*argv, "--out", str(out)])
    return methods(out / "results.json")


def test_features_bad_input(tmp_path, capsys):
    import torch

    paths = _feature_files(tmp_path, "pt")
    common = ["--query", paths["query"], "--gallery", paths["gallery"], "--out", str(tmp_path / "o")]
    user_error(capsys, ["features", *common], "exactly one")
    user_error(capsys, ["features", *common, "--train", paths["train"], "--weights", paths["train"]], "exactly one")
    torch.save({"feats": torch.randn(5, 32), "pids": torch.arange(5)}, tmp_path / "bad.pt")
    user_error(capsys, ["features", "--query", str(tmp_path / "bad.pt"), "--gallery", paths["gallery"], "--train",
                        paths["train"], "--out", str(tmp_path / "o")], "query file .*missing camids")
    user_error(capsys, ["features", *common, "--weights", paths["train"]],
               "not an NFormer saved by 'nformer-reid features --train'")
