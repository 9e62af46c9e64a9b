// Per-row int8 quantization and the int8 GEMM on tensor cores (WMMA, s8 x s8 -> s32:
// IMMA on sm_80 / sm_90) with the epilogue fused: acc * a_scale[i] * b_scale[j] + bias[j],
// then GELU (erf or tanh) if asked, written as float32 / float16 / bfloat16 (or the raw
// int32 accumulator). Any M, N, K: tiles are staged through shared memory with zero
// fill at the edges.
#include <mma.h>

#include "common.cuh"

namespace llmkit_ext::cuda {

namespace {

// ---- quantization ----------------------------------------------------------------------

template <typename T>
__global__ void quantize_rows_kernel(const T* x, int8_t* q, float* scale, int64_t cols) {
  __shared__ float scratch[32];
  const int64_t r = blockIdx.x;
  const T* xr = x + r * cols;
  int8_t* qr = q + r * cols;
  float m = 0.f;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) m = nan_max(m, fabsf(to_float(xr[c])));
  const float absmax = block_reduce<true>(m, scratch);
  if (threadIdx.x == 0) scale[r] = __fdiv_rn(absmax, 127.f);
  // true float32 divisions and products, as the reference computes them
  const float inv = (absmax > 0.f && isfinite(absmax)) ? __fdiv_rn(127.f, absmax) : 0.f;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const float v = __fmul_rn(to_float(xr[c]), inv);
    int8_t out = 0;
    if (!isnan(v)) out = static_cast<int8_t>(fminf(fmaxf(rintf(v), -127.f), 127.f));  // half to even
    qr[c] = out;
  }
}

template <typename T>
cudaError_t quantize_t(const void* x, int8_t* q, float* scale, int64_t rows, int64_t cols,
                       cudaStream_t stream) {
  const int threads = threads_for_row(cols, 1);
  quantize_rows_kernel<T><<<static_cast<unsigned>(rows), threads, 0, stream>>>(
      static_cast<const T*>(x), q, scale, cols);
  return cudaGetLastError();
}

// ---- GEMM ------------------------------------------------------------------------------

namespace wmma = nvcuda::wmma;

constexpr int kBM = 64, kBN = 64, kBK = 32;  // block tile
constexpr int kFrag = 16;                     // WMMA m16n16k16
constexpr int kThreads = 128;                 // 4 warps, 2 x 2, each 32 x 32

// Shared memory holds each 16-wide k-slice (or n-slice) of a tile contiguously, so that
// every fragment pointer is 32-byte aligned with a leading dimension of 16 bytes.
struct GemmSmem {
  int8_t a[kBK / kFrag][kBM][kFrag];  // (m, k) at a[k / 16][m][k % 16]
  int8_t b[kBK / kFrag * kBN * kFrag];  // see load_b_tile
  int32_t c[kBM][kBN];
};

// 16 bytes of a row of int8 starting at column col0 (zero past `limit`).
__device__ __forceinline__ void load16(const int8_t* row, int64_t col0, int64_t limit,
                                       bool vec_ok, int8_t* dst) {
  if (vec_ok && col0 + 16 <= limit) {
    *reinterpret_cast<int4*>(dst) = *reinterpret_cast<const int4*>(row + col0);
  } else {
#pragma unroll
    for (int i = 0; i < 16; ++i) dst[i] = (col0 + i < limit) ? row[col0 + i] : int8_t{0};
  }
}

__device__ __forceinline__ void zero16(int8_t* dst) { *reinterpret_cast<int4*>(dst) = make_int4(0, 0, 0, 0); }

__device__ __forceinline__ float gelu_exact(float x) { return 0.5f * x * (1.f + erff(x * 0.70710678118654752440f)); }
__device__ __forceinline__ float gelu_tanh(float x) {
  return 0.5f * x * (1.f + tanhf(0.79788456080286535588f * (x + 0.044715f * x * x * x)));
}

template <bool B_NK>
__global__ void __launch_bounds__(kThreads) int8_gemm_kernel(Int8GemmArgs g, bool vec_a, bool vec_b) {
  __shared__ __align__(128) GemmSmem sm;
  const int tid = threadIdx.x, warp = tid >> 5;
  const int wm = warp >> 1, wn = warp & 1;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kBM, n0 = static_cast<int64_t>(blockIdx.x) * kBN;

  wmma::fragment<wmma::accumulator, kFrag, kFrag, kFrag, int> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0);

  for (int64_t k0 = 0; k0 < g.k; k0 += kBK) {
    {  // A tile: 64 rows x 32 columns, one 16-byte chunk per thread
      const int row = tid >> 1, kc = (tid & 1) * kFrag;
      int8_t* dst = &sm.a[kc / kFrag][row][0];
      if (m0 + row < g.m) load16(g.a + (m0 + row) * g.lda, k0 + kc, g.k, vec_a, dst);
      else zero16(dst);
    }
    if (B_NK) {  // b is (n, k): like A; (k, n) at b[k / 16][n][k % 16], read col-major
      const int row = tid >> 1, kc = (tid & 1) * kFrag;
      int8_t* dst = sm.b + ((kc / kFrag) * kBN + row) * kFrag;
      if (n0 + row < g.n) load16(g.b + (n0 + row) * g.ldb, k0 + kc, g.k, vec_b, dst);
      else zero16(dst);
    } else {  // b is (k, n): (k, n) at b[n / 16][k][n % 16], read row-major
      const int kr = tid >> 2, nc = (tid & 3) * kFrag;
      int8_t* dst = sm.b + ((nc / kFrag) * kBK + kr) * kFrag;
      if (k0 + kr < g.k) load16(g.b + (k0 + kr) * g.ldb, n0 + nc, g.n, vec_b, dst);
      else zero16(dst);
    }
    __syncthreads();
#pragma unroll
    for (int ks = 0; ks < kBK / kFrag; ++ks) {
      wmma::fragment<wmma::matrix_a, kFrag, kFrag, kFrag, signed char, wmma::row_major> fa[2];
#pragma unroll
      for (int i = 0; i < 2; ++i)
        wmma::load_matrix_sync(fa[i], reinterpret_cast<const signed char*>(&sm.a[ks][wm * 32 + i * kFrag][0]), kFrag);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int nb = wn * 32 + j * kFrag;
        if constexpr (B_NK) {
          wmma::fragment<wmma::matrix_b, kFrag, kFrag, kFrag, signed char, wmma::col_major> fb;
          wmma::load_matrix_sync(fb, reinterpret_cast<const signed char*>(sm.b + (ks * kBN + nb) * kFrag), kFrag);
#pragma unroll
          for (int i = 0; i < 2; ++i) wmma::mma_sync(acc[i][j], fa[i], fb, acc[i][j]);
        } else {
          wmma::fragment<wmma::matrix_b, kFrag, kFrag, kFrag, signed char, wmma::row_major> fb;
          wmma::load_matrix_sync(fb, reinterpret_cast<const signed char*>(sm.b + ((nb / kFrag) * kBK + ks * kFrag) * kFrag), kFrag);
#pragma unroll
          for (int i = 0; i < 2; ++i) wmma::mma_sync(acc[i][j], fa[i], fb, acc[i][j]);
        }
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(&sm.c[wm * 32 + i * kFrag][wn * 32 + j * kFrag], acc[i][j], kBN, wmma::mem_row_major);
  __syncthreads();

  // fused epilogue, one output element per thread per step, coalesced along n
  for (int e = tid; e < kBM * kBN; e += kThreads) {
    const int r = e / kBN, c = e % kBN;
    const int64_t m = m0 + r, n = n0 + c;
    if (m >= g.m || n >= g.n) continue;
    const int32_t acc_v = sm.c[r][c];
    const int64_t o = m * g.n + n;
    if (g.out_kind == OutKind::kInt32) {
      static_cast<int32_t*>(g.out)[o] = acc_v;
      continue;
    }
    // acc * a_scale * b_scale + bias in float32, in the reference's order, no contraction
    float v = __fmul_rn(__fmul_rn(static_cast<float>(acc_v), g.a_scale[m]), g.b_scale[n]);
    if (g.bias) v = __fadd_rn(v, g.bias[n]);
    if (g.activation == Activation::kGelu) v = gelu_exact(v);
    else if (g.activation == Activation::kGeluTanh) v = gelu_tanh(v);
    switch (g.out_kind) {
      case OutKind::kFloat32: static_cast<float*>(g.out)[o] = v; break;
      case OutKind::kFloat16: static_cast<__half*>(g.out)[o] = __float2half_rn(v); break;
      case OutKind::kBFloat16: static_cast<__nv_bfloat16*>(g.out)[o] = __float2bfloat16_rn(v); break;
      default: break;
    }
  }
}

}  // namespace

cudaError_t quantize_rows(DType dtype, const void* x, int8_t* q, float* scale, int64_t rows,
                          int64_t cols, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  return LLMKIT_CUDA_DISPATCH(dtype, [&] { return quantize_t<scalar_t>(x, q, scale, rows, cols, stream); });
}

cudaError_t int8_gemm(const Int8GemmArgs& args, cudaStream_t stream) {
  if (args.m == 0 || args.n == 0) return cudaSuccess;
  if (args.out_kind != OutKind::kInt32 && (args.a_scale == nullptr || args.b_scale == nullptr))
    return cudaErrorInvalidValue;
  const bool vec_a = aligned16(args.a) && args.lda % 16 == 0;
  const bool vec_b = aligned16(args.b) && args.ldb % 16 == 0;
  const dim3 grid(static_cast<unsigned>((args.n + kBN - 1) / kBN), static_cast<unsigned>((args.m + kBM - 1) / kBM));
  if (args.b_is_nk) {
    int8_gemm_kernel<true><<<grid, kThreads, 0, stream>>>(args, vec_a, vec_b);
  } else {
    int8_gemm_kernel<false><<<grid, kThreads, 0, stream>>>(args, vec_a, vec_b);
  }
  return cudaGetLastError();
}

}  // namespace llmkit_ext::cuda
