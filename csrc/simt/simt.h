// SIMT emulation: compiles CUDA kernel sources as C++ and runs them on the CPU.
//
// A launch runs the grid's blocks one after another. The threads of a block are host threads
// (std::thread), so ThreadSanitizer sees real concurrency: __syncthreads is a barrier over the
// block's threads, __shared__ is static storage (one copy, reused block after block), warp
// shuffles go through a per-warp exchange slot between two warp barriers, and atomics are
// std::atomic_ref. Launches are serialized by a global mutex because __shared__ storage is
// static. Kernels that run here avoid inline PTX; tensor-core paths need a portable twin.
//
// Included (forced, before the kernel source) by the generated simt_*.cpp wrappers; the kernel
// sources then see MP_SIMT defined and the CUDA names below.
#pragma once

#ifndef MP_SIMT
#define MP_SIMT 1
#endif

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

using cudaError_t = int;
using cudaStream_t = void*;
constexpr cudaError_t cudaSuccess = 0;
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "no error"; }

namespace mp_simt {

constexpr unsigned kWarpSize = 32;

// A block's (or a warp's) barrier. std::barrier's arrive_and_wait is a release/acquire pair
// on its counter, so ThreadSanitizer orders everything before it against everything after.
using Barrier = std::barrier<>;

struct Block {
  explicit Block(unsigned threads)
      : barrier(threads), warp_barriers(), exchange((threads + kWarpSize - 1) / kWarpSize * kWarpSize) {
    for (unsigned w = 0; w < (threads + kWarpSize - 1) / kWarpSize; ++w) {
      const unsigned in_warp = std::min(kWarpSize, threads - w * kWarpSize);
      warp_barriers.emplace_back(std::make_unique<Barrier>(in_warp));
    }
  }
  Barrier barrier;
  std::vector<std::unique_ptr<Barrier>> warp_barriers;
  std::vector<uint64_t> exchange;  // one slot per thread for warp shuffles
  std::vector<unsigned char> dynamic_shared;
};

struct ThreadState {
  dim3 thread_idx, block_idx, block_dim, grid_dim;
  unsigned linear_tid = 0;
  Block* block = nullptr;
};

inline ThreadState& state() {
  static thread_local ThreadState s;
  return s;
}

inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

inline void syncthreads() { state().block->barrier.arrive_and_wait(); }

template <class T>
T shuffle(T value, unsigned src_lane) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of values up to 8 bytes");
  ThreadState& s = state();
  const unsigned warp = s.linear_tid / kWarpSize, base = warp * kWarpSize;
  Barrier& warp_barrier = *s.block->warp_barriers[warp];
  uint64_t slot = 0;
  std::memcpy(&slot, &value, sizeof(T));
  s.block->exchange[s.linear_tid] = slot;
  warp_barrier.arrive_and_wait();
  T result;
  std::memcpy(&result, &s.block->exchange[base + src_lane], sizeof(T));
  warp_barrier.arrive_and_wait();  // nobody overwrites a slot before everyone has read it
  return result;
}

template <class... Params, class... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block_dim, size_t dynamic_shared_bytes, Args&&... args) {
  std::lock_guard<std::mutex> guard(launch_mutex());
  const unsigned threads = block_dim.x * block_dim.y * block_dim.z;
  Block block(threads);
  block.dynamic_shared.assign(dynamic_shared_bytes, 0);
  const std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  std::vector<std::thread> workers;
  workers.reserve(threads);
  for (unsigned tid = 0; tid < threads; ++tid) {
    workers.emplace_back([&, tid] {
      ThreadState& s = state();
      s.block = &block;
      s.linear_tid = tid;
      s.block_dim = block_dim;
      s.grid_dim = grid;
      s.thread_idx = dim3(tid % block_dim.x, tid / block_dim.x % block_dim.y, tid / (block_dim.x * block_dim.y));
      for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
          for (unsigned bx = 0; bx < grid.x; ++bx) {
            s.block_idx = dim3(bx, by, bz);
            std::apply(kernel, params);
            block.barrier.arrive_and_wait();  // the next block reuses the shared storage
          }
      s.block = nullptr;
    });
  }
  for (auto& w : workers) w.join();
}

}  // namespace mp_simt

#define threadIdx (::mp_simt::state().thread_idx)
#define blockIdx (::mp_simt::state().block_idx)
#define blockDim (::mp_simt::state().block_dim)
#define gridDim (::mp_simt::state().grid_dim)
#define warpSize (::mp_simt::kWarpSize)

inline void __syncthreads() { ::mp_simt::syncthreads(); }

// Lane arithmetic follows CUDA for width 32: out-of-range sources return the caller's value.
template <class T>
T __shfl_sync(unsigned, T value, int src_lane, int width = 32) {
  const unsigned lane = ::mp_simt::state().linear_tid % 32;
  const unsigned seg = lane / width * width;
  return ::mp_simt::shuffle(value, seg + unsigned(src_lane) % width);
}
template <class T>
T __shfl_down_sync(unsigned, T value, unsigned delta, int width = 32) {
  const unsigned lane = ::mp_simt::state().linear_tid % 32;
  const unsigned seg = lane / width * width;
  const unsigned src = lane + delta;
  return ::mp_simt::shuffle(value, src < seg + unsigned(width) ? src : lane);
}
template <class T>
T __shfl_xor_sync(unsigned, T value, int lane_mask, int width = 32) {
  const unsigned lane = ::mp_simt::state().linear_tid % 32;
  const unsigned seg = lane / width * width;
  const unsigned src = lane ^ unsigned(lane_mask);
  return ::mp_simt::shuffle(value, src < seg + unsigned(width) ? src : lane);
}

template <class T>
T atomicAdd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value);
}

inline float __fmul_rn(float a, float b) { return a * b; }

#define MP_EXTERN_SHARED(type, name) type* name = reinterpret_cast<type*>(::mp_simt::state().block->dynamic_shared.data())
#define MP_LAUNCH(kernel, grid, block, shared_bytes, stream, ...) \
  ::mp_simt::launch(kernel, grid, block, shared_bytes, __VA_ARGS__)
