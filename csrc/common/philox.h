// Philox 4x32-10 counter-based random numbers, identical bit for bit to
// triton.language.rand(seed, offset) for int64 offsets and to llmkit/ops/_philox.py.
//
// Attention dropout keeps element (b, h, i, j) when
//   philox_uniform(seed, offset + ((b * heads + h) * q_len + i) * k_len + j) > p
// with p rounded to float32. The functions compile for the host (C++) and the device
// (CUDA), so the CPU build can test the exact code the CUDA kernels run.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace llmkit_ext {

constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
// The largest s with (2**31 - 1) * s < 1 in float32 (what tl.rand multiplies by).
constexpr float kPhiloxUniformScale = 4.6566127342e-10f;

// First output word of Philox4x32-10 for the counter (lo(offset), hi(offset), 0, 0)
// and the key (lo(seed), hi(seed)).
LLMKIT_HD uint32_t philox_randint(uint64_t seed, uint64_t offset) {
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
  uint32_t c0 = static_cast<uint32_t>(offset);
  uint32_t c1 = static_cast<uint32_t>(offset >> 32);
  uint32_t c2 = 0u;
  uint32_t c3 = 0u;
#ifdef __CUDA_ARCH__
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint64_t prod_b = static_cast<uint64_t>(kPhiloxRoundB) * c2;
    const uint64_t prod_a = static_cast<uint64_t>(kPhiloxRoundA) * c0;
    const uint32_t hi_b = static_cast<uint32_t>(prod_b >> 32);
    const uint32_t lo_b = static_cast<uint32_t>(prod_b);
    const uint32_t hi_a = static_cast<uint32_t>(prod_a >> 32);
    const uint32_t lo_a = static_cast<uint32_t>(prod_a);
    c0 = hi_b ^ c1 ^ k0;
    c1 = lo_b;
    c2 = hi_a ^ c3 ^ k1;
    c3 = lo_a;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return c0;
}

// A float32 uniform in [0, 1), equal to tl.rand(seed, offset).
LLMKIT_HD float philox_uniform(uint64_t seed, uint64_t offset) {
  int32_t x = static_cast<int32_t>(philox_randint(seed, offset));
  if (x < 0) x = -(x + 1);  // -x - 1 without overflowing at INT32_MIN
  return static_cast<float>(x) * kPhiloxUniformScale;
}

}  // namespace llmkit_ext
