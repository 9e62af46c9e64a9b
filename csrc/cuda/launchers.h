// Host entry points of the CUDA kernels: raw pointers, sizes and a stream; no torch
// types, so the .cu files compile with nvcc alone. Each returns the launch's
// cudaError_t. Implemented in layer_norm.cu, gelu.cu, int8_matmul.cu, attention_fwd.cu
// and attention_bwd.cu; called from csrc/bindings.cpp.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace llmkit_ext::cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// ---- LayerNorm / RMSNorm, optional fused residual add (layer_norm.cu) ----------------

struct NormForwardArgs {
  DType dtype;
  const void* x;         // (rows, cols), contiguous
  const void* residual;  // same, or nullptr: then residual_out is not written
  const float* weight;   // (cols) or nullptr
  const float* bias;     // (cols) or nullptr
  void* out;             // (rows, cols)
  void* residual_out;    // (rows, cols): x + residual rounded to dtype, normalized
  float* mean;           // (rows), nullptr for RMSNorm
  float* rstd;           // (rows)
  int64_t rows;
  int64_t cols;
  float eps;
  bool rms;
};
cudaError_t norm_forward(const NormForwardArgs& args, cudaStream_t stream);

struct NormBackwardArgs {
  DType dtype;
  const void* dy;         // (rows, cols)
  const void* x;          // the normalized input (residual_out of the fused add)
  const float* weight;    // or nullptr
  const float* mean;      // nullptr for RMSNorm
  const float* rstd;
  const void* dresidual;  // added to dx (float32 add, one rounding), or nullptr
  void* dx;               // (rows, cols)
  float* dweight;         // (cols) or nullptr
  float* dbias;           // (cols) or nullptr
  float* workspace;       // norm_backward_workspace(...) floats
  int64_t rows;
  int64_t cols;
  bool rms;
};
// float32 elements of workspace norm_backward needs (0 when no parameter gradient).
int64_t norm_backward_workspace(int64_t rows, int64_t cols, bool need_params);
cudaError_t norm_backward(const NormBackwardArgs& args, cudaStream_t stream);

// ---- GELU and bias + GELU (gelu.cu) ---------------------------------------------------

// out = gelu(x + bias), bias (cols) float32 or nullptr; x, out (rows, cols) contiguous.
cudaError_t bias_gelu_forward(DType dtype, const void* x, const float* bias, void* out,
                              int64_t rows, int64_t cols, bool tanh_approx,
                              cudaStream_t stream);
int64_t bias_gelu_backward_workspace(int64_t rows, int64_t cols);
// dx = dy * gelu'(x + bias); dbias (cols, float32, or nullptr) = float32 dx summed over rows.
cudaError_t bias_gelu_backward(DType dtype, const void* dy, const void* x, const float* bias,
                               void* dx, float* dbias, float* workspace, int64_t rows,
                               int64_t cols, bool tanh_approx, cudaStream_t stream);

// ---- int8 quantization and GEMM (int8_matmul.cu) -------------------------------------

// Per-row absmax: scale = absmax / 127, q = clamp(rint(x * (127 / absmax)), -127, 127).
cudaError_t quantize_rows(DType dtype, const void* x, int8_t* q, float* scale, int64_t rows,
                          int64_t cols, cudaStream_t stream);

enum class OutKind : int { kInt32 = 0, kFloat32 = 1, kFloat16 = 2, kBFloat16 = 3 };
enum class Activation : int { kNone = 0, kGelu = 1, kGeluTanh = 2 };

struct Int8GemmArgs {
  const int8_t* a;  // (m, k), row stride lda, unit column stride
  const int8_t* b;  // b_is_nk ? (n, k) with row stride ldb : (k, n) with row stride ldb
  bool b_is_nk;
  int64_t m, n, k;
  int64_t lda, ldb;
  const float* a_scale;  // (m) or nullptr (then int32 output, no epilogue)
  const float* b_scale;  // (n)
  const float* bias;     // (n) or nullptr
  Activation activation;
  OutKind out_kind;
  void* out;  // (m, n) contiguous
};
// Tensor-core int8 GEMM with exact int32 accumulation; the epilogue
// acc * a_scale[i] * b_scale[j] + bias[j], then the activation, is fused.
cudaError_t int8_gemm(const Int8GemmArgs& args, cudaStream_t stream);

// ---- attention (attention_fwd.cu, attention_bwd.cu) ----------------------------------

constexpr int kMaxHeadDim = 128;

enum class MaskKind : int { kNone = 0, kBool = 1, kFloat = 2 };

struct AttentionArgs {
  DType dtype;  // kFloat16 or kBFloat16
  const void* q;  // (B, Hq, Sq, D): strides in elements for (b, h, s); unit last stride
  const void* k;  // (B, Hkv, Sk, D)
  const void* v;  // (B, Hkv, Sk, Dv)
  int64_t q_strides[3];
  int64_t k_strides[3];
  int64_t v_strides[3];
  int64_t batch, heads_q, heads_kv, q_len, k_len, head_dim, head_dim_v;
  MaskKind mask_kind;
  const void* mask;         // bool (1 byte) or float32, read at the strides below
  int64_t mask_strides[4];  // (b, h, i, j); 0 along broadcast dimensions
  bool causal;              // top-left: query i sees keys j <= i
  float scale;
  float dropout_p;
  uint64_t seed, offset;  // Philox counters, see csrc/common/philox.h
  void* out;              // (B, Hq, Sq, Dv) contiguous; not read by the backward
  float* lse;             // (B, Hq, Sq): natural log, +inf on rows with no visible key
};
cudaError_t attention_forward(const AttentionArgs& args, cudaStream_t stream);

struct AttentionBackwardArgs {
  AttentionArgs fwd;  // inputs, with out and lse those the forward wrote
  const void* dout;   // (B, Hq, Sq, Dv) contiguous
  float* delta;       // (B, Hq, Sq) workspace: rowsum(dout * out), from the float32
                      // output (recomputed: rowsum(P Z dP)), not the rounded `out`
  void* dq;           // (B, Hq, Sq, D) contiguous
  void* dk;           // (B, Hkv, Sk, D) contiguous
  void* dv;           // (B, Hkv, Sk, Dv) contiguous
};
cudaError_t attention_backward(const AttentionBackwardArgs& args, cudaStream_t stream);

}  // namespace llmkit_ext::cuda
