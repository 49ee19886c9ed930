"""Losses, model, one tiny step of each training stage, checkpoints, official checkpoint import."""
import logging

import pytest
import torch

import nformer_kernels as nk
from nformer_reid.engine import load_checkpoint, refine_features, save_checkpoint, train_nformer
from nformer_reid.losses import CenterLoss, CrossEntropyLabelSmooth, TripletLoss
from nformer_reid.model import Backbone, ReIDModel, load_official_checkpoint
from nformer_reid.neighborhood import NeighborhoodSampler
from nformer_reid.solver import make_optimizer, warmup_multistep


def dense_batch_hard(feats, labels, margin):
    """reid-strong-baseline's formulation: full distance matrix, hardest positive / negative."""
    d = torch.cdist(feats, feats).clamp(min=1e-6)
    same = labels[:, None] == labels[None]
    ap = (d * same).max(1).values
    an = (d + same * 1e8).min(1).values
    return torch.relu(ap - an + margin).mean()


def test_triplet_chunked_mining_equals_dense():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(40, 8, generator=g, dtype=torch.float64)
    labels = torch.arange(10).repeat_interleave(4)
    a = feats.clone().float().requires_grad_()
    b = feats.clone().float().requires_grad_()
    loss = TripletLoss(0.3, chunk_size=7)(a, labels)
    ref = dense_batch_hard(b, labels, 0.3)
    loss.backward(), ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(a.grad, b.grad)


def test_label_smooth_ce_and_center_loss():
    logits = torch.randn(6, 5)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    smooth = 0.9 * torch.nn.functional.one_hot(y, 5) + 0.1 / 5
    expected = -(smooth * torch.log_softmax(logits, 1)).sum(1).mean()
    torch.testing.assert_close(CrossEntropyLabelSmooth(5)(logits, y), expected)
    center = CenterLoss(5, 3)
    feats = torch.randn(6, 3)
    torch.testing.assert_close(center(feats, y), ((feats - center.centers[y]) ** 2).sum() / 6)


def test_warmup_multistep_schedule():
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_multistep(opt, milestones=[4, 6], warmup_factor=0.1, warmup_epochs=2)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step(), sched.step()
    assert lrs == pytest.approx([0.1, 0.55, 1, 1, 0.1, 0.1, 0.01, 0.01])


def test_backbone_last_stride_and_bnneck():
    model = Backbone(num_classes=7, arch="resnet18", feat_dim=16, verbose=False)
    assert model.feature_map(torch.randn(1, 3, 64, 32)).shape[-2:] == (4, 2)  # stride 16, not 32
    assert not model.bottleneck.bias.requires_grad
    logits, feat = model(torch.randn(4, 3, 64, 32))
    assert logits.shape == (4, 7) and feat.shape == (4, 16)
    assert model.eval()(torch.randn(2, 3, 64, 32)).shape == (2, 16)


def test_imagenet_weights_from_local_file(tmp_path, capsys, caplog):
    import torchvision

    ref = torchvision.models.resnet18(weights=None)
    torch.save(ref.state_dict(), tmp_path / "r18.pth")
    with caplog.at_level(logging.INFO, logger="nformer_reid"):
        model = Backbone(3, arch="resnet18", pretrained=str(tmp_path / "r18.pth"))
    assert "loaded ImageNet weights" in caplog.text
    assert capsys.readouterr().out == ""  # logged, not printed: library calls are quiet by default
    torch.testing.assert_close(model.base.layer3[1].conv2.weight, ref.layer3[1].conv2.weight)
    with pytest.raises(ValueError, match="does not fit resnet50"):
        Backbone(3, arch="resnet50", pretrained=str(tmp_path / "r18.pth"))


def test_stage1_one_step_then_resume(tmp_path):
    torch.manual_seed(0)
    model = ReIDModel(4, arch="resnet18", feat_dim=16, nformer_depth=1, verbose=False)
    imgs = torch.randn(8, 3, 32, 16)
    pids = torch.arange(4).repeat_interleave(2)
    loader = [(imgs, pids, torch.zeros(8, dtype=torch.long))]
    from nformer_reid.engine import train_backbone

    before = model.backbone.projection.weight.detach().clone()
    hist = train_backbone(model, loader, 4, out_dir=str(tmp_path), epochs=1, max_steps=1, device="cpu",
                          warmup_epochs=1)
    assert len(hist) == 1 and {"ce", "triplet", "center"} <= hist[0].keys()
    assert not torch.equal(before, model.backbone.projection.weight)
    hist2 = train_backbone(model, loader, 4, out_dir=str(tmp_path), epochs=2, device="cpu",
                           resume=str(tmp_path / "stage1_last.pth"))
    assert len(hist2) == 2  # resumed history + one more epoch of one step


def test_neighborhood_sampler_strategies_agree():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(300, 16, generator=g)
    pids = torch.arange(300) // 5
    a = NeighborhoodSampler(feats, pids, seq_len=40, strategy="knn", generator=torch.Generator().manual_seed(1))
    b = NeighborhoodSampler(feats, pids, seq_len=40, strategy="centres", generator=torch.Generator().manual_seed(1))
    (fa, pa), (fb, pb) = a.sample(), b.sample()
    assert fa.shape == (2, 40, 16) and pa.shape == (2, 40)
    torch.testing.assert_close(fa, fb)
    torch.testing.assert_close(pa, pb)
    assert len(a) == 300 // 30 // 2
    # a sequence = distinct features drawn from one centre's 80 nearest (pool <= 2 x seq_len)
    unit = torch.nn.functional.normalize(feats, dim=1)
    rows = (fa[0] @ unit.T).argmax(1)
    assert rows.unique().numel() == 40
    pools = (unit @ unit.T).topk(80, dim=1).indices
    assert any(bool(torch.isin(rows, pool).all()) for pool in pools)


def test_stage2_one_step_and_eval_modes(tmp_path):
    torch.manual_seed(0)
    model = ReIDModel(6, arch="resnet18", feat_dim=16, nformer_depth=1, nformer_topk=5, verbose=False)
    feats = torch.randn(60, 16)
    pids = torch.arange(60) % 6
    before = [p.detach().clone() for p in model.nformer.parameters()]
    hist = train_nformer(model, feats, pids, out_dir=str(tmp_path), steps=1, seq_len=20, lr=1e-3, device="cpu")
    assert len(hist) == 1 and hist[0]["loss"] > 0
    assert any(not torch.equal(b, p) for b, p in zip(before, model.nformer.parameters()))
    state = load_checkpoint(str(tmp_path / "stage2_last.pth"))
    assert state["stage"] == 2 and state["extra"]["step"] == 1
    qf, gf = torch.randn(5, 16), torch.randn(25, 16)
    q1, g1 = refine_features(model.nformer, qf, gf, "official", seed=3)
    q2, g2 = refine_features(model.nformer, qf, gf, "official", seed=3)
    assert q1.shape == (5, 16) and g1.shape == (25, 16)
    torch.testing.assert_close(q1, q2)  # seeded landmarks: reproducible
    qp, gp = refine_features(model.nformer, qf, gf, "paper", seed=3)
    assert not torch.allclose(qp, q1)
    with pytest.raises(ValueError, match="mode"):
        refine_features(model.nformer, qf, gf, "joint")
    with pytest.raises(ValueError, match="training pids"):
        train_nformer(model, feats, pids + 10, out_dir=str(tmp_path), steps=1, seq_len=20)


ESTIMATE_LINE = (r"stage 2: {steps} steps x \(2 x {seq}\) ~ [0-9.e+-]+ s/step, about \d+:\d\d:\d\d total on "
                 r"cpu \(\d+ threads\)")


def test_stage2_on_wider_features_logs_its_estimate(tmp_path, caplog):
    """2048-d features (ResNet-50 / BoT) train a 256-d NFormer through its input projection."""
    import re

    torch.manual_seed(0)
    model = nk.NFormer(dim=256, in_dim=2048, depth=1, topk=5, num_classes=6)
    feats, pids = torch.randn(60, 2048), torch.arange(60) % 6
    before = model.input_proj.weight.detach().clone()
    with caplog.at_level(logging.INFO, logger="nformer_reid"):
        hist = train_nformer(model, feats, pids, out_dir=str(tmp_path), steps=5, seq_len=16, lr=1e-3, device="cpu",
                             save_last=False)
    assert len(hist) == 5 and all(torch.isfinite(torch.tensor(h["loss"])) and h["loss"] > 0 for h in hist)
    assert not torch.equal(before, model.input_proj.weight)  # the projection is trained with the blocks
    messages = [r.getMessage() for r in caplog.records]
    found = [i for i, m in enumerate(messages) if re.fullmatch(ESTIMATE_LINE.format(steps=5, seq=16), m)]
    assert len(found) == 1, messages
    last_step = next(i for i, m in enumerate(messages) if m.startswith("stage2 step 5/5: loss "))
    assert found[0] < last_step  # measured on the warm-up + 3 steps, logged before the rest
    assert "2048-d, projected to 256-d" in caplog.text
    assert "no checkpoint written (save_last=False)" in messages[-1]
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match=r"feats are 256-d, the NFormer takes 2048-d input \(in_dim=2048, dim=256\)"):
        train_nformer(model, torch.randn(60, 256), pids, out_dir=str(tmp_path), steps=1, seq_len=16)
    with pytest.raises(TypeError, match="save_last"):
        train_nformer(model, feats, pids, out_dir=str(tmp_path), steps=1, seq_len=16, save_last="no")


def test_stage2_checkpoint_rebuilds_the_projected_nformer(tmp_path):
    torch.manual_seed(0)
    model = nk.NFormer(dim=16, in_dim=48, depth=1, topk=5, num_classes=6)
    train_nformer(model, torch.randn(60, 48), torch.arange(60) % 6, out_dir=str(tmp_path), steps=1, seq_len=20,
                  device="cpu")
    state = load_checkpoint(str(tmp_path / "stage2_last.pth"))
    assert state["config"] == model.config and state["config"]["in_dim"] == 48
    rebuilt = nk.NFormer(**state["config"])
    rebuilt.load_state_dict(state["model"])
    x, lm = torch.randn(30, 48), torch.arange(5)[None]
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x, landmarks=lm), model.eval()(x, landmarks=lm))


def test_step_estimate_times_the_steps_after_the_warm_up(monkeypatch, caplog):
    from nformer_reid.engine import backbone_training as bt

    clock = iter([100.0, 130.0, 132.0, 134.0, 136.0, 999.0])  # start; warm-up ends; 3 timed steps of 2 s
    monkeypatch.setattr(bt.time, "perf_counter", lambda: next(clock))
    estimate = bt.StepEstimate(logging.getLogger("nformer_reid.test"), "stage 2", 1000, "2 x 7000", "cpu")
    with caplog.at_level(logging.INFO, logger="nformer_reid"):
        assert [estimate.tick() for _ in range(4)] == [False, False, False, True]
        assert estimate.tick()  # logged once, no more clock reads
    assert estimate.seconds_per_step == 2.0
    # 36 s so far + 996 steps x 2 s
    assert caplog.messages == [f"stage 2: 1000 steps x (2 x 7000) ~ 2 s/step, about 0:33:48 total on cpu "
                               f"({torch.get_num_threads()} threads)"]
    clock = iter([0.0, 50.0])
    one = bt.StepEstimate(logging.getLogger("nformer_reid.test"), "stage 1", 1, "batch", "cpu")
    assert one.tick() and one.seconds_per_step == 50.0  # a one-step run: its one step


def test_stage1_without_saving(tmp_path, caplog):
    torch.manual_seed(0)
    model = ReIDModel(4, arch="resnet18", feat_dim=16, nformer_depth=1, verbose=False)
    loader = [(torch.randn(8, 3, 32, 16), torch.arange(4).repeat_interleave(2), torch.zeros(8, dtype=torch.long))]
    from nformer_reid.engine import train_backbone

    with caplog.at_level(logging.INFO, logger="nformer_reid"):
        hist = train_backbone(model, loader * 3, 4, out_dir=str(tmp_path), epochs=1, device="cpu", warmup_epochs=1,
                              save_last=False)
    assert len(hist) == 3 and list(tmp_path.iterdir()) == []
    estimate = [m for m in caplog.messages if m.startswith("stage 1: 3 steps x (8 x 3 x 32 x 16) ~ ")]
    assert len(estimate) == 1 and estimate[0].endswith(f"total on cpu ({torch.get_num_threads()} threads)")


def test_checkpoint_roundtrip(tmp_path):
    model = ReIDModel(3, arch="resnet18", feat_dim=16, nformer_depth=1, verbose=False)
    opt = make_optimizer(model, 1e-3)
    path = save_checkpoint(str(tmp_path / "ck.pth"), model, stage=1, epoch=3, optimizer=opt)
    other = ReIDModel.from_config(torch.load(path, weights_only=False)["config"])
    state = load_checkpoint(path, other, make_optimizer(other, 1e-3))
    assert state["epoch"] == 3
    for (k, v), (_, w) in zip(model.state_dict().items(), other.state_dict().items()):
        torch.testing.assert_close(v, w, msg=k)
    torch.save({"foo": 1}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not an nformer-reid checkpoint"):
        load_checkpoint(str(tmp_path / "bad.pth"))


def official_state(backbone: Backbone, dim: int, depth: int, num_classes: int, seed: int = 0) -> dict:
    """An nformer_model.pth-layout state dict: our backbone (same names as the official one) plus
    random NFormer tensors under the official names (Conv1D weights stored (in, out))."""
    g = torch.Generator().manual_seed(seed)
    state = {f"backbone.{k}": v.clone() for k, v in backbone.state_dict().items()}
    shapes = {"attn.c_attn.w": (dim, 3 * dim), "attn.c_attn.b": (3 * dim,), "attn.c_proj.w": (dim, dim),
              "attn.c_proj.b": (dim,), "ln_1.g": (dim,), "ln_1.b": (dim,), "mlp.c_fc.w": (dim, 4 * dim),
              "mlp.c_fc.b": (4 * dim,), "mlp.c_proj.w": (4 * dim, dim), "mlp.c_proj.b": (dim,), "ln_2.g": (dim,),
              "ln_2.b": (dim,)}
    for i in range(depth):
        for name, shape in shapes.items():
            t = 0.1 * torch.randn(shape, generator=g)
            state[f"nformer.h.{i}.{name}"] = t + 1 if name.endswith(".g") else t
    state.update({"nformer.bottleneck.weight": torch.rand(dim, generator=g) + 0.5,
                  "nformer.bottleneck.bias": torch.zeros(dim),
                  "nformer.bottleneck.running_mean": torch.randn(dim, generator=g),
                  "nformer.bottleneck.running_var": torch.rand(dim, generator=g) + 0.5,
                  "nformer.bottleneck.num_batches_tracked": torch.tensor(7),
                  "nformer.classifier.weight": torch.randn(num_classes, dim, generator=g)})
    return state


def test_official_checkpoint_import(tmp_path):
    torch.manual_seed(0)
    src = Backbone(5, arch="resnet18", feat_dim=32, stem_relu=False, verbose=False).eval()  # official: resnet50
    with torch.no_grad():
        src.bottleneck.running_var.uniform_(0.5, 2)
    state = official_state(src, dim=32, depth=2, num_classes=5)
    torch.save(state, tmp_path / "nformer_model.pth")
    model = load_official_checkpoint(str(tmp_path / "nformer_model.pth"), topk=6).eval()
    assert model.backbone.stem_relu is False and model.config["arch"] == "resnet18"
    assert model.config["nformer_depth"] == 2 and model.config["nformer_ffn_dim"] == 128
    imgs = torch.randn(2, 3, 32, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(imgs), src(imgs))
    reference = nk.NFormer.from_official(state, topk=6).eval()
    x = torch.nn.functional.normalize(torch.randn(30, 32), dim=1)
    lm = torch.stack([torch.arange(5), torch.arange(5, 10)])
    with torch.no_grad():
        torch.testing.assert_close(model.refine(x, landmarks=lm), reference(x, landmarks=lm))
    del state["backbone.projection.bias"]
    with pytest.raises(ValueError, match="projection.bias"):
        load_official_checkpoint(state)
    with pytest.raises(ValueError, match="not an official"):
        load_official_checkpoint({"x": torch.zeros(1)})


def test_eval_official_from_the_command_line(tmp_path, capsys):
    """`eval --official`: a 2-block release is refused without --nformer-depth (the release has 4)
    and evaluated with --nformer-depth 2; --nformer-depth with --weights is refused."""
    from nformer_reid.cli import main

    torch.manual_seed(0)
    src = Backbone(5, arch="resnet18", feat_dim=32, stem_relu=False, verbose=False).eval()
    path = str(tmp_path / "nformer_model.pth")
    torch.save(official_state(src, dim=32, depth=2, num_classes=5), path)
    argv = ["eval", "--data", "synthetic", "--official", path, "--size", "32", "16", "--workers", "0",
            "--device", "cpu"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 2
    assert "block" in capsys.readouterr().err
    assert main([*argv, "--nformer-depth", "2", "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / "results.json").exists()
    assert main(["eval", "--data", "synthetic", "--weights", path, "--nformer-depth", "2", "--out",
                 str(tmp_path / "c")]) == 2
    assert "--nformer-depth is the block count of --official" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["resnet34", "resnet50"])
def test_official_arch_is_inferred_from_the_blocks(arch):
    import torchvision

    from nformer_reid.model import _infer_arch

    state = {f"backbone.base.{k}": v for k, v in getattr(torchvision.models, arch)().state_dict().items()}
    assert _infer_arch(state, "backbone.base.") == arch
