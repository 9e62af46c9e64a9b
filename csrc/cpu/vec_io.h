// Loads and stores of 2 x Vectorized<float>::size() elements of T as two float vectors,
// and the column-sum helper shared by the CPU kernels.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
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

inline void load2f(const float* p, FVec& a, FVec& b) {
  a = FVec::loadu(p);
  b = FVec::loadu(p + FVec::size());
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
