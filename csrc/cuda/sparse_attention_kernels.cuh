// Device code of nformer::sparse_attention (forward) and nformer::sparse_attention_backward
// (launched from sparse_attention.cu).
//
// One warp per row i handles all H heads: it stages the row's neighbour ids, scores and
// probabilities in its slice of shared memory, computes the k x H landmark scores in
// parallel, runs nformer::masked_softmax / softmax_backward per head (the CPU kernels' code),
// and reads/writes feature rows with all 32 lanes splitting H*dv in vectors of VEC elements
// (16 bytes when dv and the pointers allow it), so every gathered neighbour row is one
// coalesced read. The backward never scatters: a row pass writes dP and ds (B,N,H,k), then a
// column pass gathers dv and dR for row j from the rows i that kept j, found through rev.
#pragma once
#include "cuda/device_common.cuh"

namespace nformer {
namespace cuda {
namespace {

template <int VEC, typename T>
__device__ __forceinline__ Vec<T, VEC> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, VEC>*>(p);
}

// One warp per row, kWarps rows per block (every attention kernel).
constexpr int attention_blocks(int64_t rows) { return static_cast<int>((rows + kWarps - 1) / kWarps); }

// Per-warp shared-memory slice: k int64 ids, then `acc_arrays` arrays of H*k accumulators and
// `extra_acc` more, then k bytes per `byte_arrays` (bool / int32 stored after, 4-byte aligned).
constexpr size_t warp_slice_bytes(int k, int H, size_t acc_size, int acc_arrays, int extra_acc, int tail_bytes) {
  return (size_t(k) * 8 + (size_t(acc_arrays) * H * k + extra_acc) * acc_size + size_t(k) * tail_bytes + 15) / 16 * 16;
}

// The slices of each kernel (host-side launch parameters): forward: ids, H*k scores, H*l P row,
// k keep bytes; backward rows: ids, probs, da; backward columns: ids, probs, ds, k int32 positions.
constexpr size_t fwd_slice_bytes(int k, int H, int l, size_t acc_size) {
  return warp_slice_bytes(k, H, acc_size, 1, H * l, 1);
}
constexpr size_t bwd_row_slice_bytes(int k, int H, size_t acc_size) { return warp_slice_bytes(k, H, acc_size, 2, 0, 0); }
constexpr size_t bwd_col_slice_bytes(int k, int H, size_t acc_size) {
  return warp_slice_bytes(k, H, acc_size, 2, 0, sizeof(int));
}

// Lanes per dot product in the backward row pass: the power of two covering dv/vec, at most a warp.
constexpr int lanes_per_dot(int dv, int vec) {
  int group = 1;
  while (group < kWarpSize && group * vec < dv) group *= 2;
  return group;
}

template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreads, 4) sparse_attention_fwd_kernel(
    const acc_t* __restrict__ P, const acc_t* __restrict__ R, const scalar_t* __restrict__ v,
    const int64_t* __restrict__ idx, const bool* __restrict__ keep, acc_t scale, scalar_t* __restrict__ out,
    acc_t* __restrict__ probs, int64_t rows, int64_t n, int H, int l, int k, int dv, int slice_bytes) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t row = int64_t(blockIdx.x) * kWarps + warp;
  if (row >= rows) return;  // whole warp; the kernel has no block-wide barrier
  int64_t* nbr = reinterpret_cast<int64_t*>(smem + warp * slice_bytes);  // neighbour row ids (batch-absolute)
  acc_t* sc = reinterpret_cast<acc_t*>(nbr + k);                        // [H][k] scores, then probs
  acc_t* p_row = sc + H * k;                                            // [H][l]
  bool* kp = reinterpret_cast<bool*>(p_row + H * l);                    // [k]

  const int64_t batch_row0 = row - row % n;
  const int Hl = H * l, Hk = H * k, D = H * dv;
  for (int t = lane; t < k; t += kWarpSize) {
    nbr[t] = batch_row0 + idx[row * k + t];
    kp[t] = keep[row * k + t];
  }
  for (int e = lane; e < Hl; e += kWarpSize) p_row[e] = P[row * Hl + e];
  __syncwarp();
  for (int e = lane; e < Hk; e += kWarpSize) {
    const int h = e / k, t = e - h * k;
    acc_t s = -INFINITY;
    if (kp[t]) {
      const acc_t* r_nb = R + nbr[t] * Hl + h * l;
      acc_t dot = 0;
      for (int m = 0; m < l; ++m) dot += p_row[h * l + m] * r_nb[m];
      s = scale * dot;
    }
    sc[e] = s;
  }
  __syncwarp();
  for (int h = lane; h < H; h += kWarpSize) masked_softmax(sc + h * k, kp, k);
  __syncwarp();
  for (int e = lane; e < Hk; e += kWarpSize) probs[row * Hk + e] = sc[e];

  for (int c = lane; c < D / VEC; c += kWarpSize) {
    const acc_t* p_h = sc + (c * VEC / dv) * k;
    acc_t acc[VEC] = {};
    for (int t = 0; t < k; ++t) {
      if (!kp[t]) continue;
      const Vec<scalar_t, VEC> x = load_vec<VEC>(v + nbr[t] * D + c * VEC);
#pragma unroll
      for (int q = 0; q < VEC; ++q) acc[q] += p_h[t] * static_cast<acc_t>(x.v[q]);
    }
    Vec<scalar_t, VEC> o;
#pragma unroll
    for (int q = 0; q < VEC; ++q) o.v[q] = static_cast<scalar_t>(acc[q]);
    *reinterpret_cast<Vec<scalar_t, VEC>*>(out + row * D + c * VEC) = o;
  }
}

// Row pass: da[h,t] = <grad_out[i,h], v[idx[i,t],h]>, ds = softmax_backward(probs, da),
// dP[i,h,:] = scale * sum_t ds[h,t] R[idx[i,t],h,:]; ds is written for the column pass.
// The dots are split over lane groups of `group` lanes (a power of two covering dv/VEC up
// to 32), so several neighbours are reduced at once when a head is narrow.
template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreads, 4) sparse_attention_bwd_row_kernel(
    const scalar_t* __restrict__ grad_out, const acc_t* __restrict__ R, const scalar_t* __restrict__ v,
    const int64_t* __restrict__ idx, const acc_t* __restrict__ probs, acc_t scale, acc_t* __restrict__ dP,
    acc_t* __restrict__ ds, int64_t rows, int64_t n, int H, int l, int k, int dv, int group, int slice_bytes) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t row = int64_t(blockIdx.x) * kWarps + warp;
  if (row >= rows) return;
  int64_t* nbr = reinterpret_cast<int64_t*>(smem + warp * slice_bytes);
  acc_t* pr = reinterpret_cast<acc_t*>(nbr + k);  // [H][k] probs
  acc_t* da = pr + H * k;                         // [H][k] da, then ds

  const int64_t batch_row0 = row - row % n;
  const int Hl = H * l, Hk = H * k, D = H * dv;
  for (int t = lane; t < k; t += kWarpSize) nbr[t] = batch_row0 + idx[row * k + t];
  for (int e = lane; e < Hk; e += kWarpSize) pr[e] = probs[row * Hk + e];
  __syncwarp();

  const int vecs_per_head = dv / VEC, groups = kWarpSize / group, g = lane / group, gl = lane % group;
  for (int h = 0; h < H; ++h) {
    const scalar_t* go = grad_out + row * D + h * dv;
    for (int t0 = 0; t0 < k; t0 += groups) {
      const int t = t0 + g;
      acc_t part = 0;
      if (t < k && pr[h * k + t] != acc_t(0)) {  // unkept (or underflowed) entries get ds = 0 anyway
        const scalar_t* v_nb = v + nbr[t] * D + h * dv;
        for (int c = gl; c < vecs_per_head; c += group) {
          const Vec<scalar_t, VEC> a = load_vec<VEC>(go + c * VEC), b = load_vec<VEC>(v_nb + c * VEC);
#pragma unroll
          for (int q = 0; q < VEC; ++q) part += static_cast<acc_t>(a.v[q]) * static_cast<acc_t>(b.v[q]);
        }
      }
      for (int off = group / 2; off > 0; off /= 2) part += __shfl_xor_sync(kFullMask, part, off);
      if (gl == 0 && t < k) da[h * k + t] = part;
    }
  }
  __syncwarp();
  for (int h = lane; h < H; h += kWarpSize) softmax_backward(pr + h * k, da + h * k, k);
  __syncwarp();
  for (int e = lane; e < Hk; e += kWarpSize) ds[row * Hk + e] = da[e];
  for (int e = lane; e < Hl; e += kWarpSize) {
    const acc_t* ds_h = da + (e / l) * k;
    acc_t acc = 0;
    for (int t = 0; t < k; ++t)
      if (ds_h[t] != acc_t(0)) acc += ds_h[t] * R[nbr[t] * Hl + e];
    dP[row * Hl + e] = scale * acc;
  }
}

// Column pass for row j: every t' with r = rev[j,t'] >= 0 names a row i = idx[j,t'] that
// kept j at position r; dv[j] = sum probs[i,h,r] grad_out[i,h], dR[j] = scale sum ds[i,h,r] P[i,h].
template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreads, 4) sparse_attention_bwd_col_kernel(
    const scalar_t* __restrict__ grad_out, const acc_t* __restrict__ P, const int64_t* __restrict__ idx,
    const int64_t* __restrict__ rev, const acc_t* __restrict__ probs, const acc_t* __restrict__ ds, acc_t scale,
    acc_t* __restrict__ dR, scalar_t* __restrict__ dv_out, int64_t rows, int64_t n, int H, int l, int k, int dv,
    int slice_bytes) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t row = int64_t(blockIdx.x) * kWarps + warp;
  if (row >= rows) return;
  int64_t* src = reinterpret_cast<int64_t*>(smem + warp * slice_bytes);  // row i that kept j (batch-absolute)
  acc_t* pc = reinterpret_cast<acc_t*>(src + k);                         // [H][k] probs[i,h,r]
  acc_t* dc = pc + H * k;                                                // [H][k] ds[i,h,r]
  int* rr = reinterpret_cast<int*>(dc + H * k);                          // [k] r, or -1

  const int64_t batch_row0 = row - row % n;
  const int Hl = H * l, Hk = H * k, D = H * dv;
  for (int t = lane; t < k; t += kWarpSize) {
    const int64_t r = rev[row * k + t];
    rr[t] = static_cast<int>(r);
    src[t] = batch_row0 + idx[row * k + t];
  }
  __syncwarp();
  for (int e = lane; e < Hk; e += kWarpSize) {
    const int h = e / k, t = e - h * k, r = rr[t];
    acc_t p = 0, d = 0;
    if (r >= 0) {
      const int64_t off = (src[t] * H + h) * k + r;
      p = probs[off];
      d = ds[off];
    }
    pc[e] = p;
    dc[e] = d;
  }
  __syncwarp();

  for (int c = lane; c < D / VEC; c += kWarpSize) {
    const acc_t* pc_h = pc + (c * VEC / dv) * k;
    acc_t acc[VEC] = {};
    for (int t = 0; t < k; ++t) {
      if (rr[t] < 0) continue;
      const Vec<scalar_t, VEC> g = load_vec<VEC>(grad_out + src[t] * D + c * VEC);
#pragma unroll
      for (int q = 0; q < VEC; ++q) acc[q] += pc_h[t] * static_cast<acc_t>(g.v[q]);
    }
    Vec<scalar_t, VEC> o;
#pragma unroll
    for (int q = 0; q < VEC; ++q) o.v[q] = static_cast<scalar_t>(acc[q]);
    *reinterpret_cast<Vec<scalar_t, VEC>*>(dv_out + row * D + c * VEC) = o;
  }
  for (int e = lane; e < Hl; e += kWarpSize) {
    const acc_t* dc_h = dc + (e / l) * k;
    acc_t acc = 0;
    for (int t = 0; t < k; ++t)
      if (rr[t] >= 0) acc += dc_h[t] * P[src[t] * Hl + e];
    dR[row * Hl + e] = scale * acc;
  }
}

}  // namespace
}  // namespace cuda
}  // namespace nformer
