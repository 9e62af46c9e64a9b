// The torch glue of the llmkit extension: op schemas in the `llmkit_ext` namespace (apart
// from the user-facing `llmkit::` ops, whose cuda_ext backend calls these), the CPU
// implementations (csrc/cpu) and, when built with -DLLMKIT_WITH_CUDA, the CUDA ones
// (csrc/cuda). Inputs arrive validated by llmkit's shared checks; these functions only
// make layouts contiguous, convert parameters to float32, allocate outputs and launch.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "common/launch_plan.h"
#include "common/philox.h"
#include "cpu/cpu_kernels.h"

#ifdef LLMKIT_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/launchers.h"
#endif

namespace llmkit_ext {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

namespace {

// float/half/bfloat16 switch over the CPU kernels' element type.
#define LLMKIT_CPU_DISPATCH(dtype, NAME, ...)                                         \
  [&] {                                                                               \
    switch (dtype) {                                                                  \
      case at::kFloat: {                                                              \
        using scalar_t = float;                                                       \
        return __VA_ARGS__();                                                         \
      }                                                                               \
      case at::kHalf: {                                                               \
        using scalar_t = c10::Half;                                                   \
        return __VA_ARGS__();                                                         \
      }                                                                               \
      case at::kBFloat16: {                                                           \
        using scalar_t = c10::BFloat16;                                               \
        return __VA_ARGS__();                                                         \
      }                                                                               \
      default:                                                                        \
        TORCH_CHECK(false, NAME, ": the llmkit extension takes float32, float16 and " \
                                 "bfloat16, got ", dtype);                            \
    }                                                                                 \
  }()

Tensor float_param(const OptTensor& p) {
  return p.has_value() ? p->to(at::kFloat).contiguous() : Tensor();
}

const float* fptr(const Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

Tensor empty0(const Tensor& like, at::ScalarType dtype) {
  return at::empty({0}, like.options().dtype(dtype));
}

void check_2d(const char* op, const Tensor& x) {
  TORCH_CHECK(x.dim() == 2, op, ": expects a 2-D (rows, cols) tensor, got ", x.sizes());
}

// ---- shared between CPU and CUDA: allocation of outputs ------------------------------

struct NormOutputs {
  Tensor out, residual_out, mean, rstd;
};

NormOutputs alloc_norm_outputs(const Tensor& x, bool has_residual, bool rms) {
  const int64_t rows = x.size(0);
  auto f32 = x.options().dtype(at::kFloat);
  return {at::empty_like(x, at::MemoryFormat::Contiguous),
          has_residual ? at::empty_like(x, at::MemoryFormat::Contiguous) : empty0(x, x.scalar_type()),
          rms ? empty0(x, at::kFloat) : at::empty({rows}, f32), at::empty({rows}, f32)};
}

// ---- CPU implementations --------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor, Tensor> norm_fwd_cpu(const Tensor& x_in,
                                                        const OptTensor& residual_in,
                                                        const OptTensor& weight,
                                                        const OptTensor& bias, double eps,
                                                        bool rms) {
  check_2d("norm_fwd", x_in);
  const Tensor x = x_in.contiguous();
  const Tensor residual = residual_in.has_value() ? residual_in->contiguous() : Tensor();
  const Tensor w = float_param(weight), b = float_param(bias);
  NormOutputs o = alloc_norm_outputs(x, residual.defined(), rms);
  LLMKIT_CPU_DISPATCH(x.scalar_type(), "norm_fwd", [&] {
    cpu::norm_forward<scalar_t>(
        x.data_ptr<scalar_t>(), residual.defined() ? residual.data_ptr<scalar_t>() : nullptr,
        fptr(w), fptr(b), o.out.data_ptr<scalar_t>(),
        residual.defined() ? o.residual_out.data_ptr<scalar_t>() : nullptr,
        rms ? nullptr : o.mean.data_ptr<float>(), o.rstd.data_ptr<float>(), x.size(0),
        x.size(1), static_cast<float>(eps), rms);
  });
  return {o.out, o.residual_out, o.mean, o.rstd};
}

std::tuple<Tensor, Tensor, Tensor> norm_bwd_cpu(const Tensor& dy_in, const Tensor& x_in,
                                                const OptTensor& weight, const OptTensor& mean_in,
                                                const Tensor& rstd_in, const OptTensor& dres_in,
                                                bool need_dweight, bool need_dbias, bool rms) {
  check_2d("norm_bwd", x_in);
  const Tensor dy = dy_in.contiguous(), x = x_in.contiguous();
  const Tensor rstd = rstd_in.to(at::kFloat).contiguous();
  const Tensor mean = (!rms && mean_in.has_value()) ? mean_in->to(at::kFloat).contiguous() : Tensor();
  TORCH_CHECK(rms || mean.defined(), "norm_bwd: LayerNorm backward needs the saved mean");
  const Tensor dres = dres_in.has_value() ? dres_in->contiguous() : Tensor();
  const Tensor w = float_param(weight);
  const int64_t cols = x.size(1);
  Tensor dx = at::empty_like(x, at::MemoryFormat::Contiguous);
  Tensor dw = need_dweight ? at::empty({cols}, x.options().dtype(at::kFloat)) : empty0(x, at::kFloat);
  Tensor db = need_dbias ? at::empty({cols}, x.options().dtype(at::kFloat)) : empty0(x, at::kFloat);
  LLMKIT_CPU_DISPATCH(x.scalar_type(), "norm_bwd", [&] {
    cpu::norm_backward<scalar_t>(
        dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), fptr(w), fptr(mean),
        rstd.data_ptr<float>(), dres.defined() ? dres.data_ptr<scalar_t>() : nullptr,
        dx.data_ptr<scalar_t>(), need_dweight ? dw.data_ptr<float>() : nullptr,
        need_dbias ? db.data_ptr<float>() : nullptr, x.size(0), cols, rms);
  });
  return {dx, dw, db};
}

Tensor bias_gelu_fwd_cpu(const Tensor& x_in, const OptTensor& bias, bool tanh_approx) {
  check_2d("bias_gelu_fwd", x_in);
  const Tensor x = x_in.contiguous();
  const Tensor b = float_param(bias);
  Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  LLMKIT_CPU_DISPATCH(x.scalar_type(), "bias_gelu_fwd", [&] {
    cpu::bias_gelu_forward<scalar_t>(x.data_ptr<scalar_t>(), fptr(b), out.data_ptr<scalar_t>(),
                                     x.size(0), x.size(1), tanh_approx);
  });
  return out;
}

std::tuple<Tensor, Tensor> bias_gelu_bwd_cpu(const Tensor& dy_in, const Tensor& x_in,
                                             const OptTensor& bias, bool need_dbias,
                                             bool tanh_approx) {
  check_2d("bias_gelu_bwd", x_in);
  const Tensor dy = dy_in.contiguous(), x = x_in.contiguous();
  const Tensor b = float_param(bias);
  Tensor dx = at::empty_like(x, at::MemoryFormat::Contiguous);
  Tensor db = need_dbias ? at::empty({x.size(1)}, x.options().dtype(at::kFloat)) : empty0(x, at::kFloat);
  LLMKIT_CPU_DISPATCH(x.scalar_type(), "bias_gelu_bwd", [&] {
    cpu::bias_gelu_backward<scalar_t>(dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), fptr(b),
                                      dx.data_ptr<scalar_t>(),
                                      need_dbias ? db.data_ptr<float>() : nullptr, x.size(0),
                                      x.size(1), tanh_approx);
  });
  return {dx, db};
}

// A 2-D operand of the GLU kernels: unit column stride (else made contiguous), any row stride.
Tensor unit_cols(const char* op, const Tensor& t) {
  check_2d(op, t);
  return t.stride(1) == 1 && t.stride(0) >= t.size(1) ? t : t.contiguous();
}

Tensor glu_fwd_cpu(const Tensor& gate_in, const Tensor& up_in, int64_t act) {
  const Tensor g = unit_cols("glu_fwd", gate_in), u = unit_cols("glu_fwd", up_in);
  TORCH_CHECK(g.sizes() == u.sizes(), "glu_fwd: gate ", g.sizes(), " and up ", u.sizes(), " differ");
  Tensor out = at::empty(g.sizes(), g.options());
  LLMKIT_CPU_DISPATCH(g.scalar_type(), "glu_fwd", [&] {
    cpu::glu_forward<scalar_t>(g.data_ptr<scalar_t>(), g.stride(0), u.data_ptr<scalar_t>(), u.stride(0),
                               out.data_ptr<scalar_t>(), g.size(0), g.size(1), static_cast<int>(act));
  });
  return out;
}

std::tuple<Tensor, Tensor> glu_bwd_cpu(const Tensor& dy_in, const Tensor& gate_in, const Tensor& up_in,
                                       int64_t act) {
  const Tensor dy = unit_cols("glu_bwd", dy_in), g = unit_cols("glu_bwd", gate_in),
               u = unit_cols("glu_bwd", up_in);
  TORCH_CHECK(g.sizes() == u.sizes() && g.sizes() == dy.sizes(), "glu_bwd: dy ", dy.sizes(), ", gate ",
              g.sizes(), " and up ", u.sizes(), " differ");
  Tensor dg = at::empty(g.sizes(), g.options()), du = at::empty(g.sizes(), g.options());
  LLMKIT_CPU_DISPATCH(g.scalar_type(), "glu_bwd", [&] {
    cpu::glu_backward<scalar_t>(dy.data_ptr<scalar_t>(), dy.stride(0), g.data_ptr<scalar_t>(), g.stride(0),
                                u.data_ptr<scalar_t>(), u.stride(0), dg.data_ptr<scalar_t>(),
                                du.data_ptr<scalar_t>(), g.size(0), g.size(1), static_cast<int>(act));
  });
  return {dg, du};
}

std::tuple<Tensor, Tensor> quantize_rows_cpu(const Tensor& x_in) {
  check_2d("quantize_rows", x_in);
  const Tensor x = x_in.contiguous();
  Tensor q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  Tensor scale = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  LLMKIT_CPU_DISPATCH(x.scalar_type(), "quantize_rows", [&] {
    cpu::quantize_rows<scalar_t>(x.data_ptr<scalar_t>(), q.data_ptr<int8_t>(),
                                 scale.data_ptr<float>(), x.size(0), x.size(1));
  });
  return {q, scale};
}

// The Philox uniforms attention dropout uses (test hook: the same header as the kernels).
Tensor philox_uniform_cpu(int64_t seed, const Tensor& offsets_in) {
  const Tensor offsets = offsets_in.to(at::kLong).contiguous();
  Tensor out = at::empty(offsets.sizes(), offsets.options().dtype(at::kFloat));
  const int64_t* o = offsets.data_ptr<int64_t>();
  float* u = out.data_ptr<float>();
  for (int64_t i = 0; i < offsets.numel(); ++i)
    u[i] = philox_uniform(static_cast<uint64_t>(seed), static_cast<uint64_t>(o[i]));
  return out;
}

// The CUDA norm forward's launch for a row length, element size, vectorizability and a
// device's opt-in shared memory per block (launch_plan.h): [threads, vec, cache_row,
// smem_bytes, opt_in]. Host arithmetic only, in every build, so that a machine without
// a GPU can test which regime each device gets.
std::vector<int64_t> norm_forward_plan_op(int64_t cols, int64_t elem_bytes, bool vectorizable,
                                          int64_t smem_optin) {
  TORCH_CHECK(cols >= 0, "norm_forward_plan: cols must be >= 0, got ", cols);
  TORCH_CHECK(elem_bytes == 2 || elem_bytes == 4, "norm_forward_plan: elem_bytes must be 2 or 4, got ",
              elem_bytes);
  const NormForwardPlan p =
      norm_forward_plan(cols, static_cast<int>(elem_bytes), vectorizable, smem_optin);
  return {p.threads, p.vec, p.cache_row ? 1 : 0, p.smem_bytes, p.opt_in ? 1 : 0};
}

#ifdef LLMKIT_WITH_CUDA
// ---- CUDA implementations -------------------------------------------------------------

cuda::DType cuda_dtype(const Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return cuda::DType::kFloat32;
    case at::kHalf:
      return cuda::DType::kFloat16;
    case at::kBFloat16:
      return cuda::DType::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": the llmkit extension takes float32, float16 and bfloat16, got ",
                  t.scalar_type());
  }
}

cudaStream_t stream_of(const Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

const void* cptr(const Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

std::tuple<Tensor, Tensor, Tensor, Tensor> norm_fwd_cuda(const Tensor& x_in,
                                                         const OptTensor& residual_in,
                                                         const OptTensor& weight,
                                                         const OptTensor& bias, double eps,
                                                         bool rms) {
  check_2d("norm_fwd", x_in);
  c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = x_in.contiguous();
  const Tensor residual = residual_in.has_value() ? residual_in->contiguous() : Tensor();
  const Tensor w = float_param(weight), b = float_param(bias);
  NormOutputs o = alloc_norm_outputs(x, residual.defined(), rms);
  cuda::NormForwardArgs a{};
  a.dtype = cuda_dtype(x, "norm_fwd");
  a.x = x.data_ptr();
  a.residual = cptr(residual);
  a.weight = fptr(w);
  a.bias = fptr(b);
  a.out = o.out.data_ptr();
  a.residual_out = residual.defined() ? o.residual_out.data_ptr() : nullptr;
  a.mean = rms ? nullptr : o.mean.data_ptr<float>();
  a.rstd = o.rstd.data_ptr<float>();
  a.rows = x.size(0);
  a.cols = x.size(1);
  a.eps = static_cast<float>(eps);
  a.rms = rms;
  C10_CUDA_CHECK(cuda::norm_forward(a, stream_of(x)));
  return {o.out, o.residual_out, o.mean, o.rstd};
}

std::tuple<Tensor, Tensor, Tensor> norm_bwd_cuda(const Tensor& dy_in, const Tensor& x_in,
                                                 const OptTensor& weight, const OptTensor& mean_in,
                                                 const Tensor& rstd_in, const OptTensor& dres_in,
                                                 bool need_dweight, bool need_dbias, bool rms) {
  check_2d("norm_bwd", x_in);
  c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor dy = dy_in.contiguous(), x = x_in.contiguous();
  const Tensor rstd = rstd_in.to(at::kFloat).contiguous();
  const Tensor mean = (!rms && mean_in.has_value()) ? mean_in->to(at::kFloat).contiguous() : Tensor();
  TORCH_CHECK(rms || mean.defined(), "norm_bwd: LayerNorm backward needs the saved mean");
  const Tensor dres = dres_in.has_value() ? dres_in->contiguous() : Tensor();
  const Tensor w = float_param(weight);
  const int64_t rows = x.size(0), cols = x.size(1);
  auto f32 = x.options().dtype(at::kFloat);
  Tensor dx = at::empty_like(x, at::MemoryFormat::Contiguous);
  Tensor dw = need_dweight ? at::empty({cols}, f32) : empty0(x, at::kFloat);
  Tensor db = need_dbias ? at::empty({cols}, f32) : empty0(x, at::kFloat);
  Tensor ws = at::empty({cuda::norm_backward_workspace(rows, cols, need_dweight || need_dbias)}, f32);
  cuda::NormBackwardArgs a{};
  a.dtype = cuda_dtype(x, "norm_bwd");
  a.dy = dy.data_ptr();
  a.x = x.data_ptr();
  a.weight = fptr(w);
  a.mean = fptr(mean);
  a.rstd = rstd.data_ptr<float>();
  a.dresidual = cptr(dres);
  a.dx = dx.data_ptr();
  a.dweight = need_dweight ? dw.data_ptr<float>() : nullptr;
  a.dbias = need_dbias ? db.data_ptr<float>() : nullptr;
  a.workspace = ws.numel() ? ws.data_ptr<float>() : nullptr;
  a.rows = rows;
  a.cols = cols;
  a.rms = rms;
  C10_CUDA_CHECK(cuda::norm_backward(a, stream_of(x)));
  return {dx, dw, db};
}

Tensor bias_gelu_fwd_cuda(const Tensor& x_in, const OptTensor& bias, bool tanh_approx) {
  check_2d("bias_gelu_fwd", x_in);
  c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = x_in.contiguous();
  const Tensor b = float_param(bias);
  Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  C10_CUDA_CHECK(cuda::bias_gelu_forward(cuda_dtype(x, "bias_gelu_fwd"), x.data_ptr(), fptr(b),
                                         out.data_ptr(), x.size(0), x.size(1), tanh_approx,
                                         stream_of(x)));
  return out;
}

std::tuple<Tensor, Tensor> bias_gelu_bwd_cuda(const Tensor& dy_in, const Tensor& x_in,
                                              const OptTensor& bias, bool need_dbias,
                                              bool tanh_approx) {
  check_2d("bias_gelu_bwd", x_in);
  c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor dy = dy_in.contiguous(), x = x_in.contiguous();
  const Tensor b = float_param(bias);
  const int64_t rows = x.size(0), cols = x.size(1);
  auto f32 = x.options().dtype(at::kFloat);
  Tensor dx = at::empty_like(x, at::MemoryFormat::Contiguous);
  Tensor db = need_dbias ? at::empty({cols}, f32) : empty0(x, at::kFloat);
  Tensor ws = at::empty({need_dbias ? cuda::bias_gelu_backward_workspace(rows, cols) : 0}, f32);
  C10_CUDA_CHECK(cuda::bias_gelu_backward(
      cuda_dtype(x, "bias_gelu_bwd"), dy.data_ptr(), x.data_ptr(), fptr(b), dx.data_ptr(),
      need_dbias ? db.data_ptr<float>() : nullptr, ws.numel() ? ws.data_ptr<float>() : nullptr,
      rows, cols, tanh_approx, stream_of(x)));
  return {dx, db};
}

std::tuple<Tensor, Tensor> quantize_rows_cuda(const Tensor& x_in) {
  check_2d("quantize_rows", x_in);
  c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = x_in.contiguous();
  Tensor q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  Tensor scale = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  C10_CUDA_CHECK(cuda::quantize_rows(cuda_dtype(x, "quantize_rows"), x.data_ptr(),
                                     q.data_ptr<int8_t>(), scale.data_ptr<float>(), x.size(0),
                                     x.size(1), stream_of(x)));
  return {q, scale};
}

// a (m, k) int8; b (k, n) int8, or (n, k) when b_is_nk (an nn.Linear weight).
Tensor int8_gemm_cuda(const Tensor& a_in, const Tensor& b_in, bool b_is_nk,
                      const OptTensor& a_scale, const OptTensor& b_scale, const OptTensor& bias,
                      int64_t activation, std::optional<at::ScalarType> out_dtype) {
  check_2d("int8_gemm", a_in);
  check_2d("int8_gemm", b_in);
  c10::cuda::CUDAGuard guard(a_in.device());
  const Tensor a = a_in.stride(1) == 1 ? a_in : a_in.contiguous();
  const Tensor b = b_in.stride(1) == 1 ? b_in : b_in.contiguous();
  const int64_t m = a.size(0), k = a.size(1), n = b_is_nk ? b.size(0) : b.size(1);
  const bool scaled = a_scale.has_value();
  TORCH_CHECK(scaled == b_scale.has_value(), "int8_gemm: give both scales or neither");
  const at::ScalarType odt = scaled ? out_dtype.value_or(at::kFloat) : at::kInt;
  Tensor out = at::empty({m, n}, a.options().dtype(odt));
  if (m == 0 || n == 0) return out;
  if (k == 0) {
    out.zero_();
    if (!scaled) return out;
  }
  const Tensor as = scaled ? a_scale->to(at::kFloat).expand({m}).contiguous() : Tensor();
  const Tensor bs = scaled ? b_scale->to(at::kFloat).expand({n}).contiguous() : Tensor();
  const Tensor bb = float_param(bias);
  cuda::Int8GemmArgs g{};
  g.a = a.data_ptr<int8_t>();
  g.b = b.data_ptr<int8_t>();
  g.b_is_nk = b_is_nk;
  g.m = m;
  g.n = n;
  g.k = k;
  g.lda = std::max<int64_t>(a.stride(0), 1);
  g.ldb = std::max<int64_t>(b.stride(0), 1);
  g.a_scale = fptr(as);
  g.b_scale = fptr(bs);
  g.bias = fptr(bb);
  g.activation = static_cast<cuda::Activation>(activation);
  g.out_kind = odt == at::kInt     ? cuda::OutKind::kInt32
               : odt == at::kFloat ? cuda::OutKind::kFloat32
               : odt == at::kHalf  ? cuda::OutKind::kFloat16
                                   : cuda::OutKind::kBFloat16;
  TORCH_CHECK(odt == at::kInt || odt == at::kFloat || odt == at::kHalf || odt == at::kBFloat16,
              "int8_gemm: out_dtype must be float32, float16 or bfloat16, got ", odt);
  C10_CUDA_CHECK(cuda::int8_gemm(g, stream_of(a)));
  return out;
}

// Fills the fields of AttentionArgs shared by the forward and the backward.
cuda::AttentionArgs attention_args(const Tensor& q, const Tensor& k, const Tensor& v,
                                   const Tensor& mask, double dropout_p, bool causal,
                                   double scale, int64_t seed, int64_t offset) {
  cuda::AttentionArgs a{};
  a.dtype = cuda_dtype(q, "attention");
  TORCH_CHECK(a.dtype != cuda::DType::kFloat32, "attention: the CUDA kernels take float16 and bfloat16");
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  for (int i = 0; i < 3; ++i) {
    a.q_strides[i] = q.stride(i);
    a.k_strides[i] = k.stride(i);
    a.v_strides[i] = v.stride(i);
  }
  a.batch = q.size(0);
  a.heads_q = q.size(1);
  a.heads_kv = k.size(1);
  a.q_len = q.size(2);
  a.k_len = k.size(2);
  a.head_dim = q.size(3);
  a.head_dim_v = v.size(3);
  TORCH_CHECK(a.head_dim <= cuda::kMaxHeadDim && a.head_dim_v <= cuda::kMaxHeadDim,
              "attention: head dims up to ", cuda::kMaxHeadDim, ", got ", a.head_dim, " and ",
              a.head_dim_v);
  a.mask_kind = !mask.defined()                    ? cuda::MaskKind::kNone
                : mask.scalar_type() == at::kBool ? cuda::MaskKind::kBool
                                                   : cuda::MaskKind::kFloat;
  if (mask.defined()) {
    a.mask = mask.data_ptr();
    for (int i = 0; i < 4; ++i) a.mask_strides[i] = mask.stride(i);
  }
  a.causal = causal;
  a.scale = static_cast<float>(scale);
  a.dropout_p = static_cast<float>(dropout_p);
  a.seed = static_cast<uint64_t>(seed);
  a.offset = static_cast<uint64_t>(offset);
  return a;
}

Tensor unit_last_stride(const Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// The mask as a (B, Hq, Sq, Sk) view (stride 0 where broadcast): bool, or float32.
Tensor expand_mask(const OptTensor& mask, const Tensor& q, const Tensor& k) {
  if (!mask.has_value()) return Tensor();
  Tensor m = mask->scalar_type() == at::kBool ? *mask : mask->to(at::kFloat);
  return m.expand({q.size(0), q.size(1), q.size(2), k.size(2)});
}

std::tuple<Tensor, Tensor> attention_fwd_cuda(const Tensor& q_in, const Tensor& k_in,
                                              const Tensor& v_in, const OptTensor& mask_in,
                                              double dropout_p, bool causal, double scale,
                                              int64_t seed, int64_t offset) {
  c10::cuda::CUDAGuard guard(q_in.device());
  const Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  const Tensor mask = expand_mask(mask_in, q, k);
  Tensor out = at::empty({q.size(0), q.size(1), q.size(2), v.size(3)}, q.options());
  Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  cuda::AttentionArgs a = attention_args(q, k, v, mask, dropout_p, causal, scale, seed, offset);
  a.out = out.data_ptr();
  a.lse = lse.data_ptr<float>();
  C10_CUDA_CHECK(cuda::attention_forward(a, stream_of(q)));
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> attention_bwd_cuda(
    const Tensor& dout_in, const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
    const Tensor& out_in, const Tensor& lse_in, const OptTensor& mask_in, double dropout_p,
    bool causal, double scale, int64_t seed, int64_t offset) {
  c10::cuda::CUDAGuard guard(q_in.device());
  const Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  const Tensor dout = dout_in.contiguous(), out = out_in.contiguous();
  const Tensor lse = lse_in.to(at::kFloat).contiguous();
  const Tensor mask = expand_mask(mask_in, q, k);
  Tensor dq = at::empty(q.sizes(), q.options());
  Tensor dk = at::empty(k.sizes(), k.options());
  Tensor dv = at::empty(v.sizes(), v.options());
  Tensor delta = at::empty(lse.sizes(), lse.options());
  cuda::AttentionBackwardArgs a{};
  a.fwd = attention_args(q, k, v, mask, dropout_p, causal, scale, seed, offset);
  a.fwd.out = const_cast<void*>(static_cast<const void*>(out.data_ptr()));
  a.fwd.lse = const_cast<float*>(lse.data_ptr<float>());
  a.dout = dout.data_ptr();
  a.delta = delta.data_ptr<float>();
  a.dq = dq.data_ptr();
  a.dk = dk.data_ptr();
  a.dv = dv.data_ptr();
  C10_CUDA_CHECK(cuda::attention_backward(a, stream_of(q)));
  return {dq, dk, dv};
}
#endif  // LLMKIT_WITH_CUDA

}  // namespace

TORCH_LIBRARY(llmkit_ext, m) {
  m.def("norm_fwd(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, float eps, "
        "bool rms) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("norm_bwd(Tensor dy, Tensor x, Tensor? weight, Tensor? mean, Tensor rstd, "
        "Tensor? dresidual, bool need_dweight, bool need_dbias, bool rms) -> (Tensor, Tensor, Tensor)");
  m.def("bias_gelu_fwd(Tensor x, Tensor? bias, bool tanh_approx) -> Tensor");
  m.def("bias_gelu_bwd(Tensor dy, Tensor x, Tensor? bias, bool need_dbias, bool tanh_approx) "
        "-> (Tensor, Tensor)");
  m.def("glu_fwd(Tensor gate, Tensor up, int act) -> Tensor");
  m.def("glu_bwd(Tensor dy, Tensor gate, Tensor up, int act) -> (Tensor, Tensor)");
  m.def("quantize_rows(Tensor x) -> (Tensor, Tensor)");
  m.def("int8_gemm(Tensor a, Tensor b, bool b_is_nk, Tensor? a_scale, Tensor? b_scale, "
        "Tensor? bias, int activation, ScalarType? out_dtype) -> Tensor");
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? mask, float dropout_p, "
        "bool causal, float scale, int seed, int offset) -> (Tensor, Tensor)");
  m.def("attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor? mask, float dropout_p, bool causal, float scale, int seed, int offset) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("philox_uniform(int seed, Tensor offsets) -> Tensor");
  m.def("norm_forward_plan(int cols, int elem_bytes, bool vectorizable, int smem_optin) -> int[]",
        &norm_forward_plan_op);
}

TORCH_LIBRARY_IMPL(llmkit_ext, CPU, m) {
  m.impl("norm_fwd", &norm_fwd_cpu);
  m.impl("norm_bwd", &norm_bwd_cpu);
  m.impl("bias_gelu_fwd", &bias_gelu_fwd_cpu);
  m.impl("bias_gelu_bwd", &bias_gelu_bwd_cpu);
  m.impl("glu_fwd", &glu_fwd_cpu);
  m.impl("glu_bwd", &glu_bwd_cpu);
  m.impl("quantize_rows", &quantize_rows_cpu);
  m.impl("philox_uniform", &philox_uniform_cpu);
}

#ifdef LLMKIT_WITH_CUDA
TORCH_LIBRARY_IMPL(llmkit_ext, CUDA, m) {
  m.impl("norm_fwd", &norm_fwd_cuda);
  m.impl("norm_bwd", &norm_bwd_cuda);
  m.impl("bias_gelu_fwd", &bias_gelu_fwd_cuda);
  m.impl("bias_gelu_bwd", &bias_gelu_bwd_cuda);
  m.impl("quantize_rows", &quantize_rows_cuda);
  m.impl("int8_gemm", &int8_gemm_cuda);
  m.impl("attention_fwd", &attention_fwd_cuda);
  m.impl("attention_bwd", &attention_bwd_cuda);
}
#endif

}  // namespace llmkit_ext
