"""Hostile input to the Re-ID application: every user error of the CLI is one stderr line naming
the file or option, exit status 2, no traceback (--debug shows it), and nothing is written before
the checks pass; outputs are atomic, never replace a previous run's without --overwrite and never
an input; Ctrl-C exits 130 without a partial file; parsers count only regular image files;
training stops at the first non-finite loss and never saves NaN weights; progress is plain log
lines off a terminal."""
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import nformer_kernels as nk
from nformer_reid.cli import main
from nformer_reid.data import (MSMT17, DatasetLayoutError, FeatureSet, Market1501, load_features,
                               make_feature_benchmark, make_synthetic_market, save_features)
from nformer_reid.engine import load_checkpoint, save_checkpoint, train_nformer
from nformer_reid.utils import ReIDInputError, TrainingDiverged
from nformer_reid.utils import logging as reid_logging
from nformer_reid.utils.io import atomic_write, save_torch, write_json
from tests.helpers import RunsACommand

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "python")]))


def refused(capsys, argv, *names):
    """main(argv): exit 2, one stderr line naming each of `names` (regexes), no traceback."""
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, (rc, err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for name in names:
        assert re.search(name, err), (name, err)
    return err


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Small feature files (train / query / gallery, .pt) and an NFormer trained on them for 1 step."""
    tmp = tmp_path_factory.mktemp("features")
    bench = make_feature_benchmark(num_train_ids=20, num_test_ids=10, num_cams=3, images_per_cam=2, cams_per_id=2,
                                   dim=16, noise=1.0, num_distractors=5, seed=0)
    paths = {}
    for split in ("train", "query", "gallery"):
        paths[split] = str(tmp / f"{split}.pt")
        save_features(paths[split], getattr(bench, split))
    torch.manual_seed(0)
    config = dict(dim=16, depth=1, num_landmarks=3, topk=4, num_classes=20)
    nformer = nk.NFormer(**config)
    paths["nformer"] = save_checkpoint(str(tmp / "nformer.pth"), nformer, stage=2, epoch=0, config=config)
    paths["dir"] = str(tmp)
    paths["bench"] = bench
    return paths


def feats_args(files, out, *extra):
    return ["features", "--query", files["query"], "--gallery", files["gallery"], "--out", str(out), "--device", "cpu",
            *extra]


# ------------------------------------------------------------------------------------- option values
@pytest.mark.parametrize("argv,flag", [
    (["--nformer-steps", "-5"], "--nformer-steps must be >= 1"),
    (["--nformer-lr", "nan"], "--nformer-lr must be a finite number > 0"),
    (["--nformer-lr", "-1e-3"], "--nformer-lr"),
    (["--seq-len", "1"], "--seq-len must be >= 2"),
    (["--seed", "-1"], "--seed"),
    (["--nformer-batch", "0"], "--nformer-batch"),
    (["--nformer-topk", "0"], "--nformer-topk"),
    (["--nformer-steps", "many"], "--nformer-steps: invalid int value"),
    (["--mode", "joint"], "--mode: invalid choice"),
    (["--epochz", "3"], "unrecognized arguments: --epochz"),
])
def test_features_option_values_refused_before_any_work(files, tmp_path, capsys, argv, flag):
    out = tmp_path / "out"
    refused(capsys, feats_args(files, out, "--train", files["train"], *argv), re.escape(flag))
    assert not out.exists()  # checked before anything is written


@pytest.mark.parametrize("argv,flag", [
    (["demo", "--steps", "-3"], "--steps must be >= 1"),
    (["demo", "--lr", "inf"], "--lr must be a finite number > 0"),
    (["train", "--lr", "0"], "--lr must be a finite number > 0"),
    (["train", "--size", "0", "16"], "--size must be >= 1"),
    (["train", "--batch-size", "10", "--num-instances", "4"], "--batch-size 10 must be a multiple of --num-instances"),
    (["train", "--milestones", "0"], "--milestones"),
    (["train", "--arch", "resnet9"], "--arch must be one of"),
    (["train", "--data", "viper"], "--data must be one of"),
    (["train", "--stage", "both", "--resume", "x.pth"], "--resume continues one stage"),
    (["features", "--gallery", "g.pt"], "--query required: give --query and --gallery, or --features FILE"),
    (["eval", "--data", "synthetic"], "exactly one of --weights"),
    (["datasets"], "--root is required"),
])
def test_command_option_values(tmp_path, capsys, argv, flag):
    out = tmp_path / "out"
    refused(capsys, [*argv, "--out", str(out)] if argv[0] != "datasets" else argv, re.escape(flag))
    assert not out.exists()


def test_debug_shows_the_traceback(capsys):
    with pytest.raises(ReIDInputError, match="--steps must be >= 1"):
        main(["demo", "--steps", "-3", "--debug"])


def test_process_level_exit_status_and_no_traceback(tmp_path):
    res = subprocess.run([sys.executable, "-m", "nformer_reid", "demo", "--steps", "-3", "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert res.returncode == 2 and res.stderr == "nformer-reid demo: --steps must be >= 1, got -3\n", res.stderr
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------------------- --config
ALIAS_BOMB = ('a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x"]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n'
              'c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nseed: [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n')


def test_hostile_yaml_is_refused_in_one_short_line(tmp_path, capsys):
    """Aliases (a 300-byte tree expands to millions of values), keys given twice, 20,000 levels of
    nesting, in a --config file or a KEY=VALUE value: one line of at most a few hundred bytes,
    exit 2, at once; long values are clipped in messages."""
    cases = {"bomb.yaml": (ALIAS_BOMB, "aliases"), "twice.yaml": ("seed: 1\nseed: 2\n", "key 'seed' is given twice"),
             "deep.yaml": ("seed: " + "[" * 20000 + "]" * 20000 + "\n", "nested more than")}
    for name, (text, match) in cases.items():
        (tmp_path / name).write_text(text)
        started = time.monotonic()
        refused(capsys, ["demo", "--config", str(tmp_path / name)], re.escape(str(tmp_path / name)), match)
        assert time.monotonic() - started < 10
    for value, match in (("&a [1, *a]", "aliases"), ("[" * 20000 + "]" * 20000, "nested more than"),
                         (str(list(range(10000))), r"got \[0, 1, 2, 3, 4, 5, \.\.\.\]")):
        capsys.readouterr()
        assert main(["demo", f"seed={value}"]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and len(err) < 600 and re.search(match, err), err


def test_config_file_errors_name_the_file(tmp_path, capsys):
    missing = tmp_path / "none.yaml"
    refused(capsys, ["demo", "--config", str(missing)], "--config", re.escape(str(missing)), "no such file")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1, 2\n")
    refused(capsys, ["demo", "--config", str(bad)], re.escape(str(bad)), "not valid YAML")
    bad.write_text("- steps\n- 3\n")
    refused(capsys, ["demo", "--config", str(bad)], re.escape(str(bad)), "must hold a mapping")
    bad.write_text("steps: -2\n")
    refused(capsys, ["demo", "--config", str(bad)], re.escape(str(bad)) + ": steps must be >= 1")
    bad.write_text("steps: 2.5\n")
    refused(capsys, ["demo", "--config", str(bad)], "steps must be one value of type int")
    refused(capsys, ["demo", "--config", str(tmp_path)], "not a regular file")


# --------------------------------------------------------------------------------------------- devices
def test_device_errors(files, tmp_path, capsys):
    if not torch.cuda.is_available():
        refused(capsys, feats_args(files, tmp_path / "o", "--weights", files["nformer"]) + ["--device", "cuda"],
                "--device 'cuda': CUDA is not available")
    refused(capsys, ["demo", "--device", "gpu0", "--out", str(tmp_path / "d")], "--device 'gpu0' is not a device")
    assert not (tmp_path / "o").exists() and not (tmp_path / "d").exists()


# ---------------------------------------------------------------------------------------- input files
def test_unreadable_feature_and_checkpoint_files_are_named(files, tmp_path, capsys):
    text = tmp_path / "notes.pt"
    text.write_text("these are not features\n")
    refused(capsys, feats_args(files, tmp_path / "o", "--weights", files["nformer"]) + ["--query", str(text)],
            "--query file", re.escape(str(text)), "not a readable PyTorch file")
    truncated = tmp_path / "cut.pth"
    data = open(files["nformer"], "rb").read()
    truncated.write_bytes(data[: len(data) // 2])
    refused(capsys, feats_args(files, tmp_path / "o", "--weights", str(truncated)), "--weights",
            re.escape(str(truncated)), "truncated")
    refused(capsys, feats_args(files, tmp_path / "o", "--weights", str(tmp_path / "absent.pth")),
            re.escape(str(tmp_path / "absent.pth")) + ": no such file")
    refused(capsys, feats_args(files, tmp_path / "o", "--weights", files["nformer"]) + ["--gallery", str(tmp_path)],
            "--gallery", "not a regular file")
    cut_npz = tmp_path / "cut.npz"
    save_features(str(tmp_path / "whole.npz"), files["bench"].query)
    cut_npz.write_bytes(open(tmp_path / "whole.npz", "rb").read()[:100])
    refused(capsys, feats_args(files, tmp_path / "o", "--weights", files["nformer"]) + ["--query", str(cut_npz)],
            re.escape(str(cut_npz)), "not a readable .npz")
    assert not (tmp_path / "o").exists()


def bad_features(tmp_path, name, **arrays):
    path = tmp_path / f"{name}.pt"
    torch.save(arrays, path)
    return str(path)


def test_feature_file_contents_are_checked_on_load(files, tmp_path, capsys):
    q = files["bench"].query
    n = q.feats.shape[0]
    nan = q.feats.clone()
    nan[3, 1] = float("nan")
    cases = [
        (dict(feats=nan, pids=q.pids, camids=q.camids), r"feats contain NaN or Inf \(1 rows, first row 3\)"),
        (dict(feats=q.feats, pids=q.pids.float(), camids=q.camids), "pids must be integers"),
        (dict(feats=q.feats, pids=q.pids[:-1], camids=q.camids), rf"pids must be integers of shape \({n},\)"),
        (dict(feats=q.feats, pids=q.pids, camids=q.camids - 5), "camids must be >= 0"),
        (dict(feats=q.feats[:0], pids=q.pids[:0], camids=q.camids[:0]), "feats is empty"),
        (dict(feats=q.feats[:, :0], pids=q.pids, camids=q.camids), "feats is empty"),
        (dict(feats=q.feats.long(), pids=q.pids, camids=q.camids), "feats must be a 2-D float array"),
        (dict(feats=q.feats, pids=q.pids, camids=q.camids, names="not an array"), None),  # extra key: ignored
    ]
    for i, (arrays, message) in enumerate(cases):
        path = bad_features(tmp_path, f"q{i}", **arrays)
        if message is None:
            assert load_features(path, "--query").feats.shape == q.feats.shape
            continue
        refused(capsys, feats_args(files, tmp_path / "o", "--weights", files["nformer"]) + ["--query", path],
                "--query file", re.escape(path), message)
    torch.save([q.feats, q.pids], tmp_path / "list.pt")
    refused(capsys, feats_args(files, tmp_path / "o", "--weights", files["nformer"]) + ["--query",
            str(tmp_path / "list.pt")], "expected a dict")
    # query and gallery do not fit together: dims, no valid match (label consistency)
    g = files["bench"].gallery
    path = bad_features(tmp_path, "g8", feats=g.feats[:, :8], pids=g.pids, camids=g.camids)
    refused(capsys, feats_args(files, tmp_path / "o", "--weights", files["nformer"]) + ["--gallery", path],
            "16-d", "8-d", re.escape(path))
    path = bad_features(tmp_path, "g_other", feats=g.feats, pids=g.pids + 1000, camids=g.camids)
    refused(capsys, feats_args(files, tmp_path / "o", "--weights", files["nformer"]) + ["--gallery", path],
            "no query has a valid match", re.escape(path))
    assert not (tmp_path / "o").exists()


def test_extra_keys_are_ignored_with_a_warning(files, tmp_path, caplog):
    q = files["bench"].query
    path = bad_features(tmp_path, "extra", feats=q.feats, pids=q.pids, camids=q.camids, paths=["a.jpg"] * 3)
    with caplog.at_level(logging.WARNING, logger="nformer_reid"):
        got = load_features(path, "--query")
    assert torch.equal(got.feats, q.feats) and "ignoring keys ['paths']" in caplog.text


def test_failures_that_used_to_come_after_training(files, tmp_path, capsys):
    g = files["bench"].gallery
    empty = bad_features(tmp_path, "empty", feats=g.feats[:0], pids=g.pids[:0], camids=g.camids[:0])
    refused(capsys, feats_args(files, tmp_path / "o", "--train", files["train"], "--nformer-steps", "2",
                               "--seq-len", "32") + ["--gallery", empty], "--gallery file", "feats is empty")
    small = bad_features(tmp_path, "small", feats=g.feats[:3], pids=g.pids[:3], camids=(g.camids[:3] + 1) % 3)
    q = files["bench"].query
    query = bad_features(tmp_path, "q_small", feats=q.feats, pids=q.pids, camids=q.camids)
    torch.save({"feats": q.feats, "pids": torch.cat([g.pids[:3], q.pids[3:]]), "camids": q.camids}, query)
    refused(capsys, feats_args(files, tmp_path / "o", "--train", files["train"], "--mode", "paper",
                               "--nformer-steps", "2", "--seq-len", "32") + ["--gallery", small, "--query", query],
            "paper mode needs at least 19 gallery features for --nformer-topk 20, got 3")
    assert not (tmp_path / "o").exists()  # refused before training


# ------------------------------------------------------------------------------------------ checkpoints
def test_own_checkpoints_are_validated_on_load(files, tmp_path, capsys):
    state = torch.load(files["nformer"], weights_only=True)
    key = next(k for k, v in state["model"].items() if v.is_floating_point())

    def variant(name, change):
        s = {**state, "model": dict(state["model"])}
        change(s)
        torch.save(s, tmp_path / name)
        return str(tmp_path / name)

    def nan(s):
        s["model"][key] = torch.full_like(s["model"][key], float("nan"))

    def integer(s):
        s["model"][key] = s["model"][key].long()

    def shape(s):
        s["model"][key] = s["model"][key][..., :1]

    def not_tensor(s):
        s["model"][key] = [1.0, 2.0]

    cases = [(variant("nan.pth", nan), f"weight '{re.escape(key)}' holds NaN or Inf"),
             (variant("int.pth", integer), f"weight '{re.escape(key)}' has dtype torch.int64"),
             (variant("shape.pth", shape), f"weight '{re.escape(key)}' has shape"),
             (variant("list.pth", not_tensor), f"weight '{re.escape(key)}' is a list"),
             (variant("config.pth", lambda s: s.update(config=[1, 2])), "key 'config' must be a mapping"),
             (variant("badcfg.pth", lambda s: s["config"].update(dim=-3)), "key 'config'")]
    torch.save([1, 2, 3], tmp_path / "seq.pth")
    cases.append((str(tmp_path / "seq.pth"), "is not an NFormer saved by 'nformer-reid features --train'"))
    for path, message in cases:
        refused(capsys, feats_args(files, tmp_path / "o", "--weights", path), "--weights", re.escape(path), message)
    refused(capsys, feats_args(files, tmp_path / "o", "--weights", files["nformer"], "--nformer-depth", "3"),
            "holds an NFormer of depth 1, but --nformer-depth 3 was asked for")
    with pytest.raises(ReIDInputError, match="is not an nformer-reid checkpoint"):
        load_checkpoint(str(tmp_path / "seq.pth"))
    assert not (tmp_path / "o").exists()


def test_official_release_errors_name_the_file(files, tmp_path, capsys):
    torch.save({"nformer.h.0.attn.c_attn.w": torch.zeros(3)}, tmp_path / "official.pth")
    refused(capsys, feats_args(files, tmp_path / "o", "--official", str(tmp_path / "official.pth")),
            "--official", re.escape(str(tmp_path / "official.pth")))
    (tmp_path / "text.pth").write_text("hello")
    refused(capsys, feats_args(files, tmp_path / "o", "--official", str(tmp_path / "text.pth")),
            "--official", "not a readable PyTorch file")


def test_checkpoints_with_a_payload_never_run_it(files, tmp_path, capsys):
    """An official-layout state dict (bare or under "state_dict") plus one pickled object that runs a
    command: --official (features, refine), --weights and --pretrained refuse it without running it."""
    from nformer_reid.model import _load_state_dict

    marker = tmp_path / "it_ran"
    official = {"nformer.h.0.attn.c_attn.w": torch.zeros(16, 48), "backbone.classifier.weight": torch.zeros(4, 16)}
    for i, state in enumerate([{**official, "evil": RunsACommand(marker)},
                               {"state_dict": official, "evil": RunsACommand(marker)}]):
        path = str(tmp_path / f"evil{i}.pth")
        torch.save(state, path)
        refused(capsys, feats_args(files, tmp_path / f"o{i}", "--official", path), "--official",
                re.escape(path), "holds Python objects")
        refused(capsys, ["refine", "--input", files["gallery"], "--output", str(tmp_path / f"r{i}.pt"),
                         "--official", path], "--official", "holds Python objects")
        refused(capsys, ["refine", "--input", files["gallery"], "--output", str(tmp_path / f"w{i}.pt"),
                         "--weights", path], "--weights")
        with pytest.raises(ReIDInputError, match="holds Python objects"):
            _load_state_dict(path, "--pretrained")
    assert not marker.exists()


# Every option of every command that names a file to read, with the other options a valid run needs
# ({evil}: the planted file; {out}: a fresh output place). --config is every command's: a YAML file.
FILE_OPTIONS = [
    ("features", "--query", ["features", "--query", "{evil}", "--gallery", "{gallery}", "--weights", "{nformer}"]),
    ("features", "--gallery", ["features", "--query", "{query}", "--gallery", "{evil}", "--weights", "{nformer}"]),
    ("features", "--features", ["features", "--features", "{evil}", "--weights", "{nformer}"]),
    ("features", "--train", ["features", "--query", "{query}", "--gallery", "{gallery}", "--train", "{evil}"]),
    ("features", "--weights", ["features", "--query", "{query}", "--gallery", "{gallery}", "--weights", "{evil}"]),
    ("features", "--official", ["features", "--query", "{query}", "--gallery", "{gallery}", "--official", "{evil}"]),
    ("refine", "--input", ["refine", "--input", "{evil}", "--output", "{out}.npy", "--weights", "{nformer}"]),
    ("refine", "--weights", ["refine", "--input", "{gallery}", "--output", "{out}.npy", "--weights", "{evil}"]),
    ("refine", "--official", ["refine", "--input", "{gallery}", "--output", "{out}.npy", "--official", "{evil}"]),
    ("rerank", "--query", ["rerank", "--query", "{evil}", "--gallery", "{gallery}"]),
    ("rerank", "--gallery", ["rerank", "--query", "{query}", "--gallery", "{evil}"]),
    ("rerank", "--features", ["rerank", "--features", "{evil}"]),
    ("eval", "--weights", ["eval", "--data", "synthetic", "--weights", "{evil}", "--size", "32", "16"]),
    ("eval", "--official", ["eval", "--data", "synthetic", "--official", "{evil}", "--size", "32", "16"]),
    ("train", "--pretrained", ["train", "--data", "synthetic", "--pretrained", "{evil}", "--size", "32", "16"]),
    ("train", "--weights", ["train", "--data", "synthetic", "--weights", "{evil}", "--size", "32", "16"]),
    ("train", "--resume", ["train", "--data", "synthetic", "--resume", "{evil}", "--size", "32", "16"]),
]


@pytest.mark.parametrize("command,option,argv", [pytest.param(*case, id=f"{case[0]}{case[1]}") for case in FILE_OPTIONS])
def test_a_payload_in_any_file_option_never_runs(files, tmp_path, capsys, command, option, argv):
    """A .pt file whose pickle runs a command (touching a marker) given to each file option of each
    command: exit 2, one line naming the option, and the marker never appears."""
    pytest.importorskip("torchvision") if command in ("eval", "train") else None
    marker = tmp_path / "it_ran"
    evil = tmp_path / "evil.pt"
    torch.save({"feats": torch.zeros(4, 16), "state_dict": {}, "payload": RunsACommand(marker)}, evil)
    values = {**files, "evil": str(evil), "out": str(tmp_path / "o")}
    filled = [a.format(**values) for a in argv]
    if command != "refine":
        filled += ["--out", str(tmp_path / "o")]
    refused(capsys, [*filled, "--device", "cpu"], re.escape(option))
    assert not marker.exists()


def test_a_yaml_config_that_builds_objects_never_runs(files, tmp_path, capsys):
    """--config: YAML tags that would build Python objects (yaml.unsafe_load's) are refused."""
    marker = tmp_path / "it_ran"
    config = tmp_path / "evil.yaml"
    config.write_text(f"seed: !!python/object/apply:os.system [\"touch {marker}\"]\n")
    for argv in (feats_args(files, tmp_path / "o", "--weights", files["nformer"]),
                 ["refine", "--input", files["gallery"], "--output", str(tmp_path / "r.npy"), "--weights",
                  files["nformer"]]):
        refused(capsys, [*argv, "--config", str(config)], "--config")
    assert not marker.exists()


def test_damaged_and_truncated_official_checkpoints_are_refused(files, tmp_path, capsys):
    """A byte flipped inside a tensor (the zip member's CRC names it) and a file missing its last
    block (3 of the release's 4) are refused; --nformer-depth 3 loads the 3-block file as it is."""
    from nformer_bench.baselines import random_official_state_dict

    full = random_official_state_dict(dim=16, depth=4, seed=1)
    path = tmp_path / "official.pth"
    torch.save(full, path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the tensor data, far from the headers
    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes(bytes(data))
    refused(capsys, ["refine", "--input", files["gallery"], "--output", str(tmp_path / "r.pt"),
                     "--official", str(damaged)], "--official", "damaged", "fails its CRC check")
    truncated = tmp_path / "truncated.pth"
    torch.save({k: v for k, v in full.items() if not k.startswith("nformer.h.3.")}, truncated)
    refused(capsys, ["refine", "--input", files["gallery"], "--output", str(tmp_path / "t.pt"),
                     "--official", str(truncated)], "--official", "depth=3", "depth=4")
    assert main(["refine", "--input", files["gallery"], "--output", str(tmp_path / "t3.pt"), "--official",
                 str(truncated), "--nformer-depth", "3"]) == 0


def test_train_and_eval_files_and_roots(tmp_path, capsys):
    pytest.importorskip("torchvision")
    from nformer_reid.model import ReIDModel

    model = ReIDModel(4, arch="resnet18", feat_dim=16, nformer_depth=1, verbose=False)
    final = save_checkpoint(str(tmp_path / "model_final.pth"), model, stage=1, epoch=1)
    refused(capsys, ["train", "--data", "synthetic", "--stage", "1", "--resume", final, "--out", str(tmp_path / "r")],
            "--resume", re.escape(final), "a final checkpoint", "--weights")
    refused(capsys, ["eval", "--data", "market1501", "--root", str(tmp_path / "nowhere"), "--weights", final,
                     "--out", str(tmp_path / "e")], re.escape("--root " + str(tmp_path / "nowhere")) + ": no such folder")
    refused(capsys, ["eval", "--data", "market1501", "--weights", final, "--out", str(tmp_path / "e")],
            "--root is required")
    refused(capsys, ["train", "--data", "market1501", "--root", str(tmp_path), "--out", str(tmp_path / "t")],
            "Market1501 not found under", "bounding_box_train")
    refused(capsys, ["train", "--data", "synthetic", "--pretrained", str(tmp_path / "r50.pth"), "--out",
                     str(tmp_path / "t")], "--pretrained", "no such file")
    (tmp_path / "r50.pth").write_text("not weights")
    refused(capsys, ["train", "--data", "synthetic", "--arch", "resnet18", "--pretrained", str(tmp_path / "r50.pth"),
                     "--out", str(tmp_path / "t")], "--pretrained", "not a readable PyTorch file")
    refused(capsys, ["train", "--data", "synthetic", "--weights", final, "--nformer-depth", "2", *SMALL,
                     "--out", str(tmp_path / "t")], "--weights", "num_classes=4|nformer_depth=1")
    for out in ("r", "e"):
        assert not (tmp_path / out).exists()
    real = tmp_path / "market"  # a real dataset layout: model and weights are checked before anything is written
    market(str(real))
    refused(capsys, ["train", "--data", "market1501", "--root", str(real), "--arch", "resnet18", "--batch-size", "2",
                     "--num-instances", "1", "--pretrained", str(tmp_path / "r50.pth"), *SMALL, "--out",
                     str(tmp_path / "m")], "--pretrained", "not a readable PyTorch file")
    refused(capsys, ["train", "--data", "market1501", "--root", str(real), "--arch", "resnet18", "--batch-size", "2",
                     "--num-instances", "1", "--weights", final, "--feat-dim", "32", *SMALL, "--out",
                     str(tmp_path / "m")], "--weights", "num_classes=4|feat_dim=16")
    refused(capsys, ["train", "--data", "market1501", "--root", str(real), "--batch-size", "8", "--num-instances", "2",
                     *SMALL, "--out", str(tmp_path / "m")], "2 train identities cannot fill batches of 4 identities")
    assert not (tmp_path / "m").exists()


SMALL = ["--size", "32", "16", "--workers", "0", "--device", "cpu"]


# --------------------------------------------------------------------------------------- output folder
def test_out_is_checked_and_never_silently_replaced(files, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    refused(capsys, feats_args(files, tmp_path / "file", "--weights", files["nformer"]), "--out",
            "exists and is not a folder")
    out = tmp_path / "run"
    argv = feats_args(files, out, "--weights", files["nformer"])
    assert main(argv) == 0
    first = json.loads((out / "results.json").read_text())
    assert {"results.json", "cmc.png", "refined_features.pt", "log.txt", "config.yaml"} <= set(os.listdir(out))
    before = {name: (out / name).read_bytes() for name in ("results.json", "cmc.png", "refined_features.pt")}
    refused(capsys, argv, re.escape(f"--out {out} already holds results.json, cmc.png, refined_features.pt"),
            "--overwrite")
    assert all((out / name).read_bytes() == data for name, data in before.items())  # untouched
    assert main(argv + ["--overwrite"]) == 0
    assert json.loads((out / "results.json").read_text())["methods"] == first["methods"]
    assert not [n for n in os.listdir(out) if ".tmp-" in n]  # no temporary file left behind


def test_an_output_never_overwrites_an_input(files, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    query = out / "refined_features.pt"
    save_features(str(query), files["bench"].query)
    data = query.read_bytes()
    refused(capsys, feats_args(files, out, "--weights", files["nformer"], "--overwrite") + ["--query", str(query)],
            "--query", "is also an output of this run", "inputs are never overwritten")
    assert query.read_bytes() == data


def test_synthetic_generator_never_clears_a_real_dataset(tmp_path, capsys):
    real = tmp_path / "market"
    (real / "query").mkdir(parents=True)
    (real / "query" / "0001_c1s1_000001_00.jpg").write_bytes(b"jpeg")
    refused(capsys, ["datasets", "--root", str(real), "--name", "synthetic"], "not write", "refusing to replace")
    assert (real / "query" / "0001_c1s1_000001_00.jpg").read_bytes() == b"jpeg"


# ---------------------------------------------------------------------------------- atomic writes, Ctrl-C
def test_atomic_write_keeps_the_old_file_on_error_and_interrupt(tmp_path):
    path = tmp_path / "results.json"
    write_json({"a": 1}, str(path))
    for exc in (RuntimeError("disk"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with atomic_write(str(path), "w") as fh:
                fh.write('{"a": ')
                raise exc
        assert json.loads(path.read_text()) == {"a": 1}
        assert os.listdir(tmp_path) == ["results.json"]


def test_a_failed_write_is_a_user_error_naming_the_file(tmp_path):
    (tmp_path / "results.json").mkdir()  # a folder where the file should go
    with pytest.raises(ReIDInputError, match="cannot write .*results.json"):
        write_json({"a": 1}, str(tmp_path / "results.json"))
    assert os.listdir(tmp_path) == ["results.json"]  # the temporary file is gone


def test_ctrl_c_exits_130_with_one_line_and_no_partial_file(files, tmp_path, capsys, monkeypatch):
    real_save = torch.save

    def interrupted_save(obj, fh, *args, **kwargs):
        real_save(obj, fh, *args, **kwargs)
        raise KeyboardInterrupt  # Ctrl-C after the bytes went to the temporary file, before the rename

    monkeypatch.setattr(torch, "save", interrupted_save)
    out = tmp_path / "run"
    rc = main(feats_args(files, out, "--weights", files["nformer"]))
    err = capsys.readouterr().err
    assert rc == 130 and err == "nformer-reid features: interrupted (files being written were discarded)\n"
    assert "refined_features.pt" not in os.listdir(out) and not [n for n in os.listdir(out) if ".tmp-" in n]


def _rewrite_forever(folder: str, weights: torch.Tensor) -> None:
    """The child of the kill test: replace results.json and nformer.pth again and again."""
    i = 0
    while True:
        i += 1
        write_json({"run": i, "values": list(range(20000))}, os.path.join(folder, "results.json"))
        save_torch({"run": i, "w": weights}, os.path.join(folder, "nformer.pth"))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_kill_during_write_never_leaves_a_broken_file(tmp_path):
    """SIGKILL a process that rewrites results.json and nformer.pth in a loop, at 8 moments: each
    file is always absent (before its first rename) or whole, never truncated."""
    weights = torch.arange(1 << 19, dtype=torch.float32)
    seen = set()
    for attempt in range(8):
        pid = os.fork()
        if pid == 0:  # child: write until killed
            try:
                _rewrite_forever(str(tmp_path), weights)
            finally:
                os._exit(1)
        time.sleep(0.02 + 0.04 * attempt)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        if (tmp_path / "results.json").exists():
            assert len(json.loads((tmp_path / "results.json").read_text())["values"]) == 20000
            seen.add("json")
        if (tmp_path / "nformer.pth").exists():
            data = torch.load(tmp_path / "nformer.pth", weights_only=True)
            assert torch.equal(data["w"], weights) and data["run"] >= 1
            seen.add("torch")
    assert seen == {"json", "torch"}  # both files were being replaced when the process was killed


# ------------------------------------------------------------------------------------------------ parsers
def touch(folder, *names):
    os.makedirs(folder, exist_ok=True)
    for name in names:
        open(os.path.join(folder, name), "wb").close()


def market(root):
    touch(os.path.join(root, "bounding_box_train"), "0002_c1s1_000451_03.jpg", "0007_c3s3_064069_01.jpg")
    touch(os.path.join(root, "query"), "0001_c1s1_001051_00.jpg")
    touch(os.path.join(root, "bounding_box_test"), "0001_c2s1_000301_01.jpg")


def test_only_regular_image_files_count(tmp_path):
    market(str(tmp_path))
    os.makedirs(tmp_path / "query" / "0005_c1s1_000001_00.jpg")  # a folder named like an image
    os.symlink(tmp_path / "missing.jpg", tmp_path / "query" / "0006_c2s1_000001_00.jpg")  # a broken link
    os.symlink(tmp_path / "query" / "0001_c1s1_001051_00.jpg", tmp_path / "query" / "0008_c3s1_000001_00.jpg")
    ds = Market1501(str(tmp_path), verbose=False)
    assert sorted(os.path.basename(p) for p, _, _ in ds.query) == ["0001_c1s1_001051_00.jpg",
                                                                    "0008_c3s1_000001_00.jpg"]


def test_malformed_market_names_are_named(tmp_path):
    market(str(tmp_path))
    touch(str(tmp_path / "query"), "1-2_c1s1_000001_00.jpg")
    with pytest.raises(DatasetLayoutError, match="1-2_c1s1_000001_00.jpg"):
        Market1501(str(tmp_path), verbose=False)


def msmt(root, gallery_line):
    base = os.path.join(root, "MSMT17_V1")
    touch(os.path.join(base, "train", "0000"), "0000_000_01_0303morning_0015_0.jpg")
    touch(os.path.join(base, "test", "0000"), "0000_000_03_0303morning_0001_0.jpg", "0000_001_16_0303noon_0002_0.jpg",
          "0000_001_12_0303noon_0002_0.jpg")
    lines = {"train": "0000/0000_000_01_0303morning_0015_0.jpg 0\n", "val": "",
             "query": "0000/0000_000_03_0303morning_0001_0.jpg 0\n", "gallery": gallery_line}
    for split, text in lines.items():
        with open(os.path.join(base, f"list_{split}.txt"), "w") as fh:
            fh.write(text)
    return base


def test_msmt17_camera_ids_and_listed_files_are_checked(tmp_path):
    base = msmt(str(tmp_path), "0000/0000_001_16_0303noon_0002_0.jpg 0\n")
    with pytest.raises(DatasetLayoutError, match=r"list_gallery.txt:1: .*camera 16 outside .*\[1, 15\]"):
        MSMT17(str(tmp_path), verbose=False)
    with open(os.path.join(base, "list_gallery.txt"), "w") as fh:
        fh.write("0000/0000_001_12_0303noon_0009_0.jpg 0\n")  # listed, but no such image
    with pytest.raises(DatasetLayoutError, match="0000_001_12_0303noon_0009_0.jpg listed in .*list_gallery.txt"):
        MSMT17(str(tmp_path), verbose=False)
    with open(os.path.join(base, "list_gallery.txt"), "w") as fh:
        fh.write("0000/0000_001_12_0303noon_0002_0.jpg 0\n")
    assert [(p, c) for _, p, c in MSMT17(str(tmp_path), verbose=False).gallery] == [(0, 11)]  # the file's pid


def test_cuhk03_camera_ids_and_indices_are_checked(tmp_path):
    from scipy.io import savemat

    from nformer_reid.data import CUHK03

    names = ["1_001_1_01.png", "1_001_3_06.png", "1_002_1_01.png", "1_002_2_07.png"]
    touch(str(tmp_path / "images_labeled"), *names)
    filelist = np.empty((len(names), 1), dtype=object)
    for i, n in enumerate(names):
        filelist[i, 0] = np.array([n])
    split = {"filelist": filelist, "labels": np.array([[1], [1], [2], [2]]), "train_idx": np.array([[3], [4]]),
             "query_idx": np.array([[1]]), "gallery_idx": np.array([[2]])}
    savemat(str(tmp_path / "cuhk03_new_protocol_config_labeled.mat"), split)
    with pytest.raises(DatasetLayoutError, match=r"'1_001_3_06.png' has camera 3 outside \[1, 2\]"):
        CUHK03(str(tmp_path), verbose=False)
    savemat(str(tmp_path / "cuhk03_new_protocol_config_labeled.mat"), {**split, "gallery_idx": np.array([[9]])})
    with pytest.raises(DatasetLayoutError, match=r"gallery_idx holds index 9 outside \[1, 4\]"):
        CUHK03(str(tmp_path), verbose=False)


def test_a_damaged_cuhk03_split_file_is_a_layout_error(tmp_path):
    """Truncated, bit-flipped, random or text bytes as the split .mat: DatasetLayoutError naming it,
    whatever scipy raises while parsing."""
    from scipy.io import savemat

    from nformer_reid.data import CUHK03

    touch(str(tmp_path / "images_labeled"), "1_001_1_01.png")
    path = tmp_path / "cuhk03_new_protocol_config_labeled.mat"
    filelist = np.empty((1, 1), dtype=object)
    filelist[0, 0] = np.array(["1_001_1_01.png"])
    savemat(str(path), {"filelist": filelist, "labels": np.arange(400.0)[:, None], "train_idx": np.array([[1]]),
                        "query_idx": np.array([[1]]), "gallery_idx": np.array([[1]])}, do_compression=True)
    good = path.read_bytes()
    rng = np.random.default_rng(0)
    flipped = bytearray(good)
    flipped[200:260] = rng.integers(0, 256, 60, dtype=np.uint8).tobytes()
    for damaged in (good[:len(good) // 2], bytes(flipped), rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
                    b"MATLAB 5.0 MAT-file, not really\n" * 8, b""):
        path.write_bytes(damaged)
        with pytest.raises(DatasetLayoutError, match=r"cuhk03_new_protocol_config_labeled.mat"):
            CUHK03(str(tmp_path), verbose=False)
    savemat(str(path), {"filelist": filelist, "labels": np.array(["one"]), "train_idx": np.array([[1]]),
                        "query_idx": np.array([[1]]), "gallery_idx": np.array([[1]])})
    with pytest.raises(DatasetLayoutError, match=r"labels does not hold integers"):
        CUHK03(str(tmp_path), verbose=False)


# -------------------------------------------------------------------------------------- training numerics
def test_training_stops_at_the_first_non_finite_loss_and_saves_nothing(tmp_path):
    torch.manual_seed(0)
    nformer = nk.NFormer(dim=16, depth=1, num_landmarks=3, topk=4, num_classes=6)
    feats, pids = torch.randn(60, 16), torch.arange(60) % 6
    with pytest.raises(TrainingDiverged, match=r"stage 2 step \d+: (the loss is (nan|inf)|.*out of range)"):
        train_nformer(nformer, feats, pids, out_dir=str(tmp_path), steps=5, seq_len=20, lr=1e30, device="cpu")
    assert not (tmp_path / "stage2_last.pth").exists()

    class NaNLoss(torch.nn.Module):  # the loss itself turns NaN at step 2
        calls = 0

        def forward(self, logits, feats, labels):
            NaNLoss.calls += 1
            loss = logits.float().square().mean() * (float("nan") if NaNLoss.calls == 2 else 1.0)
            return loss, {"ce": float(loss.detach()), "triplet": 0.0, "center": 0.0}

    from nformer_reid import solver

    losses = []
    real_step = solver.optimizer_step

    def spy(loss, *args, **kwargs):
        losses.append(float(loss.detach()))
        return real_step(loss, *args, **kwargs)

    import nformer_reid.engine.nformer_training as stage2

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stage2, "ReIDLoss", lambda *a, **k: _WithCenter(NaNLoss()))
        mp.setattr(stage2, "optimizer_step", spy)
        with pytest.raises(TrainingDiverged, match="stage 2 step 2: the loss is nan"):
            train_nformer(nk.NFormer(dim=16, depth=1, num_landmarks=3, topk=4, num_classes=6), feats, pids,
                          out_dir=str(tmp_path), steps=5, seq_len=20, device="cpu")
    assert len(losses) == 2 and np.isnan(losses[1])  # stopped at the first non-finite loss
    assert not (tmp_path / "stage2_last.pth").exists()
    with torch.no_grad():
        next(nformer.parameters()).fill_(float("inf"))
    with pytest.raises(TrainingDiverged, match="refusing to save"):
        save_checkpoint(str(tmp_path / "bad.pth"), nformer, stage=2, epoch=0)
    assert os.listdir(tmp_path) == []


class _WithCenter(torch.nn.Module):
    """A loss module with the center-loss parts train_nformer's optimisers expect."""

    def __init__(self, loss):
        super().__init__()
        self.loss, self.center, self.center_weight = loss, torch.nn.Linear(1, 1), 1.0

    def forward(self, *args):
        return self.loss(*args)


def test_diverging_training_from_the_cli_is_a_one_line_error(files, tmp_path, capsys):
    out = tmp_path / "o"
    refused(capsys, feats_args(files, out, "--train", files["train"], "--nformer-lr", "1e30", "--nformer-steps", "4",
                               "--seq-len", "32", "--nformer-depth", "1", "--amp", "none"),
            r"stage 2 step \d+: (the loss is|the NFormer's weights grew out of range)", "lr 1e\\+30")
    assert not (out / "nformer.pth").exists() and not (out / "stage2_last.pth").exists()


# -------------------------------------------------------------------------------------- library arguments
def test_library_arguments_are_checked_by_name():
    from nformer_reid.engine import refine_features
    from nformer_reid.losses import ReIDLoss, TripletLoss
    from nformer_reid.metrics import evaluate_rank
    from nformer_reid.neighborhood import NeighborhoodSampler
    from nformer_reid.rerank import re_ranking

    d = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)
    ids = ([1, 2, 3], [1, 2, 3, 1, 2], [0, 0, 0], [1, 1, 1, 1, 1])
    cmc, _ = evaluate_rank(d, *ids, max_rank=np.int64(3), chunk_size=np.int32(2))  # numpy ints are ints
    assert cmc.shape == (3,)
    for kwargs, exc, message in ((dict(chunk_size=-1), ValueError, "chunk_size must be >= 1"),
                                 (dict(chunk_size=0.5), TypeError, "chunk_size must be an int"),
                                 (dict(max_rank="5"), TypeError, "max_rank must be an int"),
                                 (dict(device="tpu:3"), ValueError, "device 'tpu:3'")):
        with pytest.raises(exc, match=message):
            evaluate_rank(d, *ids, **kwargs)
    with pytest.raises(TypeError, match="distmat must hold numbers"):
        evaluate_rank(np.array([["a", "b"]]), [1], [1, 1], [0], [1, 1])
    dist = np.abs(np.random.default_rng(1).normal(size=(8, 8)))
    dist = (dist + dist.T) / 2
    np.fill_diagonal(dist, 0)
    with pytest.raises(TypeError, match="k1 must be an int"):
        re_ranking(dist[:3, 3:], dist[:3, :3], dist[3:, 3:], k1=2.5)
    with pytest.raises(TypeError, match="lambda_value must be a number"):
        re_ranking(dist[:3, 3:], dist[:3, :3], dist[3:, 3:], k1=2, lambda_value="0.3")
    got = re_ranking(dist[:3, 3:], dist[:3, :3], dist[3:, 3:], k1=np.int64(2), k2=np.int32(2),
                     lambda_value=np.float32(0.3))
    assert np.isfinite(got).all()
    for make, message in ((lambda: TripletLoss(margin=float("nan")), "margin must be finite"),
                          (lambda: ReIDLoss(0, 8), "num_classes must be >= 1"),
                          (lambda: NeighborhoodSampler(torch.randn(10, 4), torch.arange(10), seq_len=1), "seq_len"),
                          (lambda: NeighborhoodSampler(torch.randn(10, 4), torch.arange(10), batch_size="2"),
                           "batch_size must be an int")):
        with pytest.raises((ValueError, TypeError), match=message):
            make()
    torch.manual_seed(0)
    nformer = nk.NFormer(dim=8, depth=1, num_landmarks=2, topk=6)
    with pytest.raises(ValueError, match="paper mode needs at least 5 gallery features for topk 6, got 2"):
        refine_features(nformer, torch.randn(4, 8), torch.randn(2, 8), "paper")
    with pytest.raises(ValueError, match="qf contains NaN"):
        refine_features(nformer, torch.full((4, 8), float("nan")), torch.randn(9, 8))
    q, g = refine_features(nformer, torch.randn(8, 8).T, torch.randn(9, 16)[:, ::2])  # non-contiguous inputs
    assert q.shape == (8, 8) and g.shape == (9, 8)


def test_degenerate_valid_inputs_give_finite_documented_results():
    from nformer_reid.metrics import compute_distance_matrix, evaluate_rank
    from nformer_reid.rerank import re_ranking, re_ranking_sparse

    same = np.ones((6, 4), dtype=np.float32)
    d = compute_distance_matrix(same[:2], same[2:])
    assert torch.equal(d, torch.zeros(2, 4))  # identical rows
    zero = np.zeros((2, 4), dtype=np.float32)
    assert torch.allclose(compute_distance_matrix(zero, same, normalize=True), torch.ones(2, 6))  # zero row: 1
    assert torch.allclose(compute_distance_matrix(zero, same), torch.full((2, 6), 4.0))  # raw: squared distance
    assert torch.allclose(compute_distance_matrix(zero, same, "cosine"), torch.ones(2, 6))
    cmc, mAP = evaluate_rank(np.zeros((2, 4)), [1, 2], [1, 2, 1, 2], [0, 0], [1, 1, 1, 1])  # all-zero distances
    # equal distances rank by gallery index: matches of query 1 at ranks 1, 3; of query 2 at ranks 2, 4
    assert mAP == pytest.approx(((1 + 2 / 3) / 2 + (1 / 2 + 2 / 4) / 2) / 2) and cmc.tolist() == [0.5, 1, 1, 1]
    zeros = np.zeros((6, 6))
    dense = re_ranking(zeros[:2, 2:], zeros[:2, :2], zeros[2:, 2:], k1=2, k2=2, lambda_value=0.3)
    sparse = re_ranking_sparse(same[:2], same[2:], k1=2, k2=2, lambda_value=0.3)
    for got in (dense, sparse):
        assert np.isfinite(got).all() and (got >= 0).all() and (got <= 0.7 + 1e-6).all()
    assert re_ranking_sparse(same[:2], same[2:2], k1=1, k2=1).shape == (2, 0)


# ------------------------------------------------------------------------------------------------ progress
class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_plain_log_lines_off_a_terminal(monkeypatch, caplog):
    monkeypatch.setattr(reid_logging, "PROGRESS_LOG_SECONDS", 0.0)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with caplog.at_level(logging.INFO, logger="nformer_reid"):
        bar = reid_logging.progress(range(4), "stage2")
        assert isinstance(bar, reid_logging.LogProgress)
        for i in bar:
            bar.set_postfix(loss=f"{i:.3f}")
    assert sys.stderr.getvalue() == ""  # nothing on stderr, no carriage returns anywhere
    messages = [re.sub(r" elapsed \S+ eta \S+", "", r.getMessage()) for r in caplog.records]
    assert messages == [f"stage2: {i}/4 ({25 * i}%) loss={i - 1:.3f}" for i in range(1, 5)]
    assert "\r" not in caplog.text
    monkeypatch.setattr(sys, "stderr", FakeTerminal())
    with caplog.at_level(logging.INFO, logger="nformer_reid"):
        bar = reid_logging.progress(range(3), "features")
        assert not isinstance(bar, reid_logging.LogProgress)  # tqdm on a terminal
        assert list(bar) == [0, 1, 2]


def test_long_non_interactive_run_logs_few_lines(monkeypatch, caplog):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with caplog.at_level(logging.INFO, logger="nformer_reid"):
        assert sum(1 for _ in reid_logging.progress(range(10000), "stage1")) == 10000
    assert caplog.records == []  # faster than PROGRESS_LOG_SECONDS: no line at all
