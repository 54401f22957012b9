// What bounds the masked step on a CPU: memory probes over the ViT-B/16 c_fc set (40.9 M fp32).
//
// Not a benchmark of fastmask (that is bench/test_masked_step.py); a diagnostic that times, on the
// same arrays and in shuffled order, the memory work a masked step cannot avoid:
//   dense_rmw    p = p * a + g * b over every element       (12 B/elem: the mask multiply's bytes)
//   dense_adamw  AdamW over every element, p, g, m, v        (28 B/elem: fused AdamW's bytes)
//   lines        for each 64 B line holding a selected entry: load the p and g lines, store the p
//                line (L2 prefetch 64 lines ahead, 2 streams per thread), nothing else
//   compact      read idx, read and write exp_avg, exp_avg_sq (20 B per selected entry)
// "lines" + "compact" is the floor of the masked step's memory traffic (DESIGN.md section 5);
// comparing it with dense_rmw shows how much slower lines with gaps between them arrive than a
// dense stream on this machine.
//
// Build and run (x86-64 with AVX-512; OMP_NUM_THREADS = the cores torch uses):
//   g++ -O3 -mavx512f -mfma -fopenmp bench/probes/line_floor.cpp -o /tmp/line_floor
//   OMP_NUM_THREADS=2 /tmp/line_floor 0.1        # density of the random masks (default 0.1)
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12: _mm512_undefined_ps in intrinsics

namespace {

float* make(size_t n, float value) {
  float* p = static_cast<float*>(std::aligned_alloc(64, (n * sizeof(float) + 63) / 64 * 64));
#pragma omp parallel for
  for (size_t i = 0; i < n; ++i) p[i] = value + 1e-3f * static_cast<float>(i % 977);
  return p;
}

struct Problem {
  int64_t n = 0;
  float *p, *g, *m, *v;                 // dense
  std::vector<int32_t> idx, lines;      // selected entries, lines holding them (one flat tensor)
  float *cm, *cv;                       // compact state
};

void dense_rmw(Problem& d) {
  float* __restrict__ p = d.p;
  const float* __restrict__ g = d.g;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < d.n; ++i) p[i] = p[i] * 0.9999f + g[i] * 1e-6f;
}

void dense_adamw(Problem& d) {
  float* __restrict__ p = d.p;
  const float* __restrict__ g = d.g;
  float* __restrict__ m = d.m;
  float* __restrict__ v = d.v;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < d.n; i += 16) {
    __m512 gi = _mm512_loadu_ps(g + i), mi = _mm512_loadu_ps(m + i), vi = _mm512_loadu_ps(v + i);
    mi = _mm512_fmadd_ps(_mm512_set1_ps(0.1f), _mm512_sub_ps(gi, mi), mi);
    vi = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(0.001f), gi), gi, _mm512_mul_ps(vi, _mm512_set1_ps(0.999f)));
    const __m512 den = _mm512_add_ps(_mm512_sqrt_ps(vi), _mm512_set1_ps(1e-8f));
    const __m512 pi = _mm512_add_ps(_mm512_mul_ps(_mm512_loadu_ps(p + i), _mm512_set1_ps(0.9999f)),
                                    _mm512_div_ps(_mm512_mul_ps(_mm512_set1_ps(-1e-3f), mi), den));
    _mm512_storeu_ps(p + i, pi);
    _mm512_storeu_ps(m + i, mi);
    _mm512_storeu_ps(v + i, vi);
  }
}

void lines(Problem& d) {
  constexpr int64_t kAhead = 64;
  const int64_t total = static_cast<int64_t>(d.lines.size());
#pragma omp parallel
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t lo = total * t / nt, hi = total * (t + 1) / nt;
    int64_t pos[2] = {lo, lo + (hi - lo) / 2}, end[2] = {lo + (hi - lo) / 2, hi};
    for (bool busy = true; busy;) {
      busy = false;
      for (int s = 0; s < 2; ++s) {
        for (int u = 0; u < 4 && pos[s] < end[s]; ++u, ++pos[s]) {
          busy = true;
          const int64_t i = pos[s];
          if (i + kAhead < end[s]) {
            const int64_t f = static_cast<int64_t>(d.lines[i + kAhead]) * 16;
            _mm_prefetch(reinterpret_cast<const char*>(d.p + f), _MM_HINT_T1);
            _mm_prefetch(reinterpret_cast<const char*>(d.g + f), _MM_HINT_T1);
          }
          const int64_t e = static_cast<int64_t>(d.lines[i]) * 16;
          const __m512 x = _mm512_load_ps(d.p + e), y = _mm512_load_ps(d.g + e);
          _mm512_store_ps(d.p + e, _mm512_fmadd_ps(y, _mm512_set1_ps(1e-6f), x));
        }
      }
    }
  }
}

void compact(Problem& d) {
  const int64_t k = static_cast<int64_t>(d.idx.size());
  const int32_t* __restrict__ ix = d.idx.data();
  float* __restrict__ m = d.cm;
  float* __restrict__ v = d.cv;
#pragma omp parallel for schedule(static)
  for (int64_t j = 0; j < k; ++j) {
    const float q = static_cast<float>(ix[j]) * 1e-9f;
    m[j] = m[j] * 0.9f + q;
    v[j] = v[j] * 0.999f + q;
  }
}

}  // namespace

int main(int argc, char** argv) {
  const double density = argc > 1 ? std::atof(argv[1]) : 0.1;
  Problem d;
  d.n = 12LL * 3072 * 768 + 12LL * 2048 * 512;  // ViT-B/16 c_fc weights, 16-aligned
  d.p = make(d.n, 0.5f);
  d.g = make(d.n, 0.25f);
  d.m = make(d.n, 0.1f);
  d.v = make(d.n, 0.01f);
  std::mt19937_64 rng(0);
  std::bernoulli_distribution pick(density);
  for (int64_t i = 0; i < d.n; ++i) {
    if (!pick(rng)) continue;
    d.idx.push_back(static_cast<int32_t>(i));
    if (d.lines.empty() || d.lines.back() != static_cast<int32_t>(i / 16)) d.lines.push_back(static_cast<int32_t>(i / 16));
  }
  d.cm = make(d.idx.size(), 0.1f);
  d.cv = make(d.idx.size(), 0.01f);
  const double lines_mb = static_cast<double>(d.lines.size()) * 64 * 3 / 1e6;
  struct Probe { const char* name; void (*fn)(Problem&); double mb; };
  std::vector<Probe> probes = {
      {"dense_rmw", dense_rmw, d.n * 12 / 1e6},
      {"dense_adamw", dense_adamw, d.n * 28 / 1e6},
      {"lines", lines, lines_mb},
      {"compact", compact, d.idx.size() * 20 / 1e6},
  };
  std::printf("N=%lld selected=%zu (%.3f) lines touched=%zu of %lld (%.0f%%), threads=%d\n",
              static_cast<long long>(d.n), d.idx.size(), density, d.lines.size(), static_cast<long long>(d.n / 16),
              100.0 * d.lines.size() / (d.n / 16), omp_get_max_threads());
  std::vector<std::vector<double>> times(probes.size());
  std::vector<size_t> order(probes.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::mt19937 shuffle_rng(1);
  for (int round = 0; round < 40; ++round) {
    std::shuffle(order.begin(), order.end(), shuffle_rng);
    for (size_t i : order) {
      const auto t0 = std::chrono::steady_clock::now();
      probes[i].fn(d);
      times[i].push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
  }
  for (size_t i = 0; i < probes.size(); ++i) {
    std::sort(times[i].begin(), times[i].end());
    const double med = times[i][times[i].size() / 2];
    std::printf("%-12s %8.2f ms  %8.1f MB  %6.1f GB/s\n", probes[i].name, med * 1e3, probes[i].mb, probes[i].mb / 1e3 / med);
  }
  return 0;
}
