// LayerNorm / RMSNorm with optional fused residual add, forward and backward, on the CPU.
// One pass over each row computes (and rounds) the input and its sum, shifted by the
// row's first value, a second the sum of squared deviations (two-pass variance), a third
// writes the output; the row stays in a float32 scratch buffer in between, so memory is
// read and written once: x and residual read, their sum and the output written
// (streaming stores for large outputs), while the next row's inputs are prefetched.
// Rows whose squares overflow or underflow float32 are computed again, scaled
// (common/norm_stats.h).
#include "../common/norm_stats.h"
#include "cpu_kernels.h"
#include "vec_io.h"

#include <cmath>
#include <vector>

namespace llmkit_ext::cpu {

namespace {

// The row's first value as normalized: x[0], or x[0] + residual[0] rounded to T.
template <typename T>
float first_value(const T* xr, const T* rr) {
  const float v = static_cast<float>(xr[0]);
  return rr == nullptr ? v : static_cast<float>(static_cast<T>(v + static_cast<float>(rr[0])));
}

// Writes the float32 values of row r (x + residual, rounded to T, also stored in
// residual_out) into buf and returns the sum of (value - shift). kStream: residual_out
// is written with streaming stores (the caller checked can_stream).
template <typename T, bool kStream>
float load_row(const T* xr, const T* rr, T* rout, float* buf, int64_t cols, float shift) {
  FVec acc0(0.f), acc1(0.f);
  const FVec vs(shift);
  int64_t c = 0;
  for (; c + kStep <= cols; c += kStep) {
    FVec a, b;
    load2(xr + c, a, b);
    if (rr != nullptr) {
      FVec ra, rb;
      load2(rr + c, ra, rb);
      a = a + ra;
      b = b + rb;
      if constexpr (kStream) {
        if constexpr (!std::is_same_v<T, float>) {  // normalize the rounded sum
          std::tie(a, b) = at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(a, b));
        }
        store2_stream(rout + c, a, b);
      } else {
        store2_rounded(rout + c, a, b);
      }
    }
    a.store(buf + c);
    b.store(buf + c + FVec::size());
    acc0 = acc0 + (a - vs);
    acc1 = acc1 + (b - vs);
  }
  float tail = 0.f;
  for (; c < cols; ++c) {
    float v = static_cast<float>(xr[c]);
    if (rr != nullptr) {
      const T s = static_cast<T>(v + static_cast<float>(rr[c]));
      rout[c] = s;
      v = static_cast<float>(s);
    }
    buf[c] = v;
    tail += v - shift;
  }
  return hsum(acc0 + acc1) + tail;
}

float sum_sq_dev(const float* buf, float center, int64_t cols) {
  FVec acc0(0.f), acc1(0.f);
  const FVec m(center);
  int64_t c = 0;
  for (; c + kStep <= cols; c += kStep) {
    FVec a, b;
    load2f(buf + c, a, b);
    a = a - m;
    b = b - m;
    acc0 = at::vec::fmadd(a, a, acc0);
    acc1 = at::vec::fmadd(b, b, acc1);
  }
  float tail = 0.f;
  for (; c < cols; ++c) {
    const float d = buf[c] - center;
    tail += d * d;
  }
  return hsum(acc0 + acc1) + tail;
}

// Statistics of a row whose float32 squares overflow or underflow (norm_needs_rescale),
// computed on the row scaled by 2^-p, and its output written from them (scalar code:
// such rows are rare). Returns false, writing nothing, for rows holding inf / NaN or
// only zeros, whose plain statistics stand.
template <typename T>
bool rescaled_row(const float* buf, int64_t cols, float eps, bool rms, const float* weight,
                  const float* bias, T* outr, float* mean, float* rstd) {
  float amax = 0.f;
  for (int64_t c = 0; c < cols; ++c) amax = std::fmax(amax, std::fabs(buf[c]));
  for (int64_t c = 0; c < cols && std::isfinite(amax); ++c)
    if (std::isnan(buf[c])) amax = NAN;
  if (!std::isfinite(amax) || !(amax > 0.f)) return false;
  const int p = norm_scale_exponent(amax);
  const float down = norm_pow2(-p), up = norm_pow2(p);
  const float n = static_cast<float>(cols);
  // deviations from the first element, then from their mean: the mean itself is never
  // rounded on the way (a row of close huge values would lose its spread to that rounding)
  const float shift = rms ? 0.f : buf[0] * down;
  float s = 0.f;
  for (int64_t c = 0; c < cols; ++c) s += buf[c] * down - shift;
  const float delta = rms ? 0.f : s / n;
  float ssd = 0.f;
  for (int64_t c = 0; c < cols; ++c) {
    const float d = (buf[c] * down - shift) - delta;
    ssd += d * d;
  }
  const float rs = 1.f / std::sqrt(ssd / n + eps * down * down);
  if (mean != nullptr) *mean = (shift + delta) * up;
  *rstd = rs * down;
  for (int64_t c = 0; c < cols; ++c) {
    float v = ((buf[c] * down - shift) - delta) * rs;
    if (weight != nullptr) v *= weight[c];
    if (bias != nullptr) v += bias[c];
    outr[c] = static_cast<T>(v);
  }
  return true;
}

// Outputs of at least kStreamBytes (per output tensor; the fused op touches four such
// tensors) are written with streaming stores when aligned: they are evicted before anyone
// reads them back, and a streaming store does not read the line into the cache first.
// Measured on a 2-core AMD EPYC VM with a 32 MB L3 (2048 rows, same run, eager
// x + r then F.layer_norm = 1): float32 768 / 1024 / 4096 columns (6-32 MB each) 1.63 /
// 1.13 / 1.06x with normal stores, 2.02 / 2.02 / 2.05x streaming; bfloat16 768 / 1024
// columns (3-4 MB) 1.84 / 1.90x normal, 1.54 / 1.55x streaming (the outputs still sit in
// the L3 there), 4096 columns (16 MB) 1.33x normal, 1.45x streaming. A fixed size, a
// sixth of that L3: sysconf's L3 size is not reliable in VMs (it reported 384 MB here).
constexpr int64_t kStreamBytes = int64_t{5} << 20;

template <typename T, bool kStream>
void norm_forward_impl(const T* x, const T* residual, const float* weight, const float* bias,
                       T* out, T* residual_out, float* mean, float* rstd, int64_t rows,
                       int64_t cols, float eps, bool rms) {
  at::parallel_for(0, rows, row_grain(cols), [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(static_cast<size_t>(cols));
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t off = r * cols;
      const T* rr = residual ? residual + off : nullptr;
      const float shift = (rms || cols == 0) ? 0.f : first_value(x + off, rr);
      const float sum = load_row<T, kStream>(x + off, rr, residual_out ? residual_out + off : nullptr,
                                             buf.data(), cols, shift);
      const float mu = (rms || cols == 0) ? 0.f : shift + sum / static_cast<float>(cols);
      const float ssd = sum_sq_dev(buf.data(), mu, cols);
      const float var = ssd / static_cast<float>(cols);  // NaN for empty rows, as ATen
      T* outr = out + off;
      float* mean_r = (mean != nullptr && !rms) ? mean + r : nullptr;
      if (cols > 0 && norm_needs_rescale(sum, ssd, var, eps) &&
          rescaled_row(buf.data(), cols, eps, rms, weight, bias, outr, mean_r, rstd + r))
        continue;
      const float rs = 1.f / std::sqrt(var + eps);
      if (mean_r != nullptr) *mean_r = mu;
      rstd[r] = rs;
      const FVec vm(mu), vr(rs);
      // the next row's inputs are fetched while this one is written
      const T* next_x = r + 1 < r1 ? x + off + cols : nullptr;
      const T* next_res = (r + 1 < r1 && residual != nullptr) ? residual + off + cols : nullptr;
      int64_t c = 0;
      for (; c + kStep <= cols; c += kStep) {
        if (next_x != nullptr) prefetch_step(next_x + c);
        if (next_res != nullptr) prefetch_step(next_res + c);
        FVec a, b;
        load2f(buf.data() + c, a, b);
        a = (a - vm) * vr;
        b = (b - vm) * vr;
        if (weight != nullptr) {
          FVec wa, wb;
          load2f(weight + c, wa, wb);
          a = a * wa;
          b = b * wb;
        }
        if (bias != nullptr) {
          FVec ba, bb;
          load2f(bias + c, ba, bb);
          a = a + ba;
          b = b + bb;
        }
        if constexpr (kStream) {
          store2_stream(outr + c, a, b);
        } else {
          store2(outr + c, a, b);
        }
      }
      for (; c < cols; ++c) {
        float v = (buf[c] - mu) * rs;
        if (weight != nullptr) v *= weight[c];
        if (bias != nullptr) v += bias[c];
        outr[c] = static_cast<T>(v);
      }
    }
    if constexpr (kStream) stream_fence();
  });
}

}  // namespace

template <typename T>
void norm_forward(const T* x, const T* residual, const float* weight, const float* bias,
                  T* out, T* residual_out, float* mean, float* rstd, int64_t rows,
                  int64_t cols, float eps, bool rms) {
  const bool stream = rows * cols * static_cast<int64_t>(sizeof(T)) >= kStreamBytes &&
                      can_stream(out, cols) &&
                      (residual_out == nullptr || can_stream(residual_out, cols));
  if (stream) {
    norm_forward_impl<T, true>(x, residual, weight, bias, out, residual_out, mean, rstd, rows,
                               cols, eps, rms);
  } else {
    norm_forward_impl<T, false>(x, residual, weight, bias, out, residual_out, mean, rstd, rows,
                                cols, eps, rms);
  }
}

namespace {

template <typename T, bool kStream>
void norm_backward_impl(const T* dy, const T* x, const float* weight, const float* mean,
                        const float* rstd, const T* dresidual, T* dx, float* dweight,
                        float* dbias, int64_t rows, int64_t cols, bool rms) {
  const int64_t chunks = row_chunks(rows, cols);
  const bool need_params = dweight != nullptr || dbias != nullptr;
  std::vector<float> pw(need_params ? static_cast<size_t>(chunks * cols) : 0, 0.f);
  std::vector<float> pb(need_params ? static_cast<size_t>(chunks * cols) : 0, 0.f);
  at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
    std::vector<float> xhat(static_cast<size_t>(cols)), g(static_cast<size_t>(cols));
    const int64_t last_row = rows * k1 / chunks;  // this task's rows end here
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t rb = rows * k / chunks, re = rows * (k + 1) / chunks;
      float* pwk = need_params ? pw.data() + k * cols : nullptr;
      float* pbk = need_params ? pb.data() + k * cols : nullptr;
      for (int64_t r = rb; r < re; ++r) {
        const int64_t off = r * cols;
        const float mu = rms ? 0.f : mean[r];
        const float rs = rstd[r];
        const FVec vm(mu), vr(rs);
        // pass 1: x_hat, g = dy * w, their sums, the parameter gradients
        FVec sg0(0.f), sg1(0.f), sgx0(0.f), sgx1(0.f);
        float sg_t = 0.f, sgx_t = 0.f;
        int64_t c = 0;
        for (; c + kStep <= cols; c += kStep) {
          FVec xa, xb, da, db;
          load2(x + off + c, xa, xb);
          load2(dy + off + c, da, db);
          xa = (xa - vm) * vr;
          xb = (xb - vm) * vr;
          if (pwk != nullptr) {
            FVec a, b;
            load2f(pwk + c, a, b);
            at::vec::fmadd(da, xa, a).store(pwk + c);
            at::vec::fmadd(db, xb, b).store(pwk + c + FVec::size());
            load2f(pbk + c, a, b);
            (a + da).store(pbk + c);
            (b + db).store(pbk + c + FVec::size());
          }
          if (weight != nullptr) {
            FVec wa, wb;
            load2f(weight + c, wa, wb);
            da = da * wa;
            db = db * wb;
          }
          xa.store(xhat.data() + c);
          xb.store(xhat.data() + c + FVec::size());
          da.store(g.data() + c);
          db.store(g.data() + c + FVec::size());
          sg0 = sg0 + da;
          sg1 = sg1 + db;
          sgx0 = at::vec::fmadd(da, xa, sgx0);
          sgx1 = at::vec::fmadd(db, xb, sgx1);
        }
        for (; c < cols; ++c) {
          const float xh = (static_cast<float>(x[off + c]) - mu) * rs;
          const float d = static_cast<float>(dy[off + c]);
          if (pwk != nullptr) {
            pwk[c] += d * xh;
            pbk[c] += d;
          }
          const float gv = weight != nullptr ? d * weight[c] : d;
          xhat[c] = xh;
          g[c] = gv;
          sg_t += gv;
          sgx_t += gv * xh;
        }
        const float n = static_cast<float>(cols);
        const float c_gx = (hsum(sgx0 + sgx1) + sgx_t) / n;
        const float c_g = rms ? 0.f : (hsum(sg0 + sg1) + sg_t) / n;
        // pass 2: dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat)) [+ dresidual]
        const FVec vgx(c_gx), vg(c_g);
        // the next row's inputs are fetched while this one is written
        const bool more = r + 1 < last_row;
        c = 0;
        for (; c + kStep <= cols; c += kStep) {
          if (more) {
            prefetch_step(x + off + cols + c);
            prefetch_step(dy + off + cols + c);
            if (dresidual != nullptr) prefetch_step(dresidual + off + cols + c);
          }
          FVec ga, gb, xa, xb;
          load2f(g.data() + c, ga, gb);
          load2f(xhat.data() + c, xa, xb);
          FVec a = (ga - vg - xa * vgx) * vr;
          FVec b = (gb - vg - xb * vgx) * vr;
          if (dresidual != nullptr) {
            FVec ra, rb2;
            load2(dresidual + off + c, ra, rb2);
            a = a + ra;
            b = b + rb2;
          }
          if constexpr (kStream) {
            store2_stream(dx + off + c, a, b);
          } else {
            store2(dx + off + c, a, b);
          }
        }
        for (; c < cols; ++c) {
          float v = (g[c] - c_g - xhat[c] * c_gx) * rs;
          if (dresidual != nullptr) v += static_cast<float>(dresidual[off + c]);
          dx[off + c] = static_cast<T>(v);
        }
      }
    }
    if constexpr (kStream) stream_fence();
  });
  if (dweight != nullptr) sum_partials(pw, chunks, cols, dweight);
  if (dbias != nullptr) sum_partials(pb, chunks, cols, dbias);
}

}  // namespace

template <typename T>
void norm_backward(const T* dy, const T* x, const float* weight, const float* mean,
                   const float* rstd, const T* dresidual, T* dx, float* dweight,
                   float* dbias, int64_t rows, int64_t cols, bool rms) {
  if (rows * cols * static_cast<int64_t>(sizeof(T)) >= kStreamBytes && can_stream(dx, cols)) {
    norm_backward_impl<T, true>(dy, x, weight, mean, rstd, dresidual, dx, dweight, dbias, rows,
                                cols, rms);
  } else {
    norm_backward_impl<T, false>(dy, x, weight, mean, rstd, dresidual, dx, dweight, dbias, rows,
                                 cols, rms);
  }
}

#define LLMKIT_INSTANTIATE_NORM(T)                                                          \
  template void norm_forward<T>(const T*, const T*, const float*, const float*, T*, T*,   \
                                float*, float*, int64_t, int64_t, float, bool);          \
  template void norm_backward<T>(const T*, const T*, const float*, const float*,          \
                                 const float*, const T*, T*, float*, float*, int64_t,     \
                                 int64_t, bool);
LLMKIT_INSTANTIATE_NORM(float)
LLMKIT_INSTANTIATE_NORM(c10::Half)
LLMKIT_INSTANTIATE_NORM(c10::BFloat16)
#undef LLMKIT_INSTANTIATE_NORM

}  // namespace llmkit_ext::cpu
