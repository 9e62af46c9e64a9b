// LayerNorm / RMSNorm forward and backward, with the fused residual add, on the GPU.
// One block per row; float32 statistics: the mean from a sum shifted by the row's first
// value (a constant row has variance exactly 0), two-pass variance over a shared-memory
// copy of the row when it fits in what the device allows (common/launch_plan.h), else
// over a re-read of the row; rows whose squares overflow or underflow float32 are
// computed again, scaled (common/norm_stats.h). 16-byte vectorized loads when the row
// length and pointers allow; parameter gradients by a deterministic column reduction
// (common.cuh).
#include <atomic>

#include "../common/norm_stats.h"
#include "common.cuh"

namespace llmkit_ext::cuda {

namespace {

// The VEC values of the row at column c, as normalized: from the shared-memory copy or
// from src (x, or the rounded x + residual this block wrote).
template <typename T, int VEC>
__device__ __forceinline__ void row_values(const float* row_cache, const T* src, int64_t c,
                                           bool cache_row, float (&v)[VEC]) {
  if (cache_row) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[i] = row_cache[c + i];
  } else {
    load_floats<T, VEC>(src + c, v);
  }
}

// Sum of squared deviations from `mean` of the row scaled by `unit` (1, or 2^-p for
// rows whose squares leave float32's range); every thread gets it.
template <typename T, int VEC>
__device__ __forceinline__ float row_ssd(int64_t cols, const float* row_cache, const T* src,
                                         bool cache_row, float unit, float mean, float* scratch) {
  float acc = 0.f;
  for (int64_t c = static_cast<int64_t>(threadIdx.x) * VEC; c < cols; c += static_cast<int64_t>(blockDim.x) * VEC) {
    float v[VEC];
    row_values<T, VEC>(row_cache, src, c, cache_row, v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float d = v[i] * unit - mean;
      acc += d * d;
    }
  }
  return block_reduce<false>(acc, scratch);
}

template <typename T, int VEC>
__global__ void norm_forward_kernel(NormForwardArgs a, bool cache_row) {
  extern __shared__ float row_cache[];
  __shared__ float scratch[kNormScratchFloats];
  const int64_t r = blockIdx.x;
  const int64_t cols = a.cols;
  const int64_t step = static_cast<int64_t>(blockDim.x) * VEC;
  const float n = static_cast<float>(cols);
  const T* x = static_cast<const T*>(a.x) + r * cols;
  const T* res = a.residual ? static_cast<const T*>(a.residual) + r * cols : nullptr;
  T* res_out = a.residual_out ? static_cast<T*>(a.residual_out) + r * cols : nullptr;
  // the row as normalized: x, or x + residual rounded to T
  const T* src = res ? res_out : x;

  // the shift: the row's first value as normalized (every thread computes it alike)
  float shift = 0.f;
  if (!a.rms) {
    shift = to_float(x[0]);
    if (res) shift = to_float(from_float<T>(shift + to_float(res[0])));
  }
  // pass 1: the rounded sum x + residual (written once), the row into shared memory, the
  // sum of (value - shift)
  float sum = 0.f;
  for (int64_t c = static_cast<int64_t>(threadIdx.x) * VEC; c < cols; c += step) {
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
      sum += v[i] - shift;
      if (cache_row) row_cache[c + i] = v[i];
    }
  }
  if (res || cache_row) __syncthreads();  // the row is read by other threads below
  float shifted_sum = a.rms ? 0.f : block_reduce<false>(sum, scratch);
  float mean = a.rms ? 0.f : shift + shifted_sum / n;
  // pass 2: two-pass variance
  float ssd = row_ssd<T, VEC>(cols, row_cache, src, cache_row, 1.f, mean, scratch);
  float var = ssd / n, eps = a.eps, unit = 1.f;
  int p = 0;
  // rare rows: again on the row scaled by 2^-p (block-uniform: every thread holds the
  // same reduced values)
  if (norm_needs_rescale(shifted_sum, ssd, var, eps)) {
    float m = 0.f;
    for (int64_t c = static_cast<int64_t>(threadIdx.x) * VEC; c < cols; c += step) {
      float v[VEC];
      row_values<T, VEC>(row_cache, src, c, cache_row, v);
#pragma unroll
      for (int i = 0; i < VEC; ++i) m = nan_max(m, fabsf(v[i]));
    }
    const float amax = block_reduce<true>(m, scratch);
    if (isfinite(amax) && amax > 0.f) {  // else inf / NaN / zeros: the plain statistics stand
      p = norm_scale_exponent(amax);
      unit = norm_pow2(-p);
      if (!a.rms) {
        const float s_shift = shift * unit;
        float s = 0.f;
        for (int64_t c = static_cast<int64_t>(threadIdx.x) * VEC; c < cols; c += step) {
          float v[VEC];
          row_values<T, VEC>(row_cache, src, c, cache_row, v);
#pragma unroll
          for (int i = 0; i < VEC; ++i) s += v[i] * unit - s_shift;
        }
        mean = s_shift + block_reduce<false>(s, scratch) / n;
      }
      ssd = row_ssd<T, VEC>(cols, row_cache, src, cache_row, unit, mean, scratch);
      var = ssd / n;
      eps = eps * unit * unit;
    }
  }
  const float rstd = rsqrtf(var + eps);
  if (threadIdx.x == 0) {
    if (a.mean) a.mean[r] = mean * norm_pow2(p);  // exact: powers of two
    a.rstd[r] = rstd * unit;
  }

  // pass 3: the output
  T* out = static_cast<T*>(a.out) + r * cols;
  for (int64_t c = static_cast<int64_t>(threadIdx.x) * VEC; c < cols; c += step) {
    float v[VEC];
    row_values<T, VEC>(row_cache, src, c, cache_row, v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      float y = (v[i] * unit - mean) * rstd;
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

// Shared memory per block with opt-in on the current device (read once per device).
cudaError_t smem_optin(int64_t* bytes) {
  constexpr int kDevices = 64;
  static std::atomic<int> cached[kDevices];  // 0: not read yet
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  int v = dev < kDevices ? cached[dev].load(std::memory_order_relaxed) : 0;
  if (v == 0) {
    err = cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    if (err != cudaSuccess) return err;
    if (dev < kDevices) cached[dev].store(v, std::memory_order_relaxed);
  }
  *bytes = v;
  return cudaSuccess;
}

template <typename T, int VEC>
cudaError_t launch_forward(const NormForwardArgs& a, const NormForwardPlan& plan, cudaStream_t stream) {
  if (plan.opt_in) {
    const cudaError_t err = cudaFuncSetAttribute(norm_forward_kernel<T, VEC>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(plan.smem_bytes));
    if (err != cudaSuccess) return err;
  }
  norm_forward_kernel<T, VEC><<<static_cast<unsigned>(a.rows), plan.threads, plan.smem_bytes, stream>>>(a, plan.cache_row);
  return cudaGetLastError();
}

template <typename T>
cudaError_t norm_forward_t(const NormForwardArgs& a, cudaStream_t stream) {
  const bool vec = can_vectorize<T>(a.cols, {a.x, a.residual, a.out, a.residual_out, a.weight, a.bias});
  int64_t optin = 0;
  // only rows past the default 48 KiB need the device's limit
  if (a.cols * 4 + kNormStaticSmem > kDefaultSmemPerBlock) {
    const cudaError_t err = smem_optin(&optin);
    if (err != cudaSuccess) return err;
  }
  const NormForwardPlan plan = norm_forward_plan(a.cols, static_cast<int>(sizeof(T)), vec, optin);
  if (plan.vec > 1) return launch_forward<T, kVec16<T>>(a, plan, stream);
  return launch_forward<T, 1>(a, plan, stream);
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
