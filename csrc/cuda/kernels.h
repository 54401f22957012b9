// CUDA kernels of fastmask: plain pointers and sizes, no torch headers (ops_cuda.cpp binds them).
// Multi-tensor apply: a table of up to kMaxTensors tensors is passed by value (a kernel argument:
// nothing to copy or keep alive, safe on any stream and under CUDA graph capture), so one launch
// serves them all; the binding splits longer lists into several launches.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "../adamw_math.h"

namespace fastmask {
namespace cuda {

// CUDA 12.1 raised the kernel argument limit from 4 KiB to 32 KiB (Volta and newer; fastmask
// builds for sm_80 and up): 128 tensors per launch (6 KiB of table), e.g. a 64-layer model's
// gate_proj and up_proj in one launch; 40 (under 4 KiB) with an older toolkit.
#if defined(CUDART_VERSION) && CUDART_VERSION >= 12010
constexpr int kMaxTensors = 128;
constexpr int kMaxKernelArgBytes = 32764;
#else
constexpr int kMaxTensors = 40;
constexpr int kMaxKernelArgBytes = 4096;
#endif

// Entries of one tensor's gradient per score block (dense passes): 256 threads x 16.
constexpr int64_t kScoreChunk = 4096;

struct StepTable {
  void* param[kMaxTensors];
  const void* grad[kMaxTensors];
  float* score[kMaxTensors];
  int64_t numel[kMaxTensors];
  // Segment offsets into idx / state (relative to StepParams::idx). k_begin[0] is the launch's
  // head peel (0-3 entries that belong to no tensor: the compact arrays' pointers are rounded down
  // to a multiple of 4 entries, so their vector loads stay aligned in every launch).
  int64_t k_begin[kMaxTensors + 1];
  int64_t chunk_begin[kMaxTensors + 1];  // first dense score chunk of each tensor
  int num_tensors;
};

struct StepParams {
  const int32_t* idx;   // compact arrays, already offset to this launch's first tensor
  float* exp_avg;
  float* exp_avg_sq;
  float* max_exp_avg_sq;  // nullptr unless amsgrad
  const float* steps;     // one per tensor of this launch (device)
  const void* lr_ptr;     // device lr (float or double), or nullptr: use lr_value
  int lr_is_double;
  double lr_value;
  double beta1, beta2, weight_decay;
  AdamwConsts consts;
  const float* grad_scale;  // device, or nullptr
  const float* found_inf;   // device, or nullptr
  int param_type;           // ParamType
  int maximize;
  int with_scores;
  int score_mode;           // ScoreMode
  int vec4;                 // compact arrays 16-byte aligned
  int* bad_count;           // device counter of skipped out-of-range entries (required)
};

struct ScoreTable {
  float* score[kMaxTensors];
  const void* grad[kMaxTensors];
  int64_t numel[kMaxTensors];
  int64_t chunk_begin[kMaxTensors + 1];
  int grad_type[kMaxTensors];  // 0 f32, 1 bf16, 2 f16, 3 f64
  int num_tensors;
};

}  // namespace cuda
}  // namespace fastmask

extern "C" {
// One masked AdamW step (and fused scores) over the tensors of `table`. Never syncs the host.
cudaError_t fastmask_cuda_masked_adamw_step(const fastmask::cuda::StepTable* table,
                                            const fastmask::cuda::StepParams* params, cudaStream_t stream);
// scores[t] += stat(grads[t]) for every tensor of `table`.
cudaError_t fastmask_cuda_score_accumulate(const fastmask::cuda::ScoreTable* table, int score_mode,
                                           cudaStream_t stream);
}
