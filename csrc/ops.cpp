// The fastmask_ext operator library: backend entry points of fastmask's ops and their CPU
// implementations.
//
// The public schemas (fastmask::masked_adamw_step_, fastmask::score_accumulate_) are owned by
// fastmask/ops.py, which checks every argument and routes to a backend; fastmask/_ext.py then
// calls the ops below. They repeat the public argument lists exactly (tests/test_ext.py checks),
// and are registered once here; the CUDA kernels are added by cuda/ops_cuda.cpp when built.
// Loaded with torch.ops.load_library: no Python.h.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <string>
#include <vector>

#include "common.h"
#include "cpu/kernels.h"

namespace fastmask {
namespace {

void masked_adamw_step_cpu(at::TensorList params, at::TensorList grads, const at::Tensor& idx,
                           const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq, at::IntArrayRef offsets,
                           const at::Tensor& steps, const at::Tensor& lr, double beta1, double beta2, double eps,
                           double weight_decay, bool maximize, const std::optional<at::Tensor>& max_exp_avg_sq,
                           const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                           at::TensorList scores, c10::string_view score_mode) {
  const int64_t n = static_cast<int64_t>(params.size());
  check_step_layout(params, grads, idx, exp_avg, exp_avg_sq, offsets, steps, max_exp_avg_sq, scores, at::kCPU);
  const ScoreMode mode = parse_score_mode(score_mode);
  if (n == 0) return;
  if (found_inf.has_value()) {
    TORCH_CHECK(found_inf->device().is_cpu() && found_inf->numel() == 1, "found_inf: expected one CPU element");
    if (found_inf->item<double>() != 0.0) return;  // GradScaler's skipped step: change nothing
  }
  cpu::StepArgs a{};
  a.has_grad_scale = grad_scale.has_value();
  if (a.has_grad_scale) {
    TORCH_CHECK(grad_scale->device().is_cpu() && grad_scale->numel() == 1, "grad_scale: expected one CPU element");
    a.grad_scale = grad_scale->item<float>();
  }
  TORCH_CHECK(lr.numel() == 1 && lr.device().is_cpu(), "lr: expected a one-element CPU tensor for CPU params");
  const double lr_v = lr.item<double>();
  const at::Tensor steps_c = steps.to(at::kFloat).contiguous();
  const float* step_vals = steps_c.data_ptr<float>();

  std::vector<cpu::StepTensor> tensors(n);
  for (int64_t t = 0; t < n; ++t) {
    cpu::StepTensor& st = tensors[t];
    st.param = params[t].data_ptr();
    st.grad = grads[t].data_ptr();
    st.score = scores.empty() ? nullptr : scores[t].data_ptr<float>();
    st.numel = params[t].numel();
    st.k_begin = offsets[t];
    st.k_end = offsets[t + 1];
    st.s = make_tensor_scalars(lr_v, static_cast<double>(step_vals[t]), beta1, beta2, weight_decay);
  }
  a.tensors = tensors.data();
  a.num_tensors = n;
  a.idx = idx.data_ptr<int32_t>();
  a.exp_avg = exp_avg.data_ptr<float>();
  a.exp_avg_sq = exp_avg_sq.data_ptr<float>();
  a.max_exp_avg_sq = max_exp_avg_sq.has_value() ? max_exp_avg_sq->data_ptr<float>() : nullptr;
  a.param_type = param_type_of(params[0].scalar_type());
  a.consts = make_consts(beta1, beta2, eps);
  a.maximize = maximize;
  a.with_scores = !scores.empty();
  a.score_mode = mode;
  a.num_threads = at::get_num_threads();
  cpu::IndexErrors errors{};
  a.errors = &errors;
  cpu::masked_adamw_step(a);
  if (errors.count != 0) {
    const int64_t t = errors.first_tensor;
    TORCH_CHECK_INDEX(false, index_error_message(errors.first_count, t, params[t].numel(), errors.first_value,
                                                 errors.count, errors.tensors));
  }
}

void score_accumulate_cpu(at::TensorList scores, at::TensorList grads, c10::string_view score_mode) {
  const ScoreMode mode = parse_score_mode(score_mode);
  TORCH_CHECK(scores.size() == grads.size(), "scores: expected one score tensor per gradient");
  std::vector<cpu::ScoreTensor> tensors;
  std::vector<at::Tensor> keep;  // converted gradients of dtypes the kernel does not read directly
  tensors.reserve(scores.size());
  for (size_t t = 0; t < scores.size(); ++t) {
    const at::Tensor& s = scores[t];
    at::Tensor g = grads[t];
    TORCH_CHECK(s.device().is_cpu() && g.device().is_cpu(), "score_accumulate_: all tensors must be on the CPU");
    TORCH_CHECK(s.scalar_type() == at::kFloat && s.is_contiguous() && g.is_contiguous() && s.sizes() == g.sizes(),
                "score_accumulate_: scores[", t, "] must be a contiguous float32 tensor shaped like grads[", t, "]");
    cpu::GradType gt;
    switch (g.scalar_type()) {
      case at::kFloat: gt = cpu::GradType::kFloat32; break;
      case at::kBFloat16: gt = cpu::GradType::kBFloat16; break;
      case at::kHalf: gt = cpu::GradType::kFloat16; break;
      case at::kDouble: gt = cpu::GradType::kFloat64; break;
      default:
        TORCH_CHECK(at::isFloatingType(g.scalar_type()), "grads[", t, "]: expected a floating dtype");
        g = g.to(at::kFloat);  // other floating types (e.g. float8): convert once, as .float() would
        keep.push_back(g);
        gt = cpu::GradType::kFloat32;
    }
    tensors.push_back({s.data_ptr<float>(), g.data_ptr(), s.numel(), gt});
  }
  cpu::score_accumulate(tensors.data(), static_cast<int64_t>(tensors.size()), mode, at::get_num_threads());
}

// Weight gradient of a linear layer at selected entries only: out[j] = sum_t grad_out[t, r] * input[t, c]
// for idx[j] = r * in + c (in = input.size(1)), in fp32 whatever the input dtype. Both operands are
// first transposed to fp32 rows ([out, T] and [in, T]), so each entry is one dot product of two
// contiguous rows; sorted indices keep a row of grad_out in L1 across its entries. An index outside
// [0, out * in) gives no value (its output stays 0) and raises after the loop, naming it.
at::Tensor sampled_weight_grad_cpu(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& idx) {
  TORCH_CHECK(grad_out.dim() == 2 && input.dim() == 2 && grad_out.size(0) == input.size(0),
              "sampled_weight_grad: expected grad_out [T, out] and input [T, in]");
  TORCH_CHECK(grad_out.device().is_cpu() && input.device().is_cpu() && idx.device().is_cpu(),
              "sampled_weight_grad: all tensors must be on the CPU");
  TORCH_CHECK(idx.scalar_type() == at::kInt && idx.dim() == 1 && idx.is_contiguous(),
              "idx: expected a contiguous 1-D int32 tensor");
  const int64_t T = grad_out.size(0), n_out = grad_out.size(1), n_in = input.size(1), k = idx.numel();
  const at::Tensor a = grad_out.t().to(at::kFloat).contiguous();  // [out, T]
  const at::Tensor b = input.t().to(at::kFloat).contiguous();     // [in, T]
  at::Tensor out = at::zeros({k}, grad_out.options().dtype(at::kFloat));
  const float* pa = a.data_ptr<float>();
  const float* pb = b.data_ptr<float>();
  const int32_t* pi = idx.data_ptr<int32_t>();
  float* po = out.data_ptr<float>();
  const uint64_t numel = static_cast<uint64_t>(n_out) * static_cast<uint64_t>(n_in);
  std::atomic<int64_t> bad{0};
  std::atomic<int64_t> first_bad{INT64_MAX};
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(T, 1));
  at::parallel_for(0, k, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t j = lo; j < hi; ++j) {
      const int64_t q = pi[j];
      if (static_cast<uint64_t>(q) >= numel) {
        bad.fetch_add(1, std::memory_order_relaxed);
        int64_t cur = first_bad.load(std::memory_order_relaxed);
        while (j < cur && !first_bad.compare_exchange_weak(cur, j, std::memory_order_relaxed)) {
        }
        continue;
      }
      const float* x = pa + (q / n_in) * T;
      const float* y = pb + (q % n_in) * T;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t t = 0; t < T; ++t) s += x[t] * y[t];
      po[j] = s;
    }
  });
  const int64_t nbad = bad.load();
  TORCH_CHECK_INDEX(nbad == 0, "idx: ", nbad, nbad == 1 ? " index is" : " indices are", " outside [0, ", numel,
                    ") for a weight of shape [", n_out, ", ", n_in, "]; the first at position ", first_bad.load(),
                    " is ", nbad ? pi[first_bad.load()] : 0);
  return out;
}

std::string cpu_isa() { return cpu::isa_name(); }

}  // namespace
}  // namespace fastmask

TORCH_LIBRARY(fastmask_ext, m) {
  m.def(FASTMASK_STEP_SCHEMA);
  m.def(FASTMASK_SCORE_SCHEMA);
  m.def(FASTMASK_SAMPLED_SCHEMA);
  // Which CPU instruction-set variant the kernels use here (diagnostics).
  m.def("cpu_isa() -> str", &fastmask::cpu_isa);
}

TORCH_LIBRARY_IMPL(fastmask_ext, CPU, m) {
  m.impl("masked_adamw_step_", &fastmask::masked_adamw_step_cpu);
  m.impl("score_accumulate_", &fastmask::score_accumulate_cpu);
  m.impl("sampled_weight_grad", &fastmask::sampled_weight_grad_cpu);
}
