// CPU emulation of the nvcuda::wmma subset used by knn_kernels.cuh. Every lane holds the whole
// 16x16 tile (redundant but simple); stores are done by lane 0. Checks WMMA's alignment rules.
#pragma once
#include <cassert>
#include <cstdint>
#include <cstring>
#include <cmath>
#include "cuda_bf16.h"
#include "cuda_fp16.h"

namespace emu { int lane(); }

namespace nvcuda { namespace wmma {
struct matrix_a {}; struct matrix_b {}; struct accumulator {}; struct row_major {}; struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
// Every lane holds the whole tile in `v` (what mma/load/store use). `x[e]`, e < num_elements, is a
// lane's own share of it as on a GPU (8 of 256 values, lane-major here; a GPU's order is
// unspecified), so a kernel's reduction over a warp's elements sees each value once.
struct LaneShare {
  float* tile;
  float& operator[](int e) const { return tile[emu::lane() * 8 + e]; }
};
template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static constexpr int num_elements = 16 * 16 / 32;
  float v[16 * 16];
  LaneShare x{v};
  fragment() = default;
  fragment(const fragment& o) { std::memcpy(v, o.v, sizeof v); }
  fragment& operator=(const fragment& o) { std::memcpy(v, o.v, sizeof v); return *this; }
};

inline float to_float(__nv_bfloat16 h) { uint32_t b = uint32_t(h.bits) << 16; float f; std::memcpy(&f, &b, 4); return f; }
inline float to_float(__half h) {
  const uint32_t sign = (h.bits >> 15) & 1, exp = (h.bits >> 10) & 31, man = h.bits & 1023;
  float v;
  if (exp == 0) v = std::ldexp(float(man), -24);
  else if (exp == 31) v = man ? NAN : INFINITY;
  else v = std::ldexp(float(man | 1024), int(exp) - 25);
  return sign ? -v : v;
}
template <class F> inline void fill_fragment(F& f, float v) { for (float& e : f.v) e = v; }
template <class T>
inline void load_matrix_sync(fragment<matrix_a, 16, 16, 16, T, row_major>& f, const T* p, unsigned ldm) {
  assert(reinterpret_cast<uintptr_t>(p) % 32 == 0 && ldm % 8 == 0);
  for (int r = 0; r < 16; ++r) for (int c = 0; c < 16; ++c) f.v[r * 16 + c] = to_float(p[r * ldm + c]);
}
template <class T>
inline void load_matrix_sync(fragment<matrix_b, 16, 16, 16, T, col_major>& f, const T* p, unsigned ldm) {
  assert(reinterpret_cast<uintptr_t>(p) % 32 == 0 && ldm % 8 == 0);
  for (int kk = 0; kk < 16; ++kk) for (int n = 0; n < 16; ++n) f.v[kk * 16 + n] = to_float(p[n * ldm + kk]);
}
template <class A, class B, class C>
inline void mma_sync(C& d, const A& a, const B& b, const C& c) {
  float out[256];
  for (int m = 0; m < 16; ++m) for (int n = 0; n < 16; ++n) {
    float s = c.v[m * 16 + n];
    for (int kk = 0; kk < 16; ++kk) s += a.v[m * 16 + kk] * b.v[kk * 16 + n];
    out[m * 16 + n] = s;
  }
  std::memcpy(d.v, out, sizeof out);
}
template <class F>
inline void store_matrix_sync(float* p, const F& f, unsigned ldm, layout_t layout) {
  assert(reinterpret_cast<uintptr_t>(p) % 32 == 0 && ldm % 4 == 0 && layout == mem_row_major);
  if (emu::lane() != 0) return;
  for (int r = 0; r < 16; ++r) for (int c = 0; c < 16; ++c) p[r * ldm + c] = f.v[r * 16 + c];
}
}}  // namespace nvcuda::wmma
