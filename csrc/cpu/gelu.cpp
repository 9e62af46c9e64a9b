// Fused bias + GELU (exact erf form or tanh form), forward and backward, on the CPU.
// The bias add happens in float32 and the sum is never rounded or written.
#include "cpu_kernels.h"
#include "vec_math.h"

#include <algorithm>
#include <vector>

namespace llmkit_ext::cpu {

namespace {

// (a, b) = float32 x[0, kStep) + bias[0, kStep) (bias may be nullptr)
template <typename T>
inline void load_biased(const T* x, const float* bias, FVec& a, FVec& b) {
  load2(x, a, b);
  if (bias != nullptr) {
    FVec ba, bb;
    load2f(bias, ba, bb);
    a = a + ba;
    b = b + bb;
  }
}

// One vector step of the forward: out[0, kStep) = gelu(x + bias).
template <typename T, bool kTanh>
inline void gelu_step(const T* x, const float* bias, T* out) {
  FVec a, b;
  load_biased(x, bias, a, b);
  store2(out, gelu_vec<kTanh, MathFor<T>>(a), gelu_vec<kTanh, MathFor<T>>(b));
}

// out[0, n) = gelu(x + bias), bias indexed like x (nullptr: no bias). The tail (n not a
// multiple of kStep) goes through zero-padded buffers and the same vector code, so every
// element gets the same arithmetic.
template <typename T, bool kTanh>
void gelu_span(const T* x, const float* bias, T* out, int64_t n) {
  int64_t c = 0;
  for (; c + kStep <= n; c += kStep) gelu_step<T, kTanh>(x + c, bias ? bias + c : nullptr, out + c);
  if (c < n) {
    alignas(64) T xt[kStep] = {}, ot[kStep];
    alignas(64) float bt[kStep] = {};
    std::copy(x + c, x + n, xt);
    if (bias != nullptr) std::copy(bias + c, bias + n, bt);
    gelu_step<T, kTanh>(xt, bias ? bt : nullptr, ot);
    std::copy(ot, ot + (n - c), out + c);
  }
}

// One vector step of the backward: dx = dy * gelu'(x + bias); acc += the float32 dx.
template <typename T, bool kTanh>
inline void gelu_grad_step(const T* dy, const T* x, const float* bias, T* dx, float* acc) {
  FVec a, b, da, db;
  load_biased(x, bias, a, b);
  load2(dy, da, db);
  a = da * gelu_grad_vec<kTanh, MathFor<T>>(a);
  b = db * gelu_grad_vec<kTanh, MathFor<T>>(b);
  store2(dx, a, b);
  if (acc != nullptr) {
    FVec pa, pb;
    load2f(acc, pa, pb);
    (pa + a).store(acc);
    (pb + b).store(acc + FVec::size());
  }
}

// dx[0, n) = dy * gelu'(x + bias); when acc != nullptr, acc += the float32 dx.
template <typename T, bool kTanh>
void gelu_grad_span(const T* dy, const T* x, const float* bias, T* dx, float* acc, int64_t n) {
  int64_t c = 0;
  for (; c + kStep <= n; c += kStep)
    gelu_grad_step<T, kTanh>(dy + c, x + c, bias ? bias + c : nullptr, dx + c,
                             acc ? acc + c : nullptr);
  if (c < n) {
    const int64_t m = n - c;
    alignas(64) T dyt[kStep] = {}, xt[kStep] = {}, dxt[kStep];
    alignas(64) float bt[kStep] = {}, at[kStep] = {};
    std::copy(dy + c, dy + n, dyt);
    std::copy(x + c, x + n, xt);
    if (bias != nullptr) std::copy(bias + c, bias + n, bt);
    if (acc != nullptr) std::copy(acc + c, acc + n, at);
    gelu_grad_step<T, kTanh>(dyt, xt, bias ? bt : nullptr, dxt, acc ? at : nullptr);
    std::copy(dxt, dxt + m, dx + c);
    if (acc != nullptr) std::copy(at, at + m, acc + c);
  }
}

// Elements per parallel task of the elementwise (no bias) form: ~0.1 ms of work, so
// the fork/join of at::parallel_for is paid only where it pays.
constexpr int64_t kFlatGrain = 32768;

template <typename T, bool kTanh>
void forward_impl(const T* x, const float* bias, T* out, int64_t rows, int64_t cols) {
  if (bias == nullptr) {  // elementwise: split the flat range, whatever the row length
    at::parallel_for(0, rows * cols, kFlatGrain, [&](int64_t i0, int64_t i1) {
      gelu_span<T, kTanh>(x + i0, nullptr, out + i0, i1 - i0);
    });
    return;
  }
  at::parallel_for(0, rows, row_grain(cols), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) gelu_span<T, kTanh>(x + r * cols, bias, out + r * cols, cols);
  });
}

template <typename T, bool kTanh>
void backward_impl(const T* dy, const T* x, const float* bias, T* dx, float* dbias, int64_t rows,
                   int64_t cols) {
  if (bias == nullptr && dbias == nullptr) {
    at::parallel_for(0, rows * cols, kFlatGrain, [&](int64_t i0, int64_t i1) {
      gelu_grad_span<T, kTanh>(dy + i0, x + i0, nullptr, dx + i0, nullptr, i1 - i0);
    });
    return;
  }
  const int64_t chunks = row_chunks(rows, cols);
  std::vector<float> partial(dbias != nullptr ? static_cast<size_t>(chunks * cols) : 0, 0.f);
  at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      float* acc = dbias != nullptr ? partial.data() + k * cols : nullptr;
      for (int64_t r = rows * k / chunks; r < rows * (k + 1) / chunks; ++r)
        gelu_grad_span<T, kTanh>(dy + r * cols, x + r * cols, bias, dx + r * cols, acc, cols);
    }
  });
  if (dbias != nullptr) sum_partials(partial, chunks, cols, dbias);
}

}  // namespace

template <typename T>
void bias_gelu_forward(const T* x, const float* bias, T* out, int64_t rows, int64_t cols,
                       bool tanh_approx) {
  if (tanh_approx) {
    forward_impl<T, true>(x, bias, out, rows, cols);
  } else {
    forward_impl<T, false>(x, bias, out, rows, cols);
  }
}

template <typename T>
void bias_gelu_backward(const T* dy, const T* x, const float* bias, T* dx, float* dbias,
                        int64_t rows, int64_t cols, bool tanh_approx) {
  if (tanh_approx) {
    backward_impl<T, true>(dy, x, bias, dx, dbias, rows, cols);
  } else {
    backward_impl<T, false>(dy, x, bias, dx, dbias, rows, cols);
  }
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
