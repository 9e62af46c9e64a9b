// Attention backward on tensor cores (WMMA), recomputing the probabilities from the
// saved lse: P = exp(S - lse) (zero on rows with lse = +inf), dP = dO V^T, with dropout
// Z = keep / (1 - p): dV = (P Z)^T dO, dS = P (dP Z - delta), dQ = scale dS K,
// dK = scale dS^T Q. delta = rowsum(dO O) is taken as rowsum(P Z dP) in float32, the
// same sum over the float32 output before it was rounded to float16 / bfloat16: the
// rounded O would put its rounding into every dS (dominant where |O| >> |dO|). Two
// kernels, no atomics (deterministic): one per 64-query block that first sums delta
// over the key blocks, writes it, then accumulates dQ; then one per 64-key block
// accumulating dK and dV over every query block of every query head of its GQA group.
#include "attention_common.cuh"

namespace llmkit_ext::cuda {

namespace {

using namespace attn;

template <typename T, int DPAD>
constexpr size_t dkdv_smem_bytes() {
  return static_cast<size_t>(4 * kBlockN) * kTileLd<DPAD> * sizeof(T) +  // K, V, Q, dO tiles
         static_cast<size_t>(2 * kWarps * kFrag) * kScoreLd * sizeof(float) +  // S^T, dP^T
         static_cast<size_t>(2 * kWarps * kFrag) * kProbLd * sizeof(T) +  // (P Z)^T, dS^T
         static_cast<size_t>(2 * kBlockM) * sizeof(float);  // lse, delta of the query block
}

template <typename T, int DPAD>
__global__ void __launch_bounds__(kThreads) attention_bwd_dkdv_kernel(AttentionBackwardArgs g, bool vec_ok, bool vec_do) {
  extern __shared__ __align__(128) unsigned char smem[];
  const AttentionArgs& a = g.fwd;
  constexpr int LD = kTileLd<DPAD>;
  T* k_tile = reinterpret_cast<T*>(smem);
  T* v_tile = k_tile + kBlockN * LD;
  T* q_tile = v_tile + kBlockN * LD;
  T* do_tile = q_tile + kBlockM * LD;
  float* st_all = reinterpret_cast<float*>(do_tile + kBlockM * LD);
  float* dpt_all = st_all + kWarps * kFrag * kScoreLd;
  T* pt_all = reinterpret_cast<T*>(dpt_all + kWarps * kFrag * kScoreLd);
  T* dst_all = pt_all + kWarps * kFrag * kProbLd;
  float* lse_s = reinterpret_cast<float*>(dst_all + kWarps * kFrag * kProbLd);
  float* delta_s = lse_s + kBlockM;

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t b = blockIdx.x / a.heads_kv, hk = blockIdx.x % a.heads_kv;
  const int64_t group = a.heads_q / a.heads_kv;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kBlockN;
  load_tile<T, DPAD>(k_tile, static_cast<const T*>(a.k) + b * a.k_strides[0] + hk * a.k_strides[1], n0,
                     a.k_len, a.k_strides[2], static_cast<int>(a.head_dim), vec_ok);
  load_tile<T, DPAD>(v_tile, static_cast<const T*>(a.v) + b * a.v_strides[0] + hk * a.v_strides[1], n0,
                     a.k_len, a.v_strides[2], static_cast<int>(a.head_dim_v), vec_ok);

  float* st = st_all + warp * kFrag * kScoreLd;
  float* dpt = dpt_all + warp * kFrag * kScoreLd;
  T* pt = pt_all + warp * kFrag * kProbLd;
  T* dst = dst_all + warp * kFrag * kProbLd;
  const int r = lane >> 1, half = lane & 1;  // key row r of this warp's 16; 32 queries per lane
  const int64_t j = n0 + warp * kFrag + r;

  OutFrags<DPAD> dk, dv;
#pragma unroll
  for (int n = 0; n < DPAD / kFrag; ++n) {
    wmma::fill_fragment(dk[n], 0.f);
    wmma::fill_fragment(dv[n], 0.f);
  }

  // top-left causal: query i sees key j only when i >= j
  const int64_t m_start = a.causal ? (n0 / kBlockM) * kBlockM : 0;
  for (int64_t gi = 0; gi < group; ++gi) {
    const int64_t h = hk * group + gi;
    const T* q_base = static_cast<const T*>(a.q) + b * a.q_strides[0] + h * a.q_strides[1];
    const int64_t row_base = (b * a.heads_q + h) * a.q_len;
    const T* do_base = static_cast<const T*>(g.dout) + row_base * a.head_dim_v;
    for (int64_t m0 = m_start; m0 < a.q_len; m0 += kBlockM) {
      __syncthreads();  // the previous query block is consumed
      load_tile<T, DPAD>(q_tile, q_base, m0, a.q_len, a.q_strides[2], static_cast<int>(a.head_dim), vec_ok);
      load_tile<T, DPAD>(do_tile, do_base, m0, a.q_len, a.head_dim_v, static_cast<int>(a.head_dim_v), vec_do);
      for (int t = threadIdx.x; t < kBlockM; t += kThreads) {
        const bool in = m0 + t < a.q_len;
        lse_s[t] = in ? a.lse[row_base + m0 + t] : INFINITY;
        delta_s[t] = in ? g.delta[row_base + m0 + t] : 0.f;
      }
      __syncthreads();
      scores_16x64<T, DPAD>(st, kScoreLd, k_tile + warp * kFrag * LD, LD, q_tile, LD);   // S^T
      scores_16x64<T, DPAD>(dpt, kScoreLd, v_tile + warp * kFrag * LD, LD, do_tile, LD);  // dP^T (no Z)
      __syncwarp();
#pragma unroll 4
      for (int c = half * 32; c < half * 32 + 32; ++c) {
        const int64_t i = m0 + c;
        const float s = masked_score(a, st[r * kScoreLd + c], b, h, i, j);
        const float p = s == -INFINITY ? 0.f : expf(s - lse_s[c]);
        const float z = p > 0.f ? dropout_factor(a, b, h, i, j) : 0.f;
        pt[r * kProbLd + c] = from_float<T>(p * z);
        dst[r * kProbLd + c] = from_float<T>(p * (dpt[r * kScoreLd + c] * z - delta_s[c]));
      }
      __syncwarp();
      mma_rowmajor_b<T, kBlockM, DPAD / kFrag>(dv, pt, kProbLd, do_tile, LD);
      mma_rowmajor_b<T, kBlockM, DPAD / kFrag>(dk, dst, kProbLd, q_tile, LD);
    }
  }
  __syncthreads();  // the Q / dO tiles become staging space
  float* stage = reinterpret_cast<float*>(q_tile) + warp * kFrag * (DPAD + 4);
  const int64_t kv_row0 = (b * a.heads_kv + hk) * a.k_len;
  const int64_t rows_left = a.k_len - (n0 + warp * kFrag);
  store_rows<T, DPAD>(dv, stage, 1.f, static_cast<T*>(g.dv) + (kv_row0 + n0 + warp * kFrag) * a.head_dim_v,
                      0, rows_left, static_cast<int>(a.head_dim_v));
  store_rows<T, DPAD>(dk, stage, a.scale, static_cast<T*>(g.dk) + (kv_row0 + n0 + warp * kFrag) * a.head_dim,
                      0, rows_left, static_cast<int>(a.head_dim));
}

template <typename T, int DPAD>
constexpr size_t dq_smem_bytes() {
  return static_cast<size_t>(4 * kBlockN) * kTileLd<DPAD> * sizeof(T) +  // Q, dO, K, V tiles
         static_cast<size_t>(2 * kWarps * kFrag) * kScoreLd * sizeof(float) +  // S, dP
         static_cast<size_t>(kWarps * kFrag) * kProbLd * sizeof(T);  // dS
}

// Two blocks per SM, what its shared memory allows at DPAD 64 / 128 anyway: ptxas then keeps
// everything in registers (with the default bound it spilled at DPAD 32 in bfloat16 on sm_80).
template <typename T, int DPAD>
__global__ void __launch_bounds__(kThreads, 2) attention_bwd_dq_kernel(AttentionBackwardArgs g, bool vec_ok, bool vec_do) {
  extern __shared__ __align__(128) unsigned char smem[];
  const AttentionArgs& a = g.fwd;
  constexpr int LD = kTileLd<DPAD>;
  T* q_tile = reinterpret_cast<T*>(smem);
  T* do_tile = q_tile + kBlockM * LD;
  T* k_tile = do_tile + kBlockM * LD;
  T* v_tile = k_tile + kBlockN * LD;
  float* s_all = reinterpret_cast<float*>(v_tile + kBlockN * LD);
  float* dp_all = s_all + kWarps * kFrag * kScoreLd;
  T* ds_all = reinterpret_cast<T*>(dp_all + kWarps * kFrag * kScoreLd);

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t b = blockIdx.x / a.heads_q, h = blockIdx.x % a.heads_q;
  const int64_t hk = h / (a.heads_q / a.heads_kv);
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kBlockM;
  const int64_t row_base = (b * a.heads_q + h) * a.q_len;
  load_tile<T, DPAD>(q_tile, static_cast<const T*>(a.q) + b * a.q_strides[0] + h * a.q_strides[1], m0,
                     a.q_len, a.q_strides[2], static_cast<int>(a.head_dim), vec_ok);
  load_tile<T, DPAD>(do_tile, static_cast<const T*>(g.dout) + row_base * a.head_dim_v, m0, a.q_len,
                     a.head_dim_v, static_cast<int>(a.head_dim_v), vec_do);
  const T* k_base = static_cast<const T*>(a.k) + b * a.k_strides[0] + hk * a.k_strides[1];
  const T* v_base = static_cast<const T*>(a.v) + b * a.v_strides[0] + hk * a.v_strides[1];

  float* s_w = s_all + warp * kFrag * kScoreLd;
  float* dp_w = dp_all + warp * kFrag * kScoreLd;
  T* ds_w = ds_all + warp * kFrag * kProbLd;
  const int r = lane >> 1, half = lane & 1;
  const int64_t i = m0 + warp * kFrag + r;
  const float lse_i = i < a.q_len ? a.lse[row_base + i] : INFINITY;

  // S = Q K^T and dP = dO V^T of the 64 keys from n0 into this warp's staging
  auto scores = [&](int64_t n0) {
    __syncthreads();  // the previous tile is consumed (and the Q / dO tiles are loaded)
    load_tile<T, DPAD>(k_tile, k_base, n0, a.k_len, a.k_strides[2], static_cast<int>(a.head_dim), vec_ok);
    load_tile<T, DPAD>(v_tile, v_base, n0, a.k_len, a.v_strides[2], static_cast<int>(a.head_dim_v), vec_ok);
    __syncthreads();
    scores_16x64<T, DPAD>(s_w, kScoreLd, q_tile + warp * kFrag * LD, LD, k_tile, LD);
    scores_16x64<T, DPAD>(dp_w, kScoreLd, do_tile + warp * kFrag * LD, LD, v_tile, LD);
    __syncwarp();
  };
  // The sum of f(c, P, dP Z) over this lane's 32 keys n0 + c of the staged tile
  auto each_key = [&](int64_t n0, auto&& f) {
    float sum = 0.f;
#pragma unroll 4
    for (int c = half * 32; c < half * 32 + 32; ++c) {
      const int64_t j = n0 + c;
      const float s = masked_score(a, s_w[r * kScoreLd + c], b, h, i, j);
      const float p = s == -INFINITY ? 0.f : expf(s - lse_i);
      const float z = p > 0.f ? dropout_factor(a, b, h, i, j) : 0.f;
      sum += f(c, p, dp_w[r * kScoreLd + c] * z);
    }
    __syncwarp();
    return sum;
  };

  const int64_t n_end = a.causal ? (a.k_len < m0 + kBlockM ? a.k_len : m0 + kBlockM) : a.k_len;
  // pass 1: delta = rowsum(P Z dP) in float32, written for the dK / dV kernel
  float delta_i = 0.f;
  for (int64_t n0 = 0; n0 < n_end; n0 += kBlockN) {
    scores(n0);
    delta_i += each_key(n0, [](int, float p, float dpz) { return p * dpz; });
  }
  delta_i += __shfl_xor_sync(0xffffffffu, delta_i, 1);
  if (half == 0 && i < a.q_len) g.delta[row_base + i] = delta_i;

  // pass 2: dS = P (dP Z - delta), dQ += dS K
  OutFrags<DPAD> dq;
#pragma unroll
  for (int n = 0; n < DPAD / kFrag; ++n) wmma::fill_fragment(dq[n], 0.f);
  for (int64_t n0 = 0; n0 < n_end; n0 += kBlockN) {
    scores(n0);
    each_key(n0, [=](int c, float p, float dpz) {
      ds_w[r * kProbLd + c] = from_float<T>(p * (dpz - delta_i));
      return 0.f;
    });
    mma_rowmajor_b<T, kBlockN, DPAD / kFrag>(dq, ds_w, kProbLd, k_tile, LD);
  }
  __syncthreads();  // the K / V tiles become staging space
  float* stage = reinterpret_cast<float*>(k_tile) + warp * kFrag * (DPAD + 4);
  store_rows<T, DPAD>(dq, stage, a.scale, static_cast<T*>(g.dq) + (row_base + m0 + warp * kFrag) * a.head_dim,
                      0, a.q_len - (m0 + warp * kFrag), static_cast<int>(a.head_dim));
}

// kernel<<<grid, kThreads, smem>>>(g, vec_ok, vec_do), opted in to `smem` bytes of dynamic
// shared memory.
template <typename Kernel>
cudaError_t launch_bwd_kernel(Kernel kernel, size_t smem, dim3 grid, const AttentionBackwardArgs& g, bool vec_ok,
                              bool vec_do, cudaStream_t stream) {
  const cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  kernel<<<grid, kThreads, smem, stream>>>(g, vec_ok, vec_do);
  return cudaGetLastError();
}

template <typename T, int DPAD>
cudaError_t launch_backward(const AttentionBackwardArgs& g, cudaStream_t stream) {
  const AttentionArgs& a = g.fwd;
  const bool vec_ok = attention_vec_ok(a);
  const bool vec_do = aligned16(g.dout) && a.head_dim_v % 8 == 0;
  if (a.batch * a.heads_q * a.q_len > 0) {  // dQ, and delta for the dK / dV kernel: first
    const dim3 grid(static_cast<unsigned>(a.batch * a.heads_q), static_cast<unsigned>((a.q_len + kBlockM - 1) / kBlockM));
    const cudaError_t err = launch_bwd_kernel(attention_bwd_dq_kernel<T, DPAD>, dq_smem_bytes<T, DPAD>(), grid, g,
                                              vec_ok, vec_do, stream);
    if (err != cudaSuccess) return err;
  }
  if (a.k_len == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(a.batch * a.heads_kv), static_cast<unsigned>((a.k_len + kBlockN - 1) / kBlockN));
  return launch_bwd_kernel(attention_bwd_dkdv_kernel<T, DPAD>, dkdv_smem_bytes<T, DPAD>(), grid, g, vec_ok, vec_do,
                           stream);
}

}  // namespace

cudaError_t attention_backward(const AttentionBackwardArgs& args, cudaStream_t stream) {
  const AttentionArgs& a = args.fwd;
  if (a.heads_kv <= 0 || a.heads_q % a.heads_kv != 0 || a.head_dim > kMaxHeadDim || a.head_dim_v > kMaxHeadDim)
    return cudaErrorInvalidValue;
  if (a.batch * a.heads_kv == 0) return cudaSuccess;
  return LLMKIT_ATTENTION_DISPATCH(a, [&] { return launch_backward<scalar_t, kDPad>(args, stream); });
}

}  // namespace llmkit_ext::cuda
