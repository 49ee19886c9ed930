"""One run per output, and --overwrite leaves one run's results: the output lock (utils.io.OutputLock)
and the outputs manifest (utils.io.OutputManifest), through the CLI.

Two runs started together into one --out (or one --output file) must not both run: exactly one
succeeds, whichever starts first; the other exits 2 with one line (in use, or already holding an
earlier run's files). A lock left by a dead run is taken over; one held by a live process refuses.
"""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nformer_reid.cli import main
from nformer_reid.data import make_feature_benchmark, save_features
from nformer_reid.utils.errors import ReIDInputError
from nformer_reid.utils.io import MANIFEST, OutputLock, OutputManifest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "python")])}


@pytest.fixture(scope="module")
def feats(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("outputs")
    bench = make_feature_benchmark(num_train_ids=4, num_test_ids=12, num_cams=3, images_per_cam=2, cams_per_id=2,
                                   dim=16, noise=1.0, num_distractors=5, seed=0)
    q, g = str(tmp / "query.pt"), str(tmp / "gallery.pt")
    save_features(q, bench.query)
    save_features(g, bench.gallery)
    return q, g


def rerank_args(feats, out, *extra):
    return ["rerank", "--query", feats[0], "--gallery", feats[1], "--out", str(out), *extra]


def test_a_second_lock_is_refused_and_a_dead_runs_lock_taken_over(tmp_path):
    first = OutputLock.of_folder(str(tmp_path)).acquire()
    with pytest.raises(ReIDInputError, match=r"--out .* is in use by another run \(pid \d+ on .*delete"):
        OutputLock.of_folder(str(tmp_path)).acquire()
    first.release()
    assert not os.path.exists(first.path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    with open(first.path, "w") as fh:  # left by a killed run
        json.dump({"pid": int(dead.stdout), "host": socket.gethostname(), "started": "then"}, fh)
    with OutputLock.scope():
        taken = OutputLock.of_folder(str(tmp_path)).acquire()
        assert json.load(open(taken.path))["pid"] == os.getpid()
    assert not os.path.exists(taken.path)  # released with its scope


def test_a_live_runs_lock_refuses_the_cli_in_one_line(feats, tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        os.makedirs(tmp_path / "out")
        with open(tmp_path / "out" / ".nformer-reid.lock", "w") as fh:
            json.dump({"pid": holder.pid, "host": socket.gethostname(), "started": "now"}, fh)
        assert main(rerank_args(feats, tmp_path / "out")) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"is in use by another run (pid {holder.pid}" in err
        assert sorted(os.listdir(tmp_path / "out")) == [".nformer-reid.lock"]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    assert main(rerank_args(feats, tmp_path / "out")) == 0  # the holder is gone: its lock is taken over


def _together(argvs):
    procs = [subprocess.Popen([sys.executable, "-m", "nformer_reid", *argv], env=ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for argv in argvs]
    return [(p.wait(timeout=300), p.stderr.read()) for p in procs]


@pytest.mark.parametrize("order", ["a-first", "b-first"])
def test_two_runs_started_together_into_one_out(feats, tmp_path, order):
    out = tmp_path / "out"
    a, b = rerank_args(feats, out, "--save-distmat"), rerank_args(feats, out, "--save-ranks", "3")
    got = _together([a, b] if order == "a-first" else [b, a])
    codes = sorted(code for code, _ in got)
    assert codes == [0, 2], got
    refused = next(err for code, err in got if code == 2)
    assert refused.count("\n") == 1 and ("in use by another run" in refused or "from an earlier run" in refused)
    assert "log.txt" in os.listdir(out) and ".nformer-reid.lock" not in os.listdir(out)
    assert ("distmat.npy" in os.listdir(out)) != ("ranks.npy" in os.listdir(out))  # one run's outputs only


@pytest.mark.parametrize("order", ["a-first", "b-first"])
def test_two_refines_started_together_into_one_output(feats, tmp_path, order):
    nformer = tmp_path / "nf"
    assert main(["features", "--train", feats[1], "--query", feats[0], "--gallery", feats[1], "--nformer-depth", "1",
                 "--nformer-steps", "1", "--seq-len", "8", "--nformer-topk", "4", "--device", "cpu", "--amp", "none",
                 "--out", str(nformer)]) == 0
    out = tmp_path / "refined.npy"
    argv = ["refine", "--input", feats[1], "--output", str(out), "--weights", str(nformer / "nformer.pth"),
            "--device", "cpu"]
    got = _together([argv, [*argv, "--save-neighbors", str(tmp_path / "nb.npy")]][::1 if order == "a-first" else -1])
    assert sorted(code for code, _ in got) == [0, 2], got
    refused = next(err for code, err in got if code == 2)
    assert "in use by another run" in refused or "already exists" in refused
    assert [n for n in os.listdir(tmp_path) if n.endswith(".lock")] == []


def test_overwrite_removes_the_earlier_runs_other_outputs_and_says_so(feats, tmp_path, caplog):
    out = tmp_path / "out"
    assert main(rerank_args(feats, out, "--save-distmat", "--save-ranks", "3")) == 0
    (out / "notes.txt").write_text("mine")  # a user's own file: never touched
    assert main(rerank_args(feats, out, "--save-ranks", "3", "--overwrite")) == 0
    names = set(os.listdir(out))
    assert "distmat.npy" not in names and {"ranks.npy", "results.json", "notes.txt", MANIFEST} <= names
    assert "removed distmat.npy" in (out / "log.txt").read_text()
    recorded = json.loads((out / MANIFEST).read_text())["outputs"]
    assert "distmat.npy" not in recorded and "ranks.npy" in recorded and "notes.txt" not in recorded
    np.load(out / "ranks.npy")


def test_a_failed_overwrite_run_removes_nothing(feats, tmp_path):
    out = tmp_path / "out"
    assert main(rerank_args(feats, out, "--save-distmat")) == 0
    assert main(rerank_args(feats, out, "--overwrite", "--k1", "100000")) == 2  # refused: nothing removed
    assert "distmat.npy" in os.listdir(out)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(runs=st.lists(st.tuples(st.sets(st.sampled_from(["a.npy", "b.npy", "results.json", "cmc.png"]), min_size=1),
                               st.booleans()), min_size=1, max_size=6))
def test_the_manifest_keeps_one_runs_results_and_never_a_users_file(tmp_path_factory, runs):
    """Any sequence of runs (each writing some outputs, with or without --overwrite): the user's own
    file is never touched, every recorded name exists, and after an --overwrite run the folder holds
    exactly that run's outputs (and the user's file)."""
    out = tmp_path_factory.mktemp("runs")
    (out / "mine.txt").write_text("a user's file")
    for outputs, overwrite in runs:
        manifest = OutputManifest(str(out))
        for name in outputs:
            (out / name).write_text("written")
        manifest.finish(outputs, overwrite)
        recorded = set(manifest.recorded())
        assert (out / "mine.txt").read_text() == "a user's file" and "mine.txt" not in recorded
        assert all((out / name).exists() for name in recorded) and set(outputs) <= recorded
        if overwrite:
            assert recorded == set(outputs) and set(os.listdir(out)) == set(outputs) | {"mine.txt", MANIFEST}

