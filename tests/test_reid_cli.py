"""End-to-end on the synthetic image set (tiny images, resnet18) and CLI smoke tests."""
import json
import os
import subprocess
import sys

import pytest

from nformer_reid.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--size", "32", "16", "--workers", "0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("train"))
    main(["train", "--data", "synthetic", "--out", out, "--eval", "--rerank", *TINY])
    return out


def test_train_synthetic_end_to_end(trained, capsys):
    for name in ("model_final.pth", "stage1_last.pth", "stage2_last.pth", "loss.png", "cmc.png", "results.json",
                 "log.txt"):
        assert os.path.isfile(os.path.join(trained, name)), name
    results = json.load(open(os.path.join(trained, "results.json")))
    assert set(results) == {"backbone", "backbone + re-ranking", "NFormer (official)", "NFormer + re-ranking"}
    assert all(0 <= r["mAP"] <= 1 and 0 <= r["R1"] <= r["R5"] <= r["R10"] <= 1 for r in results.values())


def test_eval_checkpoint_paper_mode_with_flip(trained, tmp_path, capsys):
    main(["eval", "--data", "synthetic", "--root", os.path.join(trained, "synthetic_market"), "--out", str(tmp_path),
          "--weights", os.path.join(trained, "model_final.pth"), "--mode", "paper", "--flip", *TINY])
    out = capsys.readouterr().out
    assert "NFormer (paper)" in out and "results on Market1501" in out
    assert set(json.load(open(tmp_path / "results.json"))) == {"backbone", "NFormer (paper)"}


def test_eval_needs_exactly_one_weights_source(trained):
    with pytest.raises(SystemExit, match="exactly one"):
        main(["eval", "--data", "synthetic", "--out", trained, *TINY])


def test_yaml_config_sets_options_and_rejects_unknown(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("stage: 1\nmax-steps: 1\nsize: [32, 16]\nworkers: 0\n")
    main(["train", "--data", "synthetic", "--out", str(tmp_path / "run"), "--config", str(cfg)])
    assert os.path.isfile(tmp_path / "run" / "stage1_last.pth")
    assert not os.path.exists(tmp_path / "run" / "stage2_last.pth")
    cfg.write_text("mode: joint\n")
    with pytest.raises(SystemExit, match="mode must be one of"):
        main(["train", "--data", "synthetic", "--out", str(tmp_path / "run"), "--config", str(cfg)])
    cfg.write_text("epochz: 3\n")
    with pytest.raises(SystemExit, match="epochz"):
        main(["train", "--data", "synthetic", "--out", str(tmp_path / "run"), "--config", str(cfg)])


def test_example_configs_parse():
    from nformer_reid.cli import _apply_config, build_parser

    for name in sorted(os.listdir(os.path.join(ROOT, "configs"))):
        command = name.split(".")[0].split("_")[0]
        args = _apply_config(build_parser(), [command, "--config", os.path.join(ROOT, "configs", name)]
                             + (["--official", "x.pth"] if command == "eval" else []))
        assert args.command == command


def test_datasets_command(trained, capsys, tmp_path):
    main(["datasets", "--root", os.path.join(trained, "synthetic_market")])
    assert "=> Loaded Market1501" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no known dataset layout"):
        main(["datasets", "--root", str(tmp_path)])
    with pytest.raises(SystemExit, match="bounding_box_train"):
        main(["datasets", "--root", str(tmp_path), "--name", "market1501"])


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
