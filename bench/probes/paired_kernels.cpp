// A/B timing of two builds of the CPU masked-step kernels in one process, on the same arrays.
//
// Not a benchmark of fastmask (that is bench/test_masked_step.py); a probe for kernel changes of a
// few percent, which separate pytest-benchmark runs on a shared machine cannot resolve (their
// run-to-run swings are larger). The old build's sources are compiled with -Dfastmask=fm_old, so
// both live side by side; every round calls each once, alternating which goes first, and the
// report is the median of the per-round ratios new/old (with quartiles). An A/A run (a copy of the
// current csrc/ in another directory as OLD: the headers are included once per path) gives the
// probe's own bias.
//
// The problem: the ViT-B/16 c_fc set (12 x [3072, 768] + 12 x [2048, 512], 40.9 M fp32), random
// masks of the given density, the "avx512" variant (fp32: step_avx512.h), no scores, 2 threads.
//
// Build and run (OLD: a checkout of the old commit, e.g. `git worktree add /tmp/fm_old <commit>`):
//   F="-O3 -fopenmp -ffp-contract=off -fno-math-errno -std=c++17"
//   g++ $F -Dfastmask=fm_old -I$OLD/csrc -c $OLD/csrc/cpu/kernels_avx512.cpp -o /tmp/old.o
//   g++ $F -Icsrc -c csrc/cpu/kernels_avx512.cpp -o /tmp/new.o
//   g++ $F -Icsrc -DOLD_KERNELS_H="\"$OLD/csrc/cpu/kernels.h\"" bench/probes/paired_kernels.cpp /tmp/old.o /tmp/new.o -o /tmp/paired_kernels
//   /tmp/paired_kernels 0.1 100 && /tmp/paired_kernels 0.01 300   # density, rounds
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <type_traits>
#include <vector>

#ifndef OLD_KERNELS_H
#error "define OLD_KERNELS_H as the old build's csrc/cpu/kernels.h (see the header comment)"
#endif
#define fastmask fm_old
#include OLD_KERNELS_H
#undef fastmask
#include "cpu/kernels.h"

namespace {

// Builds before the bounds check have no StepArgs::errors (an output the kernel fills): point it
// at a static record where it exists.
template <class A>
auto set_errors(A& a, int) -> decltype(a.errors, void()) {
  static std::remove_pointer_t<decltype(a.errors)> record{};
  a.errors = &record;
}
template <class A>
void set_errors(A&, long) {}

struct Problem {
  std::vector<std::vector<float>> P, G;
  std::vector<int64_t> off{0};
  std::vector<int32_t> idx;
  std::vector<float> m, v;
};

template <class NS_Tensor, class NS_Args, class MakeScalars, class MakeConsts>
void fill(std::vector<NS_Tensor>& ts, NS_Args& a, Problem& pr, MakeScalars ms, MakeConsts mc) {
  const int64_t n = static_cast<int64_t>(pr.P.size());
  ts.resize(n);
  for (int64_t t = 0; t < n; ++t) {
    ts[t].param = pr.P[t].data();
    ts[t].grad = pr.G[t].data();
    ts[t].score = nullptr;
    ts[t].numel = static_cast<int64_t>(pr.P[t].size());
    ts[t].k_begin = pr.off[t];
    ts[t].k_end = pr.off[t + 1];
    ts[t].s = ms(1e-3, 5.0, 0.9, 0.999, 1e-2);
  }
  a.tensors = ts.data();
  a.num_tensors = n;
  a.idx = pr.idx.data();
  a.exp_avg = pr.m.data();
  a.exp_avg_sq = pr.v.data();
  a.max_exp_avg_sq = nullptr;
  a.consts = mc(0.9, 0.999, 1e-8);
  a.maximize = false;
  a.has_grad_scale = false;
  a.grad_scale = 1.0f;
  a.with_scores = false;
  a.num_threads = 2;
}

double quantile(std::vector<double> x, double f) {
  std::sort(x.begin(), x.end());
  return x[static_cast<size_t>(f * static_cast<double>(x.size() - 1) + 0.5)];
}

}  // namespace

int main(int argc, char** argv) {
  const double density = argc > 1 ? atof(argv[1]) : 0.1;
  const int rounds = argc > 2 ? atoi(argv[2]) : 100;
  Problem pr;
  std::mt19937_64 rng(1);
  std::normal_distribution<float> nd;
  std::uniform_real_distribution<double> ud;
  for (int i = 0; i < 24; ++i) {
    const int64_t n = i < 12 ? 3072 * 768 : 2048 * 512;
    pr.P.emplace_back(n);
    pr.G.emplace_back(n);
    for (auto& x : pr.P.back()) x = nd(rng);
    for (auto& x : pr.G.back()) x = nd(rng);
    for (int64_t j = 0; j < n; ++j)
      if (ud(rng) < density) pr.idx.push_back(static_cast<int32_t>(j));
    pr.off.push_back(static_cast<int64_t>(pr.idx.size()));
  }
  pr.m.assign(pr.idx.size(), 0.0f);
  pr.v.assign(pr.idx.size(), 0.0f);

  std::vector<fm_old::cpu::StepTensor> t_old;
  std::vector<fastmask::cpu::StepTensor> t_new;
  fm_old::cpu::StepArgs a_old{};
  fastmask::cpu::StepArgs a_new{};
  fill(t_old, a_old, pr, fm_old::make_tensor_scalars, fm_old::make_consts);
  fill(t_new, a_new, pr, fastmask::make_tensor_scalars, fastmask::make_consts);
  a_old.param_type = fm_old::ParamType::kFloat32;
  a_new.param_type = fastmask::ParamType::kFloat32;
  set_errors(a_old, 0);
  set_errors(a_new, 0);

  auto run = [&](bool is_new) {
    const auto t0 = std::chrono::steady_clock::now();
    if (is_new)
      fastmask::cpu::isa_avx512::masked_adamw_step(a_new);
    else
      fm_old::cpu::isa_avx512::masked_adamw_step(a_old);
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  };
  for (int w = 0; w < 3; ++w) {
    run(false);
    run(true);
  }
  std::vector<double> ms_old, ms_new, ratio;
  for (int r = 0; r < rounds; ++r) {
    const bool new_first = r % 2 == 0;
    const double first = run(new_first), second = run(!new_first);
    ms_new.push_back(new_first ? first : second);
    ms_old.push_back(new_first ? second : first);
    ratio.push_back(ms_new.back() / ms_old.back());
  }
  std::printf("density %.3g, K %zu, %d rounds: old median %.3f ms (min %.3f), new median %.3f ms (min %.3f); "
              "new/old per round: median %.4f, quartiles %.4f-%.4f\n",
              density, pr.idx.size(), rounds, quantile(ms_old, 0.5), quantile(ms_old, 0.0), quantile(ms_new, 0.5),
              quantile(ms_new, 0.0), quantile(ratio, 0.5), quantile(ratio, 0.25), quantile(ratio, 0.75));
  return 0;
}
