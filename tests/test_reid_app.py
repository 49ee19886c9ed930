"""The app's plumbing: logging, --version, torchvision as an optional dependency, the checkpoint
format, and every default coming from nformer_reid.config."""
import inspect
import logging
import os
import subprocess
import sys

import pytest
import torch
import yaml

import nformer_kernels as nk
import nformer_reid
from nformer_reid.cli import main, parse_config
from nformer_reid.config import COMMANDS, SYNTHETIC, DemoConfig, TrainConfig, make_config
from nformer_reid.engine import load_checkpoint, load_model, refine_features, save_checkpoint
from nformer_reid.utils import ReIDInputError, reset_logging, setup_logging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED = {"features": ["--query", "q.pt", "--gallery", "g.pt"], "datasets": ["--root", "data"],
            "refine": ["--input", "i.npy", "--output", "o.npy", "--weights", "w.pth"], "rerank": ["--features", "qg.pt"]}


def small_nformer():
    torch.manual_seed(0)
    return nk.NFormer(dim=16, depth=1, num_landmarks=3, topk=4, num_classes=5)


def test_library_calls_are_quiet_until_logging_is_configured(tmp_path, capsys, caplog):
    from nformer_reid.model import Backbone

    qf, gf = torch.randn(4, 16), torch.randn(12, 16)
    Backbone(3, arch="resnet18", feat_dim=8)  # warns: random initialisation
    refine_features(small_nformer(), qf, gf)  # logs at INFO
    assert capsys.readouterr() == ("", "")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="nformer_reid"):
        refine_features(small_nformer(), qf, gf)
    assert [r.name for r in caplog.records] == ["nformer_reid.engine.evaluation"]
    assert "NFormer (official) refined 16 features" in caplog.text

    log_file = tmp_path / "log.txt"
    setup_logging(str(log_file))
    try:
        refine_features(small_nformer(), qf, gf)
        Backbone(3, arch="resnet18", feat_dim=8)
    finally:
        reset_logging()
    out = capsys.readouterr().out
    assert out.startswith("[nformer-reid ") and "] NFormer (official) refined 16 features" in out
    assert "] warning: resnet18: random initialisation" in out
    assert log_file.read_text().splitlines() == out.splitlines()
    refine_features(small_nformer(), qf, gf)
    assert capsys.readouterr() == ("", "")  # reset: quiet again


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"nformer_reid {nk.__version__}" == f"nformer_reid {nformer_reid.__version__}"


def test_without_torchvision_features_run_and_train_fails_with_one_line(tmp_path):
    """torchvision blocked (as if not installed): features never imports it; train exits 2 with the
    install command on one stderr line, no traceback."""
    from nformer_reid.data import make_feature_benchmark, save_features

    bench = make_feature_benchmark(num_train_ids=20, num_test_ids=10, num_cams=3, images_per_cam=2, cams_per_id=2,
                                   dim=16, noise=1.0, num_distractors=5, seed=0)
    for split in ("train", "query", "gallery"):
        save_features(str(tmp_path / f"{split}.pt"), getattr(bench, split))
    script = f"""
import sys
sys.modules["torchvision"] = None  # any import of it now raises ImportError
from nformer_reid.cli import main
rc = main(["features", "--query", {str(tmp_path / 'query.pt')!r}, "--gallery", {str(tmp_path / 'gallery.pt')!r},
           "--train", {str(tmp_path / 'train.pt')!r}, "--nformer-depth", "1", "--nformer-steps", "2",
           "--seq-len", "32", "--out", {str(tmp_path / 'features')!r}])
assert rc == 0, rc
sys.exit(main(["train", "--data", "synthetic", "--out", {str(tmp_path / 'train')!r}]))
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "python")]))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert (tmp_path / "features" / "results.json").is_file(), res.stderr
    assert res.returncode == 2, res.stderr
    assert len(res.stderr.splitlines()) == 1 and "Traceback" not in res.stderr
    assert res.stderr.startswith("nformer-reid train: torchvision is not installed")
    assert "pip install nformer_kernels[reid]" in res.stderr


def test_one_checkpoint_format_for_model_and_nformer(tmp_path):
    from nformer_reid.model import ReIDModel

    model = ReIDModel(3, arch="resnet18", feat_dim=16, nformer_depth=1, verbose=False)
    nformer = small_nformer()
    config = dict(dim=16, depth=1, num_landmarks=3, topk=4, num_classes=5)
    a = save_checkpoint(str(tmp_path / "model.pth"), model, stage=1, epoch=2)
    b = save_checkpoint(str(tmp_path / "nformer.pth"), nformer, stage=2, epoch=0, extra={"step": 7}, config=config)
    assert sorted(os.listdir(tmp_path)) == ["model.pth", "nformer.pth"]  # temp files renamed away
    sa, sb = load_checkpoint(a), load_checkpoint(b)
    assert sa.keys() == sb.keys() and (sa["kind"], sb["kind"]) == ("ReIDModel", "NFormer")
    assert sb["config"] == config and sb["extra"] == {"step": 7}
    for original, path, kind in ((model, a, "ReIDModel"), (nformer, b, "NFormer")):
        loaded = load_model(path, kind)
        for (k, v), (_, w) in zip(original.state_dict().items(), loaded.state_dict().items()):
            torch.testing.assert_close(v, w, msg=k)
    with pytest.raises(ValueError, match="holds no ReIDModel"):
        load_model(b, "ReIDModel")
    with pytest.raises(ValueError, match="holds no NFormer"):
        load_model(a, "NFormer")


def test_defaults_come_from_the_config_dataclasses(tmp_path):
    # The CLI adds no default of its own ...
    for name, cls in COMMANDS.items():
        cfg = parse_config([name, *REQUIRED.get(name, [])])
        assert type(cfg) is cls and cfg.command == name
        given = dict(zip(REQUIRED.get(name, [])[::2], REQUIRED.get(name, [])[1::2]))
        assert cfg == cls(**{k[2:]: v for k, v in given.items()})
    # ... `--data synthetic` swaps in the smoke recipe below YAML and command-line values ...
    assert parse_config(["train", "--data", "synthetic"]) == TrainConfig(data="synthetic", **SYNTHETIC)
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("epochs: 3\nmax-steps: 5\nsize: [32, 16]\n")
    cfg = parse_config(["train", "--data", "synthetic", "--config", str(cfg_file), "--max-steps", "7"])
    assert (cfg.arch, cfg.epochs, cfg.max_steps, cfg.size) == (SYNTHETIC["arch"], 3, 7, (32, 16))
    assert parse_config(["eval", "--data", "synthetic"]).size == SYNTHETIC["size"]
    for bad, message in (("size: [32]", "size must be a list"), ("rerank: 1", "rerank must be true or false"),
                         ("workers: many", "workers must be one value of type int")):
        cfg_file.write_text(bad + "\n")
        with pytest.raises(ReIDInputError, match=message):
            parse_config(["train", "--config", str(cfg_file)])
    # ... the library functions take theirs from the same dataclasses ...
    from nformer_reid.data.loader import build_test_loader, build_train_loader
    from nformer_reid.demo import run_demo
    from nformer_reid.engine import train_backbone, train_nformer
    from nformer_reid.model import ReIDModel

    def defaults(fn):
        return {k: p.default for k, p in inspect.signature(fn).parameters.items()}

    t = TrainConfig()
    assert {k: defaults(train_backbone)[k] for k in ("epochs", "lr", "milestones", "warmup_epochs")} == {
        "epochs": t.epochs, "lr": t.lr, "milestones": t.milestones, "warmup_epochs": t.warmup_epochs}
    assert {k: defaults(train_nformer)[k] for k in ("epochs", "seq_len", "batch_size", "lr")} == {
        "epochs": t.nformer_epochs, "seq_len": t.seq_len, "batch_size": t.nformer_batch, "lr": t.nformer_lr}
    assert {k: defaults(ReIDModel)[k] for k in ("arch", "feat_dim", "nformer_depth", "nformer_topk")} == {
        "arch": t.arch, "feat_dim": t.feat_dim, "nformer_depth": t.nformer_depth, "nformer_topk": t.nformer_topk}
    assert defaults(build_train_loader)["batch_size"] == t.batch_size
    assert defaults(build_test_loader)["batch_size"] == t.test_batch
    assert defaults(run_demo)["config"] == DemoConfig()
    # ... and the example YAML files set only what differs from them (naming the dataset aside).
    for name in sorted(os.listdir(os.path.join(ROOT, "configs"))):
        cls = COMMANDS[name.split("_")[0].split(".")[0]]
        with open(os.path.join(ROOT, "configs", name)) as fh:
            values = yaml.safe_load(fh)
        full = make_config(cls, values)
        plain = make_config(cls, {"data": values["data"]} if "data" in values else {})
        restated = [k for k in values if k != "data" and getattr(full, k) == getattr(plain, k)]
        assert not restated, f"configs/{name} restates defaults: {restated}"

