// GeGLU and SwiGLU, act(gate) * up, forward and backward, on the CPU: one pass over the
// inputs in float32, one rounding per output, the activation recomputed in the backward.
#include "cpu_kernels.h"
#include "vec_math.h"

#include <algorithm>

namespace llmkit_ext::cpu {

namespace {

// silu(g) = g s with s = 1 / (1 + e^(-g)), and 1 - s = e^(-g) s (no cancellation near
// s = 1). s is exactly 0 where e^(-g) overflows float32 (then silu is -0 for finite g).
struct SiluParts {
  FVec s;
  FVec one_minus_s;
};

template <typename M>
inline SiluParts silu_parts(const FVec& g) {
  const FVec mg = FVec(0.f) - g;
  const FVec em = exp_vec<M::kExpDegree>(mg);
  const FVec s = select_less(FVec(88.3f), mg, FVec(0.f), recip_vec<M::kRefineRecip>(FVec(1.f) + em));
  return {s, em * s};
}

template <int kAct, typename M>
inline FVec act_vec(const FVec& g) {
  if constexpr (kAct == kGluSilu) {
    return g * silu_parts<M>(g).s;
  } else {
    return gelu_vec<kAct == kGluGeluTanh, M>(g);
  }
}

// (act(g), act'(g))
template <int kAct, typename M>
inline std::pair<FVec, FVec> act_and_grad(const FVec& g) {
  if constexpr (kAct == kGluSilu) {
    const SiluParts p = silu_parts<M>(g);
    // s (1 + g (1 - s)); where s is 0 the product is 0 for any finite g
    return {g * p.s, p.s * at::vec::fmadd(g, p.one_minus_s, FVec(1.f))};
  } else {
    constexpr bool kTanh = kAct == kGluGeluTanh;
    return {gelu_vec<kTanh, M>(g), gelu_grad_vec<kTanh, M>(g)};
  }
}

template <typename T, int kAct>
inline void fwd_step(const T* g, const T* u, T* out) {
  FVec ga, gb, ua, ub;
  load2(g, ga, gb);
  load2(u, ua, ub);
  using M = MathFor<T>;
  store2(out, act_vec<kAct, M>(ga) * ua, act_vec<kAct, M>(gb) * ub);
}

// out[0, n) = act(g) * u. The tail goes through zero-padded buffers and the same vector
// code, so every element gets the same arithmetic.
template <typename T, int kAct>
void fwd_span(const T* g, const T* u, T* out, int64_t n) {
  int64_t c = 0;
  for (; c + kStep <= n; c += kStep) fwd_step<T, kAct>(g + c, u + c, out + c);
  if (c < n) {
    alignas(64) T gt[kStep] = {}, ut[kStep] = {}, ot[kStep];
    std::copy(g + c, g + n, gt);
    std::copy(u + c, u + n, ut);
    fwd_step<T, kAct>(gt, ut, ot);
    std::copy(ot, ot + (n - c), out + c);
  }
}

template <typename T, int kAct>
inline void bwd_step(const T* dy, const T* g, const T* u, T* dg, T* du) {
  FVec da, db, ga, gb, ua, ub;
  load2(dy, da, db);
  load2(g, ga, gb);
  load2(u, ua, ub);
  using M = MathFor<T>;
  const auto [aa, pa] = act_and_grad<kAct, M>(ga);
  const auto [ab, pb] = act_and_grad<kAct, M>(gb);
  store2(dg, da * ua * pa, db * ub * pb);
  store2(du, da * aa, db * ab);
}

template <typename T, int kAct>
void bwd_span(const T* dy, const T* g, const T* u, T* dg, T* du, int64_t n) {
  int64_t c = 0;
  for (; c + kStep <= n; c += kStep) bwd_step<T, kAct>(dy + c, g + c, u + c, dg + c, du + c);
  if (c < n) {
    alignas(64) T dyt[kStep] = {}, gt[kStep] = {}, ut[kStep] = {}, dgt[kStep], dut[kStep];
    std::copy(dy + c, dy + n, dyt);
    std::copy(g + c, g + n, gt);
    std::copy(u + c, u + n, ut);
    bwd_step<T, kAct>(dyt, gt, ut, dgt, dut);
    std::copy(dgt, dgt + (n - c), dg + c);
    std::copy(dut, dut + (n - c), du + c);
  }
}

// Elements per parallel task: ~0.1 ms of work, so the fork/join is paid only where it pays.
constexpr int64_t kFlatGrain = 32768;

template <typename T, int kAct>
void forward_impl(const T* g, int64_t ld_g, const T* u, int64_t ld_u, T* out, int64_t rows, int64_t cols) {
  if (ld_g == cols && ld_u == cols) {  // packed rows: one flat range
    at::parallel_for(0, rows * cols, kFlatGrain, [&](int64_t i0, int64_t i1) {
      fwd_span<T, kAct>(g + i0, u + i0, out + i0, i1 - i0);
    });
    return;
  }
  at::parallel_for(0, rows, row_grain(cols), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) fwd_span<T, kAct>(g + r * ld_g, u + r * ld_u, out + r * cols, cols);
  });
}

template <typename T, int kAct>
void backward_impl(const T* dy, int64_t ld_dy, const T* g, int64_t ld_g, const T* u, int64_t ld_u, T* dg,
                   T* du, int64_t rows, int64_t cols) {
  if (ld_dy == cols && ld_g == cols && ld_u == cols) {
    at::parallel_for(0, rows * cols, kFlatGrain, [&](int64_t i0, int64_t i1) {
      bwd_span<T, kAct>(dy + i0, g + i0, u + i0, dg + i0, du + i0, i1 - i0);
    });
    return;
  }
  at::parallel_for(0, rows, row_grain(cols), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      bwd_span<T, kAct>(dy + r * ld_dy, g + r * ld_g, u + r * ld_u, dg + r * cols, du + r * cols, cols);
  });
}

}  // namespace

template <typename T>
void glu_forward(const T* gate, int64_t ld_gate, const T* up, int64_t ld_up, T* out, int64_t rows,
                 int64_t cols, int act) {
  switch (act) {
    case kGluSilu: return forward_impl<T, kGluSilu>(gate, ld_gate, up, ld_up, out, rows, cols);
    case kGluGeluErf: return forward_impl<T, kGluGeluErf>(gate, ld_gate, up, ld_up, out, rows, cols);
    default: return forward_impl<T, kGluGeluTanh>(gate, ld_gate, up, ld_up, out, rows, cols);
  }
}

template <typename T>
void glu_backward(const T* dy, int64_t ld_dy, const T* gate, int64_t ld_gate, const T* up, int64_t ld_up,
                  T* dgate, T* dup, int64_t rows, int64_t cols, int act) {
  switch (act) {
    case kGluSilu:
      return backward_impl<T, kGluSilu>(dy, ld_dy, gate, ld_gate, up, ld_up, dgate, dup, rows, cols);
    case kGluGeluErf:
      return backward_impl<T, kGluGeluErf>(dy, ld_dy, gate, ld_gate, up, ld_up, dgate, dup, rows, cols);
    default:
      return backward_impl<T, kGluGeluTanh>(dy, ld_dy, gate, ld_gate, up, ld_up, dgate, dup, rows, cols);
  }
}

#define LLMKIT_INSTANTIATE_GLU(T)                                                                  \
  template void glu_forward<T>(const T*, int64_t, const T*, int64_t, T*, int64_t, int64_t, int);  \
  template void glu_backward<T>(const T*, int64_t, const T*, int64_t, const T*, int64_t, T*, T*, \
                                int64_t, int64_t, int);
LLMKIT_INSTANTIATE_GLU(float)
LLMKIT_INSTANTIATE_GLU(c10::Half)
LLMKIT_INSTANTIATE_GLU(c10::BFloat16)
#undef LLMKIT_INSTANTIATE_GLU

}  // namespace llmkit_ext::cpu
