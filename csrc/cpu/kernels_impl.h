// Body of the CPU kernels, compiled once per instruction set: a kernels_<isa>.cpp includes this
// file inside `namespace fastmask::cpu::<isa>` after a `#pragma GCC target(...)`, so every loop
// below (OpenMP bodies included) is vectorized for that instruction set. Include only from there.
//
// Masked step, without scores: the compact entries are split evenly across threads (contiguous
// ranges, so each thread streams its slice of idx/exp_avg/exp_avg_sq). Each range is handled in
// tiles: gather p and g at idx into small stack buffers (prefetching the lines of entries a few
// dozen ahead), run the AdamW maths on contiguous arrays (vectorizes: no indexing inside), then
// scatter p back. With scores, work items are dense chunks of one tensor: accumulate the chunk's
// scores (a dense, vectorized pass over the gradient), then step the chunk's selected entries
// while its gradient lines are still in cache; the gradient is read from memory once.
// fp32 params in the AVX-512 variant take step_avx512.h's path instead of the scalar tiles (vector
// gathers/scatters, each touched line prefetched into L2 once); same maths, bit-identical results.
// Every entry's result depends only on its own inputs, so results do not depend on the number
// of threads.
//
// Index safety (whatever idx holds: fastmask/ops.py's checks can be bypassed, see common.h): each
// index is compared, as unsigned, with its tensor's numel where it is gathered. An entry outside
// [0, numel) is skipped (its p and g are never read, p never written, its state left as it was)
// and recorded in the thread's BadLog, on a cold path; the AdamW step of the other entries is
// unchanged, bit for bit. The logs are reduced after the parallel region into args.errors, and
// the op raises. Hot-loop cost: a compare and a select per entry in the scalar tiles, one compare
// per 16 entries folded into the gather/scatter lane mask on AVX-512. Prefetches of a bad
// address are harmless (a prefetch never faults) and are not filtered.

constexpr int64_t kTile = 256;           // entries per gather / maths / scatter round
#ifndef FASTMASK_PREFETCH
#define FASTMASK_PREFETCH 64  // 2-core Zen 4: 64, 128 and 256 ahead within noise (L2 prefetch)
#endif
constexpr int64_t kPrefetch = FASTMASK_PREFETCH;  // entries ahead whose lines are prefetched
constexpr int64_t kDenseChunk = 1 << 15; // dense elements per work item of the fused-score path

template <ParamType PT>
using Storage = typename ParamTraits<PT>::storage;

// One thread's record of the out-of-range entries it skipped; written only on the cold path.
struct alignas(64) BadLog {
  std::vector<int64_t> per_tensor;  // skipped entries per tensor (sized on first use)
  int64_t first_j = INT64_MAX;      // lowest compact position skipped
  int32_t first_value = 0;          // its index
};

// Record the entries of vals[0, n) (compact positions j, j + 1, ...; tensor t) outside [0, numel).
__attribute__((noinline, cold)) static void note_bad(BadLog& log, const StepArgs& a, int64_t t, int64_t j,
                                                     const int32_t* vals, int64_t n) {
  const uint32_t numel = static_cast<uint32_t>(a.tensors[t].numel);
  if (log.per_tensor.empty()) log.per_tensor.assign(static_cast<size_t>(a.num_tensors), 0);
  for (int64_t e = 0; e < n; ++e) {
    if (static_cast<uint32_t>(vals[e]) < numel) continue;
    ++log.per_tensor[t];
    if (j + e < log.first_j) {
      log.first_j = j + e;
      log.first_value = vals[e];
    }
  }
}

// Reduce the threads' logs into *a.errors.
static void report_bad(const StepArgs& a, const std::vector<BadLog>& logs) {
  IndexErrors e{0, 0, -1, 0, 0};
  int64_t first_j = INT64_MAX;
  for (const BadLog& log : logs) {
    if (log.per_tensor.empty()) continue;
    if (log.first_j < first_j) {
      first_j = log.first_j;
      e.first_value = log.first_value;
    }
  }
  if (first_j != INT64_MAX) {
    for (int64_t t = 0; t < a.num_tensors; ++t) {
      int64_t c = 0;
      for (const BadLog& log : logs)
        if (!log.per_tensor.empty()) c += log.per_tensor[t];
      if (c == 0) continue;
      e.count += c;
      ++e.tensors;
      if (a.tensors[t].k_begin <= first_j && first_j < a.tensors[t].k_end) {
        e.first_tensor = t;
        e.first_count = c;
      }
    }
  }
  *a.errors = e;
}

#if defined(FASTMASK_CPU_AVX512)
#include "step_avx512.h"
#endif

// Tile of n entries (compact positions j0 + i) holding an out-of-range index (cold): the same
// maths per entry, skipping those outside [0, numel). qb: the indices as gathered.
template <ParamType PT, bool AMSGRAD>
__attribute__((noinline, cold)) static void step_tile_checked(const StepArgs& a, int64_t ti, int64_t j0, int64_t n,
                                                              const int32_t* qb, const float* pb, const float* gb,
                                                              BadLog& log) {
  using S = Storage<PT>;
  const StepTensor& t = a.tensors[ti];
  S* P = static_cast<S*>(t.param);
  const uint32_t numel = static_cast<uint32_t>(t.numel);
  note_bad(log, a, ti, j0, qb, n);
  for (int64_t i = 0; i < n; ++i) {
    if (static_cast<uint32_t>(qb[i]) >= numel) continue;
    const int64_t j = j0 + i;
    float g = gb[i];
    g = a.has_grad_scale ? g / a.grad_scale : g;
    g = a.maximize ? -g : g;
    float mi = a.exp_avg[j], vi = a.exp_avg_sq[j];
    float vmi = AMSGRAD ? a.max_exp_avg_sq[j] : 0.0f;
    const float p = adamw_entry<AMSGRAD>(pb[i], g, mi, vi, vmi, a.consts, t.s);
    a.exp_avg[j] = mi;
    a.exp_avg_sq[j] = vi;
    if (AMSGRAD) a.max_exp_avg_sq[j] = vmi;
    P[qb[i]] = ParamTraits<PT>::store(p);
  }
}

template <ParamType PT, bool AMSGRAD>
static void step_range(const StepArgs& a, int64_t ti, int64_t j0, int64_t j1, BadLog& log) {
  using S = Storage<PT>;
  const StepTensor& t = a.tensors[ti];
  S* __restrict__ P = static_cast<S*>(t.param);
  const S* __restrict__ G = static_cast<const S*>(t.grad);
  const uint32_t numel = static_cast<uint32_t>(t.numel);  // <= INT32_MAX (checked by the op)
  const int32_t* __restrict__ idx = a.idx;
  float* __restrict__ M = a.exp_avg;
  float* __restrict__ V = a.exp_avg_sq;
  float* __restrict__ VM = a.max_exp_avg_sq;
  const AdamwConsts c = a.consts;
  const TensorScalars s = t.s;
  const float scale = a.grad_scale;
  const bool has_scale = a.has_grad_scale;
  const bool maximize = a.maximize;
  alignas(64) float pb[kTile];
  alignas(64) float gb[kTile];
  alignas(64) int32_t qb[kTile];  // the indices as checked: the scatter uses these, not a re-read
  for (int64_t jt = j0; jt < j1; jt += kTile) {
    const int64_t n = (j1 - jt < kTile) ? (j1 - jt) : kTile;
    const int32_t* __restrict__ ix = idx + jt;
    const int64_t pf_end = j1 - jt;  // prefetch only indices of this range
    uint32_t bad = 0;
    for (int64_t i = 0; i < n; ++i) {
      if (i + kPrefetch < pf_end) {
        const int32_t q = ix[i + kPrefetch];
        __builtin_prefetch(P + q, 1, 2);  // locality 2: into L2 (prefetcht1); an L1/NTA prefetch
        __builtin_prefetch(G + q, 0, 2);  // was 1.6x slower at 1% density, equal at 10%
      }
      const int32_t q = ix[i];
      const bool ok = static_cast<uint32_t>(q) < numel;  // negative -> huge: one compare
      bad |= !ok;
      qb[i] = q;
      const int32_t qs = ok ? q : 0;  // an out-of-range entry reads entry 0 (in bounds), never its own
      pb[i] = ParamTraits<PT>::load(P[qs]);
      gb[i] = ParamTraits<PT>::load(G[qs]);
    }
    if (__builtin_expect(bad != 0, 0)) {
      step_tile_checked<PT, AMSGRAD>(a, ti, jt, n, qb, pb, gb, log);
      continue;
    }
    float* __restrict__ m = M + jt;
    float* __restrict__ v = V + jt;
    float* __restrict__ vm = AMSGRAD ? VM + jt : nullptr;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      float g = gb[i];
      g = has_scale ? g / scale : g;  // loop-invariant selects: cheap, and half the instantiations
      g = maximize ? -g : g;
      float mi = m[i], vi = v[i];
      float vmi = AMSGRAD ? vm[i] : 0.0f;
      pb[i] = adamw_entry<AMSGRAD>(pb[i], g, mi, vi, vmi, c, s);
      m[i] = mi;
      v[i] = vi;
      if (AMSGRAD) vm[i] = vmi;
    }
    for (int64_t i = 0; i < n; ++i) P[qb[i]] = ParamTraits<PT>::store(pb[i]);
  }
}

template <typename Load, ScoreMode MODE>
static inline void score_dense(float* __restrict__ score, Load load, int64_t lo, int64_t hi, bool has_scale, float scale) {
#pragma omp simd
  for (int64_t i = lo; i < hi; ++i) {
    float g = load(i);
    g = has_scale ? g / scale : g;
    score[i] = score[i] + score_stat<MODE>(g);
  }
}

template <ParamType PT, bool AMSGRAD>
static void step_no_scores(const StepArgs& a, std::vector<BadLog>& logs) {
  const int64_t k_total = a.tensors[a.num_tensors - 1].k_end;
  if (k_total == 0) return;
  // Small problems: one thread (a parallel region costs more than it saves).
  const int nt = k_total < 4096 ? 1 : a.num_threads;
#if defined(FASTMASK_CPU_AVX512)
  const bool two_streams = avx512::use_two_streams(a);
#endif
#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num();
    const int nth = omp_get_num_threads();
    BadLog& log = logs[tid];
    const int64_t lo = k_total * tid / nth;
    const int64_t hi = k_total * (tid + 1) / nth;
#if defined(FASTMASK_CPU_AVX512)
    if (PT == ParamType::kFloat32 && lo < hi) {
      int64_t t0 = 0;
      while (a.tensors[t0].k_end <= lo) ++t0;
      if (two_streams)
        avx512::step_streams<AMSGRAD, 2>(a, t0, lo, hi, log);
      else
        avx512::step_streams<AMSGRAD, 1>(a, t0, lo, hi, log);
    } else
#endif
    for (int64_t t = 0; t < a.num_tensors && lo < hi; ++t) {
      const StepTensor& ten = a.tensors[t];
      const int64_t j0 = ten.k_begin > lo ? ten.k_begin : lo;
      const int64_t j1 = ten.k_end < hi ? ten.k_end : hi;
      if (j0 < j1) step_range<PT, AMSGRAD>(a, t, j0, j1, log);
    }
  }
}

// First position j in [0, n) with seg[j] >= target (n if none), by bisection: for any contents
// of seg (sorted or not) it reads only seg[0, n) and returns a position in [0, n].
static inline int64_t lower_bound_idx(const int32_t* seg, int64_t n, int64_t target) {
  int64_t lo = 0;
  while (n > 0) {
    const int64_t half = n >> 1;
    if (static_cast<int64_t>(seg[lo + half]) < target) {
      lo += half + 1;
      n -= half + 1;
    } else {
      n = half;
    }
  }
  return lo;
}

template <ParamType PT, ScoreMode MODE, bool AMSGRAD>
static void step_with_scores(const StepArgs& a, std::vector<BadLog>& logs) {
  using S = Storage<PT>;
  // Work items: (tensor, dense chunk); chunk_start[t] is tensor t's first item.
  std::vector<int64_t> chunk_start(a.num_tensors + 1, 0);
  for (int64_t t = 0; t < a.num_tensors; ++t)
    chunk_start[t + 1] = chunk_start[t] + (a.tensors[t].numel + kDenseChunk - 1) / kDenseChunk;
  const int64_t items = chunk_start[a.num_tensors];
  if (items == 0) return;
  const int nt = items < 2 ? 1 : a.num_threads;
  // Item it steps the compact entries [jb[it], jb[it + 1]) (the tensor's k_end after its last
  // item): those whose index falls in its dense chunk. The bounds come from bisecting the sorted
  // segment; a running maximum keeps them non-decreasing whatever idx holds, so the items
  // partition each segment: every entry is visited once, out-of-range ones included (the first
  // item of a tensor starts at k_begin, its last ends at k_end), and are checked there.
  std::vector<int64_t> jb(items);
#pragma omp parallel num_threads(nt)
  {
#pragma omp for schedule(static)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t t = std::upper_bound(chunk_start.begin(), chunk_start.end(), it) - chunk_start.begin() - 1;
      const StepTensor& ten = a.tensors[t];
      const int64_t lo = (it - chunk_start[t]) * kDenseChunk;
      jb[it] = lo == 0 ? ten.k_begin
                       : ten.k_begin + lower_bound_idx(a.idx + ten.k_begin, ten.k_end - ten.k_begin, lo);
    }
#pragma omp single
    for (int64_t t = 0; t < a.num_tensors; ++t)
      for (int64_t it = chunk_start[t] + 1; it < chunk_start[t + 1]; ++it)
        if (jb[it] < jb[it - 1]) jb[it] = jb[it - 1];
    // (implicit barrier)
    BadLog& log = logs[omp_get_thread_num()];
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t t = std::upper_bound(chunk_start.begin(), chunk_start.end(), it) - chunk_start.begin() - 1;
      const StepTensor& ten = a.tensors[t];
      const int64_t lo = (it - chunk_start[t]) * kDenseChunk;
      const int64_t hi = lo + kDenseChunk < ten.numel ? lo + kDenseChunk : ten.numel;
      const S* __restrict__ G = static_cast<const S*>(ten.grad);
      auto load = [G](int64_t i) { return ParamTraits<PT>::load(G[i]); };
      score_dense<decltype(load), MODE>(ten.score, load, lo, hi, a.has_grad_scale, a.grad_scale);
      const int64_t j0 = jb[it];
      const int64_t j1 = it + 1 < chunk_start[t + 1] ? jb[it + 1] : ten.k_end;
      if (j0 >= j1) continue;
#if defined(FASTMASK_CPU_AVX512)
      if (PT == ParamType::kFloat32) {
        avx512::step_streams<AMSGRAD, 1>(a, t, j0, j1, log);
        continue;
      }
#endif
      step_range<PT, AMSGRAD>(a, t, j0, j1, log);
    }
  }
}

template <ParamType PT, bool AMSGRAD>
static void step_dispatch_scores(const StepArgs& a, std::vector<BadLog>& logs) {
  if (!a.with_scores) return step_no_scores<PT, AMSGRAD>(a, logs);
  switch (a.score_mode) {
    case ScoreMode::kGrad: return step_with_scores<PT, ScoreMode::kGrad, AMSGRAD>(a, logs);
    case ScoreMode::kAbs: return step_with_scores<PT, ScoreMode::kAbs, AMSGRAD>(a, logs);
    case ScoreMode::kFisher: return step_with_scores<PT, ScoreMode::kFisher, AMSGRAD>(a, logs);
  }
}

template <ParamType PT>
static void step_dispatch_flags(const StepArgs& a, std::vector<BadLog>& logs) {
  if (a.max_exp_avg_sq != nullptr) return step_dispatch_scores<PT, true>(a, logs);
  return step_dispatch_scores<PT, false>(a, logs);
}

void masked_adamw_step(const StepArgs& a) {
  *a.errors = IndexErrors{0, 0, -1, 0, 0};
  if (a.num_tensors == 0) return;
  std::vector<BadLog> logs(a.num_threads > 1 ? a.num_threads : 1);  // one per thread (OpenMP never gives more)
  switch (a.param_type) {
    case ParamType::kFloat32: step_dispatch_flags<ParamType::kFloat32>(a, logs); break;
    case ParamType::kBFloat16: step_dispatch_flags<ParamType::kBFloat16>(a, logs); break;
    case ParamType::kFloat16: step_dispatch_flags<ParamType::kFloat16>(a, logs); break;
  }
  report_bad(a, logs);
}

template <ScoreMode MODE>
static void score_one_chunk(const ScoreTensor& ten, int64_t lo, int64_t hi) {
  switch (ten.grad_type) {
    case GradType::kFloat32: {
      const float* __restrict__ G = static_cast<const float*>(ten.grad);
      auto load = [G](int64_t i) { return G[i]; };
      return score_dense<decltype(load), MODE>(ten.score, load, lo, hi, false, 1.0f);
    }
    case GradType::kBFloat16: {
      const uint16_t* __restrict__ G = static_cast<const uint16_t*>(ten.grad);
      auto load = [G](int64_t i) { return bf16_to_f32(G[i]); };
      return score_dense<decltype(load), MODE>(ten.score, load, lo, hi, false, 1.0f);
    }
    case GradType::kFloat16: {
      const uint16_t* __restrict__ G = static_cast<const uint16_t*>(ten.grad);
      auto load = [G](int64_t i) { return f16_to_f32(G[i]); };
      return score_dense<decltype(load), MODE>(ten.score, load, lo, hi, false, 1.0f);
    }
    case GradType::kFloat64: {
      const double* __restrict__ G = static_cast<const double*>(ten.grad);
      auto load = [G](int64_t i) { return static_cast<float>(G[i]); };
      return score_dense<decltype(load), MODE>(ten.score, load, lo, hi, false, 1.0f);
    }
  }
}

template <ScoreMode MODE>
static void score_all(const ScoreTensor* tensors, int64_t n, int num_threads) {
  std::vector<int64_t> chunk_start(n + 1, 0);
  for (int64_t t = 0; t < n; ++t)
    chunk_start[t + 1] = chunk_start[t] + (tensors[t].numel + kDenseChunk - 1) / kDenseChunk;
  const int64_t items = chunk_start[n];
  if (items == 0) return;
  const int nt = items < 2 ? 1 : num_threads;
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t it = 0; it < items; ++it) {
    const int64_t t = std::upper_bound(chunk_start.begin(), chunk_start.end(), it) - chunk_start.begin() - 1;
    const int64_t lo = (it - chunk_start[t]) * kDenseChunk;
    const int64_t hi = lo + kDenseChunk < tensors[t].numel ? lo + kDenseChunk : tensors[t].numel;
    score_one_chunk<MODE>(tensors[t], lo, hi);
  }
}

void score_accumulate(const ScoreTensor* tensors, int64_t n, ScoreMode mode, int num_threads) {
  switch (mode) {
    case ScoreMode::kGrad: return score_all<ScoreMode::kGrad>(tensors, n, num_threads);
    case ScoreMode::kAbs: return score_all<ScoreMode::kAbs>(tensors, n, num_threads);
    case ScoreMode::kFisher: return score_all<ScoreMode::kFisher>(tensors, n, num_threads);
  }
}
