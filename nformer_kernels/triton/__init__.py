"""The `triton` backend: Triton kernels with the batched contract of the C++ `nformer::` ops.

Each module holds one op family's kernels, launchers and torch.library custom ops
(nformer::<op>_triton): knn.py, knn_rescore.py (stage 2 of the certified knn), knn_rows.py (the
exact rescan of the rows stage 2 could not certify), reciprocal.py
(reciprocal_mask, reverse_index), sparse_attention.py (sparse_attention,
sparse_attention_backward). Their fake kernels and autograd are registered with
the C++ ops' in nformer_kernels/ops/. variants.py lists every launch configuration; aot.py compiles
them all ahead of time for GPU targets.

They run on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 was set before triton was
imported. fp32/fp16/bf16 only (float64 -> TypeError). Importing this package never fails:
`available` says whether the kernels can run here and `reason` why not.
"""
import torch

try:
    import triton
except Exception as exc:  # not installed, or broken for this platform
    triton = None
    reason = f"triton cannot be imported ({exc})"
else:
    from nformer_kernels.triton import knn, knn_rescore, knn_rows, reciprocal, sparse_attention  # noqa: F401  (registers the ops)

    if not (triton.knobs.runtime.interpret or torch.cuda.is_available()):
        reason = "no CUDA GPU (set TRITON_INTERPRET=1 before importing triton to run on CPU)"
    else:
        reason = ""
available = not reason
imported = triton is not None
interpreted = bool(imported and triton.knobs.runtime.interpret)
