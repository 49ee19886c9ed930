"""NFormerLayer / NFormer: official-forward equivalence, checkpoints, train/eval, options, compile."""
import io
import warnings

import pytest
import torch

import nformer_kernels as nk
from nformer_bench.baselines import DenseOfficialNFormer, random_official_state_dict
from tests.conftest import assert_close_fp32, cpu_backends, ties_free

BACKENDS = cpu_backends()


def official_eval_forward(sd, x, landmarks, topk, heads):
    """The official NFormer eval forward on state dict sd: the dense transcription of the official
    code (nformer_bench.baselines) with its N x N cosine top-k, reciprocal mask and affinity."""
    model = DenseOfficialNFormer.from_official(sd, heads=heads, topk=topk).eval()
    with torch.no_grad():
        return model(x, landmarks=landmarks)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("prefix", ["nformer.", ""])
def test_from_official_matches_official_forward(backend, prefix):
    sd = random_official_state_dict(dim=32, depth=2, prefix=prefix)
    model = nk.NFormer.from_official(sd, topk=8).eval()
    assert model.classifier.out_features == 11 and model.depth == 2
    x = ties_free(3 * 40, 32).view(3, 40, 32)
    landmarks = torch.stack([torch.randperm(40, generator=torch.Generator().manual_seed(s))[:5] for s in (1, 2)])
    with torch.no_grad():
        ours = model(x, landmarks=landmarks)
    assert_close_fp32(ours, official_eval_forward(sd, x, landmarks, topk=8, heads=2))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_from_official_default_size(backend):
    sd = random_official_state_dict(dim=256, depth=4, classes=751, seed=3, std=0.05)
    model = nk.NFormer.from_official(sd).eval()
    x = ties_free(1 * 120, 256).view(1, 120, 256)
    g = torch.Generator().manual_seed(4)
    landmarks = torch.stack([torch.randperm(120, generator=g)[:5] for _ in range(4)])
    with torch.no_grad():
        assert_close_fp32(model(x, landmarks=landmarks), official_eval_forward(sd, x, landmarks, topk=20, heads=2))


def test_from_official_loads_every_head_tensor():
    sd = random_official_state_dict()
    model = nk.NFormer.from_official(sd)
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(model.bottleneck, name), sd[f"nformer.bottleneck.{name}"])
    assert int(model.bottleneck.num_batches_tracked) == 7
    assert torch.equal(model.classifier.weight, sd["nformer.classifier.weight"])
    assert torch.equal(model.blocks[1].fc1.weight, sd["nformer.h.1.mlp.c_fc.w"].t())
    assert not model.bottleneck.bias.requires_grad


def test_from_official_reports_missing_and_unexpected_keys():
    sd = random_official_state_dict()
    del sd["nformer.h.1.ln_2.g"]
    sd["nformer.h.0.attn.extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys \['h.1.ln_2.g'\].*unexpected keys \['h.0.attn.extra'\]"):
        nk.NFormer.from_official(sd)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = nk.NFormer.from_official(sd, strict=False)
    assert any("h.1.ln_2.g" in str(w.message) for w in caught)
    missing, unexpected = model.load_official(sd, strict=False)
    assert missing == ["h.1.ln_2.g"] and unexpected == ["h.0.attn.extra"]


def test_from_official_rejects_wrong_shapes():
    sd = random_official_state_dict()
    sd["nformer.h.0.mlp.c_proj.b"] = torch.zeros(5)
    with pytest.raises(ValueError, match="fc2.bias"):
        nk.NFormer.from_official(sd)
    with pytest.raises(ValueError, match="h.0.attn.c_attn.w"):
        nk.NFormer.from_official({"foo": torch.zeros(1)})


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_train_mode_outputs_and_gradients(backend):
    model = nk.NFormer(dim=32, depth=2, topk=6, num_classes=9).train()
    x = ties_free(50, 32)
    logits, refined = model(x, generator=torch.Generator().manual_seed(0))
    assert logits.shape == (50, 9) and refined.shape == (50, 32)
    torch.nn.functional.cross_entropy(logits, torch.arange(50) % 9).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    no_cls = nk.NFormer(dim=32, depth=1, topk=6).train()
    assert no_cls(x)[0] is None


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_landmark_reproducibility_and_dropout(backend):
    model = nk.NFormer(dim=32, depth=2, topk=6)
    x = ties_free(60, 32)
    model.eval()
    a = model(x, generator=torch.Generator().manual_seed(5))
    b = model(x, generator=torch.Generator().manual_seed(5))
    c = model(x)
    d = model(x)
    assert torch.equal(a, b)
    assert not torch.equal(c, d)  # fresh landmark draws per call, like the official code
    model.train()
    lm = torch.stack([torch.arange(5), torch.arange(5, 10)])
    assert not torch.equal(model(x, landmarks=lm)[1], model(x, landmarks=lm)[1])  # dropout active


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_batched_equals_per_item(backend):
    model = nk.NFormer(dim=32, depth=2, topk=6).eval()
    x = ties_free(30, 32, batch=3)
    lm = torch.stack([torch.arange(5), torch.arange(3, 8)])
    with torch.no_grad():
        batched = model(x, landmarks=lm)
        for i in range(3):
            torch.testing.assert_close(batched[i], model(x[i], landmarks=lm), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_query_isolation(backend, monkeypatch):
    model = nk.NFormer(dim=32, depth=2, topk=6).eval()
    x = ties_free(50, 32)
    query = torch.zeros(50, dtype=torch.bool)
    query[:10] = True
    seen_idx, seen_landmarks = [], []
    attention, check_landmarks = nk.ops.sparse_attention, nk.ops.check_landmarks

    def spy_attention(P, R, v, idx, keep, scale, **kwargs):
        seen_idx.append(idx)
        return attention(P, R, v, idx, keep, scale, **kwargs)

    def spy_landmarks(landmarks, *args, **kwargs):
        seen_landmarks.append(landmarks)
        return check_landmarks(landmarks, *args, **kwargs)

    monkeypatch.setattr(nk.ops, "sparse_attention", spy_attention)
    monkeypatch.setattr(nk.ops, "check_landmarks", spy_landmarks)
    out = model(x, query_mask=query)
    assert torch.isfinite(out).all()
    assert len(seen_idx) == len(seen_landmarks) == 2
    for idx, landmarks in zip(seen_idx, seen_landmarks):
        assert not query[landmarks].any()
        assert not query[idx[:10, 1:]].any()
    with pytest.raises(ValueError, match="query_mask"):
        model(x, query_mask=torch.ones(50, dtype=torch.bool))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_affinity_neighbours(backend):
    model = nk.NFormer(dim=32, depth=2, topk=6, neighbor_source="affinity", num_classes=3).train()
    x = ties_free(40, 32, batch=2).requires_grad_()
    logits, refined = model(x)
    refined.sum().backward()
    assert torch.isfinite(x.grad).all()
    model.eval()
    assert torch.isfinite(model(x)).all()


@pytest.mark.parametrize("source", ["input", "affinity"])
def test_lists_the_model_builds_are_not_rechecked(source, monkeypatch):
    """The neighbour lists and landmarks NFormer builds itself skip the O(N*k) value checks
    (reciprocal_mask, sparse_attention); lists and landmarks a caller passes are checked."""
    from nformer_kernels import _checks

    seen, real = [], _checks.check_index
    monkeypatch.setattr(_checks, "check_index", lambda *a, **kw: seen.append(kw.get("check_values", True)) or real(*a, **kw))
    model = nk.NFormer(dim=32, depth=2, topk=6, neighbor_source=source).eval()
    x = ties_free(40, 32)
    with torch.no_grad():
        model(x)
    assert seen and not any(seen)
    seen.clear()
    with torch.no_grad():
        model(x, landmarks=torch.stack([torch.arange(5), torch.arange(5, 10)]))
    assert any(seen)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("batch", [None, 2])
@pytest.mark.parametrize("source", ["input", "affinity"])
def test_inference_chunks_match_one_pass(backend, batch, source):
    """Without autograd the layer projects and finishes 16 rows at a time; with it, one pass."""
    model = nk.NFormer(dim=32, depth=2, topk=6, neighbor_source=source, inference_chunk_rows=16).eval()
    x = ties_free(100, 32, batch=batch)
    lm = torch.stack([torch.arange(5), torch.arange(40, 45)])
    calls = []
    model.blocks[0].fc1.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[-2]))
    one_pass = model(x, landmarks=lm)  # parameters require grad: the graph needs every row at once
    assert calls == [100]
    calls.clear()
    with torch.no_grad():
        chunked = model(x, landmarks=lm)
    rows = 16 // (batch or 1)
    assert calls == [rows] * (100 // rows) + ([100 % rows] if 100 % rows else [])
    assert_close_fp32(chunked, one_pass.detach())
    with torch.inference_mode():
        assert_close_fp32(model(x, landmarks=lm), one_pass.detach())
    with pytest.raises(ValueError, match="inference_chunk_rows"):
        nk.NFormerLayer(dim=32, inference_chunk_rows=0)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_inference_chunks_under_autocast(backend):
    """bf16 autocast: the chunked output keeps the one-pass dtype (LayerNorm runs in fp32)."""
    model = nk.NFormer(dim=32, depth=2, topk=6, inference_chunk_rows=16).eval()
    x = ties_free(100, 32)
    lm = torch.stack([torch.arange(5), torch.arange(40, 45)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        one_pass = model(x, landmarks=lm).detach()
        with torch.no_grad():
            chunked = model(x, landmarks=lm)
    assert chunked.dtype == one_pass.dtype
    torch.testing.assert_close(chunked, one_pass, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_training_step_under_autocast(backend):
    """A bf16-autocast training step (what nformer-reid's --amp does) runs and gives finite gradients."""
    model = nk.NFormer(dim=32, depth=2, topk=6, num_classes=5).train()
    x = ties_free(50, 32, batch=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = model(x)
    logits.float().logsumexp(-1).sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_small_inputs_clamp_topk_and_landmarks():
    model = nk.NFormer(dim=16, depth=1, topk=20, num_landmarks=5).eval()
    assert model(ties_free(1, 16)).shape == (1, 16)
    assert model(ties_free(3, 16)).shape == (3, 16)


def test_module_bad_input():
    with pytest.raises(ValueError, match="num_heads"):
        nk.NFormerLayer(dim=30, num_heads=4)
    with pytest.raises(ValueError, match="neighbor_source"):
        nk.NFormer(neighbor_source="graph")
    model = nk.NFormer(dim=16, depth=2, topk=4)
    with pytest.raises(ValueError, match="x must be"):
        model(torch.randn(10, 8))
    with pytest.raises(ValueError, match="landmarks"):
        model(torch.randn(10, 16), landmarks=torch.zeros(3, 5, dtype=torch.long))


def _projected(in_dim=48, dim=16, **kwargs):
    torch.manual_seed(0)
    return nk.NFormer(dim=dim, in_dim=in_dim, depth=2, topk=6, **kwargs)


def _block_landmarks(n=30):
    return torch.stack([torch.arange(5), torch.arange(n - 5, n)])


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_input_projection_shapes_and_gradients(backend):
    model = _projected(num_classes=5).train()
    assert isinstance(model.input_proj, torch.nn.Linear) and model.in_dim == 48 and model.dim == 16
    assert (model.input_proj.in_features, model.input_proj.out_features) == (48, 16)
    x = ties_free(30, 48, batch=2).requires_grad_()
    logits, refined = model(x)
    assert logits.shape == (2, 30, 5) and refined.shape == (2, 30, 16)
    torch.nn.functional.cross_entropy(logits.reshape(-1, 5), torch.arange(60) % 5).backward()
    for grad in (model.input_proj.weight.grad, model.input_proj.bias.grad, x.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        assert model(x[0]).shape == (30, 16) and model(x).shape == (2, 30, 16)


def test_input_projection_starts_norm_keeping_and_orthogonal():
    w = _projected(in_dim=256, dim=32).input_proj.weight.detach().double()
    torch.testing.assert_close(w @ w.T, 8.0 * torch.eye(32, dtype=torch.float64), rtol=0, atol=1e-4)
    assert not _projected().input_proj.bias.any()


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("source", ["input", "affinity"])
def test_projection_comes_before_the_neighbour_search(backend, source, monkeypatch):
    """The projected model is a dim-wide NFormer on input_proj(x): the neighbours are those of the
    projected features (what the blocks see), not of the raw in_dim-wide input."""
    model = _projected(neighbor_source=source).eval()
    x = ties_free(30, 48)
    plain = nk.NFormer(dim=16, depth=2, topk=6, neighbor_source=source).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("input_proj.")})
    searched, knn = [], nk.ops.knn
    monkeypatch.setattr(nk.ops, "knn", lambda x, *a, **kw: searched.append(x) or knn(x, *a, **kw))
    lm = _block_landmarks()
    with torch.no_grad():
        projected = model.input_proj(x)
        out = model(x, landmarks=lm)
        assert torch.equal(out, plain(projected, landmarks=lm))
    if source == "input":
        assert len(searched) == 2 and all(torch.equal(t, projected) for t in searched)
        assert not torch.equal(nk.knn(x, 6), nk.knn(projected, 6))  # the choice matters on these rows
    else:
        assert not searched


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_in_dim_equal_to_dim_is_the_model_without_it(backend):
    torch.manual_seed(0)
    today = nk.NFormer(dim=32, depth=2, topk=6, num_classes=5)
    torch.manual_seed(0)
    same = nk.NFormer(dim=32, depth=2, topk=6, num_classes=5, in_dim=32)
    assert same.input_proj is None and today.input_proj is None and today.in_dim == same.in_dim == 32
    assert today.state_dict().keys() == same.state_dict().keys()
    assert all(torch.equal(v, same.state_dict()[k]) for k, v in today.state_dict().items())
    assert today.project(x := ties_free(40, 32)) is x
    lm = _block_landmarks(40)
    with torch.no_grad():
        assert torch.equal(today.eval()(x, landmarks=lm), same.eval()(x, landmarks=lm))
    today.train(), same.train()
    torch.manual_seed(1)
    a = today(x, landmarks=lm)
    torch.manual_seed(1)
    b = same(x, landmarks=lm)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("kwargs", [dict(in_dim=48, num_classes=5), dict(num_classes=None),
                                    dict(in_dim=24, num_heads=4, num_landmarks=3, ffn_dim=40, dropout=0.2,
                                         neighbor_source="affinity")])
def test_config_rebuilds_an_equal_model(kwargs):
    """What a checkpoint stores (config: plain values, loadable with weights_only) rebuilds the model."""
    model = _projected(**{"in_dim": None, **kwargs})
    with torch.no_grad():
        model.bottleneck.running_mean.normal_()
    buffer = io.BytesIO()
    torch.save({"config": model.config, "state_dict": model.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert set(saved["config"]) == {"dim", "in_dim", "depth", "num_heads", "num_landmarks", "topk", "ffn_dim",
                                    "dropout", "num_classes", "neighbor_source"}
    torch.manual_seed(123)  # other initial weights: everything must come from the checkpoint
    rebuilt = nk.NFormer(**saved["config"])
    rebuilt.load_state_dict(saved["state_dict"])
    assert rebuilt.config == model.config
    assert rebuilt.config["in_dim"] == (kwargs.get("in_dim") or 16)
    x = ties_free(30, model.in_dim)
    lm = _block_landmarks()
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x, landmarks=lm), model.eval()(x, landmarks=lm))


def test_from_official_refuses_an_input_projection():
    sd = random_official_state_dict(dim=32, depth=2)
    with pytest.raises(ValueError, match=r"in_dim=64: an official NFormer has no input projection.*dim=32"):
        nk.NFormer.from_official(sd, in_dim=64)
    model = nk.NFormer.from_official(sd, in_dim=32)
    assert model.input_proj is None and model.in_dim == 32 and model.config["in_dim"] == 32


def test_in_dim_bad_input():
    for bad in (0, -3):
        with pytest.raises(ValueError, match="in_dim must be >= 1"):
            nk.NFormer(dim=16, in_dim=bad)
    for bad in (1.5, "48", True):
        with pytest.raises((TypeError, ValueError), match="in_dim"):
            nk.NFormer(dim=16, in_dim=bad)
    model = _projected()
    with pytest.raises(ValueError, match=r"x must be \(N,48\) or \(B,N,48\) \(in_dim=48\), got \(10, 16\)"):
        model(torch.randn(10, 16))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        model([[0.0] * 48])


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_torch_compile_fullgraph_layer(backend):
    layer = nk.NFormerLayer(dim=32, num_heads=2).eval()
    x = ties_free(40, 32)
    idx = nk.knn(x, 6)
    keep = nk.reciprocal_mask(idx)
    lm = torch.arange(5)
    compiled = torch.compile(layer, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, idx, keep, landmarks=lm), layer(x, idx, keep, landmarks=lm),
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not nk.extension_available(), reason="the fused ops come from the compiled extension")
def test_torch_compile_fullgraph_whole_model():
    """The whole eval NFormer (knn, reciprocal mask, 4 fused attentions, explicit landmarks) is one graph."""
    model = nk.NFormer(dim=32, depth=2, topk=6).eval()
    x = ties_free(100, 32)
    lm = torch.stack([torch.arange(5), torch.arange(40, 45)])
    with torch.no_grad():
        assert_close_fp32(torch.compile(model, fullgraph=True)(x, landmarks=lm), model(x, landmarks=lm))


@pytest.mark.skipif(not nk.extension_available(), reason="the fused op comes from the compiled extension")
def test_torch_export_layer_keeps_fused_op_as_one_node():
    layer = nk.NFormerLayer(dim=32, num_heads=2).eval()
    x = ties_free(40, 32)
    idx = nk.knn(x, 6)
    keep = nk.reciprocal_mask(idx)
    lm = torch.arange(5)
    exported = torch.export.export(layer, (x, idx, keep), kwargs={"landmarks": lm})
    fused = [n for n in exported.graph.nodes if str(n.target).startswith("nformer.")]
    assert len(fused) == 1 and str(fused[0].target) == "nformer.sparse_attention.default"
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x, idx, keep, landmarks=lm), layer(x, idx, keep, landmarks=lm),
                                   rtol=1e-5, atol=1e-5)
