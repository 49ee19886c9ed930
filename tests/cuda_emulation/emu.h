// Minimal CPU emulation of the CUDA execution model used by csrc/cuda/*_kernels.cuh:
// one std::thread per CUDA thread, blocks run one after another, __syncthreads/__syncwarp are
// barriers, warp votes/shuffles go through per-warp slots between two barriers. A collective
// reached by only part of a warp deadlocks (the harness runs under a timeout), which is how a
// divergent collective shows up here.
#pragma once
#include <barrier>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

struct dim3 { unsigned x = 1, y = 1, z = 1; dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {} };
struct alignas(16) uint4 { unsigned x, y, z, w; };
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

namespace emu {
struct Warp { std::unique_ptr<std::barrier<>> bar; uint64_t slot[32]; };
inline std::unique_ptr<std::barrier<>> block_bar;
inline std::vector<Warp> warps;
inline int lane() { return threadIdx.x % 32; }
inline Warp& warp() { return warps[threadIdx.x / 32]; }

template <class F>
void launch(dim3 grid, dim3 block, F&& body) {
  assert(block.x % 32 == 0 && block.y == 1 && block.z == 1);
  gridDim = grid; blockDim = block;
  for (unsigned bz = 0; bz < grid.z; ++bz) for (unsigned by = 0; by < grid.y; ++by) for (unsigned bx = 0; bx < grid.x; ++bx) {
    block_bar = std::make_unique<std::barrier<>>(block.x);
    warps = std::vector<Warp>(block.x / 32);
    for (auto& w : warps) w.bar = std::make_unique<std::barrier<>>(32);
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < block.x; ++t)
      threads.emplace_back([&, t] { threadIdx = dim3(t, 0, 0); blockIdx = dim3(bx, by, bz); body(); });
    for (auto& th : threads) th.join();
  }
}
}  // namespace emu

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__
#define __align__(n)
#define __launch_bounds__(...)

inline void __syncthreads() { emu::block_bar->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::warp().bar->arrive_and_wait(); }
inline unsigned __ballot_sync(unsigned, bool pred) {
  auto& w = emu::warp();
  w.slot[emu::lane()] = pred;
  w.bar->arrive_and_wait();
  unsigned m = 0;
  for (int i = 0; i < 32; ++i) m |= unsigned(w.slot[i] != 0) << i;
  w.bar->arrive_and_wait();
  return m;
}
template <class T>
T shfl_from(T v, int src) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
  auto& w = emu::warp();
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  w.slot[emu::lane()] = bits;
  w.bar->arrive_and_wait();
  bits = w.slot[src & 31];
  w.bar->arrive_and_wait();
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}
template <class T> T __shfl_sync(unsigned, T v, int src) { return shfl_from(v, src); }
template <class T> T __shfl_xor_sync(unsigned, T v, int mask) { return shfl_from(v, emu::lane() ^ mask); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(unsigned x) { return __builtin_ffs(int(x)); }
[[noreturn]] inline void __trap() { std::abort(); }
