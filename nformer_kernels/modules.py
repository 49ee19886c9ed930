"""NFormerLayer and NFormer: the official NFormer model built on the fused ops."""
import math
import warnings
from typing import Optional, Sequence, Union

import torch
from torch import nn

from nformer_kernels import _checks, official, ops


def draw_landmarks(n: int, num_landmarks: int, generator: Optional[torch.Generator] = None,
                   pool: Optional[torch.Tensor] = None, device=None) -> torch.Tensor:
    """min(num_landmarks, |pool|) distinct positions drawn uniformly from pool (default: all n).

    Without a generator this uses the global RNG, so every call draws afresh (as the official code).
    """
    if pool is None:
        pool = torch.arange(n)
    pool = pool.cpu()
    perm = torch.randperm(pool.numel(), generator=generator)[: min(num_landmarks, pool.numel())]
    return pool[perm].to(device)


def _check_dropout(p):
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
        raise ValueError(f"dropout must be a probability in [0, 1], got {p!r}")


class NFormerLayer(nn.Module):
    """One NFormer block: landmark-agent attention over reciprocal neighbours, post-LN, tanh-GELU FFN.

    y = LN1(x + Dropout(Proj(Attn(x)))); out = LN2(y + Dropout(FC2(GELU(FC1(y))))).

    Without autograd (torch.no_grad / inference_mode, or nothing requiring grad) the row-wise parts
    run in chunks of `inference_chunk_rows` rows (default 2048 on CPU, 65536 on GPU): Q and K are
    never held for all N rows (only their landmark factors are), and the N x ffn_dim activation
    never exists, which cuts peak memory to about three N x dim tensors and keeps the CPU's working
    set in cache. Results equal the one-pass forward up to GEMM rounding.
    """

    def __init__(self, dim: int = 256, num_heads: int = 2, num_landmarks: int = 5, ffn_dim: int = 1024,
                 dropout: float = 0.1, layer_norm_eps: float = 1e-5, inference_chunk_rows: Optional[int] = None):
        super().__init__()
        dim, num_heads, num_landmarks, ffn_dim = (_checks.positive_int(v, name) for v, name in (
            (dim, "dim"), (num_heads, "num_heads"), (num_landmarks, "num_landmarks"), (ffn_dim, "ffn_dim")))
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        if inference_chunk_rows is not None:
            inference_chunk_rows = _checks.positive_int(inference_chunk_rows, "inference_chunk_rows")
        _check_dropout(dropout)
        self.dim, self.num_heads, self.num_landmarks = dim, num_heads, num_landmarks
        self.inference_chunk_rows = inference_chunk_rows
        self.scale = 1.0 / math.sqrt(dim // num_heads)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.act = nn.GELU(approximate="tanh")
        self.dropout = nn.Dropout(dropout)
        for lin in (self.qkv, self.out_proj, self.fc1, self.fc2):  # the official Conv1D init
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor, idx: Optional[torch.Tensor], keep: Optional[torch.Tensor],
                landmarks: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                landmark_pool: Optional[torch.Tensor] = None, topk: Optional[int] = None,
                check_inputs: bool = True) -> torch.Tensor:
        """x: (N,d)|(B,N,d). idx/keep: neighbour lists and mask; idx=None takes the top-`topk`
        neighbours of this block's own landmark affinity (paper Eq. 6) with their reciprocal mask.
        check_inputs=False skips re-validating idx/landmarks that the caller built itself."""
        if x.dim() not in (2, 3) or x.shape[-1] != self.dim:
            raise ValueError(f"x must be (N,{self.dim}) or (B,N,{self.dim}), got {tuple(x.shape)}")
        n = x.shape[-2]
        if landmarks is None:
            landmarks = draw_landmarks(n, self.num_landmarks, generator, landmark_pool, x.device)
        ops.check_landmarks(landmarks, n, check_values=check_inputs)
        chunk = self._chunk_rows(x)
        P, R, v = self._attention_inputs(x, landmarks, chunk)
        if idx is None:
            if topk is None:
                raise ValueError("topk is required when idx is None (affinity neighbours)")
            idx = ops.landmark_affinity_knn(P, R, min(topk, n))
            keep = ops.reciprocal_mask(idx, check_inputs=False)  # built here: nothing to re-check
        attn = ops.sparse_attention(P, R, v, idx, keep, self.scale, check_inputs=check_inputs)
        return self._output(x, attn, chunk)

    def _output(self, x, attn, chunk):
        """The row-wise rest of the block (projection, residuals, LayerNorms, FFN) of x and its
        attention output, `chunk` rows at a time."""
        n = x.shape[-2]
        if chunk >= n:
            return self._residual_ffn(x, attn)
        out = None
        for start in range(0, n, chunk):  # row-wise from here
            rows = slice(start, start + chunk)
            y = self._residual_ffn(x[..., rows, :], attn[..., rows, :])
            if out is None:  # reuse attn's memory unless autocast gives the output another dtype
                out = attn if y.dtype == attn.dtype else y.new_empty((*x.shape[:-1], self.dim))
            out[..., rows, :] = y
        return out

    def _chunk_rows(self, x: torch.Tensor) -> int:
        """Rows per chunk of the inference path; N (one pass) whenever autograd must see the graph."""
        n = x.shape[-2]
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and (
                x.requires_grad or any(p.requires_grad for p in self.parameters()))):
            return n
        rows = self.inference_chunk_rows or (2048 if x.device.type == "cpu" else 65536)
        return min(n, max(1, rows // (x.shape[0] if x.dim() == 3 else 1)))

    def _attention_inputs(self, x, landmarks, chunk):
        """Landmark factors P, R and values v of x, projecting `chunk` rows at a time."""
        n = x.shape[-2]
        if chunk >= n:
            q, k, v = self.qkv(x).split(self.dim, dim=-1)
            return (*ops.landmark_factors(q, k, q[..., landmarks, :], k[..., landmarks, :], self.num_heads), v)
        q_land, k_land, _ = self.qkv(x[..., landmarks, :]).split(self.dim, dim=-1)
        return self._landmark_inputs(x, q_land, k_land, chunk)

    def _landmark_inputs(self, x, q_land, k_land, chunk):
        """P, R and v of the rows x against landmark rows q_land, k_land (the q and k projections
        of the landmarks, which need not be rows of x), projecting `chunk` rows at a time."""
        n = x.shape[-2]
        Ps, Rs, v = [], [], None
        for start in range(0, n, chunk):
            q, k, v_rows = self.qkv(x[..., start:start + chunk, :]).split(self.dim, dim=-1)
            P, R = ops.landmark_factors(q, k, q_land, k_land, self.num_heads)
            Ps.append(P)
            Rs.append(R)
            if v is None:
                v = v_rows.new_empty((*x.shape[:-1], self.dim))
            v[..., start:start + chunk, :] = v_rows
        return torch.cat(Ps, dim=-3), torch.cat(Rs, dim=-3), v

    def _residual_ffn(self, x, attn):
        y = self.norm1(x + self.dropout(self.out_proj(attn)))
        return self.norm2(y + self.dropout(self.fc2(self.act(self.fc1(y)))))


class NFormer(nn.Module):
    """depth NFormerLayers over the neighbour graph of the input, then a BatchNorm head.

    Neighbours (top-`topk` by cosine of the *input* features, reciprocal mask) are computed once per
    forward, as in the official code; neighbor_source="affinity" recomputes them per block from the
    landmark affinity (paper Eq. 6). inference_chunk_rows: see NFormerLayer. knn_precision: the
    `precision` of the neighbour search (nk.knn; "exact" restores the full-precision scan). Eval returns the
    BatchNorm'd refined features (x's shape with dim features); training returns (logits, refined
    features) with logits None when num_classes is None.

    in_dim: the width of the features given to forward (default dim). When it differs from dim, a
    learned `input_proj = nn.Linear(in_dim, dim)` maps them to dim first, so 2048-d ResNet-50 /
    BoT features train a 256-d NFormer (3.4M parameters) instead of a 2048-d one (203M). A plain
    Linear because it is what the official NFormer already sits on: its input is the backbone's
    Linear(2048, 256) projection of the pooled features (nformer_reid's Backbone.projection), so
    the blocks see the same kind of features; the post-LN blocks normalise what they add to it.
    It starts as a scaled projection onto a random dim-subspace (orthogonal rows, gain
    sqrt(in_dim / dim), zero bias), which keeps feature norms and, as closely as a map fixed
    before training can, cosine neighbourhoods. The projection comes first: the neighbour search
    and every block run on the projected features, and refined features are dim-wide.
    Without it (in_dim == dim) the model is the official one, parameter for parameter.

    `config` holds the constructor arguments of the architecture: NFormer(**model.config) builds
    a model that model.state_dict() loads into.
    """

    def __init__(self, dim: int = 256, depth: int = 4, num_heads: int = 2, num_landmarks: int = 5,
                 topk: int = 20, ffn_dim: Optional[int] = None, dropout: float = 0.1,
                 num_classes: Optional[int] = None, neighbor_source: str = "input",
                 inference_chunk_rows: Optional[int] = None, knn_precision: str = "auto",
                 in_dim: Optional[int] = None):
        super().__init__()
        if neighbor_source not in ("input", "affinity"):
            raise ValueError(f"neighbor_source must be 'input' or 'affinity', got {neighbor_source!r}")
        dim, depth, topk = (_checks.positive_int(v, name) for v, name in ((dim, "dim"), (depth, "depth"), (topk, "topk")))
        in_dim = dim if in_dim is None else _checks.positive_int(in_dim, "in_dim")
        if knn_precision not in ops.PRECISIONS:
            raise ValueError(f"knn_precision must be one of {ops.PRECISIONS}, got {knn_precision!r}")
        self.knn_precision = knn_precision
        if num_classes is not None:
            num_classes = _checks.positive_int(num_classes, "num_classes")
        self.dim, self.depth, self.topk, self.num_landmarks = dim, depth, topk, num_landmarks
        self.neighbor_source = neighbor_source
        self.in_dim = in_dim
        self.input_proj = None
        if in_dim != dim:
            self.input_proj = nn.Linear(in_dim, dim)
            nn.init.orthogonal_(self.input_proj.weight, gain=math.sqrt(in_dim / dim))
            nn.init.zeros_(self.input_proj.bias)
        self.blocks = nn.ModuleList(
            NFormerLayer(dim, num_heads, num_landmarks, ffn_dim or 4 * dim, dropout,
                         inference_chunk_rows=inference_chunk_rows) for _ in range(depth))
        self.bottleneck = nn.BatchNorm1d(dim)
        self.bottleneck.bias.requires_grad_(False)  # BNNeck: no shift
        self.classifier = None
        if num_classes is not None:
            self.classifier = nn.Linear(dim, num_classes, bias=False)
            nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, x: torch.Tensor, landmarks: Optional[Union[torch.Tensor, Sequence[torch.Tensor]]] = None,
                generator: Optional[torch.Generator] = None, query_mask: Optional[torch.Tensor] = None):
        """x: (N,in_dim)|(B,N,in_dim). landmarks: (depth, l) int64 or a list of per-block tensors.
        query_mask: bool (N,)|(B,N); queries never neighbour other queries and are never landmarks.
        x is cast to the model's dtype (model.double() for fp64). Returns (N,dim)|(B,N,dim) features
        in that dtype (with the logits in training, see the class)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() not in (2, 3) or x.shape[-1] != self.in_dim:
            raise ValueError(f"x must be (N,{self.in_dim}) or (B,N,{self.in_dim}) (in_dim={self.in_dim}), "
                             f"got {tuple(x.shape)}")
        if landmarks is not None:
            if isinstance(landmarks, torch.Tensor) and landmarks.dim() != 2 or \
                    not isinstance(landmarks, (torch.Tensor, list, tuple)):
                raise TypeError(f"landmarks must be a (depth, l) int64 tensor or a list of {self.depth} 1-D "
                                f"int64 tensors, got {type(landmarks).__name__}"
                                f"{' of shape ' + str(tuple(landmarks.shape)) if isinstance(landmarks, torch.Tensor) else ''}")
            if len(landmarks) != self.depth:
                raise ValueError(f"landmarks must give one set per block ({self.depth}), got {len(landmarks)}")
        n = x.shape[-2]
        k = min(self.topk, n)
        pool = None
        if query_mask is not None:
            _checks.check_query_mask(query_mask, x.shape)
            # Landmarks are shared by the batch: draw them among positions that are no query anywhere.
            flat = query_mask.reshape(-1, n).any(0)
            pool = (~flat).nonzero().squeeze(1).cpu()
            if pool.numel() == 0:
                raise ValueError("query_mask flags every position; landmarks need non-query positions")
        x = self.project(x.to(self.bottleneck.weight.dtype))  # the model's own dtype (fp64/fp16 input is cast)
        idx = keep = None
        if self.neighbor_source == "input":
            idx = ops.knn(x, k, query_mask=query_mask, precision=self.knn_precision)
            keep = ops.reciprocal_mask(idx, check_inputs=False)
        for i, block in enumerate(self.blocks):
            lm = None if landmarks is None else landmarks[i]
            # Neighbours and drawn landmarks are built (and checked) here; explicit landmarks are the user's.
            x = block(x, idx, keep, landmarks=lm, generator=generator, landmark_pool=pool, topk=k,
                      check_inputs=lm is not None)
        feat = self.bottleneck(x.reshape(-1, self.dim)).view_as(x)
        if self.training:
            return (self.classifier(feat) if self.classifier is not None else None), x
        return feat

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The blocks' input for features x (..., in_dim): input_proj(x) in x's dtype, or x itself
        when in_dim == dim. Row-wise, so a subset of rows projects to the same rows."""
        if self.input_proj is None:
            return x
        # In x's dtype (an autocast Linear gives bf16/fp16): the neighbour search and the first
        # residual then see the precision they see without a projection.
        return self.input_proj(x).to(x.dtype)

    @property
    def config(self) -> dict:
        """The architecture's constructor arguments (dim, in_dim, depth, num_heads, num_landmarks,
        topk, ffn_dim, dropout, num_classes, neighbor_source): NFormer(**config) rebuilds a model
        that this model's state_dict loads into. Run settings (knn_precision,
        inference_chunk_rows) change no weight and are not part of it."""
        block = self.blocks[0]
        return dict(dim=self.dim, in_dim=self.in_dim, depth=self.depth, num_heads=block.num_heads,
                    num_landmarks=self.num_landmarks, topk=self.topk, ffn_dim=block.fc1.out_features,
                    dropout=block.dropout.p,
                    num_classes=None if self.classifier is None else self.classifier.out_features,
                    neighbor_source=self.neighbor_source)

    # ------------------------------------------------------------------ official checkpoints
    def convert_official(self, state_dict):
        """Official-layout state dict -> (our state dict, missing keys, unexpected keys) (official names)."""
        return official.convert(state_dict, self.depth, self.classifier is not None, self.state_dict())

    def load_official(self, state_dict, strict: bool = True):
        """Load an official NFormer state dict into this model; returns (missing, unexpected) key lists."""
        ours, missing, unexpected = self.convert_official(state_dict)
        if missing or unexpected:
            msg = f"official state_dict: missing keys {missing}, unexpected keys {unexpected}"
            if strict:
                raise ValueError(msg)
            warnings.warn(msg, stacklevel=2)
        self.load_state_dict(ours, strict=False)
        return missing, unexpected

    @classmethod
    def from_official(cls, state_dict, num_classes: Optional[int] = None, strict: bool = True, *,
                      dim: Optional[int] = None, depth: Optional[int] = None, **kwargs):
        """Build an NFormer from the official nformer_model.pth layout (keys nformer.h.{i}.attn.c_attn.w
        with Conv1D (in,out) weights, with or without the "nformer." prefix). dim, depth, ffn_dim and the
        number of classes are read from the tensors; pass dim/depth to have them checked (ValueError
        if the checkpoint differs). num_heads/num_landmarks/topk come from kwargs (official defaults 2/5/20).
        Official checkpoints have no input projection: in_dim, if given, must equal dim."""
        config = official.architecture(state_dict)
        in_dim = kwargs.get("in_dim")
        if in_dim is not None and _checks.positive_int(in_dim, "in_dim") != config["dim"]:
            raise ValueError(f"in_dim={in_dim}: an official NFormer has no input projection, its input is "
                             f"dim={config['dim']}-d; project the features to {config['dim']}-d first or train "
                             f"an NFormer(dim={config['dim']}, in_dim={in_dim})")
        for name, expected in (("dim", dim), ("depth", depth)):
            if expected is not None and _checks.positive_int(expected, name) != config[name]:
                raise ValueError(f"state_dict holds an NFormer with {name}={config[name]}, but {name}={expected} "
                                 "was asked for")
        if "ffn_dim" in config:
            kwargs.setdefault("ffn_dim", config["ffn_dim"])
        if num_classes is None:
            num_classes = config["num_classes"]
        model = cls(dim=config["dim"], depth=config["depth"], num_classes=num_classes, **kwargs)
        model.load_official(state_dict, strict=strict)
        return model
