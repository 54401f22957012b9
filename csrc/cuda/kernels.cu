// CUDA kernels of fastmask (see kernels.h). The per-entry maths is csrc/adamw_math.h, shared with
// the CPU kernels. Compiled with -fmad=false so that only the explicit fmas of that header fuse.
//
// One launch = step blocks followed by score blocks:
//  * a step block covers kStepBlock = kStepThreads * 4 consecutive compact entries; each thread
//    handles 4 (int4 / float4 loads of idx and state when the arrays are 16-byte aligned, which the
//    binding's head peel keeps true in every launch), finds each entry's tensor by binary search in
//    the table's segment offsets, and issues all its gathers of p and g before anything waits on
//    them. Per-tensor scalars (bias corrections, decay) are computed in double, from steps and lr
//    read on the device (no host sync), only for the tensors the block touches, while the gathers
//    are in flight; then the block steps its entries and scatters p.
//  * a score block covers kScoreChunk consecutive entries of one tensor's gradient (dense pass;
//    vector loads, all of a thread's loads in flight before its stores, for full aligned chunks).
// found_inf (GradScaler) is read by every block: if non-zero, the block returns at once.
// Index safety: an entry whose index is outside [0, numel) of its tensor (one unsigned compare) is
// skipped (nothing read or written at it, its state left as it was) and counted in
// sp.bad_count (atomicAdd, only on that path); the binding asserts the counter is 0 on the device.
#include <cuda_runtime.h>

#include "kernels.h"

namespace fastmask {
namespace cuda {
namespace {

constexpr int kStepThreads = 256;
constexpr int kPerThread = 4;
constexpr int kStepBlock = kStepThreads * kPerThread;
constexpr int kScoreThreads = 256;
static_assert(kScoreChunk == kScoreThreads * 16, "kernels.h's kScoreChunk: 16 entries per score thread");

__device__ __forceinline__ int find_segment(const int64_t* begin, int n, int64_t j) {
  // largest t with begin[t] <= j (segments may be empty)
  int lo = 0, hi = n;  // begin[n] = total
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (begin[mid] <= j) lo = mid; else hi = mid;
  }
  return lo;
}

// Four consecutive gradient entries as fp32, loaded with one vector load (16 bytes for fp32, 8 for
// bf16/fp16, two 16-byte loads for fp64). kAlign: the byte alignment the vector load needs.
template <int GT> struct GradVec;
template <> struct GradVec<0> {
  static constexpr uintptr_t kAlign = 16;
  static __device__ __forceinline__ void load(const void* __restrict__ base, int64_t i, float (&g)[4]) {
    const float4 x = *reinterpret_cast<const float4*>(static_cast<const float*>(base) + i);
    g[0] = x.x; g[1] = x.y; g[2] = x.z; g[3] = x.w;
  }
};
template <bool BF16> struct GradVec16 {  // bf16 or fp16: four 16-bit entries in one 8-byte load
  static constexpr uintptr_t kAlign = 8;
  static __device__ __forceinline__ float widen(uint32_t h) {
    return BF16 ? bf16_to_f32(static_cast<uint16_t>(h)) : f16_to_f32(static_cast<uint16_t>(h));
  }
  static __device__ __forceinline__ void load(const void* __restrict__ base, int64_t i, float (&g)[4]) {
    const uint2 x = *reinterpret_cast<const uint2*>(static_cast<const uint16_t*>(base) + i);
    g[0] = widen(x.x & 0xFFFFu); g[1] = widen(x.x >> 16);
    g[2] = widen(x.y & 0xFFFFu); g[3] = widen(x.y >> 16);
  }
};
template <> struct GradVec<1> : GradVec16<true> {};
template <> struct GradVec<2> : GradVec16<false> {};
template <> struct GradVec<3> {
  static constexpr uintptr_t kAlign = 16;
  static __device__ __forceinline__ void load(const void* __restrict__ base, int64_t i, float (&g)[4]) {
    const double2* p = reinterpret_cast<const double2*>(static_cast<const double*>(base) + i);
    const double2 a = p[0], b = p[1];
    g[0] = static_cast<float>(a.x); g[1] = static_cast<float>(a.y);
    g[2] = static_cast<float>(b.x); g[3] = static_cast<float>(b.y);
  }
};

template <int GT>
__device__ __forceinline__ float load_grad(const void* __restrict__ base, int64_t i) {
  if (GT == 1) return bf16_to_f32(static_cast<const uint16_t*>(base)[i]);
  if (GT == 2) return f16_to_f32(static_cast<const uint16_t*>(base)[i]);
  if (GT == 3) return static_cast<float>(static_cast<const double*>(base)[i]);
  return static_cast<const float*>(base)[i];
}

// score[i] += stat(g[i] / scale) for i in [lo, hi) of one tensor (lo a multiple of kScoreChunk, so
// 16-byte aligned whenever the tensors' bases are). A full chunk with aligned bases: each thread
// loads its four groups of 4 entries (scores and gradients, all eight vector loads in flight)
// before it adds and stores. Otherwise (the tensor's last chunk, or a misaligned view) one entry
// per thread and iteration. Same arithmetic either way.
template <ScoreMode MODE, int GT>
__device__ __forceinline__ void score_chunk(float* __restrict__ score, const void* __restrict__ grad, int64_t lo,
                                            int64_t hi, bool has_scale, float scale) {
  constexpr int kGroups = static_cast<int>(kScoreChunk / (kScoreThreads * 4));
  const bool aligned = (reinterpret_cast<uintptr_t>(score) % 16 == 0) &&
                       (reinterpret_cast<uintptr_t>(grad) % GradVec<GT>::kAlign == 0);
  if (aligned && hi - lo == kScoreChunk && blockDim.x == kScoreThreads) {
    float s[kGroups][4], g[kGroups][4];
#pragma unroll
    for (int u = 0; u < kGroups; ++u) {
      const int64_t i = lo + (static_cast<int64_t>(u) * kScoreThreads + threadIdx.x) * 4;
      const float4 x = *reinterpret_cast<const float4*>(score + i);
      s[u][0] = x.x; s[u][1] = x.y; s[u][2] = x.z; s[u][3] = x.w;
      GradVec<GT>::load(grad, i, g[u]);
    }
#pragma unroll
    for (int u = 0; u < kGroups; ++u) {
      const int64_t i = lo + (static_cast<int64_t>(u) * kScoreThreads + threadIdx.x) * 4;
      float r[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float ge = g[u][e];
        if (has_scale) ge = fm_div(ge, scale);
        r[e] = s[u][e] + score_stat<MODE>(ge);
      }
      *reinterpret_cast<float4*>(score + i) = make_float4(r[0], r[1], r[2], r[3]);
    }
    return;
  }
  for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) {
    float g = load_grad<GT>(grad, i);
    if (has_scale) g = fm_div(g, scale);
    score[i] = score[i] + score_stat<MODE>(g);
  }
}

template <ScoreMode MODE>
__device__ __forceinline__ void score_chunk_mode(float* score, const void* grad, int grad_type, int64_t lo, int64_t hi,
                                                 bool has_scale, float scale) {
  switch (grad_type) {
    case 1: score_chunk<MODE, 1>(score, grad, lo, hi, has_scale, scale); break;
    case 2: score_chunk<MODE, 2>(score, grad, lo, hi, has_scale, scale); break;
    case 3: score_chunk<MODE, 3>(score, grad, lo, hi, has_scale, scale); break;
    default: score_chunk<MODE, 0>(score, grad, lo, hi, has_scale, scale);
  }
}

__device__ __forceinline__ void score_chunk_any(int mode, float* score, const void* grad, int grad_type, int64_t lo,
                                                int64_t hi, bool has_scale, float scale) {
  if (mode == static_cast<int>(ScoreMode::kAbs))
    score_chunk_mode<ScoreMode::kAbs>(score, grad, grad_type, lo, hi, has_scale, scale);
  else if (mode == static_cast<int>(ScoreMode::kFisher))
    score_chunk_mode<ScoreMode::kFisher>(score, grad, grad_type, lo, hi, has_scale, scale);
  else
    score_chunk_mode<ScoreMode::kGrad>(score, grad, grad_type, lo, hi, has_scale, scale);
}

// A step block: kStepThreads threads x kPerThread consecutive compact entries. In three phases, so
// that no load waits on another load or on arithmetic:
//  1. every thread loads its entries' indices and state (one int4 and two or three float4 loads when
//     aligned), finds each entry's tensor (entries are sorted by tensor), and issues the gathers of
//     all four p and g at once (8 independent loads);
//  2. while those are in flight, the threads of the tensors this block touches compute their
//     per-tensor scalars (double pow, from steps and lr on the device), and the block syncs;
//  3. every thread steps its entries and stores p, then the state.
// Entries [0, k_begin[0]) of a launch belong to no tensor (a head peel, so that the compact arrays'
// vector loads stay 16-byte aligned in every launch of a long tensor list).
template <ParamType PT, bool AMSGRAD>
__global__ void __launch_bounds__(kStepThreads) step_kernel(const __grid_constant__ StepTable tab,
                                                            const __grid_constant__ StepParams sp,
                                                            int64_t step_blocks) {
  if (sp.found_inf != nullptr && *sp.found_inf != 0.0f) return;
  const bool has_scale = sp.grad_scale != nullptr;
  const float scale = has_scale ? *sp.grad_scale : 1.0f;
  const int n = tab.num_tensors;

  if (static_cast<int64_t>(blockIdx.x) >= step_blocks) {
    if (!sp.with_scores) return;
    const int64_t c = static_cast<int64_t>(blockIdx.x) - step_blocks;
    const int t = find_segment(tab.chunk_begin, n, c);
    const int64_t lo = (c - tab.chunk_begin[t]) * kScoreChunk;
    const int64_t hi = min(lo + kScoreChunk, tab.numel[t]);
    score_chunk_any(sp.score_mode, tab.score[t], tab.grad[t], static_cast<int>(PT), lo, hi, has_scale, scale);
    return;
  }

  using Storage = typename ParamTraits<PT>::storage;
  const int64_t k_lo = tab.k_begin[0], k_total = tab.k_begin[n];
  const int64_t block_lo = static_cast<int64_t>(blockIdx.x) * kStepBlock;
  const int64_t j0 = block_lo + static_cast<int64_t>(threadIdx.x) * kPerThread;

  // 1. loads
  int32_t ix[kPerThread];
  float m[kPerThread], v[kPerThread], vm[kPerThread], p[kPerThread], g[kPerThread];
  int te[kPerThread];
  bool live[kPerThread], ok[kPerThread];
  const bool vec = sp.vec4 && j0 >= k_lo && j0 + kPerThread <= k_total;
  if (vec) {
    const int4 xi = *reinterpret_cast<const int4*>(sp.idx + j0);
    const float4 xm = *reinterpret_cast<const float4*>(sp.exp_avg + j0);
    const float4 xv = *reinterpret_cast<const float4*>(sp.exp_avg_sq + j0);
    ix[0] = xi.x; ix[1] = xi.y; ix[2] = xi.z; ix[3] = xi.w;
    m[0] = xm.x; m[1] = xm.y; m[2] = xm.z; m[3] = xm.w;
    v[0] = xv.x; v[1] = xv.y; v[2] = xv.z; v[3] = xv.w;
    if (AMSGRAD) {
      const float4 xvm = *reinterpret_cast<const float4*>(sp.max_exp_avg_sq + j0);
      vm[0] = xvm.x; vm[1] = xvm.y; vm[2] = xvm.z; vm[3] = xvm.w;
    }
#pragma unroll
    for (int e = 0; e < kPerThread; ++e) live[e] = true;
  } else {
#pragma unroll
    for (int e = 0; e < kPerThread; ++e) {
      const int64_t j = j0 + e;
      live[e] = j >= k_lo && j < k_total;
      ix[e] = live[e] ? sp.idx[j] : 0;
      m[e] = live[e] ? sp.exp_avg[j] : 0.0f;
      v[e] = live[e] ? sp.exp_avg_sq[j] : 0.0f;
      if (AMSGRAD) vm[e] = live[e] ? sp.max_exp_avg_sq[j] : 0.0f;
    }
  }
  if (!AMSGRAD) {
#pragma unroll
    for (int e = 0; e < kPerThread; ++e) vm[e] = 0.0f;
  }
  int t = find_segment(tab.k_begin, n, max(min(j0, k_total - 1), k_lo));
  int bad = 0;
#pragma unroll
  for (int e = 0; e < kPerThread; ++e) {
    const int64_t j = j0 + e;
    while (t + 1 < n && tab.k_begin[t + 1] <= j) ++t;  // entries are sorted by tensor
    te[e] = t;
    // numel <= INT32_MAX (checked by the host): one unsigned compare, a negative index is huge
    ok[e] = live[e] && static_cast<uint64_t>(static_cast<uint32_t>(ix[e])) < static_cast<uint64_t>(tab.numel[t]);
    bad += (live[e] && !ok[e]) ? 1 : 0;
  }
#pragma unroll
  for (int e = 0; e < kPerThread; ++e) {
    p[e] = ok[e] ? ParamTraits<PT>::load(static_cast<const Storage*>(tab.param[te[e]])[ix[e]]) : 0.0f;
    g[e] = ok[e] ? ParamTraits<PT>::load(static_cast<const Storage*>(tab.grad[te[e]])[ix[e]]) : 0.0f;
  }
  if (bad) atomicAdd(sp.bad_count, bad);  // skipped: nothing read or written at them

  // 2. per-tensor scalars, for the tensors whose segments meet this block's entries
  __shared__ TensorScalars sc[kMaxTensors];
  const int64_t block_hi = block_lo + kStepBlock;
  for (int u = threadIdx.x; u < n; u += blockDim.x) {
    if (tab.k_begin[u] < block_hi && tab.k_begin[u + 1] > block_lo && tab.k_begin[u + 1] > tab.k_begin[u]) {
      double lr = sp.lr_value;
      if (sp.lr_ptr != nullptr)
        lr = sp.lr_is_double ? *static_cast<const double*>(sp.lr_ptr)
                             : static_cast<double>(*static_cast<const float*>(sp.lr_ptr));
      sc[u] = make_tensor_scalars(lr, static_cast<double>(sp.steps[u]), sp.beta1, sp.beta2, sp.weight_decay);
    }
  }
  __syncthreads();

  // 3. step, scatter p, store the state (unchanged for skipped entries)
#pragma unroll
  for (int e = 0; e < kPerThread; ++e) {
    if (!ok[e]) continue;
    float ge = g[e];
    if (has_scale) ge = fm_div(ge, scale);
    if (sp.maximize) ge = -ge;
    const float pe = adamw_entry<AMSGRAD>(p[e], ge, m[e], v[e], vm[e], sp.consts, sc[te[e]]);
    static_cast<Storage*>(tab.param[te[e]])[ix[e]] = ParamTraits<PT>::store(pe);
  }
  if (vec) {
    *reinterpret_cast<float4*>(sp.exp_avg + j0) = make_float4(m[0], m[1], m[2], m[3]);
    *reinterpret_cast<float4*>(sp.exp_avg_sq + j0) = make_float4(v[0], v[1], v[2], v[3]);
    if (AMSGRAD) *reinterpret_cast<float4*>(sp.max_exp_avg_sq + j0) = make_float4(vm[0], vm[1], vm[2], vm[3]);
  } else {
#pragma unroll
    for (int e = 0; e < kPerThread; ++e) {
      if (!live[e]) continue;
      const int64_t j = j0 + e;
      sp.exp_avg[j] = m[e];
      sp.exp_avg_sq[j] = v[e];
      if (AMSGRAD) sp.max_exp_avg_sq[j] = vm[e];
    }
  }
}

__global__ void __launch_bounds__(kScoreThreads) score_kernel(const __grid_constant__ ScoreTable tab, int mode) {
  const int64_t c = blockIdx.x;
  const int t = find_segment(tab.chunk_begin, tab.num_tensors, c);
  const int64_t lo = (c - tab.chunk_begin[t]) * kScoreChunk;
  const int64_t hi = min(lo + kScoreChunk, tab.numel[t]);
  score_chunk_any(mode, tab.score[t], tab.grad[t], tab.grad_type[t], lo, hi, false, 1.0f);
}

static_assert(sizeof(StepTable) + sizeof(StepParams) + sizeof(int64_t) <= kMaxKernelArgBytes,
              "the step kernel's arguments exceed the kernel parameter limit: lower kMaxTensors");
static_assert(sizeof(ScoreTable) + sizeof(int) <= kMaxKernelArgBytes,
              "the score kernel's arguments exceed the kernel parameter limit: lower kMaxTensors");

// Launches `kernel` on `blocks` blocks of `threads` threads. FASTMASK_CUDA_EMULATE (tests only:
// tests/cuda_emulation compiles this file as host C++) runs the grid on CPU threads instead.
template <class... Params, class... Args>
cudaError_t launch(void (*kernel)(Params...), int64_t blocks, int threads, cudaStream_t stream, const Args&... args) {
  if (blocks > 0x7FFFFFFFLL) return cudaErrorInvalidConfiguration;
#if defined(FASTMASK_CUDA_EMULATE)
  (void)stream;
  return fastmask_emulate::launch(blocks, threads, [&] { kernel(args...); });
#else
  kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(args...);
  return cudaGetLastError();
#endif
}

template <ParamType PT>
cudaError_t launch_step(const StepTable& tab, const StepParams& sp, cudaStream_t stream) {
  const int64_t k_total = tab.k_begin[tab.num_tensors];
  const int64_t step_blocks = k_total > tab.k_begin[0] ? (k_total + kStepBlock - 1) / kStepBlock : 0;
  const int64_t score_blocks = sp.with_scores ? tab.chunk_begin[tab.num_tensors] : 0;
  const int64_t blocks = step_blocks + score_blocks;
  if (blocks == 0) return cudaSuccess;
  if (sp.max_exp_avg_sq != nullptr) return launch(step_kernel<PT, true>, blocks, kStepThreads, stream, tab, sp, step_blocks);
  return launch(step_kernel<PT, false>, blocks, kStepThreads, stream, tab, sp, step_blocks);
}

}  // namespace
}  // namespace cuda
}  // namespace fastmask

extern "C" cudaError_t fastmask_cuda_masked_adamw_step(const fastmask::cuda::StepTable* table,
                                                       const fastmask::cuda::StepParams* params,
                                                       cudaStream_t stream) {
  using namespace fastmask;
  using namespace fastmask::cuda;
  for (int t = 0; t < table->num_tensors; ++t)
    if (table->numel[t] > 0x7FFFFFFFLL) return cudaErrorInvalidValue;  // int32 flat indices
  switch (static_cast<ParamType>(params->param_type)) {
    case ParamType::kFloat32: return launch_step<ParamType::kFloat32>(*table, *params, stream);
    case ParamType::kBFloat16: return launch_step<ParamType::kBFloat16>(*table, *params, stream);
    case ParamType::kFloat16: return launch_step<ParamType::kFloat16>(*table, *params, stream);
  }
  return cudaErrorInvalidValue;
}

extern "C" cudaError_t fastmask_cuda_score_accumulate(const fastmask::cuda::ScoreTable* table, int score_mode,
                                                      cudaStream_t stream) {
  using namespace fastmask::cuda;
  const int64_t blocks = table->chunk_begin[table->num_tensors];
  if (blocks == 0) return cudaSuccess;
  return launch(score_kernel, blocks, kScoreThreads, stream, *table, score_mode);
}
