"""Dense baselines the fused kernels are compared with; none of this belongs in the library.

- DenseOfficialNFormer: the official NFormer computation (haochenheheda/NFormer,
  modeling/nformer.py), with every N x N tensor it builds: cosine matrix + topk, landmark
  affinity w1 @ w2, scattered neighbour mask, reciprocal mask * mask^T, masked softmax and a
  dense probabilities @ V. Parameter names follow the official checkpoint layout, so
  `nk.NFormer.from_official(dense.state_dict())` gives the fused model the same weights and
  `DenseOfficialNFormer.from_official(sd)` runs an official checkpoint densely. It is the one
  transcription of the official model: the benchmarks, the agreement checks and the tests use it.
- random_official_state_dict: seeded random weights in that layout (tests, checks).
- dense_transformer: torch.nn.TransformerEncoder layers (full softmax attention, SDPA).
- knn_torch_chunked / knn_faiss: the usual ways to get a top-k without a custom kernel.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn


class _Conv1D(nn.Module):
    """The official 1x1 Conv1D: a linear layer whose weight is stored (in, out) as `w`."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.w = nn.Parameter(torch.empty(n_in, n_out).normal_(std=0.02))
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        return torch.addmm(self.b, x.reshape(-1, x.shape[-1]), self.w).view(*x.shape[:-1], -1)


class _LayerNorm(nn.Module):
    """OpenAI-style LayerNorm of the official code (gain `g`, bias `b`, eps inside the sqrt)."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.g = nn.Parameter(torch.ones(dim))
        self.b = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x):
        mean = x.mean(-1, keepdim=True)
        var = (x - mean).pow(2).mean(-1, keepdim=True)
        return self.g * (x - mean) / torch.sqrt(var + self.eps) + self.b


class _DenseAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.c_attn = _Conv1D(dim, 3 * dim)
        self.c_proj = _Conv1D(dim, dim)

    def forward(self, x, landmarks, idx):
        b, n, d = x.shape
        dh = d // self.heads
        q, k, v = (t.view(b, n, self.heads, dh).transpose(1, 2) for t in self.c_attn(x).split(d, dim=2))
        w1 = q @ k[:, :, landmarks].transpose(2, 3)  # (B,H,N,l)
        w2 = q[:, :, landmarks] @ k.transpose(2, 3)  # (B,H,l,N)
        w = (w1 @ w2).div_(math.sqrt(dh))  # dense N x N landmark affinity
        # The official mask: ones at each row's top-k, float, per head; reciprocal = mask * mask^T.
        mask = torch.zeros_like(w).scatter_(3, idx.unsqueeze(1).expand(b, self.heads, n, idx.shape[-1]), 1.0)
        mask = mask * mask.transpose(2, 3)
        # w * mask - 1e9 * (1 - mask), in place (the official training path; its eval path's
        # sparse softmax over the nonzeros of w * mask gives the same probabilities).
        w.mul_(mask).add_(mask.sub_(1.0).mul_(1e9))
        del mask
        out = torch.softmax(w, dim=3) @ v
        return self.c_proj(out.transpose(1, 2).reshape(b, n, d))


class _MLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.c_fc = _Conv1D(dim, hidden)
        self.c_proj = _Conv1D(hidden, dim)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class _DenseBlock(nn.Module):
    def __init__(self, dim, heads, ffn_dim):
        super().__init__()
        self.attn = _DenseAttention(dim, heads)
        self.ln_1 = _LayerNorm(dim)
        self.mlp = _MLP(dim, ffn_dim)
        self.ln_2 = _LayerNorm(dim)

    def forward(self, x, landmarks, idx):
        y = self.ln_1(x + self.attn(x, landmarks, idx))
        return self.ln_2(y + self.mlp(y))


class DenseOfficialNFormer(nn.Module):
    """The official NFormer's eval computation, O(N^2) memory; dropout omitted (eval only).

    forward(x (B,N,d), landmarks (depth, l) int64 or None) -> BatchNorm'd features (B,N,d).
    Without landmarks each block draws l distinct positions from the global RNG, as the official code.
    num_classes adds the official classifier (bias-free Linear), so a full state dict loads; the
    eval forward does not use it.
    """

    def __init__(self, dim=256, depth=4, heads=2, num_landmarks=5, topk=20, ffn_dim=1024, num_classes=None):
        super().__init__()
        self.depth, self.num_landmarks, self.topk = depth, num_landmarks, topk
        self.h = nn.ModuleList(_DenseBlock(dim, heads, ffn_dim) for _ in range(depth))
        self.bottleneck = nn.BatchNorm1d(dim)
        self.bottleneck.bias.requires_grad_(False)
        self.classifier = nn.Linear(dim, num_classes, bias=False) if num_classes else None

    @classmethod
    def from_official(cls, state_dict, heads=2, num_landmarks=5, topk=20):
        """The dense model with the weights of an official state dict (nformer_model.pth, with or
        without the `nformer.` prefix; dim, depth, FFN width and classes read from its tensors)."""
        from nformer_kernels import official

        sd = official.nformer_subset(state_dict)
        config = official.architecture(sd)
        model = cls(config["dim"], config["depth"], heads, num_landmarks, topk, config["ffn_dim"],
                    config["num_classes"])
        model.load_state_dict(sd)
        return model

    def forward(self, x, landmarks=None):
        b, n, d = x.shape
        xn = x / torch.norm(x, p=2, dim=2, keepdim=True)
        idx = torch.topk(torch.bmm(xn, xn.transpose(1, 2)), min(self.topk, n), dim=2).indices
        del xn
        for i, block in enumerate(self.h):
            lm = torch.randperm(n)[: self.num_landmarks] if landmarks is None else landmarks[i]
            x = block(x, lm.to(x.device), idx)
        return self.bottleneck(x.reshape(b * n, d)).view(b, n, d)


def random_official_state_dict(dim=32, depth=2, ffn=None, classes=11, seed=0, prefix="nformer.", std=0.2):
    """A seeded random state dict in the official nformer_model.pth layout (Conv1D weights (in, out)).

    Weights are std * N(0, 1); LayerNorm and BatchNorm gains 1 + that, running variances 1 + |that|.
    With a prefix (a full model's checkpoint) it also holds a backbone tensor that is not NFormer's.
    At dim=256 keep std small: the affinity is a product of two 128-dim dot products, so large
    weights give logits in the thousands, where fp32 summation order alone moves the output by 1e-3.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):  # names and shapes only: no memory, no draws from the global RNG
        layout = DenseOfficialNFormer(dim, depth, ffn_dim=ffn or 4 * dim, num_classes=classes).state_dict()
    sd = {}
    for key, like in layout.items():
        if key.endswith("num_batches_tracked"):
            value = torch.tensor(7)
        else:
            value = std * torch.randn(*like.shape, generator=g)
            if key.endswith(("ln_1.g", "ln_2.g", "bottleneck.weight")):
                value = 1 + value
            elif key.endswith("running_var"):
                value = 1 + value.abs()
        sd[prefix + key] = value
    if prefix:
        sd["base.conv1.weight"] = std * torch.randn(4, 3, 1, 1, generator=g)
    return sd


def dense_transformer(dim=256, heads=2, ffn_dim=1024, depth=4):
    """depth stacked nn.TransformerEncoderLayer (post-LN, batch_first): full N x N attention."""
    layer = nn.TransformerEncoderLayer(dim, heads, ffn_dim, batch_first=True, norm_first=False)
    return nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)


def knn_torch_chunked(x, k, chunk_bytes=256 << 20):
    """Cosine top-k of the rows of x (N,d) by torch.mm + torch.topk over row chunks.

    The products run in x's dtype on CUDA (fp16/bf16 on tensor cores, as a user would run them)
    and in fp32 on the CPU, where half-precision matmuls are slow. Each chunk's similarity block
    (rows x N) stays under chunk_bytes. Self is not forced first (it is first anyway unless a
    duplicate row ties with it).
    """
    xn = F.normalize(x if x.is_cuda else x.float(), dim=1)
    rows = max(1, min(x.shape[0], chunk_bytes // (xn.element_size() * x.shape[0])))
    return torch.cat([torch.topk(torch.mm(xn[s:s + rows], xn.T), k, dim=1).indices
                      for s in range(0, x.shape[0], rows)])


def knn_faiss(x_np, k, threads=None):
    """Exact inner-product top-k with faiss IndexFlatIP; x_np: L2-normalised float32 (N,d) array."""
    import faiss

    if threads is not None:
        faiss.omp_set_num_threads(threads)
    index = faiss.IndexFlatIP(x_np.shape[1])
    index.add(x_np)
    return index.search(x_np, k)[1]
