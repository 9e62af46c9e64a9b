// LayerNorm / RMSNorm forward and backward, with the fused residual add, on the GPU.
// One block per row; float32 statistics (two-pass variance over a shared-memory copy
// of the row when it fits, else over a re-read of the row); 16-byte vectorized loads
// when the row length and pointers allow; parameter gradients by a deterministic
// column reduction (common.cuh).
#include "common.cuh"

namespace llmkit_ext::cuda {

namespace {

constexpr int64_t kMaxCachedFloats = 12288;  // 48 KiB of shared memory

template <typename T, int VEC>
__global__ void norm_forward_kernel(NormForwardArgs a, bool cache_row) {
  extern __shared__ float row_cache[];
  __shared__ float scratch[32];
  const int64_t r = blockIdx.x;
  const int64_t cols = a.cols;
  const T* x = static_cast<const T*>(a.x) + r * cols;
  const T* res = a.residual ? static_cast<const T*>(a.residual) + r * cols : nullptr;
  T* res_out = a.residual_out ? static_cast<T*>(a.residual_out) + r * cols : nullptr;
  // the row as normalized: x, or x + residual rounded to T
  const T* src = res ? res_out : x;

  float sum = 0.f;
  for (int64_t c = static_cast<int64_t>(threadIdx.x) * VEC; c < cols; c += static_cast<int64_t>(blockDim.x) * VEC) {
    float v[VEC];
    load_floats<T, VEC>(x + c, v);
    if (res) {
      float rv[VEC];
      load_floats<T, VEC>(res + c, rv);
#pragma unroll
      for (int i = 0; i < VEC; ++i) v[i] = to_float(from_float<T>(v[i] + rv[i]));
      store_floats<T, VEC>(res_out + c, v);
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      sum += v[i];
      if (cache_row) row_cache[c + i] = v[i];
    }
  }
  if (res) __syncthreads();  // residual_out written by this block is re-read below
  const float mean = a.rms ? 0.f : block_reduce<false>(sum, scratch) / static_cast<float>(cols);

  float ssd = 0.f;
  for (int64_t c = static_cast<int64_t>(threadIdx.x) * VEC; c < cols; c += static_cast<int64_t>(blockDim.x) * VEC) {
    float v[VEC];
    if (cache_row) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) v[i] = row_cache[c + i];
    } else {
      load_floats<T, VEC>(src + c, v);
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float d = v[i] - mean;
      ssd += d * d;
    }
  }
  const float var = block_reduce<false>(ssd, scratch) / static_cast<float>(cols);
  const float rstd = rsqrtf(var + a.eps);
  if (threadIdx.x == 0) {
    if (a.mean) a.mean[r] = mean;
    a.rstd[r] = rstd;
  }

  T* out = static_cast<T*>(a.out) + r * cols;
  for (int64_t c = static_cast<int64_t>(threadIdx.x) * VEC; c < cols; c += static_cast<int64_t>(blockDim.x) * VEC) {
    float v[VEC];
    if (cache_row) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) v[i] = row_cache[c + i];
    } else {
      load_floats<T, VEC>(src + c, v);
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      float y = (v[i] - mean) * rstd;
      if (a.weight) y *= a.weight[c + i];
      if (a.bias) y += a.bias[c + i];
      v[i] = y;
    }
    store_floats<T, VEC>(out + c, v);
  }
}

// dx of one row: rstd * (g - mean(g) - x_hat * mean(g * x_hat)) [+ dresidual], g = dy * w.
template <typename T, int VEC>
__global__ void norm_backward_dx_kernel(NormBackwardArgs a) {
  __shared__ float scratch[32];
  const int64_t r = blockIdx.x;
  const int64_t cols = a.cols;
  const T* x = static_cast<const T*>(a.x) + r * cols;
  const T* dy = static_cast<const T*>(a.dy) + r * cols;
  const float mean = a.rms ? 0.f : a.mean[r];
  const float rstd = a.rstd[r];
  float sg = 0.f, sgx = 0.f;
  for (int64_t c = static_cast<int64_t>(threadIdx.x) * VEC; c < cols; c += static_cast<int64_t>(blockDim.x) * VEC) {
    float xv[VEC], dv[VEC];
    load_floats<T, VEC>(x + c, xv);
    load_floats<T, VEC>(dy + c, dv);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float g = a.weight ? dv[i] * a.weight[c + i] : dv[i];
      sg += g;
      sgx += g * (xv[i] - mean) * rstd;
    }
  }
  const float n = static_cast<float>(cols);
  const float c_gx = block_reduce<false>(sgx, scratch) / n;
  const float c_g = a.rms ? 0.f : block_reduce<false>(sg, scratch) / n;
  T* dx = static_cast<T*>(a.dx) + r * cols;
  const T* dres = a.dresidual ? static_cast<const T*>(a.dresidual) + r * cols : nullptr;
  for (int64_t c = static_cast<int64_t>(threadIdx.x) * VEC; c < cols; c += static_cast<int64_t>(blockDim.x) * VEC) {
    float xv[VEC], dv[VEC], rv[VEC];
    load_floats<T, VEC>(x + c, xv);
    load_floats<T, VEC>(dy + c, dv);
    if (dres) load_floats<T, VEC>(dres + c, rv);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float g = a.weight ? dv[i] * a.weight[c + i] : dv[i];
      const float xh = (xv[i] - mean) * rstd;
      float d = (g - c_g - xh * c_gx) * rstd;
      if (dres) d += rv[i];
      xv[i] = d;
    }
    store_floats<T, VEC>(dx + c, xv);
  }
}

// (dy * x_hat, dy) at (r, c): the summands of d weight and d bias.
template <typename T>
struct NormParamGrad {
  const T* x;
  const T* dy;
  const float* mean;
  const float* rstd;
  int64_t cols;
  __device__ float2 operator()(int64_t r, int64_t c) const {
    const int64_t i = r * cols + c;
    const float d = to_float(dy[i]);
    const float xh = (to_float(x[i]) - (mean ? mean[r] : 0.f)) * rstd[r];
    return make_float2(d * xh, d);
  }
};

template <typename T>
bool can_vectorize(int64_t cols, std::initializer_list<const void*> ptrs) {
  if (cols % kVec16<T> != 0) return false;
  for (const void* p : ptrs)
    if (p != nullptr && !aligned16(p)) return false;
  return true;
}

template <typename T>
cudaError_t norm_forward_t(const NormForwardArgs& a, cudaStream_t stream) {
  const bool vec = can_vectorize<T>(a.cols, {a.x, a.residual, a.out, a.residual_out, a.weight, a.bias});
  const int v = vec ? kVec16<T> : 1;
  const int threads = threads_for_row(a.cols, v);
  const bool cache = a.cols <= kMaxCachedFloats;
  const size_t smem = cache ? static_cast<size_t>(a.cols) * sizeof(float) : 0;
  const dim3 grid(static_cast<unsigned>(a.rows));
  if (vec) {
    norm_forward_kernel<T, kVec16<T>><<<grid, threads, smem, stream>>>(a, cache);
  } else {
    norm_forward_kernel<T, 1><<<grid, threads, smem, stream>>>(a, cache);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t norm_backward_t(const NormBackwardArgs& a, cudaStream_t stream) {
  const bool vec = can_vectorize<T>(a.cols, {a.x, a.dy, a.dx, a.dresidual, a.weight});
  const int threads = threads_for_row(a.cols, vec ? kVec16<T> : 1);
  const dim3 grid(static_cast<unsigned>(a.rows));
  if (vec) {
    norm_backward_dx_kernel<T, kVec16<T>><<<grid, threads, 0, stream>>>(a);
  } else {
    norm_backward_dx_kernel<T, 1><<<grid, threads, 0, stream>>>(a);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || (a.dweight == nullptr && a.dbias == nullptr)) return err;
  const NormParamGrad<T> op{static_cast<const T*>(a.x), static_cast<const T*>(a.dy),
                            a.rms ? nullptr : a.mean, a.rstd, a.cols};
  return column_sums(op, a.rows, a.cols, a.workspace, a.dweight, a.dbias, stream);
}

}  // namespace

cudaError_t norm_forward(const NormForwardArgs& args, cudaStream_t stream) {
  if (args.rows == 0) return cudaSuccess;
  if (args.cols == 0) return cudaErrorInvalidValue;  // the Python side keeps empty rows
  return LLMKIT_CUDA_DISPATCH(args.dtype, [&] { return norm_forward_t<scalar_t>(args, stream); });
}

int64_t norm_backward_workspace(int64_t rows, int64_t cols, bool need_params) {
  return need_params ? column_sums_workspace(rows, cols) : 0;
}

cudaError_t norm_backward(const NormBackwardArgs& args, cudaStream_t stream) {
  if (args.cols == 0) return cudaErrorInvalidValue;
  if (args.rows == 0 && args.dweight == nullptr && args.dbias == nullptr) return cudaSuccess;
  return LLMKIT_CUDA_DISPATCH(args.dtype, [&] {
    if (args.rows == 0) {
      cudaError_t err = cudaSuccess;
      if (args.dweight) err = cudaMemsetAsync(args.dweight, 0, args.cols * sizeof(float), stream);
      if (err == cudaSuccess && args.dbias)
        err = cudaMemsetAsync(args.dbias, 0, args.cols * sizeof(float), stream);
      return err;
    }
    return norm_backward_t<scalar_t>(args, stream);
  });
}

}  // namespace llmkit_ext::cuda
