// Row statistics of LayerNorm / RMSNorm that float32 sums get wrong, shared by the CPU
// (csrc/cpu/layer_norm.cpp) and CUDA (csrc/cuda/layer_norm.cu) kernels.
//
// - A constant row must have variance exactly 0: the sum that gives the mean is taken
//   over x - x[0] (a shift by the row's first value), so the mean of a constant row is
//   x[0] itself and every deviation is 0 (a plain float32 sum of 768 x 10000.37 rounds,
//   and its deviations, about 1e-3, would be normalized to +-0.7).
// - Squares overflow float32 above 1.8e19 and underflow below 1e-19: such rows (a
//   non-finite sum from finite input, or variance + eps under kNormMinFastVar) are
//   computed again on x * 2^-p, with p from the row's largest magnitude, and the
//   statistics scaled back (mean * 2^p, rstd * 2^-p; powers of two, exact). Only those
//   rare rows pay for the extra passes.
#pragma once

#include <math.h>

#include "host_device.h"

namespace llmkit_ext {

// Variance + eps below which the float32 squares of the deviations may have lost bits
// to underflow (deviations near 1e-19, squares near float32's smallest normal number).
constexpr float kNormMinFastVar = 7.8886090522101181e-31f;  // 2^-100

// True when statistics from plain float32 sums (sum of the shifted row, sum of squared
// deviations, their variance) may be wrong although the row itself may be finite: the
// row is then computed again, scaled (a row holding inf / NaN is left as it is).
LLMKIT_HD bool norm_needs_rescale(float shifted_sum, float ssd, float var, float eps) {
  return !(isfinite(shifted_sum) && isfinite(ssd)) || !(var + eps >= kNormMinFastVar);
}

// p with amax * 2^-p in [1, 2): the row scaled by 2^-p has squares far from float32's
// limits. Clamped to [-126, 126] so that 2^-p and 2^p are normal float32 numbers (then
// amax * 2^-p is below 4, and a row of subnormal numbers still scales to at least
// 2^-23). amax must be finite and > 0.
LLMKIT_HD int norm_scale_exponent(float amax) {
  int e = 0;
  frexpf(amax, &e);  // amax = m * 2^e, m in [0.5, 1)
  const int p = e - 1;
  return p < -126 ? -126 : (p > 126 ? 126 : p);
}

// 2^p as a float32, for p in [-126, 127].
LLMKIT_HD float norm_pow2(int p) { return ldexpf(1.f, p); }

}  // namespace llmkit_ext
