// CPU kernels of fastmask (OpenMP). Plain pointers and sizes: no torch headers, so the same
// sources compile for several instruction sets (kernels_<isa>.cpp) and one is picked at run time.
#pragma once

#include <cstdint>

#include "../adamw_math.h"

namespace fastmask {
namespace cpu {

// Dtype of a gradient handed to score_accumulate_ (the step's gradients share the param dtype).
enum class GradType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kFloat64 = 3 };

// One tensor of a multi-tensor step: its storage, and its segment [k_begin, k_end) of the compact
// arrays (idx, exp_avg, exp_avg_sq, max_exp_avg_sq).
struct StepTensor {
  void* param;
  const void* grad;
  float* score;  // full-shape scores, or nullptr
  int64_t numel;
  int64_t k_begin;
  int64_t k_end;
  TensorScalars s;
};

// Entries of idx outside [0, numel) of their tensor, found by the last masked_adamw_step: such an
// entry is skipped (its p and g are never read, p never written, its exp_avg / exp_avg_sq /
// max_exp_avg_sq left as they were) and counted here; every other entry is stepped.
struct IndexErrors {
  int64_t count;         // all such entries
  int64_t tensors;       // tensors holding at least one
  int64_t first_tensor;  // the first of them (-1: none)
  int64_t first_count;   // how many it holds
  int64_t first_value;   // its first one (lowest compact position)
};

struct StepArgs {
  const StepTensor* tensors;
  int64_t num_tensors;
  const int32_t* idx;
  float* exp_avg;
  float* exp_avg_sq;
  float* max_exp_avg_sq;  // nullptr unless amsgrad
  ParamType param_type;
  AdamwConsts consts;
  bool maximize;
  bool has_grad_scale;
  float grad_scale;
  bool with_scores;
  ScoreMode score_mode;
  int num_threads;
  IndexErrors* errors;  // out: filled by masked_adamw_step (required)
};

struct ScoreTensor {
  float* score;
  const void* grad;
  int64_t numel;
  GradType grad_type;
};

// Run-time-selected implementations (best instruction set the CPU supports).
void masked_adamw_step(const StepArgs& args);
void score_accumulate(const ScoreTensor* tensors, int64_t num_tensors, ScoreMode mode, int num_threads);
// Name of the instruction-set variant that masked_adamw_step uses on this CPU.
const char* isa_name();

// One variant per instruction set (defined in kernels_<isa>.cpp).
#define FASTMASK_DECLARE_ISA(ns)                                                                   \
  namespace ns {                                                                                   \
  void masked_adamw_step(const StepArgs& args);                                                    \
  void score_accumulate(const ScoreTensor* tensors, int64_t num_tensors, ScoreMode mode, int nt);  \
  }
FASTMASK_DECLARE_ISA(isa_default)
#if defined(__x86_64__) && defined(__GNUC__)
FASTMASK_DECLARE_ISA(isa_avx2)
FASTMASK_DECLARE_ISA(isa_avx512)
#endif
#undef FASTMASK_DECLARE_ISA

}  // namespace cpu
}  // namespace fastmask
