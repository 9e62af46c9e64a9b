// Fused bias + GELU (exact erf form or tanh form), forward and backward, on the CPU.
// The bias add happens in float32 and the sum is never rounded or written.
#include "cpu_kernels.h"
#include "vec_io.h"

#include <cmath>
#include <vector>

namespace llmkit_ext::cpu {

namespace {

constexpr float kSqrtHalf = 0.70710678118654752440f;   // 1 / sqrt(2)
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;  // 1 / sqrt(2 pi)
constexpr float kTanhBeta = 0.79788456080286535588f;    // sqrt(2 / pi)
constexpr float kTanhKappa = 0.044715f;

inline FVec gelu_vec(const FVec& x, bool tanh_approx) {
  const FVec half(0.5f), one(1.f);
  if (tanh_approx) {
    const FVec inner = FVec(kTanhBeta) * (x + FVec(kTanhKappa) * x * x * x);
    return half * x * (one + inner.tanh());
  }
  return half * x * (one + (x * FVec(kSqrtHalf)).erf());
}

inline float gelu_scalar(float x, bool tanh_approx) {
  if (tanh_approx) {
    const float inner = kTanhBeta * (x + kTanhKappa * x * x * x);
    return 0.5f * x * (1.f + std::tanh(inner));
  }
  return 0.5f * x * (1.f + std::erf(x * kSqrtHalf));
}

// d gelu(x) / dx
inline FVec gelu_grad_vec(const FVec& x, bool tanh_approx) {
  const FVec half(0.5f), one(1.f);
  if (tanh_approx) {
    const FVec x2 = x * x;
    const FVec t = (FVec(kTanhBeta) * (x + FVec(kTanhKappa) * x2 * x)).tanh();
    const FVec dinner = FVec(kTanhBeta) * (one + FVec(3.f * kTanhKappa) * x2);
    return half * (one + t) + half * x * (one - t * t) * dinner;
  }
  const FVec cdf = half * (one + (x * FVec(kSqrtHalf)).erf());
  const FVec pdf = (FVec(-0.5f) * x * x).exp() * FVec(kInvSqrt2Pi);
  return cdf + x * pdf;
}

inline float gelu_grad_scalar(float x, bool tanh_approx) {
  if (tanh_approx) {
    const float x2 = x * x;
    const float t = std::tanh(kTanhBeta * (x + kTanhKappa * x2 * x));
    const float dinner = kTanhBeta * (1.f + 3.f * kTanhKappa * x2);
    return 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * dinner;
  }
  const float cdf = 0.5f * (1.f + std::erf(x * kSqrtHalf));
  const float pdf = std::exp(-0.5f * x * x) * kInvSqrt2Pi;
  return cdf + x * pdf;
}

// out[0, n) = gelu(x + bias), bias indexed like x (nullptr: no bias)
template <typename T>
void gelu_span(const T* x, const float* bias, T* out, int64_t n, bool tanh_approx) {
  int64_t c = 0;
  for (; c + kStep <= n; c += kStep) {
    FVec a, b;
    load2(x + c, a, b);
    if (bias != nullptr) {
      FVec ba, bb;
      load2f(bias + c, ba, bb);
      a = a + ba;
      b = b + bb;
    }
    store2(out + c, gelu_vec(a, tanh_approx), gelu_vec(b, tanh_approx));
  }
  for (; c < n; ++c) {
    const float v = static_cast<float>(x[c]) + (bias != nullptr ? bias[c] : 0.f);
    out[c] = static_cast<T>(gelu_scalar(v, tanh_approx));
  }
}

// dx[0, n) = dy * gelu'(x + bias); when acc != nullptr, acc += the float32 dx.
template <typename T>
void gelu_grad_span(const T* dy, const T* x, const float* bias, T* dx, float* acc, int64_t n,
                    bool tanh_approx) {
  int64_t c = 0;
  for (; c + kStep <= n; c += kStep) {
    FVec a, b, da, db;
    load2(x + c, a, b);
    load2(dy + c, da, db);
    if (bias != nullptr) {
      FVec ba, bb;
      load2f(bias + c, ba, bb);
      a = a + ba;
      b = b + bb;
    }
    a = da * gelu_grad_vec(a, tanh_approx);
    b = db * gelu_grad_vec(b, tanh_approx);
    store2(dx + c, a, b);
    if (acc != nullptr) {
      FVec pa, pb;
      load2f(acc + c, pa, pb);
      (pa + a).store(acc + c);
      (pb + b).store(acc + c + FVec::size());
    }
  }
  for (; c < n; ++c) {
    const float v = static_cast<float>(x[c]) + (bias != nullptr ? bias[c] : 0.f);
    const float d = static_cast<float>(dy[c]) * gelu_grad_scalar(v, tanh_approx);
    dx[c] = static_cast<T>(d);
    if (acc != nullptr) acc[c] += d;
  }
}

constexpr int64_t kFlatGrain = 32768;

}  // namespace

template <typename T>
void bias_gelu_forward(const T* x, const float* bias, T* out, int64_t rows, int64_t cols,
                       bool tanh_approx) {
  if (bias == nullptr) {  // elementwise: split the flat range, whatever the row length
    at::parallel_for(0, rows * cols, kFlatGrain, [&](int64_t i0, int64_t i1) {
      gelu_span<T>(x + i0, nullptr, out + i0, i1 - i0, tanh_approx);
    });
    return;
  }
  at::parallel_for(0, rows, row_grain(cols), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      gelu_span<T>(x + r * cols, bias, out + r * cols, cols, tanh_approx);
  });
}

template <typename T>
void bias_gelu_backward(const T* dy, const T* x, const float* bias, T* dx, float* dbias,
                        int64_t rows, int64_t cols, bool tanh_approx) {
  if (bias == nullptr && dbias == nullptr) {
    at::parallel_for(0, rows * cols, kFlatGrain, [&](int64_t i0, int64_t i1) {
      gelu_grad_span<T>(dy + i0, x + i0, nullptr, dx + i0, nullptr, i1 - i0, tanh_approx);
    });
    return;
  }
  const int64_t chunks = row_chunks(rows, cols);
  std::vector<float> partial(dbias != nullptr ? static_cast<size_t>(chunks * cols) : 0, 0.f);
  at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      float* acc = dbias != nullptr ? partial.data() + k * cols : nullptr;
      for (int64_t r = rows * k / chunks; r < rows * (k + 1) / chunks; ++r)
        gelu_grad_span<T>(dy + r * cols, x + r * cols, bias, dx + r * cols, acc, cols,
                          tanh_approx);
    }
  });
  if (dbias != nullptr) sum_partials(partial, chunks, cols, dbias);
}

#define LLMKIT_INSTANTIATE_GELU(T)                                                        \
  template void bias_gelu_forward<T>(const T*, const float*, T*, int64_t, int64_t, bool); \
  template void bias_gelu_backward<T>(const T*, const T*, const float*, T*, float*,       \
                                      int64_t, int64_t, bool);
LLMKIT_INSTANTIATE_GELU(float)
LLMKIT_INSTANTIATE_GELU(c10::Half)
LLMKIT_INSTANTIATE_GELU(c10::BFloat16)
#undef LLMKIT_INSTANTIATE_GELU

}  // namespace llmkit_ext::cpu
