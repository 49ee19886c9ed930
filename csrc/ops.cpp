// Schemas of the `nformer` op library. Kernels register per dispatch key:
// csrc/cpu/*.cpp (CPU), csrc/cuda/*.cu (CUDA). Fake/meta kernels and autograd
// are registered from Python, beside each op family (nformer_kernels/ops/).
//
// All ops take batched tensors; the Python wrappers add/remove the batch dim.
//   knn(x (B,N,d) float, rows already L2-normalised, k) -> idx (B,N,k) int64
//       idx[b,i,0] = i (self first); then the k-1 other j by decreasing canonical score
//       c(x_i, x_j) of the values taken as fp32 (common/canonical.h), ties broken by smaller j.
//       cpu, torch, reference: exactly that. cuda, triton: stage 1 of the two-stage knn, the same
//       order by their own fp32/fp16 scores (within the bound of canonical.score_error_bound).
//   knn_rows(x (B,N,d), rows (B,R) int64, k) -> (B,R,k): the canonical top-k of rows `rows` alone
//       (exact on every backend), the rescan of the rows a two-stage knn could not certify.
//   knn_rescore(x (B,N,d), candidates (B,N,K') int64, k, margin (B,N) float64) -> (idx (B,N,k),
//       certified (B,N) bool): the canonical top-k among each row's candidates (score desc, id asc,
//       slot asc; self first) and (K' >= N) | (c(last candidate) + margin < c(k-th)).
//   reciprocal_mask(idx (B,N,k) int64) -> keep (B,N,k) bool, keep[i,t] = i in idx[idx[i,t]]
//   reverse_index(idx, keep) -> rev (B,N,k) int64: for j, t' with i = idx[j,t'],
//       rev[j,t'] = the t with idx[i,t] == j and keep[i,t]; -1 if there is none.
//   sparse_attention(P, R (B,N,H,l) acc dtype, v (B,N,H*dv), idx, keep, scale)
//       acc dtype = float64 when v is float64, else float32 (P, R, probs, dP, dR use it)
//       -> out (B,N,H*dv) in v.dtype, probs (B,N,H,k) acc dtype (0 where not kept)
//       s[i,h,t] = scale * <P[i,h,:], R[idx[i,t],h,:]>; softmax over kept t;
//       out[i,h] = sum_t probs[i,h,t] * v[idx[i,t],h]
//   sparse_attention_backward(grad_out, P, R, v, idx, rev, probs, scale) -> (dP, dR, dv)
//       requires every kept (i,t) to be covered by rev (keep within reciprocal).
#include <torch/library.h>

TORCH_LIBRARY(nformer, m) {
  m.def("knn(Tensor x, int k) -> Tensor");
  m.def("knn_rows(Tensor x, Tensor rows, int k) -> Tensor");
  m.def("knn_rescore(Tensor x, Tensor candidates, int k, Tensor margin) -> (Tensor, Tensor)");
  m.def("reciprocal_mask(Tensor idx) -> Tensor");
  m.def("reverse_index(Tensor idx, Tensor keep) -> Tensor");
  m.def("sparse_attention(Tensor P, Tensor R, Tensor v, Tensor idx, Tensor keep, float scale) -> (Tensor, Tensor)");
  m.def("sparse_attention_backward(Tensor grad_out, Tensor P, Tensor R, Tensor v, Tensor idx, Tensor rev, Tensor probs, float scale) -> (Tensor, Tensor, Tensor)");
}
