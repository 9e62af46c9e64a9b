// Pieces shared by the attention forward and backward kernels: tile loads into shared
// memory (zero-filled past the sequence and head-dim ends), the score of one (query,
// key) pair after scale, masks and causality, and the dropout keep test.
#pragma once

#include <mma.h>

#include "../common/philox.h"
#include "common.cuh"

namespace llmkit_ext::cuda::attn {

namespace wmma = nvcuda::wmma;

constexpr int kBlockM = 64;   // query rows per block (4 warps x 16)
constexpr int kBlockN = 64;   // keys per tile
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kFrag = 16;     // WMMA m16n16k16
constexpr int kPad = 8;       // elements of padding per shared row (bank spread, keeps 32 B alignment)
constexpr int kScoreLd = kBlockN + 4;  // floats per row of a warp's 16 x 64 score tile
constexpr int kProbLd = kBlockN + kPad;  // elements per row of a warp's 16 x 64 T tile

// Head dims are padded to DPAD (32, 64 or 128) in shared memory.
template <int DPAD>
constexpr int kTileLd = DPAD + kPad;

// Accumulator fragments of a warp's 16 x DPAD output.
template <int DPAD>
using OutFrags = wmma::fragment<wmma::accumulator, kFrag, kFrag, kFrag, float>[DPAD / kFrag];

// rows [row0, row0 + 64) x columns [0, DPAD) of a (rows, dim) matrix with row stride
// `row_stride` into tile[64][DPAD + kPad]; zeros past `rows` and `dim`.
template <typename T, int DPAD>
__device__ __forceinline__ void load_tile(T* tile, const T* base, int64_t row0, int64_t rows,
                                          int64_t row_stride, int dim, bool vec_ok) {
  constexpr int kChunks = DPAD / 8;  // 8 elements (16 bytes) per chunk
  for (int idx = threadIdx.x; idx < kBlockN * kChunks; idx += kThreads) {
    const int r = idx / kChunks, c = (idx % kChunks) * 8;
    T* dst = tile + r * kTileLd<DPAD> + c;
    const int64_t gr = row0 + r;
    if (gr < rows && vec_ok && c + 8 <= dim) {
      *reinterpret_cast<int4*>(dst) = *reinterpret_cast<const int4*>(base + gr * row_stride + c);
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i)
        dst[i] = (gr < rows && c + i < dim) ? base[gr * row_stride + c + i] : from_float<T>(0.f);
    }
  }
}

// The scaled, masked score of query i and key j of head h in batch b, or -inf when the
// key is not visible (outside the sequence, causal, or a False / -inf mask entry).
__device__ __forceinline__ float masked_score(const AttentionArgs& a, float raw, int64_t b,
                                              int64_t h, int64_t i, int64_t j) {
  if (j >= a.k_len || i >= a.q_len) return -INFINITY;
  if (a.causal && j > i) return -INFINITY;
  float s = raw * a.scale;
  if (a.mask_kind != MaskKind::kNone) {
    const int64_t off = b * a.mask_strides[0] + h * a.mask_strides[1] + i * a.mask_strides[2] +
                        j * a.mask_strides[3];
    if (a.mask_kind == MaskKind::kBool) {
      if (!static_cast<const bool*>(a.mask)[off]) return -INFINITY;
    } else {
      s += static_cast<const float*>(a.mask)[off];
    }
  }
  return s;
}

// 1 / (1 - p) when element (b, h, i, j) is kept by dropout, else 0 (1 without dropout).
__device__ __forceinline__ float dropout_factor(const AttentionArgs& a, int64_t b, int64_t h,
                                                int64_t i, int64_t j) {
  if (a.dropout_p <= 0.f) return 1.f;
  const uint64_t counter =
      a.offset + static_cast<uint64_t>(((b * a.heads_q + h) * a.q_len + i) * a.k_len + j);
  return philox_uniform(a.seed, counter) > a.dropout_p ? 1.f / (1.f - a.dropout_p) : 0.f;
}

// acc (16 x 16 per fragment, NF fragments across the row) += A (16 x K, row-major in
// shared memory, leading dim lda) x B (K x (16 NF)); B read row-major from `b` (leading
// dim ldb: element (k, n) at b[k * ldb + n]).
template <typename T, int K, int NF>
__device__ __forceinline__ void mma_rowmajor_b(
    wmma::fragment<wmma::accumulator, kFrag, kFrag, kFrag, float> (&acc)[NF], const T* a, int lda,
    const T* b, int ldb) {
#pragma unroll
  for (int kk = 0; kk < K / kFrag; ++kk) {
    wmma::fragment<wmma::matrix_a, kFrag, kFrag, kFrag, T, wmma::row_major> fa;
    wmma::load_matrix_sync(fa, a + kk * kFrag, lda);
#pragma unroll
    for (int n = 0; n < NF; ++n) {
      wmma::fragment<wmma::matrix_b, kFrag, kFrag, kFrag, T, wmma::row_major> fb;
      wmma::load_matrix_sync(fb, b + kk * kFrag * ldb + n * kFrag, ldb);
      wmma::mma_sync(acc[n], fa, fb, acc[n]);
    }
  }
}

// out (16 x 64 floats, leading dim ldo) = A (16 x DPAD rows of `a`) x B^T where B is
// 64 rows of `b` (element (n, k) at b[n * ldb + k]): the scores of 16 rows against 64.
template <typename T, int DPAD>
__device__ __forceinline__ void scores_16x64(float* out, int ldo, const T* a, int lda, const T* b, int ldb) {
  wmma::fragment<wmma::accumulator, kFrag, kFrag, kFrag, float> acc[kBlockN / kFrag];
#pragma unroll
  for (int n = 0; n < kBlockN / kFrag; ++n) wmma::fill_fragment(acc[n], 0.f);
#pragma unroll
  for (int kk = 0; kk < DPAD / kFrag; ++kk) {
    wmma::fragment<wmma::matrix_a, kFrag, kFrag, kFrag, T, wmma::row_major> fa;
    wmma::load_matrix_sync(fa, a + kk * kFrag, lda);
#pragma unroll
    for (int n = 0; n < kBlockN / kFrag; ++n) {
      wmma::fragment<wmma::matrix_b, kFrag, kFrag, kFrag, T, wmma::col_major> fb;
      wmma::load_matrix_sync(fb, b + n * kFrag * ldb + kk * kFrag, ldb);
      wmma::mma_sync(acc[n], fa, fb, acc[n]);
    }
  }
#pragma unroll
  for (int n = 0; n < kBlockN / kFrag; ++n)
    wmma::store_matrix_sync(out + n * kFrag, acc[n], ldo, wmma::mem_row_major);
}

// Writes a warp's 16 x DPAD accumulators, times `mul`, to rows row0.. of a contiguous
// (rows, dim) output, through `stage` (16 x (DPAD + 4) floats of shared memory).
template <typename T, int DPAD>
__device__ __forceinline__ void store_rows(OutFrags<DPAD>& acc, float* stage, float mul, T* out,
                                           int64_t row0, int64_t rows, int dim) {
  constexpr int kLd = DPAD + 4;
  __syncwarp();
#pragma unroll
  for (int n = 0; n < DPAD / kFrag; ++n)
    wmma::store_matrix_sync(stage + n * kFrag, acc[n], kLd, wmma::mem_row_major);
  __syncwarp();
  const int lane = threadIdx.x & 31;
  for (int e = lane; e < kFrag * dim; e += 32) {
    const int r = e / dim, c = e % dim;
    if (row0 + r < rows) out[(row0 + r) * dim + c] = from_float<T>(stage[r * kLd + c] * mul);
  }
  __syncwarp();
}

inline bool attention_vec_ok(const AttentionArgs& a) {
  auto ok = [](const void* p, const int64_t* s, int64_t d) {
    return aligned16(p) && d % 8 == 0 && s[0] % 8 == 0 && s[1] % 8 == 0 && s[2] % 8 == 0;
  };
  return ok(a.q, a.q_strides, a.head_dim) && ok(a.k, a.k_strides, a.head_dim) &&
         ok(a.v, a.v_strides, a.head_dim_v);
}

inline int head_dim_pad(const AttentionArgs& a) {
  const int64_t d = a.head_dim > a.head_dim_v ? a.head_dim : a.head_dim_v;
  return d <= 32 ? 32 : (d <= 64 ? 64 : 128);
}

}  // namespace llmkit_ext::cuda::attn

// Calls BODY with `using scalar_t` (__half / __nv_bfloat16) and `constexpr int kDPad`.
#define LLMKIT_ATTENTION_DISPATCH(args, ...)                                         \
  [&]() -> cudaError_t {                                                             \
    const int dpad_ = ::llmkit_ext::cuda::attn::head_dim_pad(args);                  \
    if ((args).dtype == ::llmkit_ext::cuda::DType::kFloat16) {                       \
      using scalar_t = __half;                                                       \
      if (dpad_ == 32) { constexpr int kDPad = 32; return __VA_ARGS__(); }           \
      if (dpad_ == 64) { constexpr int kDPad = 64; return __VA_ARGS__(); }           \
      constexpr int kDPad = 128;                                                     \
      return __VA_ARGS__();                                                          \
    }                                                                                \
    if ((args).dtype == ::llmkit_ext::cuda::DType::kBFloat16) {                      \
      using scalar_t = __nv_bfloat16;                                                \
      if (dpad_ == 32) { constexpr int kDPad = 32; return __VA_ARGS__(); }           \
      if (dpad_ == 64) { constexpr int kDPad = 64; return __VA_ARGS__(); }           \
      constexpr int kDPad = 128;                                                     \
      return __VA_ARGS__();                                                          \
    }                                                                                \
    return cudaErrorInvalidValue;                                                    \
  }()
