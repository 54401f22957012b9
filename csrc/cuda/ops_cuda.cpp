// CUDA implementations of the fastmask_ext ops: fill the multi-tensor tables and call the
// launchers of kernels.cu on the current stream. Compiled only when torch has CUDA (setup.py).
// No host sync: lr, steps, grad_scale and found_inf stay on the device and are read by the kernels
// (a CPU lr is read here, which is free). Indices are range-checked in the kernel (common.h): it
// counts the entries it skipped in a device counter, and at::_assert_async (a device-side
// assertion, no host sync) fails the stream when the counter is not 0.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "../common.h"
#include "kernels.h"
#include "launch_tables.h"
#include "sampled_grad.h"

namespace fastmask {
namespace {

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, ": ", cudaGetErrorString(err));
}

void masked_adamw_step_cuda(at::TensorList params, at::TensorList grads, const at::Tensor& idx,
                            const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq, at::IntArrayRef offsets,
                            const at::Tensor& steps, const at::Tensor& lr, double beta1, double beta2, double eps,
                            double weight_decay, bool maximize, const std::optional<at::Tensor>& max_exp_avg_sq,
                            const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                            at::TensorList scores, c10::string_view score_mode) {
  const int64_t n = static_cast<int64_t>(params.size());
  check_step_layout(params, grads, idx, exp_avg, exp_avg_sq, offsets, steps, max_exp_avg_sq, scores, at::kCUDA);
  const ScoreMode mode = parse_score_mode(score_mode);
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();

  const at::Tensor bad_count = cuda::run_step_launches(
      params, grads, idx, exp_avg, exp_avg_sq, offsets, steps, lr, beta1, beta2, eps, weight_decay, maximize,
      max_exp_avg_sq, grad_scale, found_inf, scores, mode, [&](const cuda::StepTable& tab, const cuda::StepParams& sp) {
        check_cuda(fastmask_cuda_masked_adamw_step(&tab, &sp, stream), "fastmask masked_adamw_step_ launch");
      });
  at::_assert_async(bad_count.eq(0),
                    "fastmask masked_adamw_step_: idx holds indices out of range of their tensor (outside [0, numel)); "
                    "nothing was read or written at them, the other selected entries were stepped. The index buffer "
                    "was written after fastmask checked it without bumping its version, or the backend op was "
                    "called directly");
}

void score_accumulate_cuda(at::TensorList scores, at::TensorList grads, c10::string_view score_mode) {
  const ScoreMode mode = parse_score_mode(score_mode);
  TORCH_CHECK(scores.size() == grads.size(), "scores: expected one score tensor per gradient");
  if (scores.empty()) return;
  TORCH_CHECK(scores[0].is_cuda(), "score_accumulate_: all tensors must be on one CUDA device");
  const c10::cuda::CUDAGuard guard(scores[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  std::vector<at::Tensor> keep;
  const int64_t n = static_cast<int64_t>(scores.size());
  for (int64_t first = 0; first < n; first += cuda::kMaxTensors) {
    const int64_t count = std::min<int64_t>(cuda::kMaxTensors, n - first);
    cuda::ScoreTable tab;
    cuda::fill_score_launch(scores, grads, first, count, scores[0].device(), keep, tab);
    check_cuda(fastmask_cuda_score_accumulate(&tab, static_cast<int>(mode), stream),
               "fastmask score_accumulate_ launch");
  }
}

// Rows of the weight whose dense gradient one cuBLAS call computes: at most 2^22 fp32 entries
// (16 MiB) at a time, whatever the weight's size.
constexpr int64_t kSampledTileEntries = int64_t(1) << 22;

// Weight gradient of a linear layer at selected entries (out[j] = sum_t grad_out[t, r] * input[t, c]
// for idx[j] = r * in + c), on CUDA. A GPU multiplies dense matrices on its tensor cores far faster
// than it gathers scattered dot products, so the product is computed by cuBLAS, in chunks of rows
// of the weight (kSampledTileEntries fp32 entries at most: the whole weight gradient never exists
// unless it is that small), with fp32 accumulation and output (at::mm's out_dtype for bf16/fp16;
// fp32 inputs follow torch's TF32 setting for matmuls, as autograd's own weight gradient does), and
// each chunk's selected entries are gathered from it. Indices are range-checked on the device
// (at::_assert_async: no host sync); an out-of-range index reads a valid entry until the assertion
// fails the stream. Nothing here syncs the host.
at::Tensor sampled_weight_grad_cuda(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& idx) {
  TORCH_CHECK(grad_out.dim() == 2 && input.dim() == 2 && grad_out.size(0) == input.size(0),
              "sampled_weight_grad: expected grad_out [T, out] and input [T, in]");
  TORCH_CHECK(grad_out.is_cuda() && input.device() == grad_out.device() && idx.device() == grad_out.device(),
              "sampled_weight_grad: grad_out, input and idx must be on one CUDA device, got ", grad_out.device(),
              ", ", input.device(), ", ", idx.device());
  TORCH_CHECK(idx.scalar_type() == at::kInt && idx.dim() == 1 && idx.is_contiguous(),
              "idx: expected a contiguous 1-D int32 tensor");
  const at::ScalarType dt = grad_out.scalar_type();
  TORCH_CHECK(input.scalar_type() == dt && (dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf),
              "sampled_weight_grad: grad_out and input must both be float32, bfloat16 or float16");
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const int64_t T = grad_out.size(0), n_out = grad_out.size(1), n_in = input.size(1), k = idx.numel();
  const int64_t numel = n_out * n_in;
  const at::TensorOptions f32 = grad_out.options().dtype(at::kFloat);
  if (k == 0) return at::empty({0}, f32);
  const at::Tensor q = idx.to(at::kLong);
  const std::string msg = "idx: an index is outside [0, " + std::to_string(numel) + ") for a weight of shape [" +
                          std::to_string(n_out) + ", " + std::to_string(n_in) + "]";
  at::_assert_async(((q >= 0) & (q < numel)).all(), msg);
  if (T == 0 || numel == 0) return at::zeros({k}, f32);  // no tokens: a zero gradient
  const at::Tensor go_t = grad_out.t();  // [out, T], a view
  return cuda::gather_from_row_chunks(q, n_out, n_in, kSampledTileEntries, [&](int64_t r0, int64_t r1) {
    const at::Tensor a = go_t.slice(0, r0, r1);  // rows [r0, r1) of grad_out.T @ input, fp32, flat
    return (dt == at::kFloat ? at::mm(a, input) : at::mm(a, input, at::kFloat)).view({-1});
  });
}

}  // namespace
}  // namespace fastmask

TORCH_LIBRARY_IMPL(fastmask_ext, CUDA, m) {
  m.impl("masked_adamw_step_", &fastmask::masked_adamw_step_cuda);
  m.impl("score_accumulate_", &fastmask::score_accumulate_cuda);
  m.impl("sampled_weight_grad", &fastmask::sampled_weight_grad_cuda);
}
