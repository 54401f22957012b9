// AVX-512 masked step for fp32 parameters. Included by kernels_impl.h inside the avx512 variant
// only (kernels_avx512.cpp defines FASTMASK_CPU_AVX512 and includes <immintrin.h>).
//
// Why a separate path: at SPU's densities the selected entries of a tensor are a few elements
// apart (10% -> ~10, 1% -> ~100), so the step is bound by how many 64 B lines of p and g can be
// in flight, not by arithmetic. What the measurements on a 2-core Zen 4 showed (bench/RESULTS.md):
//   * each touched line of p and g is prefetched once (duplicates within a block dropped), into
//     L2 (prefetcht1), 128 entries ahead (64 and 256 are within noise of it). Into L1 (t0) it is
//     1.5-2x slower: the few L1 miss buffers fill up and lines are evicted again before use;
//   * at densities of a few percent and more, a thread advances 2 sub-ranges of its entries in
//     turn (2 independent line streams): ~5-10% faster than one at 10% density; at 1% one stream
//     is ~10% faster than two (and 3 streams are slower than 2 at both);
//   * a block of 16 entries is one vgatherdps for p, one for g, contiguous (masked) loads of
//     exp_avg/exp_avg_sq, the maths in 16 lanes and one vscatterdps: several times fewer
//     instructions per entry than the scalar gather/scatter tiles of kernels_impl.h.
// Together: ~1.5x the scalar tiles at 1% and 10% density. At 10% the step then takes about as long
// as touching the same lines with plain vector loads/stores plus streaming the compact arrays
// (what bounds it: lines with gaps between them arrive at ~80% of a dense stream's bandwidth).
// The maths is adamw_entry (adamw_math.h) written with intrinsics: the same IEEE operations in the
// same order (no reciprocal approximations, no fusion beyond adamw_entry's explicit fmas), so the
// results are bit-identical to the other variants' (tests/test_ext.py checks it).
// Index safety: the lanes of a block whose index is outside [0, numel) (one unsigned compare of
// the 16 indices) are dropped from the lane mask of every gather, load, store and scatter, and
// recorded on a cold path (kernels_impl.h, BadLog).

// GCC 12 warns about the intrinsics' own undefined-register idiom (_mm512_undefined_ps).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#ifndef FASTMASK_LINE_PREFETCH
#define FASTMASK_LINE_PREFETCH 128
#endif

namespace avx512 {

constexpr int64_t kLinePrefetch = FASTMASK_LINE_PREFETCH;  // entries ahead whose lines go to L2
constexpr double kTwoStreamDensity = 0.03;  // at or above: two streams per thread (see above)

static inline __mmask16 lanes(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u);
}

// Walks the compact entries [k, end) of a thread's range, tensor by tensor, ahead of the step and
// prefetches each 64 B line of p that holds a selected entry, and that entry's line of g, once.
// Lines are found from absolute addresses, so a param that is a view not aligned to 64 B is
// covered too (its gradient's lines are then those of each line's first entry). Indices are not
// range-checked here: a prefetch never faults, and step_block checks every index it uses.
class LinePrefetcher {
 public:
  LinePrefetcher(const StepArgs& a, int64_t t, int64_t k, int64_t end) : a_(a), t_(t), k_(k), end_(end) {}

  // Prefetch up to (and excluding) compact position `target`.
  inline void run_to(int64_t target) {
    if (target > end_) target = end_;
    while (k_ < target) {
      while (k_ >= a_.tensors[t_].k_end) {
        ++t_;
        last_ = -1;
      }
      const StepTensor& ten = a_.tensors[t_];
      int64_t n = target - k_;
      if (n > 16) n = 16;
      if (n > ten.k_end - k_) n = ten.k_end - k_;
      block(static_cast<const float*>(ten.param), static_cast<const float*>(ten.grad), a_.idx + k_, n);
      k_ += n;
    }
  }

 private:
  inline void block(const float* P, const float* G, const int32_t* ix, int64_t n) {
    const __mmask16 m = lanes(n);
    const int32_t phase = static_cast<int32_t>((reinterpret_cast<uintptr_t>(P) >> 2) & 15);  // fp32 in its line
    const __m512i q = _mm512_maskz_loadu_epi32(m, ix);
    const __m512i line = _mm512_srli_epi32(_mm512_add_epi32(q, _mm512_set1_epi32(phase)), 4);  // unsigned: no overflow
    const __m512i prev = _mm512_alignr_epi32(line, _mm512_set1_epi32(last_), 15);
    const __mmask16 fresh = _mm512_mask_cmpneq_epi32_mask(m, line, prev);
    last_ = static_cast<int32_t>((static_cast<uint32_t>(ix[n - 1]) + static_cast<uint32_t>(phase)) >> 4);
    alignas(64) int32_t first[16];  // the first entry of each new line
    _mm512_store_si512(first, _mm512_maskz_compress_epi32(fresh, q));
    const int count = __builtin_popcount(static_cast<unsigned>(fresh));
    for (int u = 0; u < count; ++u) {
      _mm_prefetch(reinterpret_cast<const char*>(P + first[u]), _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(G + first[u]), _MM_HINT_T1);
    }
  }

  const StepArgs& a_;
  int64_t t_;
  int64_t k_;
  int64_t end_;
  int32_t last_ = -1;
};

// torch.maximum with NaN propagation (maximum_torch), a = running max, b = new value.
static inline __m512 maximum_torch_v(__m512 a, __m512 b) {
  __m512 r = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_GT_OQ), b, a);  // a > b ? a : b
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q), r, a);   // a NaN -> a
}

// The call's constants, broadcast once.
struct VecConsts {
  __m512 w, beta2, one_minus_beta2, eps, scale;
  bool lerp_from_start, has_scale, maximize;
  explicit VecConsts(const StepArgs& a) {
    const AdamwConsts& c = a.consts;
    lerp_from_start = c.one_minus_beta1 < 0.5f && c.one_minus_beta1 > -0.5f;
    w = _mm512_set1_ps(lerp_from_start ? c.one_minus_beta1 : c.one_minus_beta1 - 1.0f);
    beta2 = _mm512_set1_ps(c.beta2);
    one_minus_beta2 = _mm512_set1_ps(c.one_minus_beta2);
    eps = _mm512_set1_ps(c.eps);
    scale = _mm512_set1_ps(a.grad_scale);
    has_scale = a.has_grad_scale;
    maximize = a.maximize;
  }
};

// Lanes `bad` of a block (cold): record their indices.
__attribute__((noinline, cold)) static void note_bad_lanes(BadLog& log, const StepArgs& a, int64_t ti, int64_t j,
                                                           __m512i q, int64_t n) {
  alignas(64) int32_t vals[16];
  _mm512_store_si512(vals, q);
  note_bad(log, a, ti, j, vals, n);
}

// One block: compact entries [j, j + n) of tensor ti (m16 = lanes(n)). Lanes whose index is
// outside [0, numel) take no part: m16 becomes the in-range lanes.
template <bool AMSGRAD>
static inline void step_block(const StepArgs& a, int64_t ti, int64_t j, int64_t n, const VecConsts& k, BadLog& log) {
  const StepTensor& t = a.tensors[ti];
  float* P = static_cast<float*>(t.param);
  const float* G = static_cast<const float*>(t.grad);
  const __mmask16 all = lanes(n);
  const __m512i q = _mm512_maskz_loadu_epi32(all, a.idx + j);
  // unsigned compare: a negative index is huge; numel <= INT32_MAX (checked by the op)
  const __mmask16 m16 = _mm512_mask_cmplt_epu32_mask(all, q, _mm512_set1_epi32(static_cast<int32_t>(t.numel)));
  if (__builtin_expect(m16 != all, 0)) note_bad_lanes(log, a, ti, j, q, n);
  __m512 p = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m16, q, P, 4);
  __m512 g = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m16, q, G, 4);
  const __m512 m = _mm512_maskz_loadu_ps(m16, a.exp_avg + j);
  const __m512 v = _mm512_maskz_loadu_ps(m16, a.exp_avg_sq + j);
  if (k.has_scale) g = _mm512_div_ps(g, k.scale);
  if (k.maximize) g = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(g), _mm512_set1_epi32(INT32_MIN)));
  // adamw_entry, operation by operation
  p = _mm512_mul_ps(p, _mm512_set1_ps(t.s.decay));
  const __m512 m_new = _mm512_fmadd_ps(k.w, _mm512_sub_ps(g, m), k.lerp_from_start ? m : g);
  const __m512 v_new = _mm512_fmadd_ps(_mm512_mul_ps(k.one_minus_beta2, g), g, _mm512_mul_ps(v, k.beta2));
  _mm512_mask_storeu_ps(a.exp_avg + j, m16, m_new);
  _mm512_mask_storeu_ps(a.exp_avg_sq + j, m16, v_new);
  __m512 v_use = v_new;
  if (AMSGRAD) {
    v_use = maximum_torch_v(_mm512_maskz_loadu_ps(m16, a.max_exp_avg_sq + j), v_new);
    _mm512_mask_storeu_ps(a.max_exp_avg_sq + j, m16, v_use);
  }
  const __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(v_use), _mm512_set1_ps(t.s.bc2_sqrt)), k.eps);
  const __m512 upd = _mm512_div_ps(_mm512_mul_ps(_mm512_set1_ps(t.s.neg_step_size), m_new), denom);
  _mm512_mask_i32scatter_ps(P, m16, q, _mm512_add_ps(p, upd), 4);
}

// A position in the compact entries, walking [k, end) tensor by tensor, with its prefetcher.
struct Stream {
  int64_t t, k, end;
  LinePrefetcher pf;
  Stream(const StepArgs& a, int64_t t0, int64_t k0, int64_t end_) : t(t0), k(k0), end(end_), pf(a, t0, k0, end_) {
    skip_finished(a);
  }
  bool done() const { return k >= end; }
  void skip_finished(const StepArgs& a) {
    while (k < end && k >= a.tensors[t].k_end) ++t;
  }
  // One block of up to 16 entries, not crossing a tensor's end.
  template <bool AMSGRAD>
  inline void step(const StepArgs& a, const VecConsts& c, BadLog& log) {
    const StepTensor& ten = a.tensors[t];
    const int64_t stop = ten.k_end < end ? ten.k_end : end;
    const int64_t n = stop - k < 16 ? stop - k : 16;
    pf.run_to(k + n + kLinePrefetch);
    step_block<AMSGRAD>(a, t, k, n, c, log);
    k += n;
    skip_finished(a);
  }
};

static inline bool use_two_streams(const StepArgs& a) {
  int64_t numel = 0;
  for (int64_t t = 0; t < a.num_tensors; ++t) numel += a.tensors[t].numel;
  const int64_t k_total = a.tensors[a.num_tensors - 1].k_end;
  return static_cast<double>(k_total) >= kTwoStreamDensity * static_cast<double>(numel);
}

// Entries [lo, hi) (t0: the tensor holding entry lo) as S streams over consecutive sub-ranges,
// advanced a block each in turn (more independent streams of lines in flight per core).
template <bool AMSGRAD, int S>
static void step_streams(const StepArgs& a, int64_t t0, int64_t lo, int64_t hi, BadLog& log) {
  const VecConsts c(a);
  alignas(Stream) unsigned char storage[S * sizeof(Stream)];
  Stream* st = reinterpret_cast<Stream*>(storage);
  int64_t t = t0;
  for (int s = 0; s < S; ++s) {
    const int64_t b = lo + (hi - lo) * s / S, e = lo + (hi - lo) * (s + 1) / S;
    while (t + 1 < a.num_tensors && a.tensors[t].k_end <= b) ++t;
    new (&st[s]) Stream(a, t, b, e);
  }
  for (bool busy = true; busy;) {
    busy = false;
    for (int s = 0; s < S; ++s) {
      if (st[s].done()) continue;
      st[s].template step<AMSGRAD>(a, c, log);
      busy = true;
    }
  }
}

}  // namespace avx512

#pragma GCC diagnostic pop
