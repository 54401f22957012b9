// A stand-in for <cuda_runtime.h>, for tests only: with it (and FASTMASK_CUDA_EMULATE) the CUDA
// kernels of csrc/cuda/kernels.cu compile as host C++, and a launch runs its grid on CPU threads,
// one block after another, each block as blockDim.x threads that meet at __syncthreads(). This
// checks the kernels' logic (tables, head peel, vector and scalar paths, index checks, score
// chunks) on a machine without a GPU. It is not the GPU: the maths is adamw_math.h's host branch
// (torch's CPU rounding of addcmul, std::fma), so results are compared with the CPU reference, and
// memory-model, occupancy or compiler questions stay for a GPU (scripts/gpu_check.sh).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
#define __shared__ static  // blocks run one at a time: a static is that block's shared memory

typedef int cudaError_t;
typedef void* cudaStream_t;
enum : int { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
#define CUDART_VERSION 13000

struct dim3 {
  unsigned x = 0, y = 0, z = 0;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) int4 {
  int x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(16) double2 {
  double x, y;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

template <class T>
inline T min(T a, T b) { return b < a ? b : a; }
template <class T>
inline T max(T a, T b) { return a < b ? b : a; }

inline int atomicAdd(int* address, int value) { return __atomic_fetch_add(address, value, __ATOMIC_RELAXED); }

namespace fastmask_emulate {

// A block's barrier; a thread that returns early drops out of it, as an exited CUDA thread does.
class Barrier {
 public:
  explicit Barrier(int n) : expected_(n) {}
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mu_);
    const uint64_t phase = phase_;
    if (++arrived_ == expected_) {
      next_phase();
    } else {
      cv_.wait(lock, [&] { return phase_ != phase; });
    }
  }
  void arrive_and_drop() {
    std::lock_guard<std::mutex> lock(mu_);
    if (--expected_ > 0 && arrived_ == expected_) next_phase();
  }

 private:
  void next_phase() {
    arrived_ = 0;
    ++phase_;
    cv_.notify_all();
  }
  std::mutex mu_;
  std::condition_variable cv_;
  int expected_, arrived_ = 0;
  uint64_t phase_ = 0;
};

inline thread_local Barrier* current_barrier = nullptr;

}  // namespace fastmask_emulate

inline thread_local dim3 threadIdx, blockIdx, blockDim;

inline void __syncthreads() { fastmask_emulate::current_barrier->arrive_and_wait(); }

namespace fastmask_emulate {

template <class Body>
cudaError_t launch(int64_t blocks, int threads, const Body& body) {
  for (int64_t b = 0; b < blocks; ++b) {
    Barrier barrier(threads);
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        threadIdx.x = static_cast<unsigned>(t);
        blockIdx.x = static_cast<unsigned>(b);
        blockDim.x = static_cast<unsigned>(threads);
        current_barrier = &barrier;
        body();
        barrier.arrive_and_drop();
      });
    }
    for (auto& th : pool) th.join();
  }
  return cudaSuccess;
}

}  // namespace fastmask_emulate
