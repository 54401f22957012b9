// CPU kernels compiled for the "default" instruction-set variant (see kernels_impl.h).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "kernels.h"



namespace fastmask {
namespace cpu {
namespace isa_default {
#include "kernels_impl.h"
}  // namespace isa_default
}  // namespace cpu
}  // namespace fastmask

