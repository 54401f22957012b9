// Picks the best compiled instruction-set variant of the CPU kernels once, at first use.
#include <cstdlib>
#include <cstring>

#include "kernels.h"

namespace fastmask {
namespace cpu {
namespace {

enum class Isa { kDefault, kAvx2, kAvx512 };

Isa detect() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  // FASTMASK_CPU_ISA=default|avx2 caps the variant (tests run every variant; also a workaround
  // should a variant misbehave somewhere). A variant the CPU lacks is never chosen.
  const char* cap = std::getenv("FASTMASK_CPU_ISA");
  if (cap != nullptr && std::strcmp(cap, "default") == 0) return Isa::kDefault;
  const bool cap_avx2 = cap != nullptr && std::strcmp(cap, "avx2") == 0;
  if (!cap_avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kDefault;
}

Isa isa() {
  static const Isa chosen = detect();
  return chosen;
}

}  // namespace

void masked_adamw_step(const StepArgs& args) {
  switch (isa()) {
#if defined(__x86_64__) && defined(__GNUC__)
    case Isa::kAvx512: return isa_avx512::masked_adamw_step(args);
    case Isa::kAvx2: return isa_avx2::masked_adamw_step(args);
#endif
    default: return isa_default::masked_adamw_step(args);
  }
}

void score_accumulate(const ScoreTensor* tensors, int64_t n, ScoreMode mode, int num_threads) {
  switch (isa()) {
#if defined(__x86_64__) && defined(__GNUC__)
    case Isa::kAvx512: return isa_avx512::score_accumulate(tensors, n, mode, num_threads);
    case Isa::kAvx2: return isa_avx2::score_accumulate(tensors, n, mode, num_threads);
#endif
    default: return isa_default::score_accumulate(tensors, n, mode, num_threads);
  }
}

const char* isa_name() {
  switch (isa()) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "default";
  }
}

}  // namespace cpu
}  // namespace fastmask
