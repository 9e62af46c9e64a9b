// Per-row absmax int8 quantization on the CPU, bit-exact to the reference: the scale
// and the quantized values are computed with the same float32 operations
// (absmax / 127, 127 / absmax, x * that, round half to even, clamp).
#include "cpu_kernels.h"
#include "vec_io.h"

#include <cmath>

namespace llmkit_ext::cpu {

namespace {

// NaN-propagating max |x| of a row (at::vec::maximum propagates NaN).
template <typename T>
float row_absmax(const T* xr, int64_t cols) {
  FVec m0(0.f), m1(0.f);
  int64_t c = 0;
  for (; c + kStep <= cols; c += kStep) {
    FVec a, b;
    load2(xr + c, a, b);
    m0 = at::vec::maximum(m0, a.abs());
    m1 = at::vec::maximum(m1, b.abs());
  }
  float m = hmax_nonneg(at::vec::maximum(m0, m1));
  for (; c < cols; ++c) {
    const float v = std::fabs(static_cast<float>(xr[c]));
    if (std::isnan(v) || std::isnan(m)) {
      m = NAN;
    } else if (v > m) {
      m = v;
    }
  }
  return m;
}

inline int8_t quantize_one(float v) {
  if (std::isnan(v)) return 0;
  const float r = std::nearbyint(v);  // round half to even (default rounding mode)
  return static_cast<int8_t>(std::fmin(std::fmax(r, -127.f), 127.f));
}

}  // namespace

template <typename T>
void quantize_rows(const T* x, int8_t* q, float* scale, int64_t rows, int64_t cols) {
  at::parallel_for(0, rows, row_grain(cols), [&](int64_t r0, int64_t r1) {
    alignas(64) float tmp[kStep];
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * cols;
      int8_t* qr = q + r * cols;
      const float absmax = row_absmax<T>(xr, cols);
      scale[r] = absmax / 127.f;
      const float inv = (absmax > 0.f && std::isfinite(absmax)) ? 127.f / absmax : 0.f;
      const FVec vinv(inv), lo(-127.f), hi(127.f), zero(0.f);
      int64_t c = 0;
      for (; c + kStep <= cols; c += kStep) {
        FVec a, b;
        load2(xr + c, a, b);
        a = a * vinv;
        b = b * vinv;
        // round (half to even), clamp, NaN -> 0 (NaN from a NaN x or from 0 * inf)
        const FVec nan_a = a.isnan(), nan_b = b.isnan();
        a = FVec::blendv(at::vec::clamp(a.round(), lo, hi), zero, nan_a);
        b = FVec::blendv(at::vec::clamp(b.round(), lo, hi), zero, nan_b);
        a.store(tmp);
        b.store(tmp + FVec::size());
        for (int64_t i = 0; i < kStep; ++i) qr[c + i] = static_cast<int8_t>(tmp[i]);
      }
      for (; c < cols; ++c) qr[c] = quantize_one(static_cast<float>(xr[c]) * inv);
    }
  });
}

template void quantize_rows<float>(const float*, int8_t*, float*, int64_t, int64_t);
template void quantize_rows<c10::Half>(const c10::Half*, int8_t*, float*, int64_t, int64_t);
template void quantize_rows<c10::BFloat16>(const c10::BFloat16*, int8_t*, float*, int64_t,
                                           int64_t);

}  // namespace llmkit_ext::cpu
