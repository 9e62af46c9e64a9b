// Loads and stores of 2 x Vectorized<float>::size() elements of T as two float vectors,
// and the column-sum helper shared by the CPU kernels.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>  // convert_to_float / convert_from_float specializations
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace llmkit_ext::cpu {

using FVec = at::vec::Vectorized<float>;

// Elements handled per vector step: two float vectors (one vector of a 16-bit type).
constexpr int64_t kStep = 2 * FVec::size();

template <typename T>
inline void load2(const T* p, FVec& a, FVec& b) {
  if constexpr (std::is_same_v<T, float>) {
    a = FVec::loadu(p);
    b = FVec::loadu(p + FVec::size());
  } else {
    auto v = at::vec::Vectorized<T>::loadu(p);
    std::tie(a, b) = at::vec::convert_to_float<T>(v);
  }
}

template <typename T>
inline void store2(T* p, const FVec& a, const FVec& b) {
  if constexpr (std::is_same_v<T, float>) {
    a.store(p);
    b.store(p + FVec::size());
  } else {
    at::vec::convert_from_float<T>(a, b).store(p);
  }
}

// store2, and (a, b) become the values as stored (rounded to T): the residual add
// normalizes the rounded sum without reading it back.
template <typename T>
inline void store2_rounded(T* p, FVec& a, FVec& b) {
  if constexpr (std::is_same_v<T, float>) {
    store2(p, a, b);
  } else {
    const auto v = at::vec::convert_from_float<T>(a, b);
    v.store(p);
    std::tie(a, b) = at::vec::convert_to_float<T>(v);
  }
}

// store2 with non-temporal (streaming) stores on AVX2 / AVX512: the line is written
// without being read into the cache first. p must be aligned to kStep * sizeof(T)
// bytes' vector width (64 bytes on AVX512, 32 on AVX2); see can_stream. After the
// streaming stores of a thread, stream_fence() orders them before anything later.
template <typename T>
inline void store2_stream(T* p, const FVec& a, const FVec& b) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
#if defined(CPU_CAPABILITY_AVX512)
    _mm512_stream_ps(p, a);
    _mm512_stream_ps(p + FVec::size(), b);
#else
    _mm256_stream_ps(p, a);
    _mm256_stream_ps(p + FVec::size(), b);
#endif
  } else {
    const auto v = at::vec::convert_from_float<T>(a, b);
#if defined(CPU_CAPABILITY_AVX512)
    _mm512_stream_si512(reinterpret_cast<__m512i*>(p), v);
#else
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), v);
#endif
  }
#else
  store2(p, a, b);
#endif
}

inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// True when rows of `cols` elements of T starting at p are all aligned for store2_stream.
template <typename T>
inline bool can_stream(const T* p, int64_t cols) {
  constexpr int64_t kAlign = FVec::size() * sizeof(float);  // one float vector's bytes
  return reinterpret_cast<uintptr_t>(p) % kAlign == 0 &&
         (cols * static_cast<int64_t>(sizeof(T))) % kAlign == 0;
}

// Software prefetch of the kStep elements of T at p (every 64-byte line of them).
template <typename T>
inline void prefetch_step(const T* p) {
  for (int64_t k = 0; k < kStep * static_cast<int64_t>(sizeof(T)); k += 64)
    __builtin_prefetch(reinterpret_cast<const char*>(p) + k);
}

inline void load2f(const float* p, FVec& a, FVec& b) {
  a = FVec::loadu(p);
  b = FVec::loadu(p + FVec::size());
}

// Horizontal sum of the lanes of v, lane by lane in order (the same on every ISA's
// Vectorized; at::vec::vec_reduce_all's signature differs between them).
inline float hsum(const FVec& v) {
  alignas(64) float lanes[FVec::size()];
  v.store(lanes);
  float s = 0.f;
  for (int64_t i = 0; i < FVec::size(); ++i) s += lanes[i];
  return s;
}

// Largest lane of v, whose lanes are >= 0 or NaN (absolute values); NaN if any lane is
// NaN (the matching horizontal step of hsum for an absmax).
inline float hmax_nonneg(const FVec& v) {
  alignas(64) float lanes[FVec::size()];
  v.store(lanes);
  float m = 0.f;
  for (int64_t i = 0; i < FVec::size(); ++i) m = std::isnan(lanes[i]) || std::isnan(m) ? NAN : std::fmax(m, lanes[i]);
  return m;
}

// Rows are split into fixed chunks (independent of the thread count) so that reductions
// over rows are summed in the same order on every run.
// Row chunks of a parameter-gradient reduction: at most 32 rows each (a float32 sum of a
// few rows stays close to exact), at most 1024 chunks (bounded scratch memory).
inline int64_t row_chunks(int64_t rows, int64_t cols) {
  const int64_t per_chunk =
      std::clamp<int64_t>((int64_t{1} << 16) / std::max<int64_t>(cols, 1), 1, 32);
  return std::clamp<int64_t>((rows + per_chunk - 1) / per_chunk, 1, 1024);
}

// out[c] = sum over k of partial[k * cols + c], k in order, accumulated in double so the
// result matches a pairwise float32 reduction's accuracy or better.
inline void sum_partials(const std::vector<float>& partial, int64_t chunks, int64_t cols,
                         float* out) {
  at::parallel_for(0, cols, 1024, [&](int64_t c0, int64_t c1) {
    std::vector<double> acc(static_cast<size_t>(c1 - c0), 0.0);
    for (int64_t k = 0; k < chunks; ++k) {
      const float* p = partial.data() + k * cols;
      for (int64_t c = c0; c < c1; ++c) acc[c - c0] += static_cast<double>(p[c]);
    }
    for (int64_t c = c0; c < c1; ++c) out[c] = static_cast<float>(acc[c - c0]);
  });
}

inline int64_t row_grain(int64_t cols) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1));
}

}  // namespace llmkit_ext::cpu
