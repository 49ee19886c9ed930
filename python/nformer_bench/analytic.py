"""Analytic forward FLOPs and peak-memory estimates of the benchmarked methods.

FLOPs count multiply-adds as 2 and only the matrix products; softmax, LayerNorm, GELU,
BatchNorm and the reciprocal test are O(N*d) or O(N*k^2) elementwise work and are left out.
Notation: n tokens (one set, batch 1), d model dim, H heads (dh = d/H), l landmarks,
k neighbours, f FFN hidden dim, depth blocks.
"""

# Paper Table 1 (Wang et al., CVPR 2022): GFLOPs per image of the attention model on Market-1501.
PAPER_GFLOPS_PER_IMG = {"transformer": 0.088, "nformer": 0.0025}

# The benchmarked methods. Fused ones run once per nformer_kernels backend ("attention" is
# neighbor_attention forward + backward); each baseline has one implementation, named here.
FUSED_METHODS = ("nformer", "nformer-layer", "knn", "attention")
BASELINE_BACKEND = {"dense-official": "torch", "dense-transformer": "torch", "knn-torch": "torch",
                    "knn-faiss": "faiss"}
METHODS = FUSED_METHODS + tuple(BASELINE_BACKEND)
DTYPE_NAMES = ("float32", "float16", "bfloat16")
# nformer_kernels backends that are plain PyTorch rather than kernels: benchmarked only when named.
PLAIN_BACKENDS = ("torch", "reference")


def linear_flops(n, d, f):
    """One block's dense layers: QKV (d -> 3d), output projection (d -> d), FFN (d -> f -> d)."""
    return 2 * n * d * 3 * d + 2 * n * d * d + 2 * n * d * f * 2


def knn_flops(n, d):
    """All-pairs inner products for the top-k: 2*n^2*d. The fused knn does this work too; it only
    avoids storing the n x n matrix."""
    return 2 * n * n * d


def fused_attention_flops(n, d, heads, l, k):
    """Landmark attention over k neighbours: O(n*k*H*(l+dv)).

    P = Q K_L^T and R = K Q_L^T: 2 * (2*n*l*dh) per head = 4*n*l*d over all heads;
    scores of the k neighbours: 2*n*k*l per head; weighted sum of k values: 2*n*k*dv per head.
    """
    dv = d // heads
    return 4 * n * l * d + 2 * n * k * heads * l + 2 * n * k * heads * dv


def dense_official_attention_flops(n, d, heads, l):
    """The official computation: w1 = Q K_L^T and w2 = Q_L K^T (4*n*l*d), the dense affinity
    w1 @ w2 (2*n^2*l per head) and the dense (masked) probabilities times V (2*n^2*dv per head)."""
    dv = d // heads
    return 4 * n * l * d + 2 * n * n * l * heads + 2 * n * n * dv * heads


def dense_transformer_attention_flops(n, d):
    """Full softmax attention: Q K^T (2*n^2*d) and probabilities times V (2*n^2*d), all heads."""
    return 4 * n * n * d


def attention_forward_bytes(n, d, heads, l, k, elem_size):
    """Bytes the sparse-attention forward must move when no gathered row is reused from cache (the
    N=1e6 case): idx+keep (9 B/entry), P, R of k neighbours, v of k neighbours; writes out, probs."""
    nk_, factors = n * k, heads * l * 4  # one row of P or R in fp32
    return nk_ * 9 + n * factors + nk_ * factors + nk_ * d * elem_size + n * d * elem_size + nk_ * heads * 4


def attention_train_bytes(n, d, heads, l, k, elem_size):
    """Bytes that neighbor_attention forward + backward must move when no gathered row is reused
    from cache: the basis of its achieved-bandwidth figure. Forward: attention_forward_bytes;
    backward rows: idx, probs, grad_out, v and R of k neighbours; writes ds (fp32), dP;
    backward cols: idx, rev (16 B/entry), grad_out of k neighbours, probs and ds at the reverse
                   positions (4 B each per head), P of k neighbours; writes dv, dR.
    """
    nk_, factors = n * k, heads * l * 4
    rows = nk_ * 8 + nk_ * heads * 4 + n * d * elem_size + nk_ * d * elem_size + nk_ * factors \
        + nk_ * heads * 4 + n * factors
    cols = nk_ * 16 + nk_ * d * elem_size + 2 * nk_ * heads * 4 + nk_ * factors + n * d * elem_size + n * factors
    return attention_forward_bytes(n, d, heads, l, k, elem_size) + rows + cols


def method_flops(method, n, d, heads, l, k, f, depth):
    """Forward FLOPs of one call of a benchmarked method (attention: forward + backward)."""
    if method == "attention":  # backward ~2x the forward's gathers and products
        return 3 * fused_attention_flops(n, d, heads, l, k)
    if method == "nformer":  # knn once on the input, then depth fused blocks
        return knn_flops(n, d) + depth * (linear_flops(n, d, f) + fused_attention_flops(n, d, heads, l, k))
    if method == "nformer-layer":  # one block, neighbours given
        return linear_flops(n, d, f) + fused_attention_flops(n, d, heads, l, k)
    if method == "dense-official":
        return knn_flops(n, d) + depth * (linear_flops(n, d, f) + dense_official_attention_flops(n, d, heads, l))
    if method == "dense-transformer":
        return depth * (linear_flops(n, d, f) + dense_transformer_attention_flops(n, d))
    if method in ("knn", "knn-torch", "knn-faiss"):
        return knn_flops(n, d)
    raise ValueError(f"unknown method {method!r}")


def dense_memory_bytes(method, backend, n, heads, elem_size):
    """Estimated peak bytes of the n^2 tensors of a method (None when it has none).

    Used on the CPU to skip a run before it exhausts the machine; the O(n*d) terms are ignored.
    """
    nn_elems = n * n
    if method == "dense-official":
        # knn: the n x n cosine matrix; each block then holds the affinity w, the scattered
        # neighbour mask and mask * mask^T at once, per head (nformer_bench/baselines.py).
        return max(nn_elems * elem_size, 3 * heads * nn_elems * elem_size)
    if method == "dense-transformer":
        # At most the (H, n, n) scores and their softmax at once; measured on the CPU (torch 2.14):
        # 1.2-1.5x one score matrix.
        return 2 * heads * nn_elems * elem_size
    if backend == "reference" and method in FUSED_METHODS:
        # reference.knn: fp32 similarity + sort values + int64 sort indices; reference attention:
        # fp32 scores, softmax and masked copy per head plus a bool n x n mask.
        knn_bytes = nn_elems * (4 + 4 + 8)
        attn_bytes = 3 * heads * nn_elems * 4 + nn_elems
        # attention: the forward's tensors are kept for the backward, which makes as many again.
        return {"knn": knn_bytes, "nformer-layer": attn_bytes, "attention": 2 * attn_bytes + knn_bytes}.get(
            method, max(knn_bytes, attn_bytes))
    return None
