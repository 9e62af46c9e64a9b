// Inline float32 vector math of the CPU kernels: exp, and the GELU forms built on it.
//
// ATen's Vectorized<float>::exp / erf / tanh call SLEEF through the library (a function
// call per vector, not inlined), which made the fused GELU slower than F.gelu (oneDNN's
// JIT kernel). These are inline and FMA-based:
//   exp:  e^x = 2^n * e^r, n = round(x / ln 2), r = x - n ln 2 (Cody-Waite split of ln 2),
//         e^r from its Taylor polynomial (|r| <= ln2/2; degree 7: truncation < 6e-9
//         relative, ~1-2 ulp with the rounding of Horner's scheme).
//   1/v:  the reciprocal estimate instruction and one Newton step instead of a division.
//   erfc: the Abramowitz & Stegun 7.1.26 form (the one ATen's Vectorized::erf uses,
//         absolute error < 1.5e-7), returned as erfc(|z|) so that Phi(x) for negative
//         x is formed without the cancellation of 1 + erf(z).
//   GELU tanh form: 0.5 x (1 + tanh(u)) == x * sigmoid(2u) == x / (1 + e^(-2u)), one exp
//         and one division, no cancellation.
#pragma once

#include "vec_io.h"

namespace llmkit_ext::cpu {

using IVec = at::vec::Vectorized<int32_t>;

// 1 / v: the ISA's reciprocal estimate (AVX512 rcp14: 2^-14 relative; AVX2 rcpps:
// 1.5 * 2^-12), refined by one Newton step when kRefine (then ~1 ulp); a division on
// other ISAs. v must be finite and nonzero (callers pass 1 + something non-negative
// and bounded).
template <bool kRefine>
inline FVec recip_vec(const FVec& v) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#if defined(CPU_CAPABILITY_AVX512)
  const FVec r0(_mm512_rcp14_ps(v));
#else
  const FVec r0(_mm256_rcp_ps(v));
#endif
  if constexpr (!kRefine) return r0;
  return at::vec::fmadd(r0, at::vec::fnmadd(v, r0, FVec(1.f)), r0);  // r0 (2 - v r0)
#else
  return FVec(1.f) / v;
#endif
}

// where(x < threshold, if_less, otherwise), one compare and one blend on AVX2 / AVX512
// (Vectorized's comparison + blendv round-trips the mask through a vector on AVX512).
inline FVec select_less(const FVec& x, const FVec& threshold, const FVec& if_less,
                        const FVec& otherwise) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, threshold, _CMP_LT_OQ), otherwise, if_less);
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_blendv_ps(otherwise, if_less, _mm256_cmp_ps(x, threshold, _CMP_LT_OQ));
#else
  return FVec::blendv(otherwise, if_less, x < threshold);
#endif
}

// e^x, float32 lanes, Taylor degree kDegree for e^r (7: ~1-2 ulp for float32 results;
// 5: relative error < 3e-6, for float16 results; 4: < 5e-5, for bfloat16 results whose
// own rounding is 2^-9 relative).
// NaN in, NaN out; e^x below the smallest float32 gives 0; x > 88.3 gives e^88.3
// (~2.2e38, finite: callers only form ratios like 1 / (1 + e^x) from it).
// kNonPositive: the caller guarantees x <= 0 (or NaN), the upper clamp is skipped.
template <int kDegree, bool kNonPositive = false>
inline FVec exp_vec(const FVec& x) {
  static_assert(kDegree >= 4 && kDegree <= 7);
#if defined(CPU_CAPABILITY_AVX512)
  const FVec lo(-104.f);  // scalef rounds 2^n * p to 0 / subnormals itself
#else
  const FVec lo(-87.3f);  // 2^n built in the exponent field: n >= -126
#endif
  // clamp_min / clamp_max keep a NaN x (it is their second operand)
  FVec xc = at::vec::clamp_min(x, lo);
  if constexpr (!kNonPositive) xc = at::vec::clamp_max(xc, FVec(88.3f));
  const FVec n = (xc * FVec(1.44269504088896341f)).round();
  FVec r = at::vec::fmadd(n, FVec(-0.693359375f), xc);  // ln2 high part: n * it is exact
  r = at::vec::fmadd(n, FVec(2.12194440e-4f), r);        // ln2 = 0.693359375 - 2.12194440e-4
  constexpr float kInvFactorial[8] = {1.f, 1.f, 1.f / 2, 1.f / 6, 1.f / 24, 1.f / 120, 1.f / 720, 1.f / 5040};
  FVec p(kInvFactorial[kDegree]);  // Horner: sum of r^k / k!, k <= kDegree
  for (int k = kDegree - 1; k >= 0; --k) p = at::vec::fmadd(p, r, FVec(kInvFactorial[k]));
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_scalef_ps(p, n);  // p * 2^n
#else
  const IVec e = (at::vec::convert_to_int_of_same_size(n) + IVec(127)) << IVec(23);
  // below the range: 0 (a NaN x compares false and keeps the NaN product)
  return select_less(x, lo, FVec(0.f), p * at::vec::cast<float>(e));
#endif
}

// How much accuracy the float32 math of an element type T needs: float32 results get
// the full-accuracy exp and reciprocal, float16 (2^-11 relative rounding) a shorter exp,
// bfloat16 (2^-8) a shorter one still and the unrefined reciprocal estimate (its 2^-14
// error on AVX512, 1.5 * 2^-12 on AVX2, is well under bfloat16's rounding).
template <typename T>
struct MathFor {
  static constexpr int kExpDegree = std::is_same_v<T, float> ? 7 : std::is_same_v<T, c10::Half> ? 5 : 4;
  static constexpr bool kRefineRecip = !std::is_same_v<T, c10::BFloat16>;
};

struct GeluParts {
  FVec cdf;  // Phi(x) = 0.5 (1 + erf(x / sqrt 2))
  FVec e;    // exp(-x^2 / 2)
};

// Phi(x) and exp(-x^2/2) (shared by the derivative's pdf term) of the exact GELU.
template <typename M>
inline GeluParts gelu_erf_parts(const FVec& x) {
  const FVec one(1.f);
  const FVec z = x * FVec(0.70710678118654752440f);  // x / sqrt(2)
  // |z| capped so that 1 + p |z| stays finite for the Newton step of recip_vec (erfc(|z|)
  // is 0 in float32 long before; a NaN stays NaN); the bare estimate gives 1/inf = 0.
  FVec az = z.abs();
  if constexpr (M::kRefineRecip) az = at::vec::clamp_max(az, FVec(1e18f));
  const FVec t = recip_vec<M::kRefineRecip>(at::vec::fmadd(FVec(0.3275911f), az, one));
  // A&S 7.1.26 coefficients, halved: hq = erfc(|z|) / 2
  FVec poly(0.5f * 1.061405429f);
  poly = at::vec::fmadd(poly, t, FVec(0.5f * -1.453152027f));
  poly = at::vec::fmadd(poly, t, FVec(0.5f * 1.421413741f));
  poly = at::vec::fmadd(poly, t, FVec(0.5f * -0.284496736f));
  poly = at::vec::fmadd(poly, t, FVec(0.5f * 0.254829592f));
  const FVec e = exp_vec<M::kExpDegree, true>(at::vec::fnmadd(z, z, FVec(0.f)));  // exp(-x^2/2)
  const FVec hq = poly * t * e;
  // x >= 0: Phi = 1 - erfc/2; x < 0: Phi = erfc/2 (NaN x stays NaN through hq)
  return {select_less(x, FVec(0.f), hq, one - hq), e};
}

struct Sigmoid {
  FVec s;   // sigmoid(2u) = 1 / (1 + e^(-2u))
  FVec em;  // e^(-2u) (capped at e^88.3)
};

// sigmoid(2u) = 0.5 (1 + tanh(u)); exactly 0 where e^(-2u) overflows float32 (then
// x * s is -0 for finite x and NaN for x = -inf, as the float64 formula gives).
template <typename M>
inline Sigmoid sigmoid_2u(const FVec& u) {
  const FVec m2u = FVec(-2.f) * u;
  const FVec em = exp_vec<M::kExpDegree>(m2u);
  const FVec s = recip_vec<M::kRefineRecip>(FVec(1.f) + em);
  return {select_less(FVec(88.3f), m2u, FVec(0.f), s), em};
}

template <bool kTanh, typename M>
inline FVec gelu_vec(const FVec& x) {
  if constexpr (kTanh) {
    const FVec x2 = x * x;
    const FVec u = FVec(0.79788456080286535588f) * at::vec::fmadd(FVec(0.044715f) * x2, x, x);
    return x * sigmoid_2u<M>(u).s;
  } else {
    return x * gelu_erf_parts<M>(x).cdf;
  }
}

// d gelu(x) / dx
template <bool kTanh, typename M>
inline FVec gelu_grad_vec(const FVec& x) {
  const FVec one(1.f);
  if constexpr (kTanh) {
    // s = sigmoid(2u) = 0.5 (1 + tanh u); d/dx [x s] = s + 2 x s (1 - s) du/dx,
    // du/dx = beta (1 + 3 kappa x^2), and 1 - s = e^(-2u) s.
    // The second term is 0 in float32 beyond |x| = 20 (s (1 - s) < e^-600): x is clamped
    // there so that x du/dx cannot overflow into inf * 0; the final x * 0 gives the
    // float64 formula's NaN at x = +-inf.
    const FVec beta(0.79788456080286535588f), kappa(0.044715f);
    const FVec x2 = x * x;
    const FVec u = beta * at::vec::fmadd(kappa * x2, x, x);
    const auto [s, em] = sigmoid_2u<M>(u);
    const FVec xc = at::vec::clamp_max(at::vec::clamp_min(x, FVec(-20.f)), FVec(20.f));
    const FVec du = beta * at::vec::fmadd(FVec(3.f) * kappa, xc * xc, one);
    return at::vec::fmadd(x, FVec(0.f), at::vec::fmadd(FVec(2.f) * xc * s * (em * s), du, s));
  } else {
    const GeluParts g = gelu_erf_parts<M>(x);
    return at::vec::fmadd(x, g.e * FVec(0.39894228040143267794f), g.cdf);  // + x pdf(x)
  }
}

}  // namespace llmkit_ext::cpu
