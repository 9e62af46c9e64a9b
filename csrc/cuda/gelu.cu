// GELU (exact erf form or tanh form) and fused bias + GELU, forward and backward, on
// the GPU. Elementwise in float32 with 16-byte vectorized access; the bias is added in
// float32 and never written; d bias is a deterministic column sum of the float32 dx.
#include "common.cuh"

namespace llmkit_ext::cuda {

namespace {

constexpr float kSqrtHalf = 0.70710678118654752440f;
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;
constexpr float kTanhBeta = 0.79788456080286535588f;  // sqrt(2 / pi)
constexpr float kTanhKappa = 0.044715f;

__device__ __forceinline__ float gelu(float x, bool tanh_approx) {
  if (tanh_approx) return 0.5f * x * (1.f + tanhf(kTanhBeta * (x + kTanhKappa * x * x * x)));
  return 0.5f * x * (1.f + erff(x * kSqrtHalf));
}

__device__ __forceinline__ float gelu_grad(float x, bool tanh_approx) {
  if (tanh_approx) {
    const float x2 = x * x;
    const float t = tanhf(kTanhBeta * (x + kTanhKappa * x2 * x));
    return 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * kTanhBeta * (1.f + 3.f * kTanhKappa * x2);
  }
  return 0.5f * (1.f + erff(x * kSqrtHalf)) + x * expf(-0.5f * x * x) * kInvSqrt2Pi;
}

// Elements [VEC * i, VEC * i + VEC) for i over a grid-stride loop; with VEC > 1 the
// row length is a multiple of VEC, so a vector never straddles two rows.
template <typename T, int VEC>
__global__ void gelu_forward_kernel(const T* x, const float* bias, T* out, int64_t n,
                                    int64_t cols, bool tanh_approx) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * VEC;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC; i < n; i += stride) {
    float v[VEC];
    if (VEC > 1) {
      load_floats<T, VEC>(x + i, v);
    } else {
      v[0] = to_float(x[i]);
    }
    const int64_t c = bias ? i % cols : 0;
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = gelu(bias ? v[k] + bias[c + k] : v[k], tanh_approx);
    if (VEC > 1) {
      store_floats<T, VEC>(out + i, v);
    } else {
      out[i] = from_float<T>(v[0]);
    }
  }
}

template <typename T, int VEC>
__global__ void gelu_backward_kernel(const T* dy, const T* x, const float* bias, T* dx,
                                     int64_t n, int64_t cols, bool tanh_approx) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * VEC;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC; i < n; i += stride) {
    float v[VEC], d[VEC];
    if (VEC > 1) {
      load_floats<T, VEC>(x + i, v);
      load_floats<T, VEC>(dy + i, d);
    } else {
      v[0] = to_float(x[i]);
      d[0] = to_float(dy[i]);
    }
    const int64_t c = bias ? i % cols : 0;
#pragma unroll
    for (int k = 0; k < VEC; ++k) d[k] *= gelu_grad(bias ? v[k] + bias[c + k] : v[k], tanh_approx);
    if (VEC > 1) {
      store_floats<T, VEC>(dx + i, d);
    } else {
      dx[i] = from_float<T>(d[0]);
    }
  }
}

// (dy * gelu'(x + bias), 0) at (r, c): the summands of d bias.
template <typename T>
struct BiasGeluGrad {
  const T* dy;
  const T* x;
  const float* bias;
  int64_t cols;
  bool tanh_approx;
  __device__ float2 operator()(int64_t r, int64_t c) const {
    const int64_t i = r * cols + c;
    return make_float2(to_float(dy[i]) * gelu_grad(to_float(x[i]) + bias[c], tanh_approx), 0.f);
  }
};

unsigned elementwise_blocks(int64_t n, int vec, int threads) {
  const int64_t want = (n / vec + threads - 1) / threads;
  return static_cast<unsigned>(want < 1 ? 1 : (want > 65535 ? 65535 : want));
}

template <typename T>
bool vectorizable(int64_t cols, const float* bias, std::initializer_list<const void*> ptrs) {
  if (bias != nullptr && cols % kVec16<T> != 0) return false;
  for (const void* p : ptrs)
    if (!aligned16(p)) return false;
  return bias == nullptr || aligned16(bias);
}

template <typename T>
cudaError_t forward_t(const void* x, const float* bias, void* out, int64_t rows, int64_t cols,
                      bool tanh_approx, cudaStream_t stream) {
  const int64_t n = rows * cols;
  constexpr int kThreads = 256;
  const T* xp = static_cast<const T*>(x);
  T* op = static_cast<T*>(out);
  const bool vec = vectorizable<T>(cols, bias, {x, out}) && n % kVec16<T> == 0;
  if (vec) {
    gelu_forward_kernel<T, kVec16<T>><<<elementwise_blocks(n, kVec16<T>, kThreads), kThreads, 0, stream>>>(
        xp, bias, op, n, cols, tanh_approx);
  } else {
    gelu_forward_kernel<T, 1><<<elementwise_blocks(n, 1, kThreads), kThreads, 0, stream>>>(
        xp, bias, op, n, cols, tanh_approx);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_t(const void* dy, const void* x, const float* bias, void* dx, float* dbias,
                       float* workspace, int64_t rows, int64_t cols, bool tanh_approx,
                       cudaStream_t stream) {
  const int64_t n = rows * cols;
  constexpr int kThreads = 256;
  const T* dyp = static_cast<const T*>(dy);
  const T* xp = static_cast<const T*>(x);
  T* dxp = static_cast<T*>(dx);
  if (n > 0) {
    const bool vec = vectorizable<T>(cols, bias, {dy, x, dx}) && n % kVec16<T> == 0;
    if (vec) {
      gelu_backward_kernel<T, kVec16<T>><<<elementwise_blocks(n, kVec16<T>, kThreads), kThreads, 0, stream>>>(
          dyp, xp, bias, dxp, n, cols, tanh_approx);
    } else {
      gelu_backward_kernel<T, 1><<<elementwise_blocks(n, 1, kThreads), kThreads, 0, stream>>>(
          dyp, xp, bias, dxp, n, cols, tanh_approx);
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (dbias == nullptr) return cudaSuccess;
  if (rows == 0) return cudaMemsetAsync(dbias, 0, cols * sizeof(float), stream);
  const BiasGeluGrad<T> op{dyp, xp, bias, cols, tanh_approx};
  return column_sums(op, rows, cols, workspace, dbias, nullptr, stream);
}

}  // namespace

cudaError_t bias_gelu_forward(DType dtype, const void* x, const float* bias, void* out,
                              int64_t rows, int64_t cols, bool tanh_approx,
                              cudaStream_t stream) {
  if (rows * cols == 0) return cudaSuccess;
  return LLMKIT_CUDA_DISPATCH(
      dtype, [&] { return forward_t<scalar_t>(x, bias, out, rows, cols, tanh_approx, stream); });
}

int64_t bias_gelu_backward_workspace(int64_t rows, int64_t cols) {
  return column_sums_workspace(rows, cols);
}

cudaError_t bias_gelu_backward(DType dtype, const void* dy, const void* x, const float* bias,
                               void* dx, float* dbias, float* workspace, int64_t rows,
                               int64_t cols, bool tanh_approx, cudaStream_t stream) {
  if (dbias != nullptr && bias == nullptr) return cudaErrorInvalidValue;
  return LLMKIT_CUDA_DISPATCH(dtype, [&] {
    return backward_t<scalar_t>(dy, x, bias, dx, dbias, workspace, rows, cols, tanh_approx, stream);
  });
}

}  // namespace llmkit_ext::cuda
