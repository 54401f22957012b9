// Shared by the CPU and CUDA bindings: schemas, dtype mapping and layout checks.
//
// What the C++ layer checks, on every call (fastmask/ops.py checks the same and more first, but
// torch.ops.fastmask_ext.* can be called directly, and its index check is cached per version of
// the index buffer, which a write through .data, a numpy view or another tensor on the same
// storage does not bump):
//  * here, metadata only: devices (every tensor on the params' device, index included, not just
//    the same device type), dtypes, contiguity, shapes of every tensor, the segment
//    offsets (0 .. idx.numel(), non-decreasing, no segment longer than its tensor), <= 2^31 - 1
//    entries per tensor; a violation raises before anything is written;
//  * in the kernels (CPU and CUDA), every index as it is used: one outside [0, numel) of its
//    tensor is skipped (nothing read or written at it, its optimizer state unchanged) and
//    counted; the other entries are stepped, then the op raises IndexError (CPU) or fails a
//    device-side assertion (CUDA, no host sync).
// So whatever idx holds, a call never reads or writes outside its tensors. Order and uniqueness
// of the indices are not checked here: unsorted or duplicate indices (which fastmask/ops.py
// rejects) give unspecified results within the tensors.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>

#include <optional>
#include <string>

#include "adamw_math.h"

// Identical argument lists to the public ops of fastmask/ops.py (tests/test_ext.py compares them).
#define FASTMASK_STEP_SCHEMA                                                                          \
  "masked_adamw_step_(Tensor(a!)[] params, Tensor[] grads, Tensor idx, Tensor(b!) exp_avg, "         \
  "Tensor(c!) exp_avg_sq, int[] offsets, Tensor steps, Tensor lr, float beta1, float beta2, "        \
  "float eps, float weight_decay, bool maximize, Tensor(d!)? max_exp_avg_sq, Tensor? grad_scale, "   \
  "Tensor? found_inf, Tensor(e!)[] scores, str score_mode) -> ()"
#define FASTMASK_SCORE_SCHEMA "score_accumulate_(Tensor(a!)[] scores, Tensor[] grads, str score_mode) -> ()"
#define FASTMASK_SAMPLED_SCHEMA "sampled_weight_grad(Tensor grad_out, Tensor input, Tensor idx) -> Tensor"

namespace fastmask {

inline ScoreMode parse_score_mode(c10::string_view mode) {
  if (mode == "grad") return ScoreMode::kGrad;
  if (mode == "abs") return ScoreMode::kAbs;
  if (mode == "fisher") return ScoreMode::kFisher;
  TORCH_CHECK(false, "score_mode: expected 'grad', 'abs' or 'fisher', got '", std::string(mode), "'");
}

inline ParamType param_type_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return ParamType::kFloat32;
    case at::kBFloat16: return ParamType::kBFloat16;
    case at::kHalf: return ParamType::kFloat16;
    default: TORCH_CHECK(false, "params: dtype ", t, " is not supported (float32, bfloat16, float16)");
  }
}

inline void check_state(const at::Tensor& t, const char* name, int64_t k, c10::Device device) {
  TORCH_CHECK(t.device() == device && t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == 1 &&
                  t.numel() == k,
              name, ": expected a contiguous float32 tensor of ", k, " entries on ", device);
}

inline void check_step_layout(at::TensorList params, at::TensorList grads, const at::Tensor& idx,
                              const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq, at::IntArrayRef offsets,
                              const at::Tensor& steps, const std::optional<at::Tensor>& max_exp_avg_sq,
                              at::TensorList scores, c10::DeviceType dev) {
  const int64_t n = static_cast<int64_t>(params.size());
  TORCH_CHECK(static_cast<int64_t>(grads.size()) == n, "grads: expected one gradient per param");
  TORCH_CHECK(static_cast<int64_t>(offsets.size()) == n + 1, "offsets: expected ", n + 1, " entries");
  TORCH_CHECK(scores.empty() || static_cast<int64_t>(scores.size()) == n, "scores: expected none or one per param");
  // Every tensor of the call on one device: the params' (a kernel launched on one GPU must not be
  // handed another GPU's pointers), or idx's when there are no params.
  const c10::Device device = n > 0 ? params[0].device() : idx.device();
  TORCH_CHECK(device.type() == dev, n > 0 ? "params" : "idx", ": expected tensors on ", dev, ", got ", device);
  TORCH_CHECK(idx.device() == device && idx.scalar_type() == at::kInt && idx.is_contiguous() && idx.dim() == 1,
              "idx: expected a contiguous int32 1-D tensor on ", device);
  const int64_t k = idx.numel();
  TORCH_CHECK(offsets[0] == 0 && offsets[n] == k, "offsets: must start at 0 and end at idx.numel()");
  check_state(exp_avg, "exp_avg", k, device);
  check_state(exp_avg_sq, "exp_avg_sq", k, device);
  if (max_exp_avg_sq.has_value()) check_state(*max_exp_avg_sq, "max_exp_avg_sq", k, device);
  TORCH_CHECK(steps.device() == device && steps.numel() == n && steps.scalar_type() == at::kFloat,
              "steps: expected ", n, " float32 step counts on ", device);
  for (int64_t t = 0; t < n; ++t) {
    const at::Tensor& p = params[t];
    const at::Tensor& g = grads[t];
    TORCH_CHECK(p.device() == device && p.is_contiguous() && p.scalar_type() == params[0].scalar_type(),
                "params[", t, "]: expected contiguous params of one dtype on ", device);
    TORCH_CHECK(g.device() == p.device() && g.is_contiguous() && g.scalar_type() == p.scalar_type() &&
                    g.sizes() == p.sizes(),
                "grads[", t, "]: expected a contiguous gradient like params[", t, "]");
    TORCH_CHECK(p.numel() <= INT32_MAX, "params[", t, "]: more than 2^31 - 1 entries cannot be indexed with int32");
    TORCH_CHECK(offsets[t] <= offsets[t + 1] && offsets[t + 1] - offsets[t] <= p.numel(),
                "offsets: segment ", t, " is invalid");
    if (!scores.empty()) {
      const at::Tensor& s = scores[t];
      TORCH_CHECK(s.device() == p.device() && s.is_contiguous() && s.scalar_type() == at::kFloat &&
                      s.sizes() == p.sizes(),
                  "scores[", t, "]: expected a contiguous float32 tensor shaped like params[", t, "]");
    }
  }
}

// The IndexError of a step whose idx held entries outside their tensor (kernels skipped them).
inline std::string index_error_message(int64_t count, int64_t tensor, int64_t numel, int64_t first_value,
                                       int64_t total, int64_t tensors) {
  std::string msg = "idx: " + std::to_string(count) + (count == 1 ? " index of tensor " : " indices of tensor ") +
                    std::to_string(tensor) + (count == 1 ? " is" : " are") + " outside [0, " +
                    std::to_string(numel) + ") (first: " + std::to_string(first_value) + ")";
  if (tensors > 1) msg += ", " + std::to_string(total) + " in " + std::to_string(tensors) + " tensors in all";
  msg +=
      "; nothing was read or written at them (their optimizer state is unchanged); the other selected entries "
      "were stepped. The index buffer was written after fastmask checked it without bumping its version "
      "(through .data, a numpy view or another tensor on the same storage), or the backend op was called "
      "directly: keep indices in range, sorted and unique, and write them in place only through torch ops.";
  return msg;
}

}  // namespace fastmask
