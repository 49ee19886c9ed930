"""Training under DDP (nformer_reid.engine.ddp) against one process on the same global batches.

One gloo world of 2 CPU processes (tests/distributed_helpers: spawned, one thread each, killed on
failure or after WORLD_TIMEOUT_S) runs every case once: one backward pass of the stage-1 loss
(gradients, BatchNorm statistics), stage 1 (resnet18 on the 64 x 32 synthetic images, no
augmentation) and stage 2 (a 2-block NFormer without dropout on random features), each
uninterrupted, stopped after half its steps with a checkpoint, and resumed from this process's
half-way checkpoint; plus rank 0's failure to write a file. This process computes the same
cases without a process group and resumes the world's half-way checkpoints. The losses and
weights agree to RTOL / ATOL (float32: only summation order differs), every rank holds the same
numbers, and only rank 0 writes.
"""
import os

import pytest
import torch

import nformer_kernels as nk
from nformer_reid.data.loader import ImageDataset, RandomIdentitySampler, build_train_loader
from nformer_reid.engine import ddp, train_backbone, train_nformer
from nformer_reid.neighborhood import NeighborhoodSampler
from nformer_reid.utils.errors import ReIDInputError
from tests.distributed_helpers import spawn

WORLD = 2
RTOL, ATOL = 1e-5, 1e-6  # float32; loss histories and weights after Adam steps
BATCH, INSTANCES, IDS, IMAGES = 8, 2, 8, 3  # P = 4 identities per global batch: 2 per rank
STAGE1_EPOCHS = 2  # 2 steps per epoch
STAGE2 = dict(seq_len=20, batch_size=4, lr=1e-3, sampling="centres")
STAGE2_STEPS = 4


# ------------------------------------------------------------------ the cases, shared by every process
def _items(root):
    """IDS identities x their first IMAGES synthetic images, pids relabelled 0..IDS-1."""
    from nformer_reid.data import Market1501

    by_pid = {}
    for path, pid, cam in Market1501(root, verbose=False).train:
        by_pid.setdefault(pid, []).append((path, pid, cam))
    return [(p, label, c) for label, pid in enumerate(sorted(by_pid)[:IDS]) for p, _, c in by_pid[pid][:IMAGES]]


class TinyBackbone(torch.nn.Module):
    """Backbone's interface (training: (logits, feature before the BNNeck)) on two conv + BatchNorm
    stages: float32 gradients accurate enough for Adam steps to be compared at RTOL (a random
    resnet18's are not: see the gradient test). No bias before a BatchNorm: its true gradient is
    0, so Adam would turn float32 rounding noise into steps of up to lr / 100."""

    def __init__(self, num_classes, feat_dim=16):
        super().__init__()
        nn = torch.nn
        self.feat_dim = feat_dim
        self.base = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1))
        self.projection = nn.Linear(16, feat_dim, bias=False)
        self.bottleneck = nn.BatchNorm1d(feat_dim)
        self.bottleneck.bias.requires_grad_(False)
        self.classifier = nn.Linear(feat_dim, num_classes, bias=False)

    def forward(self, x):
        feat = self.projection(self.base(x).flatten(1))
        bn_feat = self.bottleneck(feat)
        return (self.classifier(bn_feat), feat) if self.training else bn_feat


class TinyReIDModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = TinyBackbone(IDS)


def _stage1_model():
    torch.manual_seed(0)
    return TinyReIDModel()


def _stage1(root, out, epochs, resume=None):
    model = _stage1_model()
    loader = build_train_loader(_items(root), (64, 32), BATCH, INSTANCES, num_workers=0, seed=3, augment=False)
    history = train_backbone(model, loader, IDS, out_dir=str(out), epochs=epochs, lr=1e-3, warmup_epochs=0,
                             device="cpu", resume=resume and str(resume))
    return {"history": history, "weights": {k: v.clone() for k, v in model.state_dict().items()}}


def _stage2_data():
    g = torch.Generator().manual_seed(5)
    return torch.randn(90, 24, generator=g), torch.arange(90) % 6


def _stage2(out, steps, resume=None):
    torch.manual_seed(1)
    model = nk.NFormer(dim=16, in_dim=24, depth=2, topk=5, num_classes=6, dropout=0.0)
    feats, pids = _stage2_data()
    history = train_nformer(model, feats, pids, out_dir=str(out), steps=steps, device="cpu", seed=2,
                            resume=resume and str(resume), **STAGE2)
    return {"history": history, "weights": {k: v.clone() for k, v in model.state_dict().items()}}


def _gradients(world, rank, dtype=torch.float32):
    """One forward/backward of the stage-1 loss of a resnet18 Backbone on this rank's share of a
    global batch of 16 32 x 16 images: backbone gradients (after DDP's average), centre gradients, the
    BatchNorms' running stats."""
    from nformer_reid.losses import ReIDLoss
    from nformer_reid.model import Backbone

    torch.manual_seed(0)
    backbone = Backbone(IDS, arch="resnet18", feat_dim=16, verbose=False).to(dtype)
    criterion = ReIDLoss(IDS, 16).to(dtype)
    g = torch.Generator().manual_seed(9)
    imgs, pids = torch.randn(16, 3, 32, 16, generator=g).to(dtype), torch.arange(IDS).repeat_interleave(2)
    share = slice(rank * 16 // world, (rank + 1) * 16 // world)
    with ddp.synchronized_batchnorm(backbone, "cpu"):
        net = ddp.wrap_ddp(backbone, "cpu")
        logits, feats = net(imgs[share])
        loss, value, parts, acc = ddp.global_batch_loss(criterion, logits, feats, pids[share])
        loss.backward()
        classes = [type(m).__name__ for m in backbone.modules() if "Norm" in type(m).__name__][:2]
    restored = [type(m).__name__ for m in backbone.modules() if "Norm" in type(m).__name__][:2]
    grads = {name: p.grad.clone() for name, p in backbone.named_parameters() if p.grad is not None}
    stats = {k: v.clone() for k, v in backbone.state_dict().items() if "running" in k}
    return {"loss": float(value), "parts": parts, "acc": acc, "grads": grads,
            "center_grad": criterion.center.centers.grad.clone(), "stats": stats,
            "classes": classes, "restored": restored}


# ------------------------------------------------------------------ the world
def _world_child(rank, world, backend, port, out_dir):
    import contextlib
    import io
    import logging
    import pathlib
    import traceback

    from nformer_reid.engine import checkpoints
    from nformer_reid.utils.logging import reset_logging

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    out = pathlib.Path(out_dir)
    writes = []
    save_torch = checkpoints.save_torch

    def recording_save(obj, path):
        writes.append(os.path.relpath(path, out_dir))
        return save_torch(obj, path)

    checkpoints.save_torch = recording_save
    result = {}
    with ddp.distributed_run("cpu", expected_world_size=world) as ctx:
        result["context"] = (ctx.rank, ctx.world_size, ctx.is_main, ctx.device.type, ddp.is_distributed())
        result["gradients"] = _gradients(world, rank)
        root = out / "market"
        result["s1_full"] = _stage1(root, out / "w2_s1_full", STAGE1_EPOCHS)
        result["s1_half"] = _stage1(root, out / "w2_s1_half", 1)
        result["s1_resumed"] = _stage1(root, out / "w2_s1_resumed", STAGE1_EPOCHS,
                                       resume=out / "w1_s1_half" / "stage1_last.pth")
        result["s2_full"] = _stage2(out / "w2_s2_full", STAGE2_STEPS)
        result["s2_half"] = _stage2(out / "w2_s2_half", STAGE2_STEPS // 2)
        result["s2_resumed"] = _stage2(out / "w2_s2_resumed", STAGE2_STEPS,
                                       resume=out / "w1_s2_half" / "stage2_last.pth")

        console = io.StringIO()
        with contextlib.redirect_stdout(console):
            ddp.setup_rank_logging(str(out / f"log_rank{rank}.txt"))
            logging.getLogger("nformer_reid.test").info("an info line")
            logging.getLogger("nformer_reid.test").warning("a warning line")
            reset_logging()
        result["console"] = console.getvalue()

        def fail():
            raise ReIDInputError("cannot write x.pth: disk full")

        try:
            ddp.on_main_process(fail, "x.pth")
            result["failed_write"] = None
        except ReIDInputError as exc:
            result["failed_write"] = str(exc)
        except Exception:  # noqa: BLE001
            result["failed_write"] = traceback.format_exc()
    result["initialised_after"] = ddp.is_initialized()
    result["writes"] = writes
    torch.save(result, out / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every case in this process (no process group) and in the world of 2."""
    from nformer_reid.data import make_synthetic_market

    torch.set_num_threads(1)  # the reference runs with the children's thread count
    out = tmp_path_factory.mktemp("ddp")
    make_synthetic_market(str(out / "market"), size=(64, 32), seed=0)
    single = {"gradients": _gradients(1, 0), "gradients64": _gradients(1, 0, torch.float64),
              "s1_full": _stage1(out / "market", out / "w1_s1_full", STAGE1_EPOCHS),
              "s1_half": _stage1(out / "market", out / "w1_s1_half", 1),
              "s2_full": _stage2(out / "w1_s2_full", STAGE2_STEPS),
              "s2_half": _stage2(out / "w1_s2_half", STAGE2_STEPS // 2)}
    ranks = spawn(WORLD, "gloo", out, _world_child)
    single["s1_resumed"] = _stage1(out / "market", out / "w1_s1_resumed", STAGE1_EPOCHS,
                                   resume=out / "w2_s1_half" / "stage1_last.pth")
    single["s2_resumed"] = _stage2(out / "w1_s2_resumed", STAGE2_STEPS, resume=out / "w2_s2_half" / "stage2_last.pth")
    return single, ranks, out


def _assert_history(got, ref, what):
    assert len(got) == len(ref), what
    for i, (a, b) in enumerate(zip(got, ref)):
        assert a.keys() == b.keys(), (what, i)
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=RTOL, abs=ATOL), (what, i, key, a[key], b[key])


def _assert_weights(got, ref, what):
    assert got.keys() == ref.keys()
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=RTOL, atol=ATOL, msg=lambda m: f"{what} {key}: {m}")


def test_world_runs_as_ranks_of_one_group(runs):
    _, ranks, _ = runs
    assert [r["context"] for r in ranks] == [(0, 2, True, "cpu", True), (1, 2, False, "cpu", True)]
    assert not any(r["initialised_after"] for r in ranks)  # distributed_run shut the group down


def _relative_error(got, ref):
    return float((got.double() - ref.double()).norm() / ref.double().norm())


def test_one_backward_pass_gives_the_single_process_gradient(runs):
    """resnet18, one backward pass: the 2-rank gradient (DDP-averaged, global-batch BatchNorm and
    triplet / center terms) is the single process's. Measured against float64: the 2-rank float32
    gradient within ~1e-5 relative (norm per tensor), the single-process float32 one only within
    ~2e-3 in the early layers (torch's float32 BatchNorm backward): that is why the training
    comparisons below use a small backbone. A gradient off by the world size (Adam would hide it)
    or batch statistics of one rank's half would be off by O(1)."""
    single, ranks, _ = runs
    ref, exact = single["gradients"], single["gradients64"]
    for key, value in exact["grads"].items():
        assert _relative_error(ref["grads"][key], value) < 1e-2, key
    for r in ranks:
        got = r["gradients"]
        assert got["classes"] == ["GlobalBatchNorm", "GlobalBatchNorm"]
        assert got["restored"] == ["BatchNorm2d", "BatchNorm2d"]  # put back after training
        assert got["loss"] == pytest.approx(ref["loss"], rel=RTOL)
        assert got["acc"] == ref["acc"]
        for key in ref["parts"]:
            assert got["parts"][key] == pytest.approx(ref["parts"][key], rel=RTOL, abs=ATOL), key
        for key, value in exact["grads"].items():
            assert _relative_error(got["grads"][key], value) < 1e-4, key
        assert _relative_error(got["center_grad"], exact["center_grad"]) < 1e-5
        _assert_weights(got["stats"], ref["stats"], "running stats")  # global-batch BatchNorm statistics
    assert ref["classes"] == ["BatchNorm2d", "BatchNorm2d"]  # no group: nothing swapped
    for key in ref["grads"]:
        assert torch.equal(ranks[0]["gradients"]["grads"][key], ranks[1]["gradients"]["grads"][key]), key


@pytest.mark.parametrize("case", ["s1_full", "s1_half", "s1_resumed", "s2_full", "s2_half", "s2_resumed"])
def test_two_processes_take_the_single_process_steps(runs, case):
    """2 ranks = 1 process on the same global batches; a half-way checkpoint of either, resumed by
    the other, continues as the uninterrupted run (s*_resumed against s*_full)."""
    single, ranks, _ = runs
    ref = single[case.replace("resumed", "full")]
    for who, got in [("1 process", single[case]), *((f"rank {i}", r[case]) for i, r in enumerate(ranks))]:
        _assert_history(got["history"], ref["history"], f"{case} {who}")
        _assert_weights(got["weights"], ref["weights"], f"{case} {who}")
    assert ranks[0][case]["history"] == ranks[1][case]["history"]  # the global batch's numbers on every rank
    for key, value in ranks[0][case]["weights"].items():
        assert torch.equal(value, ranks[1][case]["weights"][key]), key


def test_training_moves_the_weights_far_beyond_the_tolerance(runs):
    single, _, _ = runs
    start1 = _stage1_model().state_dict()["backbone.projection.weight"]
    moved = (single["s1_full"]["weights"]["backbone.projection.weight"] - start1).abs().max()
    assert moved > 1000 * ATOL
    losses = [h["loss"] for h in single["s2_full"]["history"]]
    assert len(set(losses)) == STAGE2_STEPS and all(torch.isfinite(torch.tensor(losses)))


def test_only_rank_0_writes(runs):
    _, ranks, out = runs
    # one checkpoint per case (stage 1: at the last epoch; stage 2: at the end), each written once
    expected = ["w2_s1_full/stage1_last.pth", "w2_s1_half/stage1_last.pth", "w2_s1_resumed/stage1_last.pth",
                "w2_s2_full/stage2_last.pth", "w2_s2_half/stage2_last.pth", "w2_s2_resumed/stage2_last.pth"]
    assert sorted(ranks[0]["writes"]) == expected
    assert ranks[1]["writes"] == []
    state = torch.load(out / "w2_s1_half" / "stage1_last.pth", weights_only=True)
    assert state["epoch"] == 1 and state["extra"]["step"] == 2 and state["extra"]["sampler"] is not None
    assert torch.load(out / "w2_s2_half" / "stage2_last.pth", weights_only=True)["extra"]["step"] == STAGE2_STEPS // 2


def test_rank_0_logs_to_the_file_the_others_warn_on_the_console(runs):
    _, ranks, out = runs
    lines = ranks[0]["console"].splitlines()
    assert len(lines) == 2 and lines[0].endswith("] an info line") and lines[1].endswith("] warning: a warning line")
    assert "an info line" in (out / "log_rank0.txt").read_text()
    assert ranks[1]["console"].splitlines()[0].endswith("] warning: [rank 1] a warning line")
    assert len(ranks[1]["console"].splitlines()) == 1 and not (out / "log_rank1.txt").exists()


def test_a_failed_write_on_rank_0_stops_every_rank(runs):
    _, ranks, _ = runs
    assert ranks[0]["failed_write"] == "cannot write x.pth: disk full"
    assert ranks[1]["failed_write"] == "rank 0 failed to write x.pth; see its message"


# ------------------------------------------------------------------ samplers
def _fake_items(counts):
    return [(f"img{pid}_{i}.jpg", pid, i % 3) for pid, n in enumerate(counts) for i in range(n)]


@pytest.mark.parametrize("world", [2, 4])
def test_pk_sampler_shares_make_up_the_single_process_batches(world):
    items = _fake_items([5, 1, 8, 4, 4, 3, 9, 2, 6, 4, 7, 2])
    one = list(RandomIdentitySampler(items, 16, 2, seed=7, rank=0, world_size=1))
    shares = [list(RandomIdentitySampler(items, 16, 2, seed=7, rank=r, world_size=world)) for r in range(world)]
    local = 16 // world
    assert len(one) % 16 == 0 and all(len(s) == len(one) // world for s in shares)
    rebuilt = [i for b in range(len(one) // 16) for s in shares for i in s[b * local:(b + 1) * local]]
    assert rebuilt == one
    # each rank's batch holds whole identities: K images of P / world identities
    pids = [items[i][1] for i in shares[1][:local]]
    assert len(set(pids)) == 8 // world and all(pids.count(p) == 2 for p in set(pids))
    sampler = RandomIdentitySampler(items, 16, 2, seed=7, rank=1, world_size=world)
    assert sampler.local_batch_size == local and len(sampler) == sampler.length // world


def test_pk_sampler_refuses_an_uneven_split_and_bad_ranks():
    items = _fake_items([4] * 6)
    with pytest.raises(ValueError, match=r"the 3 identities of a batch .* must split evenly over 2 processes"):
        RandomIdentitySampler(items, 12, 4, rank=0, world_size=2)
    with pytest.raises(ValueError, match=r"rank \(2\) must be smaller than world_size \(2\)"):
        RandomIdentitySampler(items, 8, 2, rank=2, world_size=2)
    sampler = RandomIdentitySampler(items, 8, 2)  # no process group: the whole batch
    assert (sampler.rank, sampler.world_size, sampler.local_batch_size) == (0, 1, 8)


def test_pk_sampler_state_resumes_the_epoch_sequence(tmp_path):
    items = _fake_items([3, 5, 4, 6, 2, 4])
    a = RandomIdentitySampler(items, 4, 2, seed=1)
    list(a)
    torch.save({"s": a.state_dict()}, tmp_path / "s.pth")
    b = RandomIdentitySampler(items, 4, 2, seed=99, rank=1, world_size=2)
    b.load_state_dict(torch.load(tmp_path / "s.pth", weights_only=True)["s"])
    expected = list(a)
    assert list(b) == [i for s in range(0, len(expected), 4) for i in expected[s + 2:s + 4]]
    with pytest.raises(ValueError, match="not a RandomIdentitySampler state"):
        b.load_state_dict({"rng": [3, [1, 2], None]})


def test_train_backbone_refuses_a_loader_split_for_another_world(tmp_path):
    items = _fake_items([4] * 4)
    loader = torch.utils.data.DataLoader(ImageDataset(items), batch_size=4,
                                         sampler=RandomIdentitySampler(items, 8, 2, rank=0, world_size=2))
    with pytest.raises(ValueError, match=r"splits batches over 2 process\(es\), this run has 1"):
        train_backbone(None, loader, 4, out_dir=str(tmp_path))


@pytest.mark.parametrize("strategy", ["centres", "knn"])
def test_sequence_sampler_shares_make_up_the_single_process_batch(strategy):
    g = torch.Generator().manual_seed(0)
    feats, pids = torch.randn(120, 8, generator=g), torch.arange(120) // 4

    def sampler(rank, world):
        return NeighborhoodSampler(feats, pids, seq_len=16, batch_size=6, strategy=strategy,
                                   generator=torch.Generator().manual_seed(4), rank=rank, world_size=world)

    one = sampler(0, 1)
    parts = [sampler(r, 3) for r in range(3)]
    for _ in range(2):  # the generators stay in step
        f1, p1 = one.sample()
        shares = [s.sample() for s in parts]
        assert all(f.shape == (2, 16, 8) for f, _ in shares)
        assert torch.equal(torch.cat([f for f, _ in shares]), f1) and torch.equal(torch.cat([p for _, p in shares]), p1)
    with pytest.raises(ValueError, match=r"batch_size \(6 sequences\) must be a multiple of the number of processes"):
        sampler(0, 4)
    with pytest.raises(ValueError, match="rank"):
        sampler(3, 3)


# ------------------------------------------------------------------ the process group's errors
TORCHRUN = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}


def test_init_distributed_needs_torchrun(monkeypatch):
    for name in ddp.TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    assert not ddp.launched_by_torchrun()
    with pytest.raises(ReIDInputError, match=r"torchrun's environment \(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, "
                                             r"MASTER_PORT not set\): start it with `torchrun --nproc-per-node N"):
        ddp.init_distributed("cpu")
    with ddp.distributed_run("cpu") as ctx:  # no torchrun: a world of one, nothing initialised
        assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.distributed) == (0, 1, True, False)
        assert not ddp.is_initialized() and ddp.world_size() == 1 and ddp.is_main_process()
    with pytest.raises(ReIDInputError, match="torchrun"):
        with ddp.distributed_run("cpu", expected_world_size=2):
            pass
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ReIDInputError, match=r"WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT not set"):
        ddp.init_distributed("cpu")


@pytest.mark.parametrize("env, kwargs, message", [
    ({}, {"expected_world_size": 3}, r"asks for 3 processes, but torchrun started WORLD_SIZE=2"),
    ({"RANK": "2"}, {}, r"out of range: RANK=2, LOCAL_RANK=0, WORLD_SIZE=2"),
    ({"WORLD_SIZE": "two"}, {}, r"WORLD_SIZE='two' is not an integer"),
    ({}, {"device": "cuda:1"}, r"--device cuda:1: under torchrun each rank uses cuda:LOCAL_RANK \(cuda:0 here\)"),
    ({}, {"device": "tpu"}, r"--device"),
])
def test_init_distributed_refuses_a_bad_environment(monkeypatch, env, kwargs, message):
    for name, value in {**TORCHRUN, **env}.items():
        monkeypatch.setenv(name, value)
    assert ddp.launched_by_torchrun()
    with pytest.raises(ReIDInputError, match=message):
        ddp.init_distributed(**{"device": "cpu", **kwargs})
    assert not ddp.is_initialized()


def test_init_distributed_on_cuda_needs_the_local_gpu(monkeypatch):
    for name, value in {**TORCHRUN, "LOCAL_RANK": "1", "RANK": "1"}.items():
        monkeypatch.setenv(name, value)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count > 1:
        pytest.skip("this machine has a GPU for LOCAL_RANK=1")
    with pytest.raises(ReIDInputError, match=rf"LOCAL_RANK=1 needs GPU 1, this node has {count}"):
        ddp.init_distributed("cuda")
