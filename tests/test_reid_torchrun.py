"""nformer-reid refine / features --distributed under torchrun, against the single-process commands.

Two torchrun launches of 2 gloo CPU processes (one thread each, killed with their process group
after LAUNCH_TIMEOUT_S):
  * `python -m torch.distributed.run --nproc-per-node 2 -m nformer_reid refine --distributed ...`,
    what users type: the .npy it writes equals the single-process `refine` output (and the
    neighbour lists theirs);
  * this module run under torchrun as a worker (`-m tests.test_reid_torchrun`): it initialises the
    process group once and calls nformer_reid.cli.main for several cases in turn (features in
    official and paper mode, refine of a .pt read whole, and failures on one rank or on all),
    writing each rank's exit status and stderr per case; the tests compare them.
The launch errors (no torchrun environment, a partial / out-of-range one, a world that does not
form, a group of another size) run in this process, and a torchrun world of one too.
"""
import contextlib
import datetime
import io
import json
import os
import signal
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

import nformer_kernels as nk
from nformer_reid.cli import main
from nformer_reid.engine.ddp import TORCHRUN_ENV
from nformer_reid.data import make_feature_benchmark, save_features, save_query_gallery
from nformer_reid.engine import save_checkpoint
from nformer_reid.utils.io import MANIFEST
from tests.distributed_helpers import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH_TIMEOUT_S = 240
DIM = 16
LANDMARK_SENSITIVE_SCALE = 10.0  # the blocks' weights of the test NFormer, times this
TINY = ["--size", "32", "16", "--workers", "0"]  # train on the synthetic images, as tests/test_reid_cli


def _make_files(folder):
    """A small benchmark (query + gallery in one .pt, the gallery as .npy and as a labelled .pt)
    and an NFormer of 2 blocks saved as `features --train` saves it, its blocks' weights scaled up
    so that its output depends on the landmarks drawn (at their initial scale the attention is
    near-uniform: another seed changes the output by ~1e-6, which a 1e-5 comparison would miss)."""
    os.makedirs(folder, exist_ok=True)
    bench = make_feature_benchmark(num_train_ids=20, num_test_ids=10, num_cams=3, images_per_cam=2, cams_per_id=2,
                                   dim=DIM, noise=1.0, num_distractors=5, seed=0)
    paths = {"combined": os.path.join(folder, "query_gallery.pt"), "gallery_npy": os.path.join(folder, "gallery.npy"),
             "gallery_pt": os.path.join(folder, "gallery.pt"), "nformer": os.path.join(folder, "nformer.pth")}
    save_query_gallery(paths["combined"], bench.query, bench.gallery)
    np.save(paths["gallery_npy"], bench.gallery.feats.numpy())
    save_features(paths["gallery_pt"], bench.gallery)
    paths["one_row"] = os.path.join(folder, "one_row.npy")  # fewer rows than ranks: rank 1's share is empty
    np.save(paths["one_row"], bench.gallery.feats[:1].numpy())
    torch.manual_seed(0)
    nformer = nk.NFormer(dim=DIM, depth=2, num_landmarks=3, topk=4, num_classes=20)
    with torch.no_grad():  # peaked attention: the landmarks drawn matter (another seed moves outputs by ~0.7)
        for name, param in nformer.named_parameters():
            if name.startswith("blocks.") and param.dim() == 2:
                param.mul_(LANDMARK_SENSITIVE_SCALE)
    save_checkpoint(paths["nformer"], nformer, stage=2, epoch=0, config=nformer.config)
    return paths


def _features_argv(paths, out, *extra):
    return ["features", "--features", paths["combined"], "--weights", paths["nformer"], "--device", "cpu", "--out",
            out, *extra]


def _refine_argv(paths, source, output, *extra):
    return ["refine", "--input", paths[source], "--weights", paths["nformer"], "--device", "cpu", "--output",
            output, *extra]


def _worker_cases(paths, folder, rank):
    """(name, argv) run in turn by every rank of the worker world (argv may differ by rank)."""
    missing = os.path.join(folder, "no_such_nformer.pth")
    return [
        ("official", _features_argv(paths, os.path.join(folder, "official"), "--distributed")),
        ("paper", _features_argv(paths, os.path.join(folder, "paper"), "--distributed", "--mode", "paper")),
        ("refine_pt", _refine_argv(paths, "gallery_pt", os.path.join(folder, "refined_pt.npy"), "--distributed")),
        ("one_row", _refine_argv(paths, "one_row", os.path.join(folder, "refined_one.npy"), "--distributed",
                                 "--save-neighbors", os.path.join(folder, "one_nb.npy"))),
        # rank 1 alone names a missing --weights: every rank must fail (none waits for the others)
        ("one_rank_fails", _refine_argv(paths, "gallery_npy", os.path.join(folder, "never.npy"), "--distributed")
         if rank == 0 else ["refine", "--input", paths["gallery_npy"], "--weights", missing, "--device", "cpu",
                            "--output", os.path.join(folder, "never.npy"), "--distributed"]),
        ("exists", _refine_argv(paths, "gallery_npy", paths["gallery_pt"].replace(".pt", "_copy.npy"),
                                "--distributed")),
        ("rerank", _features_argv(paths, os.path.join(folder, "rerank"), "--distributed", "--rerank")),
        ("train", ["train", "--data", "synthetic", "--out", os.path.join(folder, "train"), "--distributed", "--eval",
                   *TINY]),
        # ranks started differently (an option, an input file): refused on both before any work
        ("other_topk", _refine_argv(paths, "gallery_npy", os.path.join(folder, "never_topk.npy"), "--distributed",
                                    "--nformer-topk", str(3 + rank))),
        ("other_input", _refine_argv(paths, "gallery_npy" if rank == 0 else "one_row",
                                     os.path.join(folder, "never_input.npy"), "--distributed")),
        # 3 identities per PK batch cannot be shared by 2 ranks: refused on both before any write
        ("train_uneven", ["train", "--data", "synthetic", "--out", os.path.join(folder, "uneven"), "--distributed",
                          "--batch-size", "12", *TINY]),
    ]


def _worker(folder):
    """Run under torchrun: one gloo group for all cases, each rank's exit status and stderr per case
    to folder/rank{r}.json."""
    import faulthandler

    import torch.distributed as dist

    faulthandler.enable(all_threads=True)  # an abort (see the end of this function) prints every thread
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank = dist.get_rank()
    paths = json.load(open(os.path.join(folder, "paths.json")))
    if rank == 0:  # an output that exists already: refused on every rank
        np.save(paths["gallery_pt"].replace(".pt", "_copy.npy"), np.zeros((1, 1), np.float32))
    dist.barrier()
    outcome = {}
    for name, argv in _worker_cases(paths, folder, rank):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main(argv)
        outcome[name] = {"rc": rc, "stderr": err.getvalue()}
    with open(os.path.join(folder, f"rank{rank}.json"), "w") as fh:
        json.dump(outcome, fh)
    dist.destroy_process_group()
    # Every outcome is written. Under a loaded pytest-xdist run this process has aborted after this
    # point, in interpreter teardown ("terminate called without an active exception", faulthandler:
    # no Python frame; rank{r}.json complete), on either rank: a C++ thread still joinable when the
    # process's static objects are destroyed. The harness ends without that teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _launch(args, cwd):
    """`python -m torch.distributed.run --nproc-per-node 2 --master-port <free> <args>`, one thread
    per process, its whole process group killed after LAUNCH_TIMEOUT_S; returns (rc, output)."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(free_port()), *args]
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish within {LAUNCH_TIMEOUT_S} s:\n{out[-4000:]}")
    return proc.returncode, out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("torchrun"))
    paths = _make_files(folder)
    with open(os.path.join(folder, "paths.json"), "w") as fh:
        json.dump(paths, fh)
    return {"dir": folder, **paths}


@pytest.fixture(scope="module")
def worker_world(files):
    """Every rank's outcomes of the worker cases (one torchrun launch)."""
    rc, out = _launch(["-m", "tests.test_reid_torchrun", files["dir"]], ROOT)
    assert rc == 0, out[-4000:]
    return [json.load(open(os.path.join(files["dir"], f"rank{r}.json"))) for r in range(2)]


def _results(folder):
    return json.load(open(os.path.join(folder, "results.json")))


# ------------------------------------------------------------------ torchrun launches
def test_refine_under_torchrun_equals_the_single_process(files, tmp_path):
    single, neighbours = str(tmp_path / "single.npy"), str(tmp_path / "single_nb.npy")
    assert main(_refine_argv(files, "gallery_npy", single, "--save-neighbors", neighbours)) == 0
    out = tmp_path / "sharded"
    out.mkdir()
    rc, log = _launch(["-m", "nformer_reid", *_refine_argv(files, "gallery_npy", str(out / "refined.npy"),
                                                            "--distributed", "--save-neighbors",
                                                            str(out / "nb.npy"))], str(tmp_path))
    assert rc == 0, log[-4000:]
    got, want = np.load(out / "refined.npy"), np.load(single)
    assert got.dtype == np.float32 and got.shape == want.shape == (25, DIM)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.load(out / "nb.npy"), np.load(neighbours))
    assert sorted(os.listdir(out)) == ["nb.npy", "refined.npy"]  # no temporary file left
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(out / "refined.npy").st_mode & 0o777 == 0o666 & ~umask  # as a file written with open()
    assert "on 2 processes" in log


def test_the_test_nformer_depends_on_the_landmark_draw(files, tmp_path):
    """Without this the comparisons above could not tell a wrong landmark draw from the right one."""
    outputs = []
    for seed in (0, 1):
        path = str(tmp_path / f"seed{seed}.npy")
        assert main([*_refine_argv(files, "gallery_npy", path), "--seed", str(seed)]) == 0
        outputs.append(np.load(path))
    assert np.abs(outputs[0] - outputs[1]).max() > 1e-2


def test_features_under_torchrun_give_the_single_process_numbers(files, worker_world, tmp_path):
    for mode in ("official", "paper"):
        single = str(tmp_path / mode)
        assert main(_features_argv(files, single, "--mode", mode)) == 0
        for rank in range(2):
            assert worker_world[rank][mode]["rc"] == 0, worker_world[rank][mode]["stderr"]
        sharded = os.path.join(files["dir"], mode)
        got, want = _results(sharded), _results(single)
        assert got["methods"] == want["methods"]  # equal, not close
        assert set(got["methods"]) == {"input features", f"NFormer ({mode})"}
        assert got["distributed"] == {"processes": 2, "backend": "gloo"}
        assert "distributed" not in want
        assert sorted(os.listdir(sharded)) == sorted(os.listdir(single))  # rank 0 alone wrote them, once
        a, b = (torch.load(os.path.join(d, "refined_features.pt")) for d in (sharded, single))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_refine_of_a_pt_read_whole_on_every_rank(files, worker_world, tmp_path):
    """A .pt input is read whole on each rank, each keeping its rows; the output is .npy."""
    assert [worker_world[r]["refine_pt"]["rc"] for r in range(2)] == [0, 0], worker_world[0]["refine_pt"]
    single = str(tmp_path / "single.npy")
    assert main(_refine_argv(files, "gallery_pt", single)) == 0
    np.testing.assert_allclose(np.load(os.path.join(files["dir"], "refined_pt.npy")), np.load(single), rtol=1e-5,
                               atol=1e-6)


def test_refine_with_fewer_rows_than_ranks(files, worker_world, tmp_path):
    assert [worker_world[r]["one_row"]["rc"] for r in range(2)] == [0, 0], worker_world[1]["one_row"]
    single = str(tmp_path / "single.npy")
    assert main(_refine_argv(files, "one_row", single)) == 0
    np.testing.assert_allclose(np.load(os.path.join(files["dir"], "refined_one.npy")), np.load(single), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_array_equal(np.load(os.path.join(files["dir"], "one_nb.npy")), [[0]])


def test_a_failure_on_one_rank_fails_every_rank(files, worker_world):
    rank0, rank1 = (worker_world[r]["one_rank_fails"] for r in range(2))
    assert rank0["rc"] == rank1["rc"] == 2
    for got in (rank0, rank1):  # rank 1's --weights is missing: the launch check names it on both
        assert got["stderr"].count("\n") == 1 and "the ranks were not started alike" in got["stderr"]
        assert "no_such_nformer.pth' on rank 1" in got["stderr"] and "(not given) on rank 1" in got["stderr"]
    assert not os.path.exists(os.path.join(files["dir"], "never.npy"))
    for name, match in (("exists", "already exists; pass --overwrite"), ("rerank", "--rerank with --distributed")):
        for rank in range(2):
            outcome = worker_world[rank][name]
            assert outcome["rc"] == 2 and match in outcome["stderr"], outcome
            assert len(outcome["stderr"].splitlines()) == 1
    assert np.load(files["gallery_pt"].replace(".pt", "_copy.npy")).shape == (1, 1)  # left as it was


def test_ranks_started_differently_are_refused_on_every_rank(files, worker_world):
    """An option given to one rank only, or another input file on one rank (a stale copy): every rank
    exits 2 with one line naming what differs, rank by rank, before any work or output."""
    for case, named in (("other_topk", "--nformer-topk is 3 on rank 0, 4 on rank 1"),
                        ("other_input", "the file of --input is")):
        for outcome in worker_world:
            got = outcome[case]
            assert got["rc"] == 2 and got["stderr"].count("\n") == 1, got
            assert "the ranks were not started alike" in got["stderr"] and named in got["stderr"], got
    assert not [n for n in os.listdir(files["dir"]) if n.startswith("never_")]


def test_train_under_torchrun_writes_once_from_rank_0(files, worker_world):
    for rank in range(2):
        assert worker_world[rank]["train"]["rc"] == 0, worker_world[rank]["train"]["stderr"]
    out = os.path.join(files["dir"], "train")
    assert {"model_final.pth", "loss.png", "results.json", "cmc.png", "config.yaml", "log.txt",
            "synthetic_market", MANIFEST} == set(os.listdir(out))
    state = torch.load(os.path.join(out, "model_final.pth"), weights_only=False)
    assert state["kind"] == "ReIDModel" and state["stage"] == 2
    doc = _results(out)
    assert doc["distributed"] == {"processes": 2, "backend": "gloo"}
    assert {"backbone", "NFormer (official)"} <= set(doc["methods"])
    for rank in range(2):
        outcome = worker_world[rank]["train_uneven"]
        assert outcome["rc"] == 2 and "3 identities per batch must be a multiple of the 2 processes" in \
            outcome["stderr"], outcome
    assert not os.path.exists(os.path.join(files["dir"], "uneven"))


# ------------------------------------------------------------------ in this process
@pytest.fixture
def torchrun_env(monkeypatch):
    """Sets torchrun's variables (a world of 1 on a free port unless told otherwise)."""
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)

    def set_env(rank=0, world=1, local_rank=0):
        values = {"RANK": rank, "WORLD_SIZE": world, "LOCAL_RANK": local_rank, "MASTER_ADDR": "127.0.0.1",
                  "MASTER_PORT": free_port()}
        for name, value in values.items():
            monkeypatch.setenv(name, str(value))
    return set_env


def _user_error(capsys, argv, *matches):
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for match in matches:
        assert match in err, err
    return err


def test_distributed_without_torchrun_says_how_to_launch(files, tmp_path, capsys, torchrun_env):
    for argv in (_refine_argv(files, "gallery_npy", str(tmp_path / "r.npy"), "--distributed"),
                 _features_argv(files, str(tmp_path / "f"), "--distributed")):
        _user_error(capsys, argv, "not started by torchrun", f"`torchrun --nproc-per-node P -m nformer_reid {argv[0]} "
                                                              "--distributed ...`")
    assert os.listdir(tmp_path) == []


def test_torchrun_environment_checks(files, tmp_path, capsys, torchrun_env, monkeypatch):
    refine = _refine_argv(files, "gallery_npy", str(tmp_path / "r.npy"))
    torchrun_env(world=2)
    _user_error(capsys, refine, "torchrun started 2 processes but --distributed was not given")
    _user_error(capsys, ["rerank", "--features", files["combined"], "--out", str(tmp_path / "rr")],
                "rerank runs in one process, but torchrun started 2")
    torchrun_env(rank=2, world=2)
    _user_error(capsys, [*refine, "--distributed"], "out of range: RANK=2, LOCAL_RANK=0, WORLD_SIZE=2")
    monkeypatch.setenv("WORLD_SIZE", "two")
    _user_error(capsys, [*refine, "--distributed"], "WORLD_SIZE='two' is not an integer")
    torchrun_env(world=1)
    for port in ("abc", "99999", "0"):
        monkeypatch.setenv("MASTER_PORT", port)
        _user_error(capsys, [*refine, "--distributed"], f"MASTER_PORT='{port}' is not a TCP port (1-65535)")
    monkeypatch.delenv("MASTER_PORT")
    _user_error(capsys, [*refine, "--distributed"], "incomplete", "MASTER_PORT not")
    assert os.listdir(tmp_path) == []


def test_a_world_that_does_not_form_fails_after_the_timeout(files, tmp_path, capsys, torchrun_env):
    torchrun_env(world=2)  # rank 1 never starts
    _user_error(capsys, _refine_argv(files, "gallery_npy", str(tmp_path / "r.npy"), "--distributed",
                                     "--dist-timeout", "1"), "did not all join", "within 1 s")
    assert os.listdir(tmp_path) == []


def test_a_group_of_another_size_is_refused(files, tmp_path, capsys, torchrun_env):
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        torchrun_env(world=2)
        _user_error(capsys, _refine_argv(files, "gallery_npy", str(tmp_path / "r.npy"), "--distributed"),
                    "a process group of 1 (rank 0) is already initialised", "torchrun's environment says 2")
        assert dist.is_initialized()  # a caller's group is left alone
    finally:
        dist.destroy_process_group()
    assert not (tmp_path / "r.npy").exists()


def test_a_torchrun_world_of_one(files, tmp_path, capsys, torchrun_env):
    """WORLD_SIZE=1 with --distributed: the sharded code on one rank, the single process's output;
    without --distributed it is the single process; --train and .pt outputs are refused."""
    import torch.distributed as dist

    single = str(tmp_path / "single.npy")
    assert main(_refine_argv(files, "gallery_npy", single)) == 0
    torchrun_env()
    assert main(_refine_argv(files, "gallery_npy", str(tmp_path / "plain.npy"))) == 0
    assert main(_refine_argv(files, "gallery_npy", str(tmp_path / "sharded.npy"), "--distributed")) == 0
    assert not dist.is_initialized()  # the run's own group is destroyed at its end
    for name in ("plain.npy", "sharded.npy"):
        np.testing.assert_allclose(np.load(tmp_path / name), np.load(single), rtol=1e-5, atol=1e-6)
    _user_error(capsys, _refine_argv(files, "gallery_npy", str(tmp_path / "r.pt"), "--distributed"),
                "--output", "with --distributed the output is a .npy file")
    _user_error(capsys, _refine_argv(files, "gallery_npy", str(tmp_path / "sharded.npy"), "--distributed"),
                "already exists; pass --overwrite")
    _user_error(capsys, _refine_argv(files, "gallery_npy", files["gallery_npy"], "--distributed", "--overwrite"),
                "is the input --input")
    _user_error(capsys, ["features", "--features", files["combined"], "--train", files["gallery_pt"], "--device",
                         "cpu", "--out", str(tmp_path / "t"), "--distributed"], "--train with --distributed")
    assert not (tmp_path / "t").exists() and not (tmp_path / "r.pt").exists()


if __name__ == "__main__":  # a rank of the worker world (see the module docstring)
    _worker(sys.argv[1])


def test_the_launch_digest_tells_copies_of_a_file_apart(files, tmp_path):
    """A stale copy on another node has the name and maybe the size, not the bytes: the digest of
    every file option differs; the options themselves are all in it."""
    from nformer_reid.cli import parse_args
    from nformer_reid.commands import launch_digest

    a, b = tmp_path / "a" / "g.npy", tmp_path / "b" / "g.npy"
    for path, value in ((a, 0.0), (b, 1.0)):
        os.makedirs(path.parent)
        np.save(path, np.full((300, 64), value, np.float32))  # one size, other bytes (past the header)
    digests = [launch_digest(parse_args(_refine_argv({**files, "x": str(p)}, "x", str(tmp_path / "o.npy")))[0])
               for p in (a, b)]
    assert digests[0]["the file of --input"] != digests[1]["the file of --input"]
    assert digests[0]["--weights"] == digests[1]["--weights"] and "--nformer-topk" in digests[0]


def test_a_rank_that_stops_answering_is_one_user_error(monkeypatch):
    """Any agreement collective that fails (a rank killed mid-run, or in another world) raises one
    ReIDInputError naming this rank, unless this rank's own step failed (that error wins)."""
    from nformer_kernels import distributed as nkd
    from nformer_reid import commands
    from nformer_reid.utils.errors import ReIDInputError

    def gone(local_check, group=None):
        local_check()
        raise RuntimeError("[gloo/transport/tcp/pair.cc:598] Connection closed by peer [127.0.0.1]:4242")

    monkeypatch.setattr(nkd, "gather_checked", gone)
    ranks = commands._Ranks(0, 2, torch.device("cpu"))
    with pytest.raises(ReIDInputError, match=r"rank 0 of 2: another rank stopped answering .*Connection closed"):
        commands._agree_all(lambda: 1, ranks)

    def fails():
        raise OSError("this rank's own failure")

    with pytest.raises(OSError, match="own failure"):
        commands._agree_all(fails, ranks)


def test_a_rank_lost_mid_run_is_one_line_and_exit_1(monkeypatch, capsys):
    """A collective of the work that fails because a peer is gone (DDP's all-reduce, the ring) is one
    RankLost naming this rank: the CLI prints one line and exits 1. Other RuntimeErrors propagate."""
    from nformer_reid import cli, commands
    from nformer_reid.utils.errors import RankLost

    ranks = commands._Ranks(1, 2, torch.device("cpu"))
    gloo = "[../third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:8605: Connection reset by peer"
    with pytest.raises(RankLost, match=r"^rank 1 of 2: another rank stopped answering .*Connection reset by peer"):
        with commands.rank_loss_is_one_error(ranks):
            raise RuntimeError(gloo)
    with pytest.raises(RuntimeError, match="an error of the work"):
        with commands.rank_loss_is_one_error(ranks):
            raise RuntimeError("an error of the work")

    def lost(cfg, invocation):
        with commands.rank_loss_is_one_error(ranks):
            raise RuntimeError(gloo)

    monkeypatch.setitem(cli.RUNNERS, "refine", lost)
    monkeypatch.setattr(cli, "parse_args", lambda argv: (types.SimpleNamespace(command="refine"), None))
    monkeypatch.setattr(cli, "check_launch", lambda cfg: None)
    code = cli.main(["refine", "--distributed"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("nformer-reid refine: rank 1 of 2: another rank")
