// Per-entry maths of fastmask's masked AdamW step and of score accumulation, shared by the CPU
// kernels (csrc/cpu) and the CUDA kernels (csrc/cuda). No torch headers: plain C++ that nvcc and
// any host compiler accept, so the CPU tests exercise the very arithmetic the GPU runs.
//
// Order of operations follows fastmask.reference (itself torch.optim.AdamW's single-tensor path)
// so the CPU kernel matches the reference bit for bit on fp32:
//   * per-tensor scalars are computed in double and rounded to float once
//     (step_size, sqrt(1 - beta2^step), 1 - lr * weight_decay);
//   * per entry, everything is fp32:
//       m  = lerp(m, g, 1 - beta1)        torch's lerp: fma(w, g - m, m) for |w| < 0.5,
//                                          else fma(w - 1, g - m, g)
//       v  = v * beta2 + (1 - beta2) * g * g   torch's addcmul, which torch rounds differently
//                                          per device (addcmul_torch below):
//                                          CPU  fma((1 - beta2) * g, g, v * beta2)
//                                          CUDA fma(1 - beta2, g * g, v * beta2)
//       denom = sqrt(max(v_max, v)) / bc2_sqrt + eps
//       p  = p * decay + (neg_step_size * m) / denom
// The fused multiply-adds are written out explicitly (torch's kernels use them: its vectorized CPU
// kernels, and nvcc's contraction or explicit fmas in its CUDA kernels); every other product and
// sum must stay unfused, so these sources are compiled with -ffp-contract=off (host) and
// -fmad=false (nvcc). Never build them with -ffast-math.
// The per-tensor scalars use pow/sqrt/division in double: on a GPU these are CUDA's pow
// (__nv_pow, what torch.pow runs there) and IEEE sqrt/division (nvcc's default -prec-div/-prec-sqrt;
// never build with --use_fast_math).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FM_HD __host__ __device__ __forceinline__
#else
#define FM_HD inline __attribute__((always_inline))
#endif

namespace fastmask {

// ------------------------------------------------------------------------------------------------
// scalar types and conversions (bit-level, identical on host and device)
// ------------------------------------------------------------------------------------------------
enum class ParamType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };
enum class ScoreMode : int { kGrad = 0, kAbs = 1, kFisher = 2 };

FM_HD uint32_t f32_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

FM_HD float bits_f32(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

FM_HD float bf16_to_f32(uint16_t h) { return bits_f32(static_cast<uint32_t>(h) << 16); }

// Round to nearest even, NaN -> canonical quiet NaN 0x7FC0 (as c10::BFloat16 does).
FM_HD uint16_t f32_to_bf16(float f) {
  const uint32_t u = f32_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  const uint32_t rounding = 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>((u + rounding) >> 16);
}

FM_HD float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  const uint32_t mant = h & 0x3FFu;
  if (exp == 0) {
    // zero or subnormal: mant * 2^-24, exact in fp32
    const float mag = static_cast<float>(mant) * 5.9604644775390625e-08f;
    return bits_f32(f32_bits(mag) | sign);
  }
  if (exp == 31) return bits_f32(sign | 0x7F800000u | (mant << 13));
  return bits_f32(sign | ((exp + 112u) << 23) | (mant << 13));
}

// Round to nearest even; overflow -> inf; NaN -> 0x7E00 (sign kept).
FM_HD uint16_t f32_to_f16(float f) {
  const uint32_t u = f32_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7FFFFFFFu;
  if (a >= 0x7F800000u) return sign | (a > 0x7F800000u ? 0x7E00 : 0x7C00);
  if (a >= 0x477FF000u) return sign | 0x7C00;  // >= 65520 rounds to inf
  if (a < 0x38800000u) {                       // below 2^-14: fp16 subnormal or zero
    if (a <= 0x33000000u) return sign;         // <= 2^-25 rounds to zero (tie to even)
    const uint32_t e = a >> 23;                // 102..112
    const uint32_t mant = (a & 0x7FFFFFu) | 0x800000u;
    const uint32_t shift = 126u - e;           // 14..24
    uint32_t r = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return sign | static_cast<uint16_t>(r);
  }
  const uint32_t b = a - (112u << 23);
  uint32_t r = b >> 13;
  const uint32_t rem = b & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;
  return sign | static_cast<uint16_t>(r);
}

template <ParamType PT> struct ParamTraits;
template <> struct ParamTraits<ParamType::kFloat32> {
  using storage = float;
  static FM_HD float load(float x) { return x; }
  static FM_HD float store(float x) { return x; }
};
template <> struct ParamTraits<ParamType::kBFloat16> {
  using storage = uint16_t;
  static FM_HD float load(uint16_t x) { return bf16_to_f32(x); }
  static FM_HD uint16_t store(float x) { return f32_to_bf16(x); }
};
template <> struct ParamTraits<ParamType::kFloat16> {
  using storage = uint16_t;
  static FM_HD float load(uint16_t x) { return f16_to_f32(x); }
  static FM_HD uint16_t store(float x) { return f32_to_f16(x); }
};

// ------------------------------------------------------------------------------------------------
// per-call and per-tensor scalars
// ------------------------------------------------------------------------------------------------
// Hyper-parameters rounded to fp32 the way torch rounds a Python float used with an fp32 tensor.
struct AdamwConsts {
  float one_minus_beta1;  // lerp weight
  float beta2;
  float one_minus_beta2;
  float eps;
};

FM_HD AdamwConsts make_consts(double beta1, double beta2, double eps) {
  AdamwConsts c;
  c.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  c.beta2 = static_cast<float>(beta2);
  c.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  c.eps = static_cast<float>(eps);
  return c;
}

// Per-tensor scalars: computed in double from the (already incremented) step count, rounded once.
struct TensorScalars {
  float neg_step_size;  // -lr / (1 - beta1^step)
  float bc2_sqrt;       // sqrt(1 - beta2^step)
  float decay;          // 1 - lr * weight_decay
};

FM_HD TensorScalars make_tensor_scalars(double lr, double step, double beta1, double beta2, double weight_decay) {
  TensorScalars s;
  const double bc1 = 1.0 - pow(beta1, step);
  const double bc2 = 1.0 - pow(beta2, step);
  s.neg_step_size = static_cast<float>(-lr / bc1);
  s.bc2_sqrt = static_cast<float>(sqrt(bc2));
  s.decay = static_cast<float>(1.0 - lr * weight_decay);
  return s;
}

// ------------------------------------------------------------------------------------------------
// per-entry maths
// ------------------------------------------------------------------------------------------------
FM_HD float fm_fma(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

FM_HD float fm_sqrt(float x) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(x);
#else
  return std::sqrt(x);
#endif
}

FM_HD float fm_div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

// torch.lerp(start, end, weight) with a scalar weight, as torch's kernels compute it.
FM_HD float lerp_torch(float start, float end, float weight) {
  const float diff = end - start;
  return (weight < 0.5f && weight > -0.5f) ? fm_fma(weight, diff, start) : fm_fma(weight - 1.0f, diff, end);
}

// v.addcmul_(g, g, value=w) on v = exp_avg_sq * beta2, rounded as torch's kernel for the device
// rounds it, so that the state equals the reference's (torch's own ops) bit for bit there:
//  * CPU (ATen's vectorized addcmul kernel): fma(w * g, g, v);
//  * CUDA/ROCm (ATen's pointwise_op_impl): fma(w, g * g, v), or fma(g, g, v) when w == 1.
// The two forms differ in the last bit for about 6% of the entries.
FM_HD float addcmul_torch(float v, float g, float w) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return (w == 1.0f) ? fm_fma(g, g, v) : fm_fma(w, g * g, v);
#else
  return fm_fma(w * g, g, v);
#endif
}

// torch.maximum: NaN propagates.
FM_HD float maximum_torch(float a, float b) { return (a != a) ? a : ((b != b) ? b : (a > b ? a : b)); }

// One AdamW step of one entry. p/g are already in fp32 (g unscaled and negated for maximize).
// Writes back m, v (and v_max when amsgrad) and returns the new parameter value.
template <bool AMSGRAD>
FM_HD float adamw_entry(float p, float g, float& m, float& v, float& v_max, const AdamwConsts& c,
                        const TensorScalars& s) {
  p = p * s.decay;
  const float m_new = lerp_torch(m, g, c.one_minus_beta1);
  const float v_new = addcmul_torch(v * c.beta2, g, c.one_minus_beta2);
  m = m_new;
  v = v_new;
  float v_use = v_new;
  if (AMSGRAD) {
    v_use = maximum_torch(v_max, v_new);
    v_max = v_use;
  }
  const float denom = fm_div(fm_sqrt(v_use), s.bc2_sqrt) + c.eps;
  const float upd = fm_div(s.neg_step_size * m_new, denom);
  return p + upd;
}

template <ScoreMode MODE>
FM_HD float score_stat(float g) {
  if (MODE == ScoreMode::kGrad) return g;
  if (MODE == ScoreMode::kAbs) return bits_f32(f32_bits(g) & 0x7FFFFFFFu);
  return g * g;
}

}  // namespace fastmask
