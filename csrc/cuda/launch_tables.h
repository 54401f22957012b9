// The part of the CUDA binding that needs no CUDA: how one call's tensors are split into launches
// of at most kMaxTensors tensors, and how each launch's table is filled. ops_cuda.cpp uses it, and
// so does the CPU emulation of the kernels that the tests build (tests/cuda_emulation), so that the
// tables the kernels read there are the ones the binding builds.
#pragma once

#include <ATen/ATen.h>

#include "../common.h"

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "kernels.h"

namespace fastmask {
namespace cuda {

// The compact arrays of a masked step call (idx and the state, entries of all tensors one after
// another, tensor t's at [offsets[t], offsets[t + 1])).
struct StepArrays {
  const int32_t* idx;
  float* exp_avg;
  float* exp_avg_sq;
  float* max_exp_avg_sq;  // nullptr unless amsgrad
  const float* steps;     // one per tensor
};

// Fills `tab` and the per-launch fields of `sp` for tensors [first, first + count) of a call.
// Head peel: the compact arrays are addressed from the launch's first entry rounded down to a
// multiple of 4 entries, so that their 16-byte vector loads stay aligned in every launch (the
// 0-3 entries before it belong to the previous launch and are not touched: k_begin[0] = lead).
inline void fill_step_launch(at::TensorList params, at::TensorList grads, at::TensorList scores,
                             at::IntArrayRef offsets, int64_t first, int64_t count, const StepArrays& arrays,
                             StepTable& tab, StepParams& sp) {
  tab = StepTable{};
  tab.num_tensors = static_cast<int>(count);
  const int64_t lead = offsets[first] % 4;
  const int64_t k0 = offsets[first] - lead;
  tab.k_begin[0] = lead;
  tab.chunk_begin[0] = 0;
  for (int64_t u = 0; u < count; ++u) {
    const int64_t t = first + u;
    tab.param[u] = params[t].data_ptr();
    tab.grad[u] = grads[t].data_ptr();
    tab.score[u] = scores.empty() ? nullptr : scores[t].data_ptr<float>();
    tab.numel[u] = params[t].numel();
    tab.k_begin[u + 1] = offsets[t + 1] - k0;  // includes the lead
    tab.chunk_begin[u + 1] = tab.chunk_begin[u] + (tab.numel[u] + kScoreChunk - 1) / kScoreChunk;
  }
  sp.idx = arrays.idx + k0;
  sp.exp_avg = arrays.exp_avg + k0;
  sp.exp_avg_sq = arrays.exp_avg_sq + k0;
  sp.max_exp_avg_sq = arrays.max_exp_avg_sq ? arrays.max_exp_avg_sq + k0 : nullptr;
  sp.steps = arrays.steps + first;
  auto aligned = [](const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  sp.vec4 = aligned(sp.idx) && aligned(sp.exp_avg) && aligned(sp.exp_avg_sq) && aligned(sp.max_exp_avg_sq);
}

// Fills `tab` for tensors [first, first + count) of a score_accumulate_ call, checking each pair
// (scores on `device`, float32, contiguous, shaped like its gradient). A gradient of a dtype the
// kernel does not read is converted to float32 once; `keep` holds the copy until the launch is
// queued (stream-ordered: the caching allocator keeps it for the kernel).
inline void fill_score_launch(at::TensorList scores, at::TensorList grads, int64_t first, int64_t count,
                              const at::Device& device, std::vector<at::Tensor>& keep, ScoreTable& tab) {
  tab = ScoreTable{};
  tab.num_tensors = static_cast<int>(count);
  tab.chunk_begin[0] = 0;
  for (int64_t u = 0; u < count; ++u) {
    const int64_t t = first + u;
    const at::Tensor& s = scores[t];
    at::Tensor g = grads[t];
    TORCH_CHECK(s.device() == device && g.device() == device,
                "score_accumulate_: all tensors must be on one device (", device, ")");
    TORCH_CHECK(s.scalar_type() == at::kFloat && s.is_contiguous() && g.is_contiguous() && s.sizes() == g.sizes(),
                "score_accumulate_: scores[", t, "] must be contiguous float32 shaped like grads[", t, "]");
    TORCH_CHECK(s.numel() <= INT32_MAX * int64_t(4096), "score_accumulate_: tensor too large");
    int gt;
    switch (g.scalar_type()) {
      case at::kFloat: gt = 0; break;
      case at::kBFloat16: gt = 1; break;
      case at::kHalf: gt = 2; break;
      case at::kDouble: gt = 3; break;
      default:
        g = g.to(at::kFloat);
        keep.push_back(g);
        gt = 0;
    }
    tab.score[u] = s.data_ptr<float>();
    tab.grad[u] = g.data_ptr();
    tab.numel[u] = s.numel();
    tab.grad_type[u] = gt;
    tab.chunk_begin[u + 1] = tab.chunk_begin[u] + (s.numel() + kScoreChunk - 1) / kScoreChunk;
  }
}

// A masked step call as the CUDA binding runs it (arguments already checked by check_step_layout):
// the per-call StepParams (lr read here when it is on the CPU, which is free, else by the kernels
// from the device; grad_scale and found_inf as float32 on the params' device), then one launch per
// kMaxTensors tensors through `launch(tab, sp)`. Returns the int32 counter of skipped out-of-range
// entries, on the params' device, that the kernels add to (the caller asserts it is 0). Converted
// scalars are released after the launches are queued (stream-ordered frees: safe).
template <class Launch>
at::Tensor run_step_launches(at::TensorList params, at::TensorList grads, const at::Tensor& idx,
                             const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq, at::IntArrayRef offsets,
                             const at::Tensor& steps, const at::Tensor& lr, double beta1, double beta2, double eps,
                             double weight_decay, bool maximize, const std::optional<at::Tensor>& max_exp_avg_sq,
                             const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                             at::TensorList scores, ScoreMode mode, Launch&& launch) {
  const at::Device device = params[0].device();
  StepParams sp{};
  at::Tensor lr_dev, gs_dev, fi_dev;
  TORCH_CHECK(lr.numel() == 1, "lr: expected one element");
  if (lr.device().is_cpu()) {
    sp.lr_value = lr.item<double>();
  } else {
    TORCH_CHECK(lr.device() == device, "lr: expected the CPU or the params' device");
    lr_dev = (lr.scalar_type() == at::kDouble || lr.scalar_type() == at::kFloat) ? lr : lr.to(at::kDouble);
    sp.lr_ptr = lr_dev.data_ptr();
    sp.lr_is_double = lr_dev.scalar_type() == at::kDouble;
  }
  // grad_scale and found_inf live on the params' device (a CPU one would need a blocking copy).
  if (grad_scale.has_value()) {
    TORCH_CHECK(grad_scale->numel() == 1 && grad_scale->device() == device,
                "grad_scale: expected one element on ", device, ", got ", grad_scale->device());
    gs_dev = grad_scale->to(at::kFloat);
    sp.grad_scale = gs_dev.data_ptr<float>();
  }
  if (found_inf.has_value()) {
    TORCH_CHECK(found_inf->numel() == 1 && found_inf->device() == device,
                "found_inf: expected one element on ", device, ", got ", found_inf->device());
    fi_dev = found_inf->to(at::kFloat);
    sp.found_inf = fi_dev.data_ptr<float>();
  }
  const at::Tensor steps_f = steps.to(at::kFloat).contiguous();
  sp.beta1 = beta1;
  sp.beta2 = beta2;
  sp.weight_decay = weight_decay;
  sp.consts = make_consts(beta1, beta2, eps);
  sp.param_type = static_cast<int>(param_type_of(params[0].scalar_type()));
  sp.maximize = maximize;
  sp.with_scores = !scores.empty();
  sp.score_mode = static_cast<int>(mode);
  // Skipped out-of-range entries, all launches of this call (allocated on the stream, no sync).
  at::Tensor bad_count = at::zeros({1}, params[0].options().dtype(at::kInt));
  sp.bad_count = bad_count.data_ptr<int32_t>();
  const StepArrays arrays{idx.data_ptr<int32_t>(), exp_avg.data_ptr<float>(), exp_avg_sq.data_ptr<float>(),
                          max_exp_avg_sq.has_value() ? max_exp_avg_sq->data_ptr<float>() : nullptr,
                          steps_f.data_ptr<float>()};
  const int64_t n = static_cast<int64_t>(params.size());
  for (int64_t first = 0; first < n; first += kMaxTensors) {
    StepTable tab;
    fill_step_launch(params, grads, scores, offsets, first, std::min<int64_t>(kMaxTensors, n - first), arrays, tab, sp);
    launch(static_cast<const StepTable&>(tab), static_cast<const StepParams&>(sp));
  }
  return bad_count;
}

}  // namespace cuda
}  // namespace fastmask
