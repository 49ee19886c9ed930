// Device code of nformer::knn (launched from knn.cu): fused similarity tiles + per-row
// running top-k, O(N*k) memory.
//
// A block owns BM query rows of one batch item and sweeps every column tile of BN
// candidates: it computes the BM x BN similarity tile into shared memory (tensor cores via
// WMMA for fp16/bf16, a register-blocked FMA GEMM for fp32/fp64 so fp32 stays fp32, no
// TF32), then one warp per row filters the tile against the row's current k-th best
// (threshold) and inserts the few candidates that beat it into the row's sorted list with a
// warp-parallel insertion (WarpSelect-style: the common case costs one compare per
// candidate). The lists live in shared memory for the whole sweep; only (B,N,k) int64 is
// written. Self is scored +inf so it always lands at position 0; ordering and ties follow
// nformer::ranks_before (higher score first, then smaller index). The WMMA kernel skips the
// shared-memory round trip and the selection of a tile none of whose scores can enter a list
// (tile_cannot_enter); NFORMER_CUDA_KNN_ROWS forces its row tile (knn.cu).
#pragma once
#include <mma.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>

#include "cuda/device_common.cuh"

namespace nformer {
namespace cuda {
namespace {

constexpr int kTileN = 128;  // candidates per tile (fp16/bf16/fp32)

// Inserts (s, id) into the sorted list (vals, ids) of length k; the caller guarantees that it
// ranks before the current k-th entry. Lane p owns positions p, p+32, ...
template <typename acc_t>
__device__ __forceinline__ void warp_insert(acc_t* vals, int* ids, int k, acc_t s, int id, int lane) {
  int pos = 0;  // number of entries that stay ahead of the candidate
  for (int base = 0; base < k; base += kWarpSize) {
    const int p = base + lane;
    pos += __popc(__ballot_sync(kFullMask, p < k && ranks_before(vals[p], ids[p], s, id)));
  }
  // Shift [pos, k-1) one place right. Highest slot first, so every read of p-1 happens
  // before the lane owning p-1 overwrites it.
  for (int base = (k - 1) & ~(kWarpSize - 1); base >= 0; base -= kWarpSize) {
    const int p = base + lane;
    const bool write = p < k && p >= pos;
    acc_t v = s;
    int i = id;
    if (write && p > pos) {
      v = vals[p - 1];
      i = ids[p - 1];
    }
    __syncwarp();
    if (write) {
      vals[p] = v;
      ids[p] = i;
    }
    __syncwarp();
  }
}

// Rows of the block's tile are split over warps (row r -> warp r % kWarps); each warp filters
// its rows of the score tile S (BM x BN, leading dim lds) and updates their lists.
template <typename acc_t, int BM, int BN>
__device__ __forceinline__ void select_tile(const acc_t* S, int lds, acc_t* list_v, int* list_i, int k, int row0,
                                            int col0, int n, int warp, int lane) {
  for (int r = warp; r < BM; r += kWarps) {
    const int row = row0 + r;
    if (row >= n) break;
    acc_t* lv = list_v + r * k;
    int* li = list_i + r * k;
    acc_t thr_v = lv[k - 1];
    int thr_i = li[k - 1];
#pragma unroll
    for (int c = 0; c < BN / kWarpSize; ++c) {
      const int col = col0 + c * kWarpSize + lane;
      const acc_t s = col == row ? acc_t(INFINITY) : S[r * lds + c * kWarpSize + lane];
      bool pending = col < n && ranks_before(s, col, thr_v, thr_i);
      unsigned mask;
      while ((mask = __ballot_sync(kFullMask, pending)) != 0) {
        const int src = __ffs(mask) - 1;
        warp_insert(lv, li, k, __shfl_sync(kFullMask, s, src), __shfl_sync(kFullMask, col, src), lane);
        thr_v = lv[k - 1];
        thr_i = li[k - 1];
        pending = pending && lane != src && ranks_before(s, col, thr_v, thr_i);
      }
    }
  }
}

template <typename acc_t>
__device__ __forceinline__ void init_lists(acc_t* list_v, int* list_i, int count) {
  for (int e = threadIdx.x; e < count; e += blockDim.x) {
    list_v[e] = acc_t(-INFINITY);
    list_i[e] = INT_MAX;
  }
}

template <int BM>
__device__ __forceinline__ void write_lists(const int* list_i, int64_t* out, int k, int row0, int n, int warp,
                                            int lane) {
  for (int r = warp; r < BM; r += kWarps) {
    const int row = row0 + r;
    if (row >= n) break;
    for (int p = lane; p < k; p += kWarpSize) out[static_cast<int64_t>(row) * k + p] = list_i[r * k + p];
  }
}

// ---------------------------------------------------------------- fp16 / bf16: WMMA tiles
constexpr int kMmaBK = 32;            // feature chunk staged per step
constexpr int kMmaLDK = kMmaBK + 8;   // staged row pitch (elements); keeps WMMA pointers 32-byte aligned
constexpr int kMmaLDS = kTileN + 4;   // score tile pitch (floats)

constexpr int kMmaRed = 2 * kWarps;  // per-warp tile maxima and threshold minima of the tile skip

constexpr size_t mma_smem_bytes(int bm, int k) {
  return size_t(bm) * kMmaLDS * sizeof(float) + size_t(bm) * k * (sizeof(float) + sizeof(int)) +
         kMmaRed * sizeof(float);
}

// The tile skip of knn_mma_kernel: true (the same on every thread) when no score of the block's
// accumulators can enter any of its rows' lists. Every thread offers its fragments' maximum; the
// lists' k-th values of the block's real rows give the weakest threshold. A full list only holds
// ids of earlier tiles, so a score equal to its k-th value (a larger id) would not enter either:
// strict < is safe, and rows whose lists still hold -inf keep every tile. The caller excludes the
// tile holding the block's own rows (self is scored +inf there).
template <int BM, typename Acc>
__device__ __forceinline__ bool tile_cannot_enter(const Acc& acc, int frags, const float* list_v, int k, int row0,
                                                  int n, float* red, int warp, int lane) {
  float top = -INFINITY;
  for (int f = 0; f < frags; ++f)
    for (int e = 0; e < acc[f].num_elements; ++e) top = fmaxf(top, acc[f].x[e]);
  const int r = threadIdx.x;
  float thr = r < BM && row0 + r < n ? list_v[r * k + k - 1] : INFINITY;
  for (int off = kWarpSize / 2; off > 0; off >>= 1) {
    top = fmaxf(top, __shfl_xor_sync(kFullMask, top, off));
    thr = fminf(thr, __shfl_xor_sync(kFullMask, thr, off));
  }
  if (lane == 0) {
    red[warp] = top;
    red[kWarps + warp] = thr;
  }
  __syncthreads();
  for (int w = 1; w < kWarps; ++w) {
    top = fmaxf(top, red[w]);
    thr = fminf(thr, red[kWarps + w]);
  }
  top = fmaxf(top, red[0]);
  thr = fminf(thr, red[kWarps]);
  return top < thr;
}

// Launch choice (host): 128-row blocks halve the candidate traffic; use them when they fit in
// shared memory and `blocks128` of them still give every SM one.
constexpr bool mma_use_128_rows(int k, size_t smem_optin, int64_t blocks128, int sm_count) {
  return mma_smem_bytes(128, k) <= smem_optin && blocks128 >= sm_count;
}

// 8 consecutive 16-bit features of one row, zero-filled past the row end / last row.
__device__ __forceinline__ uint4 load8(const uint16_t* __restrict__ x, int row, int n, int col, int d, bool vec_ok) {
  uint4 r = make_uint4(0, 0, 0, 0);
  if (row >= n || col >= d) return r;
  const uint16_t* p = x + static_cast<int64_t>(row) * d + col;
  if (vec_ok) return *reinterpret_cast<const uint4*>(p);  // d % 8 == 0 and 16-byte aligned base
  uint32_t w[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const uint32_t lo = col + 2 * q < d ? p[2 * q] : 0;
    const uint32_t hi = col + 2 * q + 1 < d ? p[2 * q + 1] : 0;
    w[q] = lo | (hi << 16);
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// 128-row blocks need ~200 registers per thread for their accumulators: one block per SM.
template <typename mma_t, int BM>
__global__ void __launch_bounds__(kThreads, BM == 128 ? 1 : 2) knn_mma_kernel(const uint16_t* __restrict__ x, int64_t* __restrict__ out,
                                                           int n, int d, int k, bool vec_ok) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // the host only launches this on sm_80+ (bf16 WMMA)
#else
  using namespace nvcuda;
  constexpr int BN = kTileN;
  constexpr int kWarpsM = BM / 32;  // each warp computes a 32 x (BN / kWarpsN) sub-tile
  constexpr int kWarpsN = kWarps / kWarpsM;
  constexpr int kFragsN = BN / kWarpsN / 16;
  constexpr int kVecsPerRow = kMmaBK / 8;
  constexpr int kVecsA = BM * kVecsPerRow / kThreads;
  constexpr int kVecsB = BN * kVecsPerRow / kThreads;
  static_assert(kVecsA >= 1 && kVecsB >= 1 && kFragsN >= 1, "tile shape");

  extern __shared__ __align__(128) unsigned char smem[];
  // The staging buffers (during the GEMM) and the score tile (during selection) share memory.
  mma_t* As = reinterpret_cast<mma_t*>(smem);
  mma_t* Bs = As + BM * kMmaLDK;
  float* S = reinterpret_cast<float*>(smem);
  float* list_v = reinterpret_cast<float*>(smem + size_t(BM) * kMmaLDS * sizeof(float));
  int* list_i = reinterpret_cast<int*>(list_v + BM * k);
  float* red = reinterpret_cast<float*>(list_i + BM * k);  // kMmaRed floats of the tile skip

  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int wm = warp / kWarpsN, wn = warp % kWarpsN;
  const int row0 = blockIdx.x * BM;
  x += static_cast<int64_t>(blockIdx.y) * n * d;
  out += static_cast<int64_t>(blockIdx.y) * n * k;
  init_lists(list_v, list_i, BM * k);

  const int chunks = (d + kMmaBK - 1) / kMmaBK;
  for (int col0 = 0; col0 < n; col0 += BN) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][kFragsN];
#pragma unroll
    for (int fm = 0; fm < 2; ++fm)
#pragma unroll
      for (int fn = 0; fn < kFragsN; ++fn) wmma::fill_fragment(acc[fm][fn], 0.0f);

    uint4 ra[kVecsA], rb[kVecsB];  // next chunk, prefetched into registers during the MMAs
    auto load_chunk = [&](int k0) {
#pragma unroll
      for (int it = 0; it < kVecsA; ++it) {
        const int e = threadIdx.x + it * kThreads;
        ra[it] = load8(x, row0 + e / kVecsPerRow, n, k0 + (e % kVecsPerRow) * 8, d, vec_ok);
      }
#pragma unroll
      for (int it = 0; it < kVecsB; ++it) {
        const int e = threadIdx.x + it * kThreads;
        rb[it] = load8(x, col0 + e / kVecsPerRow, n, k0 + (e % kVecsPerRow) * 8, d, vec_ok);
      }
    };
    load_chunk(0);
    for (int chunk = 0; chunk < chunks; ++chunk) {
      __syncthreads();  // previous readers of this memory (MMAs, or selection on S) are done
#pragma unroll
      for (int it = 0; it < kVecsA; ++it) {
        const int e = threadIdx.x + it * kThreads;
        *reinterpret_cast<uint4*>(As + (e / kVecsPerRow) * kMmaLDK + (e % kVecsPerRow) * 8) = ra[it];
      }
#pragma unroll
      for (int it = 0; it < kVecsB; ++it) {
        const int e = threadIdx.x + it * kThreads;
        *reinterpret_cast<uint4*>(Bs + (e / kVecsPerRow) * kMmaLDK + (e % kVecsPerRow) * 8) = rb[it];
      }
      __syncthreads();
      if (chunk + 1 < chunks) load_chunk((chunk + 1) * kMmaBK);
#pragma unroll
      for (int ks = 0; ks < kMmaBK; ks += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, mma_t, wmma::row_major> a[2];
#pragma unroll
        for (int fm = 0; fm < 2; ++fm) wmma::load_matrix_sync(a[fm], As + (wm * 32 + fm * 16) * kMmaLDK + ks, kMmaLDK);
#pragma unroll
        for (int fn = 0; fn < kFragsN; ++fn) {
          // Bs holds candidate rows, i.e. the (features x candidates) operand in column-major order.
          wmma::fragment<wmma::matrix_b, 16, 16, 16, mma_t, wmma::col_major> bfrag;
          wmma::load_matrix_sync(bfrag, Bs + (wn * (BN / kWarpsN) + fn * 16) * kMmaLDK + ks, kMmaLDK);
#pragma unroll
          for (int fm = 0; fm < 2; ++fm) wmma::mma_sync(acc[fm][fn], a[fm], bfrag, acc[fm][fn]);
        }
      }
    }
    // Past the first tiles most hold no candidate for any of the block's rows: then the score
    // tile's round trip through shared memory and the selection are skipped. (Its barrier also
    // orders every MMA's reads of the staging buffers before S overwrites them.)
    const bool own_rows = col0 < row0 + BM && row0 < col0 + BN;
    if (tile_cannot_enter<BM>(&acc[0][0], 2 * kFragsN, list_v, k, row0, n, red, warp, lane) && !own_rows) continue;
#pragma unroll
    for (int fm = 0; fm < 2; ++fm)
#pragma unroll
      for (int fn = 0; fn < kFragsN; ++fn)
        wmma::store_matrix_sync(S + (wm * 32 + fm * 16) * kMmaLDS + wn * (BN / kWarpsN) + fn * 16, acc[fm][fn],
                                kMmaLDS, wmma::mem_row_major);
    __syncthreads();
    select_tile<float, BM, BN>(S, kMmaLDS, list_v, list_i, k, row0, col0, n, warp, lane);
  }
  write_lists<BM>(list_i, out, k, row0, n, warp, lane);
#endif
}

// ---------------------------------------------------------------- fp32 / fp64: FMA tiles
constexpr int kFmaBM = 64;
constexpr int kFmaBK = 16;

template <typename acc_t>
constexpr int fma_tile_n() { return sizeof(acc_t) == 8 ? 64 : kTileN; }  // fp64 halves the tile to fit smem

template <typename acc_t>
constexpr int fma_lds() { return fma_tile_n<acc_t>() + 64 / int(sizeof(acc_t)); }  // pitch: conflict-free stores

template <typename acc_t>
constexpr size_t fma_smem_bytes(int k) {
  return size_t(kFmaBM) * fma_lds<acc_t>() * sizeof(acc_t) + size_t(kFmaBM) * k * (sizeof(acc_t) + sizeof(int));
}

// The BM x BN score tile of query rows row_of(0 .. BM-1) (-1: no row) against candidates col0 ..
// col0+BN-1 into S (pitch LDS), in acc_t by a register-blocked FMA GEMM. The staging buffers alias S:
// the tile starts and ends with a block barrier, so the caller's reads of the previous tile are done
// and this one's writes are visible.
template <typename scalar_t, typename acc_t, typename RowOf>
__device__ __forceinline__ void fma_score_tile(const scalar_t* __restrict__ x, RowOf row_of, int col0, int n, int d,
                                               acc_t* S) {
  constexpr int BM = kFmaBM, BK = kFmaBK, BN = fma_tile_n<acc_t>(), LDS = fma_lds<acc_t>();
  constexpr int LDA = BM + 1, LDB = BN + 1;  // transposed staging, padded against bank conflicts
  constexpr int TM = BM / 16, TN = BN / 16;  // outputs per thread: rows ty + 16*i, cols tx + 16*j
  static_assert(BK * (LDA + LDB) <= BM * LDS, "staging must fit in the score tile");
  acc_t* As = S;              // [BK][LDA]
  acc_t* Bs = As + BK * LDA;  // [BK][LDB]
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  acc_t acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = 0;

  for (int k0 = 0; k0 < d; k0 += BK) {
    __syncthreads();  // previous readers of this memory (FMAs, or selection on S) are done
    for (int e = threadIdx.x; e < BM * BK; e += kThreads) {
      const int r = row_of(e / BK), f = k0 + e % BK;
      As[(e % BK) * LDA + e / BK] = (r >= 0 && f < d) ? acc_t(x[static_cast<int64_t>(r) * d + f]) : acc_t(0);
    }
    for (int e = threadIdx.x; e < BN * BK; e += kThreads) {
      const int c = col0 + e / BK, f = k0 + e % BK;
      Bs[(e % BK) * LDB + e / BK] = (c < n && f < d) ? acc_t(x[static_cast<int64_t>(c) * d + f]) : acc_t(0);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      acc_t a[TM], b[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) a[i] = As[kk * LDA + ty + 16 * i];
#pragma unroll
      for (int j = 0; j < TN; ++j) b[j] = Bs[kk * LDB + tx + 16 * j];
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] += a[i] * b[j];
    }
  }
  __syncthreads();  // all FMAs have read the staging buffers before S overwrites them
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) S[(ty + 16 * i) * LDS + tx + 16 * j] = acc[i][j];
  __syncthreads();
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, 2) knn_fma_kernel(const scalar_t* __restrict__ x, int64_t* __restrict__ out,
                                                           int n, int d, int k) {
  constexpr int BM = kFmaBM, BN = fma_tile_n<acc_t>(), LDS = fma_lds<acc_t>();
  extern __shared__ __align__(128) unsigned char smem[];
  acc_t* S = reinterpret_cast<acc_t*>(smem);
  acc_t* list_v = reinterpret_cast<acc_t*>(smem + size_t(BM) * LDS * sizeof(acc_t));
  int* list_i = reinterpret_cast<int*>(list_v + BM * k);

  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int row0 = blockIdx.x * BM;
  x += static_cast<int64_t>(blockIdx.y) * n * d;
  out += static_cast<int64_t>(blockIdx.y) * n * k;
  init_lists(list_v, list_i, BM * k);
  auto row_of = [&](int r) { return row0 + r < n ? row0 + r : -1; };
  for (int col0 = 0; col0 < n; col0 += BN) {
    fma_score_tile<scalar_t, acc_t>(x, row_of, col0, n, d, S);
    select_tile<acc_t, BM, BN>(S, LDS, list_v, list_i, k, row0, col0, n, warp, lane);
  }
  write_lists<BM>(list_i, out, k, row0, n, warp, lane);
}

}  // namespace
}  // namespace cuda
}  // namespace nformer
