// CPU kernels compiled for the "avx2" instruction-set variant (see kernels_impl.h).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "kernels.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx2,fma,f16c,bmi,bmi2")
namespace fastmask {
namespace cpu {
namespace isa_avx2 {
#include "kernels_impl.h"
}  // namespace isa_avx2
}  // namespace cpu
}  // namespace fastmask
#endif
