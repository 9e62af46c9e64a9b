// Device helpers shared by the CUDA kernels: element conversions (float32 math for
// float / half / bfloat16), warp and block reductions, 16-byte vector access, the
// column-reduction used for parameter gradients, and dtype dispatch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/launch_plan.h"
#include "launchers.h"

namespace llmkit_ext::cuda {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Elements of T in 16 bytes.
template <typename T>
constexpr int kVec16 = 16 / static_cast<int>(sizeof(T));

// VEC consecutive elements of T, loaded or stored as one 16-byte (or narrower) access.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load_floats(const T* p, float (&out)[VEC]) {
  const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = to_float(pk.v[i]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_floats(T* p, const float (&in)[VEC]) {
  Pack<T, VEC> pk;
#pragma unroll
  for (int i = 0; i < VEC; ++i) pk.v[i] = from_float<T>(in[i]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pk;
}

inline bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// NaN-propagating max (fmaxf drops NaN).
__device__ __forceinline__ float nan_max(float a, float b) {
  return (a != a || b != b) ? __int_as_float(0x7fc00000) : fmaxf(a, b);
}

__device__ __forceinline__ float warp_nan_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum (or NaN-propagating max) over the block; every thread gets the result.
// `scratch` holds 32 floats of shared memory; blockDim.x is a multiple of 32.
template <bool MAX>
__device__ __forceinline__ float block_reduce(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int warps = blockDim.x >> 5;
  v = MAX ? warp_nan_max(v) : warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : 0.f;  // identity of sums and of max over |x|
  v = MAX ? warp_nan_max(v) : warp_sum(v);
  return v;
}

// ---- column sums over rows, in a fixed order (deterministic parameter gradients) ----

constexpr int kColTile = 32;   // columns per block (one warp wide)
constexpr int kRowThreads = 8;  // rows handled in parallel per block

inline int column_splits(int64_t rows) {
  int64_t s = (rows + 63) / 64;
  return static_cast<int>(s < 1 ? 1 : (s > 128 ? 128 : s));
}

// partial[split][c] (x and y sums) of op(r, c) over the rows r of this split.
template <typename Op>
__global__ void column_partials_kernel(Op op, int64_t rows, int64_t cols, float2* partial) {
  __shared__ float2 tile[kRowThreads][kColTile];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kColTile + threadIdx.x;
  const int splits = gridDim.y;
  const int64_t r_begin = rows * blockIdx.y / splits, r_end = rows * (blockIdx.y + 1) / splits;
  float2 acc = make_float2(0.f, 0.f);
  if (c < cols) {
    for (int64_t r = r_begin + threadIdx.y; r < r_end; r += kRowThreads) {
      const float2 v = op(r, c);
      acc.x += v.x;
      acc.y += v.y;
    }
  }
  tile[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    float2 s = tile[0][threadIdx.x];
    for (int i = 1; i < kRowThreads; ++i) {
      s.x += tile[i][threadIdx.x].x;
      s.y += tile[i][threadIdx.x].y;
    }
    partial[static_cast<int64_t>(blockIdx.y) * cols + c] = s;
  }
}

// out_x[c] / out_y[c] (either may be nullptr) = sums of partial over the splits, in order.
// (A template so that every .cu file may include its definition.)
template <typename Unused = void>
__global__ void column_finish_kernel(const float2* partial, int splits, int64_t cols,
                                     float* out_x, float* out_y) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  float2 s = make_float2(0.f, 0.f);
  for (int k = 0; k < splits; ++k) {
    const float2 v = partial[static_cast<int64_t>(k) * cols + c];
    s.x += v.x;
    s.y += v.y;
  }
  if (out_x != nullptr) out_x[c] = s.x;
  if (out_y != nullptr) out_y[c] = s.y;
}

template <typename Op>
cudaError_t column_sums(Op op, int64_t rows, int64_t cols, float* workspace, float* out_x,
                        float* out_y, cudaStream_t stream) {
  if (cols == 0) return cudaSuccess;
  const int splits = column_splits(rows);
  float2* partial = reinterpret_cast<float2*>(workspace);
  const dim3 grid(static_cast<unsigned>((cols + kColTile - 1) / kColTile), splits);
  column_partials_kernel<<<grid, dim3(kColTile, kRowThreads), 0, stream>>>(op, rows, cols, partial);
  const unsigned blocks = static_cast<unsigned>((cols + 255) / 256);
  column_finish_kernel<><<<blocks, 256, 0, stream>>>(partial, splits, cols, out_x, out_y);
  return cudaGetLastError();
}

// floats of workspace column_sums needs.
inline int64_t column_sums_workspace(int64_t rows, int64_t cols) {
  return 2 * static_cast<int64_t>(column_splits(rows)) * cols;
}

}  // namespace llmkit_ext::cuda

// Calls BODY with `using scalar_t = <CUDA element type>` for a DType.
#define LLMKIT_CUDA_DISPATCH(dtype, ...)                       \
  [&]() -> cudaError_t {                                       \
    switch (dtype) {                                           \
      case ::llmkit_ext::cuda::DType::kFloat32: {              \
        using scalar_t = float;                                \
        return __VA_ARGS__();                                  \
      }                                                        \
      case ::llmkit_ext::cuda::DType::kFloat16: {              \
        using scalar_t = __half;                               \
        return __VA_ARGS__();                                  \
      }                                                        \
      case ::llmkit_ext::cuda::DType::kBFloat16: {             \
        using scalar_t = __nv_bfloat16;                        \
        return __VA_ARGS__();                                  \
      }                                                        \
    }                                                          \
    return cudaErrorInvalidValue;                              \
  }()
