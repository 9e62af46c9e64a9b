// Attention forward on tensor cores (WMMA, float16 / bfloat16 in, float32 accumulate):
// one block of 4 warps per 64 query rows of one (batch, head); each warp owns 16 rows.
// Per 64-key tile: S = Q K^T (tensor cores), the online softmax update in float32
// (scale, bool / float mask, top-left causal, Philox dropout), O = O * alpha + P V
// (tensor cores). lse = m + log(l) in natural log; rows with no visible key get zeros
// and lse = +inf. GQA: query head h reads key/value head h / (Hq / Hkv).
#include "attention_common.cuh"

namespace llmkit_ext::cuda {

namespace {

using namespace attn;

template <int DPAD>
constexpr int kOutLd = (DPAD > kBlockN ? DPAD : kBlockN) + 4;  // per-warp S / O staging

template <typename T, int DPAD>
constexpr size_t fwd_smem_bytes() {
  return static_cast<size_t>(kBlockM + 2 * kBlockN) * kTileLd<DPAD> * sizeof(T) +
         static_cast<size_t>(kWarps) * kFrag * kOutLd<DPAD> * sizeof(float) +
         static_cast<size_t>(kWarps) * kFrag * kProbLd * sizeof(T);
}

template <typename T, int DPAD>
__global__ void __launch_bounds__(kThreads) attention_fwd_kernel(AttentionArgs a, bool vec_ok) {
  extern __shared__ __align__(128) unsigned char smem[];
  constexpr int LD = kTileLd<DPAD>;
  constexpr int OLD = kOutLd<DPAD>;
  T* q_tile = reinterpret_cast<T*>(smem);
  T* k_tile = q_tile + kBlockM * LD;
  T* v_tile = k_tile + kBlockN * LD;
  float* stage_all = reinterpret_cast<float*>(v_tile + kBlockN * LD);
  T* prob_all = reinterpret_cast<T*>(stage_all + kWarps * kFrag * OLD);

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t b = blockIdx.x / a.heads_q, h = blockIdx.x % a.heads_q;
  const int64_t hk = h / (a.heads_q / a.heads_kv);
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kBlockM;
  const T* q_base = static_cast<const T*>(a.q) + b * a.q_strides[0] + h * a.q_strides[1];
  const T* k_base = static_cast<const T*>(a.k) + b * a.k_strides[0] + hk * a.k_strides[1];
  const T* v_base = static_cast<const T*>(a.v) + b * a.v_strides[0] + hk * a.v_strides[1];
  load_tile<T, DPAD>(q_tile, q_base, m0, a.q_len, a.q_strides[2], static_cast<int>(a.head_dim), vec_ok);

  float* stage = stage_all + warp * kFrag * OLD;     // this warp's 16 x 64 scores / 16 x DPAD O
  T* probs = prob_all + warp * kFrag * kProbLd;       // this warp's 16 x 64 probabilities
  const T* q_warp = q_tile + warp * kFrag * LD;
  const int row = lane >> 1, half = lane & 1;          // two lanes per row, 32 columns each
  const int64_t i = m0 + warp * kFrag + row;

  float m_run = -INFINITY, l_run = 0.f;
  OutFrags<DPAD> acc;
#pragma unroll
  for (int n = 0; n < DPAD / kFrag; ++n) wmma::fill_fragment(acc[n], 0.f);

  const int64_t n_end = a.causal ? (a.k_len < m0 + kBlockM ? a.k_len : m0 + kBlockM) : a.k_len;
  for (int64_t n0 = 0; n0 < n_end; n0 += kBlockN) {
    __syncthreads();  // the previous tile is consumed (and the Q tile is loaded)
    load_tile<T, DPAD>(k_tile, k_base, n0, a.k_len, a.k_strides[2], static_cast<int>(a.head_dim), vec_ok);
    load_tile<T, DPAD>(v_tile, v_base, n0, a.k_len, a.v_strides[2], static_cast<int>(a.head_dim_v), vec_ok);
    __syncthreads();
    scores_16x64<T, DPAD>(stage, OLD, q_warp, LD, k_tile, LD);
    __syncwarp();

    float s[32];
    float tile_max = -INFINITY;
#pragma unroll
    for (int c = 0; c < 32; ++c) {
      const int col = half * 32 + c;
      s[c] = masked_score(a, stage[row * OLD + col], b, h, i, n0 + col);
      tile_max = fmaxf(tile_max, s[c]);
    }
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
    const float m_new = fmaxf(m_run, tile_max);
    const float m_use = m_new == -INFINITY ? 0.f : m_new;  // a row with nothing visible yet
    const float alpha = expf(m_run - m_use);
    float p_sum = 0.f;
#pragma unroll
    for (int c = 0; c < 32; ++c) {
      const int col = half * 32 + c;
      const float p = expf(s[c] - m_use);
      p_sum += p;
      probs[row * kProbLd + col] = from_float<T>(p * dropout_factor(a, b, h, i, n0 + col));
    }
    p_sum += __shfl_xor_sync(0xffffffffu, p_sum, 1);
    l_run = l_run * alpha + p_sum;
    m_run = m_new;
    __syncwarp();

    if (n0 > 0 && __any_sync(0xffffffffu, alpha != 1.f)) {  // O rows *= alpha
#pragma unroll
      for (int n = 0; n < DPAD / kFrag; ++n)
        wmma::store_matrix_sync(stage + n * kFrag, acc[n], OLD, wmma::mem_row_major);
      __syncwarp();
      for (int c = half; c < DPAD; c += 2) stage[row * OLD + c] *= alpha;
      __syncwarp();
#pragma unroll
      for (int n = 0; n < DPAD / kFrag; ++n)
        wmma::load_matrix_sync(acc[n], stage + n * kFrag, OLD, wmma::mem_row_major);
    }
    mma_rowmajor_b<T, kBlockN, DPAD / kFrag>(acc, probs, kProbLd, v_tile, LD);
  }

  // out = O / l (zeros where nothing was visible), lse = m + log(l) (+inf there)
  const float inv_l = l_run > 0.f ? 1.f / l_run : 0.f;
  __syncwarp();
#pragma unroll
  for (int n = 0; n < DPAD / kFrag; ++n)
    wmma::store_matrix_sync(stage + n * kFrag, acc[n], OLD, wmma::mem_row_major);
  __syncwarp();
  if (i < a.q_len) {
    const int64_t row_index = (b * a.heads_q + h) * a.q_len + i;
    T* out = static_cast<T*>(a.out) + row_index * a.head_dim_v;
    for (int c = half; c < a.head_dim_v; c += 2) out[c] = from_float<T>(stage[row * OLD + c] * inv_l);
    if (half == 0) a.lse[row_index] = l_run > 0.f ? m_run + logf(l_run) : INFINITY;
  }
}

template <typename T, int DPAD>
cudaError_t launch_forward(const AttentionArgs& a, cudaStream_t stream) {
  constexpr size_t smem = fwd_smem_bytes<T, DPAD>();
  cudaError_t err = cudaFuncSetAttribute(attention_fwd_kernel<T, DPAD>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(a.batch * a.heads_q), static_cast<unsigned>((a.q_len + kBlockM - 1) / kBlockM));
  attention_fwd_kernel<T, DPAD><<<grid, kThreads, smem, stream>>>(a, attention_vec_ok(a));
  return cudaGetLastError();
}

}  // namespace

cudaError_t attention_forward(const AttentionArgs& args, cudaStream_t stream) {
  if (args.batch * args.heads_q * args.q_len == 0) return cudaSuccess;
  if (args.heads_kv <= 0 || args.heads_q % args.heads_kv != 0 || args.head_dim > kMaxHeadDim ||
      args.head_dim_v > kMaxHeadDim)
    return cudaErrorInvalidValue;
  return LLMKIT_ATTENTION_DISPATCH(args, [&] { return launch_forward<scalar_t, kDPad>(args, stream); });
}

}  // namespace llmkit_ext::cuda
