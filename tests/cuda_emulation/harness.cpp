// The CUDA binding's launch path with the kernels of csrc/cuda/kernels.cu compiled as host C++ and
// run on CPU threads (cuda_runtime.h here). tests/test_cuda_emulated.py builds it and compares it
// with the reference backend. Tensors are CPU tensors; the binding's tables and StepParams come
// from csrc/cuda/launch_tables.h, as in ops_cuda.cpp.
#define FASTMASK_CUDA_EMULATE 1
#include <torch/extension.h>

#include <optional>
#include <string>
#include <vector>

#include "../../csrc/common.h"
#include "../../csrc/cuda/launch_tables.h"
#include "../../csrc/cuda/sampled_grad.h"
#include "../../csrc/cuda/kernels.cu"

namespace {

// masked_adamw_step_ as ops_cuda.cpp runs it; returns the count of skipped out-of-range entries.
int64_t masked_adamw_step(std::vector<at::Tensor> params, std::vector<at::Tensor> grads, at::Tensor idx,
                          at::Tensor exp_avg, at::Tensor exp_avg_sq, std::vector<int64_t> offsets, at::Tensor steps,
                          at::Tensor lr, double beta1, double beta2, double eps, double weight_decay, bool maximize,
                          std::optional<at::Tensor> max_exp_avg_sq, std::optional<at::Tensor> grad_scale,
                          std::optional<at::Tensor> found_inf, std::vector<at::Tensor> scores, std::string score_mode) {
  fastmask::check_step_layout(params, grads, idx, exp_avg, exp_avg_sq, offsets, steps, max_exp_avg_sq, scores,
                              at::kCPU);
  const fastmask::ScoreMode mode = fastmask::parse_score_mode(score_mode);
  if (params.empty()) return 0;
  int launches = 0;
  const at::Tensor bad = fastmask::cuda::run_step_launches(
      params, grads, idx, exp_avg, exp_avg_sq, offsets, steps, lr, beta1, beta2, eps, weight_decay, maximize,
      max_exp_avg_sq, grad_scale, found_inf, scores, mode,
      [&](const fastmask::cuda::StepTable& tab, const fastmask::cuda::StepParams& sp) {
        ++launches;
        TORCH_CHECK(fastmask_cuda_masked_adamw_step(&tab, &sp, nullptr) == cudaSuccess, "launch failed");
      });
  return bad.item<int32_t>();
}

void score_accumulate(std::vector<at::Tensor> scores, std::vector<at::Tensor> grads, std::string score_mode) {
  const fastmask::ScoreMode mode = fastmask::parse_score_mode(score_mode);
  TORCH_CHECK(scores.size() == grads.size(), "scores: expected one score tensor per gradient");
  std::vector<at::Tensor> keep;
  const int64_t n = static_cast<int64_t>(scores.size());
  for (int64_t first = 0; first < n; first += fastmask::cuda::kMaxTensors) {
    fastmask::cuda::ScoreTable tab;
    fastmask::cuda::fill_score_launch(scores, grads, first, std::min<int64_t>(fastmask::cuda::kMaxTensors, n - first),
                                      scores[0].device(), keep, tab);
    TORCH_CHECK(fastmask_cuda_score_accumulate(&tab, static_cast<int>(mode), nullptr) == cudaSuccess, "launch failed");
  }
}

// sampled_weight_grad's chunked gather as ops_cuda.cpp runs it, with a CPU product in fp32 and
// chunks of at most tile_entries entries (the binding's are 2^22).
at::Tensor sampled_weight_grad(at::Tensor grad_out, at::Tensor input, at::Tensor idx, int64_t tile_entries) {
  const at::Tensor go_t = grad_out.t().to(at::kFloat);
  const at::Tensor x = input.to(at::kFloat);
  return fastmask::cuda::gather_from_row_chunks(idx.to(at::kLong), grad_out.size(1), input.size(1), tile_entries,
                                                [&](int64_t r0, int64_t r1) {
                                                  return at::mm(go_t.slice(0, r0, r1), x).view({-1});
                                                });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("masked_adamw_step_", &masked_adamw_step);
  m.def("score_accumulate_", &score_accumulate);
  m.def("sampled_weight_grad", &sampled_weight_grad);
  m.attr("max_tensors") = fastmask::cuda::kMaxTensors;
}
