// C++ CPU kernels of the llmkit extension: raw pointers and sizes, templated on the
// element type T (float, c10::Half, c10::BFloat16), float32 arithmetic throughout.
// Tensors are row-major (rows, cols) and contiguous; weights and biases arrive as
// float32 (the binding converts them). Vectorized with ATen's Vectorized<float> and
// parallel over rows with at::parallel_for.
#pragma once

#include <cstdint>

namespace llmkit_ext::cpu {

// LayerNorm (rms = false) or RMSNorm (rms = true) of each row, after an optional fused
// residual add. With residual != nullptr: s = x + residual is added in float32, rounded
// to T and written to residual_out, and the rounded s is normalized. mean (skipped when
// rms or nullptr) and rstd are float32 per row; weight / bias may be nullptr.
template <typename T>
void norm_forward(const T* x, const T* residual, const float* weight, const float* bias,
                  T* out, T* residual_out, float* mean, float* rstd, int64_t rows,
                  int64_t cols, float eps, bool rms);

// Backward of norm_forward from the saved statistics. dx = d(norm)/dx + dresidual
// (dresidual may be nullptr; the sum happens in float32 and is rounded once).
// dweight / dbias (float32, cols) are written when non-null, reduced over rows in a
// fixed order (deterministic).
template <typename T>
void norm_backward(const T* dy, const T* x, const float* weight, const float* mean,
                   const float* rstd, const T* dresidual, T* dx, float* dweight,
                   float* dbias, int64_t rows, int64_t cols, bool rms);

// out = gelu(x + bias) (bias float32 of length cols, or nullptr), exact (erf) or tanh.
template <typename T>
void bias_gelu_forward(const T* x, const float* bias, T* out, int64_t rows, int64_t cols,
                       bool tanh_approx);

// dx = dy * gelu'(x + bias); dbias (float32, cols, may be nullptr) = dx summed over
// rows before dx is rounded to T.
template <typename T>
void bias_gelu_backward(const T* dy, const T* x, const float* bias, T* dx, float* dbias,
                        int64_t rows, int64_t cols, bool tanh_approx);

// Activations of glu_forward / glu_backward (the values the Python side passes).
constexpr int kGluSilu = 0;      // SwiGLU: silu(g) = g / (1 + e^-g)
constexpr int kGluGeluErf = 1;   // GeGLU, exact GELU
constexpr int kGluGeluTanh = 2;  // GeGLU, tanh GELU

// out = act(gate) * up over rows x cols; gate / up rows start every ld_gate / ld_up
// elements (packed rows: ld == cols), out is contiguous.
template <typename T>
void glu_forward(const T* gate, int64_t ld_gate, const T* up, int64_t ld_up, T* out, int64_t rows,
                 int64_t cols, int act);

// dgate = dy * up * act'(gate), dup = dy * act(gate) (the activation recomputed); inputs
// with row strides as glu_forward, outputs contiguous.
template <typename T>
void glu_backward(const T* dy, int64_t ld_dy, const T* gate, int64_t ld_gate, const T* up, int64_t ld_up,
                  T* dgate, T* dup, int64_t rows, int64_t cols, int act);

// Per-row symmetric absmax int8 quantization: scale = absmax / 127 and
// q = clamp(round_half_even(x * (127 / absmax)), -127, 127), in float32; a zero row gives
// zeros, a row holding NaN / inf gives scale NaN / inf and zeros.
template <typename T>
void quantize_rows(const T* x, int8_t* q, float* scale, int64_t rows, int64_t cols);

}  // namespace llmkit_ext::cpu
