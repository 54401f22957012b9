// CUDA kernels of fastmask (see kernels.h). The per-entry maths is csrc/adamw_math.h, shared with
// the CPU kernels. Compiled with -fmad=false so that only the explicit fmas of that header fuse.
//
// One launch = step blocks followed by score blocks:
//  * a step block covers kStepBlock * 4 consecutive compact entries; each thread handles 4
//    (int4 / float4 loads of idx and state when the arrays are 16-byte aligned), finds each
//    entry's tensor by binary search in the table's segment offsets, gathers p and g, steps, and
//    scatters p. Per-tensor scalars (bias corrections, decay) are computed once per block in
//    double, from steps and lr read on the device: no host sync.
//  * a score block covers kScoreChunk consecutive entries of one tensor's gradient (dense pass).
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
constexpr int64_t kScoreChunk = kScoreThreads * 16;

__device__ __forceinline__ int find_segment(const int64_t* begin, int n, int64_t j) {
  // largest t with begin[t] <= j (segments may be empty)
  int lo = 0, hi = n;  // begin[n] = total
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (begin[mid] <= j) lo = mid; else hi = mid;
  }
  return lo;
}

template <ParamType PT>
__device__ __forceinline__ float load_param(const void* base, int64_t i) {
  return ParamTraits<PT>::load(static_cast<const typename ParamTraits<PT>::storage*>(base)[i]);
}

template <ParamType PT>
__device__ __forceinline__ void store_param(void* base, int64_t i, float x) {
  static_cast<typename ParamTraits<PT>::storage*>(base)[i] = ParamTraits<PT>::store(x);
}

__device__ __forceinline__ float load_grad_any(const void* base, int64_t i, int type) {
  switch (type) {
    case 1: return bf16_to_f32(static_cast<const uint16_t*>(base)[i]);
    case 2: return f16_to_f32(static_cast<const uint16_t*>(base)[i]);
    case 3: return static_cast<float>(static_cast<const double*>(base)[i]);
    default: return static_cast<const float*>(base)[i];
  }
}

template <ScoreMode MODE>
__device__ __forceinline__ void score_chunk(float* score, const void* grad, int grad_type, int64_t lo, int64_t hi,
                                            bool has_scale, float scale) {
  for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) {
    float g = load_grad_any(grad, i, grad_type);
    if (has_scale) g = fm_div(g, scale);
    score[i] = score[i] + score_stat<MODE>(g);
  }
}

__device__ __forceinline__ void score_chunk_any(int mode, float* score, const void* grad, int grad_type, int64_t lo,
                                                int64_t hi, bool has_scale, float scale) {
  if (mode == static_cast<int>(ScoreMode::kAbs))
    score_chunk<ScoreMode::kAbs>(score, grad, grad_type, lo, hi, has_scale, scale);
  else if (mode == static_cast<int>(ScoreMode::kFisher))
    score_chunk<ScoreMode::kFisher>(score, grad, grad_type, lo, hi, has_scale, scale);
  else
    score_chunk<ScoreMode::kGrad>(score, grad, grad_type, lo, hi, has_scale, scale);
}

template <ParamType PT, bool AMSGRAD>
__device__ __forceinline__ void step_entry(const StepTable& tab, const StepParams& sp, const TensorScalars* sc,
                                           int64_t j, int32_t i, float& m, float& v, float& vm, bool has_scale,
                                           float scale, int& t) {
  while (tab.k_begin[t + 1] <= j) ++t;  // entries are visited in increasing j
  // numel <= INT32_MAX (checked by the binding): unsigned compare, a negative index is huge
  if (static_cast<uint64_t>(static_cast<uint32_t>(i)) >= static_cast<uint64_t>(tab.numel[t])) {
    atomicAdd(sp.bad_count, 1);
    return;  // m, v, vm unchanged: the caller stores back what it loaded
  }
  float p = load_param<PT>(tab.param[t], i);
  float g = load_param<PT>(tab.grad[t], i);
  if (has_scale) g = fm_div(g, scale);
  if (sp.maximize) g = -g;
  p = adamw_entry<AMSGRAD>(p, g, m, v, vm, sp.consts, sc[t]);
  store_param<PT>(tab.param[t], i, p);
}

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

  __shared__ TensorScalars sc[kMaxTensors];
  if (threadIdx.x < n) {
    double lr = sp.lr_value;
    if (sp.lr_ptr != nullptr)
      lr = sp.lr_is_double ? *static_cast<const double*>(sp.lr_ptr) : static_cast<double>(*static_cast<const float*>(sp.lr_ptr));
    sc[threadIdx.x] = make_tensor_scalars(lr, static_cast<double>(sp.steps[threadIdx.x]), sp.beta1, sp.beta2,
                                          sp.weight_decay);
  }
  __syncthreads();

  const int64_t k_total = tab.k_begin[n];
  const int64_t j0 = (static_cast<int64_t>(blockIdx.x) * kStepThreads + threadIdx.x) * kPerThread;
  if (j0 >= k_total) return;
  int t = find_segment(tab.k_begin, n, j0);
  float vm_dummy[kPerThread] = {0.f, 0.f, 0.f, 0.f};
  if (sp.vec4 && j0 + kPerThread <= k_total) {
    const int4 ix = *reinterpret_cast<const int4*>(sp.idx + j0);
    float4 m = *reinterpret_cast<const float4*>(sp.exp_avg + j0);
    float4 v = *reinterpret_cast<const float4*>(sp.exp_avg_sq + j0);
    float4 vm = AMSGRAD ? *reinterpret_cast<const float4*>(sp.max_exp_avg_sq + j0)
                        : make_float4(vm_dummy[0], vm_dummy[1], vm_dummy[2], vm_dummy[3]);
    step_entry<PT, AMSGRAD>(tab, sp, sc, j0 + 0, ix.x, m.x, v.x, vm.x, has_scale, scale, t);
    step_entry<PT, AMSGRAD>(tab, sp, sc, j0 + 1, ix.y, m.y, v.y, vm.y, has_scale, scale, t);
    step_entry<PT, AMSGRAD>(tab, sp, sc, j0 + 2, ix.z, m.z, v.z, vm.z, has_scale, scale, t);
    step_entry<PT, AMSGRAD>(tab, sp, sc, j0 + 3, ix.w, m.w, v.w, vm.w, has_scale, scale, t);
    *reinterpret_cast<float4*>(sp.exp_avg + j0) = m;
    *reinterpret_cast<float4*>(sp.exp_avg_sq + j0) = v;
    if (AMSGRAD) *reinterpret_cast<float4*>(sp.max_exp_avg_sq + j0) = vm;
  } else {
    for (int e = 0; e < kPerThread; ++e) {
      const int64_t j = j0 + e;
      if (j >= k_total) break;
      float m = sp.exp_avg[j], v = sp.exp_avg_sq[j];
      float vm = AMSGRAD ? sp.max_exp_avg_sq[j] : 0.0f;
      step_entry<PT, AMSGRAD>(tab, sp, sc, j, sp.idx[j], m, v, vm, has_scale, scale, t);
      sp.exp_avg[j] = m;
      sp.exp_avg_sq[j] = v;
      if (AMSGRAD) sp.max_exp_avg_sq[j] = vm;
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

template <ParamType PT>
cudaError_t launch_step(const StepTable& tab, const StepParams& sp, cudaStream_t stream) {
  const int64_t k_total = tab.k_begin[tab.num_tensors];
  const int64_t step_blocks = (k_total + kStepBlock - 1) / kStepBlock;
  const int64_t score_blocks = sp.with_scores ? tab.chunk_begin[tab.num_tensors] : 0;
  const int64_t blocks = step_blocks + score_blocks;
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7FFFFFFFLL) return cudaErrorInvalidConfiguration;
  if (sp.max_exp_avg_sq != nullptr)
    step_kernel<PT, true><<<static_cast<unsigned>(blocks), kStepThreads, 0, stream>>>(tab, sp, step_blocks);
  else
    step_kernel<PT, false><<<static_cast<unsigned>(blocks), kStepThreads, 0, stream>>>(tab, sp, step_blocks);
  return cudaGetLastError();
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
  if (blocks > 0x7FFFFFFFLL) return cudaErrorInvalidConfiguration;
  score_kernel<<<static_cast<unsigned>(blocks), kScoreThreads, 0, stream>>>(*table, score_mode);
  return cudaGetLastError();
}
