// CPU kernels compiled for the "avx512" instruction-set variant (see kernels_impl.h).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <new>
#include <vector>

#include "kernels.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define FASTMASK_CPU_AVX512 1
#endif

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2")
namespace fastmask {
namespace cpu {
namespace isa_avx512 {
#include "kernels_impl.h"
}  // namespace isa_avx512
}  // namespace cpu
}  // namespace fastmask
#endif
