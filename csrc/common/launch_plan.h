// Host-side launch decisions of the CUDA kernels that depend on sizes and device limits,
// in plain C++ (no CUDA header): csrc/cuda/*.cu launch from them, and the CPU build of
// the extension exposes them (torch.ops.llmkit_ext.norm_forward_plan) so that tests on a
// machine without a GPU check the regime every row length gets on a given device.
#pragma once

#include <cstdint>

namespace llmkit_ext {

// Threads per block for a row of `cols` elements read `vec` at a time: the smallest power
// of two from 32 to 1024 covering the row in one step; at least 128 for rows of more
// than 256 elements.
inline int threads_for_row(int64_t cols, int vec) {
  const int64_t want = (cols + vec - 1) / vec;
  int t = 32;
  while (t < want && t < 1024) t *= 2;
  return t < 128 && cols > 256 ? 128 : t;
}

// Shared memory a block may use without opting in (cudaFuncAttributeMaxDynamicSharedMemorySize),
// on every GPU since sm_20.
constexpr int64_t kDefaultSmemPerBlock = 48 * 1024;

// Static shared memory of the norm forward kernel: 32 floats of reduction scratch.
constexpr int kNormScratchFloats = 32;
constexpr int64_t kNormStaticSmem = kNormScratchFloats * 4;

struct NormForwardPlan {
  int threads;         // per block (one block per row)
  int vec;             // elements per access: 16 bytes' worth, or 1
  bool cache_row;      // the row is kept in shared memory as float32 between the passes
  int64_t smem_bytes;  // dynamic shared memory of the launch
  bool opt_in;         // smem_bytes + static shared memory is over kDefaultSmemPerBlock
};

// The launch of the norm forward kernel for rows of `cols` elements of `elem_bytes` bytes.
// `vectorizable`: the row length and every pointer allow 16-byte access. `smem_optin`:
// the device's shared memory per block with opt-in (cudaDevAttrMaxSharedMemoryPerBlockOptin,
// 227 KiB on sm_90, 163 KiB on sm_80; 0 when unknown). The row is cached in shared memory
// when it fits with the static scratch in what the device allows; longer rows are read
// again from global memory for the variance and output passes.
inline NormForwardPlan norm_forward_plan(int64_t cols, int elem_bytes, bool vectorizable,
                                         int64_t smem_optin) {
  NormForwardPlan p{};
  p.vec = vectorizable ? 16 / elem_bytes : 1;
  p.threads = threads_for_row(cols, p.vec);
  const int64_t limit = smem_optin > kDefaultSmemPerBlock ? smem_optin : kDefaultSmemPerBlock;
  const int64_t need = cols * 4 + kNormStaticSmem;
  p.cache_row = cols > 0 && need <= limit;
  p.smem_bytes = p.cache_row ? cols * 4 : 0;
  p.opt_in = p.cache_row && need > kDefaultSmemPerBlock;
  return p;
}

}  // namespace llmkit_ext
