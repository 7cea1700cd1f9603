// CUDA implementations of the native ops (compiled only in CUDA builds): check the inputs,
// allocate the outputs (alloc_output: NaN-poisoned under the test hook), call the launchers of
// csrc/cuda/launchers.h on the current stream. Schemas are defined in csrc/extension.cpp.
//
// Only c10 *core* headers are used for devices and streams (c10::DeviceGuard, the device guard
// interface's current stream and its native handle), never c10/cuda or ATen/cuda: this file then
// also parses against a CPU build of torch, whose CUDA headers are incomplete, so the tests can
// check it on a machine without CUDA torch.
//
// native_attention_backward has no CUDA kernel: it is not registered here, and fastgpt/native.py
// sends the attention backward of CUDA tensors to the Triton (or reference) backend.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/Stream.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "alloc_output.h"
#include "launchers.h"

namespace fastgpt {
namespace cuda {
namespace {

DType dtype_of(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK(false, "fastgpt native ", op, " (CUDA): ", name, " must be float32, float16 or bfloat16, got ",
                  t.scalar_type());
  }
}

void check_cuda(const at::Tensor& t, const at::Tensor& first, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), "fastgpt native ", op, " (CUDA): ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == first.device(), "fastgpt native ", op, " (CUDA): ", name, " must be on ",
              first.device(), ", got ", t.device());
}

// The stream torch enqueues on for `device` (the caller holds a DeviceGuard for it).
cudaStream_t current_stream(const at::Device& device) {
  const c10::Stream stream = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(device);
  return static_cast<cudaStream_t>(stream.native_handle());
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "fastgpt native ", op, " (CUDA) failed to launch: ", cudaGetErrorString(err));
}

// t viewed as (rows, n) with unit inner stride; a copy only when the layout cannot be flattened.
at::Tensor as_rows(const at::Tensor& t, int64_t n) {
  at::Tensor rows = t.reshape({-1, n});
  if (n > 1 && rows.stride(1) != 1) rows = rows.contiguous();
  return rows;
}

// A parameter as n contiguous fp32 values (undefined when absent): the kernels read fp32.
at::Tensor parameter_as_float(const std::optional<at::Tensor>& p, const at::Tensor& x, int64_t n, const char* name) {
  if (!p.has_value()) return at::Tensor();
  check_cuda(*p, x, "add_layer_norm", name);
  dtype_of(*p, "add_layer_norm", name);
  TORCH_CHECK(p->dim() == 1 && p->size(0) == n, "fastgpt native add_layer_norm (CUDA): ", name, " must have shape (",
              n, ",) to match the last dimension, got ", p->sizes());
  return p->to(at::kFloat).contiguous();
}

const float* float_ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr<float>() : nullptr; }

// Strides of a 4-d tensor; a dimension of size 1 gets stride 0 (its stride is never used for
// addressing, and a stray value would only disable 16-byte copies).
Strides4 strides_of(const at::Tensor& t) {
  auto stride = [&](int d) { return t.size(d) == 1 ? int64_t(0) : t.stride(d); };
  return {stride(0), stride(1), stride(2), stride(3)};
}

// ------------------------------------------------------------------------------ attention

std::tuple<at::Tensor, at::Tensor> attention_forward_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     bool causal, double scale) {
  const char* op = "attention";
  check_cuda(q, q, op, "q");
  check_cuda(k, q, op, "k");
  check_cuda(v, q, op, "v");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "fastgpt native attention (CUDA): q, k, v must be 4-d");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "fastgpt native attention (CUDA): k and v must have q's dtype ", q.scalar_type());
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == q.size(0) && k.size(3) == q.size(3),
              "fastgpt native attention (CUDA): k and v must be (batch, kv_heads, seq_k, head_dim) matching q ",
              q.sizes(), ", got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0,
              "fastgpt native attention (CUDA): q's heads must be a multiple of k's kv_heads");
  const DType dtype = dtype_of(q, op, "q");
  const char* reason = attention_unsupported(q.size(3), dtype);
  TORCH_CHECK(reason == nullptr, "fastgpt native attention (CUDA): ", reason);

  const c10::DeviceGuard guard(q.device());
  const AttentionShape shape{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3)};
  at::Tensor o = alloc_output({shape.batch, shape.heads, shape.seq_q, shape.head_dim}, q.options());
  at::Tensor lse = alloc_output({shape.batch, shape.heads, shape.seq_q}, q.options().dtype(at::kFloat));
  const int64_t workspace_floats = attention_forward_workspace_floats(shape);
  at::Tensor workspace = workspace_floats > 0 ? at::empty({workspace_floats}, q.options().dtype(at::kFloat)) : at::Tensor();
  const cudaError_t err = attention_forward(
      q.const_data_ptr(), strides_of(q), k.const_data_ptr(), strides_of(k), v.const_data_ptr(), strides_of(v), dtype,
      o.data_ptr(), lse.data_ptr<float>(), workspace.defined() ? workspace.data_ptr<float>() : nullptr, shape, causal,
      static_cast<float>(scale), current_stream(q.device()));
  check_launch(err, op);
  return {o, lse};
}

// ------------------------------------------------------------------------------ add + LayerNorm

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_forward_op(
    const at::Tensor& x, const at::Tensor& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, bool is_rms_norm, bool residual_in_fp32) {
  const char* op = "add_layer_norm";
  check_cuda(x, x, op, "x");
  check_cuda(residual, x, op, "residual");
  TORCH_CHECK(x.dim() >= 1 && residual.sizes() == x.sizes(), "fastgpt native add_layer_norm (CUDA): residual must ",
              "have the shape of x ", x.sizes(), ", got ", residual.sizes());
  const DType x_dtype = dtype_of(x, op, "x");
  const DType residual_dtype = dtype_of(residual, op, "residual");
  TORCH_CHECK(residual_dtype == x_dtype || residual_dtype == DType::kFloat32,
              "fastgpt native add_layer_norm (CUDA): residual must have x's dtype or float32, got ",
              residual.scalar_type());
  const int64_t n = x.size(-1);
  TORCH_CHECK(n >= 1 && n <= kAddLayerNormMaxHidden, "fastgpt native add_layer_norm (CUDA): the last dimension ",
              "must be 1..", kAddLayerNormMaxHidden, ", got ", n);

  const c10::DeviceGuard guard(x.device());
  const at::ScalarType h_type =
      residual_in_fp32 && x_dtype != DType::kFloat32 ? at::kFloat : x.scalar_type();
  const at::Tensor x_rows = as_rows(x, n), residual_rows = as_rows(residual, n);
  const at::Tensor weight32 = parameter_as_float(weight, x, n, "weight");
  const at::Tensor bias32 = parameter_as_float(bias, x, n, "bias");
  at::Tensor y = alloc_output(x.sizes(), x.options());
  at::Tensor h = alloc_output(x.sizes(), x.options().dtype(h_type));
  const auto stats_shape = x.sizes().slice(0, x.dim() - 1);
  at::Tensor mean = alloc_output(stats_shape, x.options().dtype(at::kFloat));
  at::Tensor rstd = alloc_output(stats_shape, x.options().dtype(at::kFloat));
  const cudaError_t err = add_layer_norm_forward(
      x_rows.const_data_ptr(), x_dtype, x_rows.stride(0), residual_rows.const_data_ptr(), residual_dtype,
      residual_rows.stride(0), float_ptr_or_null(weight32), float_ptr_or_null(bias32), y.data_ptr(), h.data_ptr(),
      dtype_of(h, op, "h"), mean.data_ptr<float>(), rstd.data_ptr<float>(), x_rows.size(0), n,
      static_cast<float>(eps), is_rms_norm, current_stream(x.device()));
  check_launch(err, op);
  return {y, h, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_layer_norm_backward_op(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_h, const at::Tensor& h,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, const at::Tensor& mean,
    const at::Tensor& rstd, bool is_rms_norm) {
  const char* op = "add_layer_norm backward";
  check_cuda(h, h, op, "h");
  check_cuda(grad_y, h, op, "grad_y");
  check_cuda(mean, h, op, "mean");
  check_cuda(rstd, h, op, "rstd");
  TORCH_CHECK(h.dim() >= 1 && grad_y.sizes() == h.sizes(), "fastgpt native add_layer_norm backward (CUDA): grad_y ",
              "must have the shape of h ", h.sizes(), ", got ", grad_y.sizes());
  const int64_t n = h.size(-1);
  TORCH_CHECK(n >= 1 && n <= kAddLayerNormMaxHidden, "fastgpt native add_layer_norm backward (CUDA): the last ",
              "dimension must be 1..", kAddLayerNormMaxHidden, ", got ", n);
  const DType h_dtype = dtype_of(h, op, "h");
  dtype_of(grad_y, op, "grad_y");
  // the kernel reads dy in its own dtype and h / dh / dx in h's: dy may differ only when h is fp32
  const at::Tensor dy = grad_y.scalar_type() == h.scalar_type() || h_dtype == DType::kFloat32
                            ? grad_y
                            : grad_y.to(h.scalar_type());
  at::Tensor dh;
  if (grad_h.has_value()) {
    check_cuda(*grad_h, h, op, "grad_h");
    TORCH_CHECK(grad_h->sizes() == h.sizes(), "fastgpt native add_layer_norm backward (CUDA): grad_h must have the ",
                "shape of h ", h.sizes(), ", got ", grad_h->sizes());
    dh = as_rows(grad_h->to(h.scalar_type()), n);
  }

  const c10::DeviceGuard guard(h.device());
  const at::Tensor dy_rows = as_rows(dy, n), h_rows = as_rows(h, n);
  const int64_t rows = h_rows.size(0);
  const at::Tensor mean32 = mean.to(at::kFloat).contiguous().reshape({-1});
  const at::Tensor rstd32 = rstd.to(at::kFloat).contiguous().reshape({-1});
  TORCH_CHECK(mean32.numel() == rows && rstd32.numel() == rows, "fastgpt native add_layer_norm backward (CUDA): ",
              "mean and rstd must have one value per row (", rows, ")");
  const at::Tensor weight32 = parameter_as_float(weight, h, n, "weight");
  if (bias.has_value()) parameter_as_float(bias, h, n, "bias");  // checks only: the backward never reads bias

  at::Tensor dx = alloc_output(h.sizes(), h.options());
  // absent parameters get an empty (0,) tensor; present ones are written in their own dtype
  at::Tensor dweight = weight.has_value() ? alloc_output({n}, h.options().dtype(weight->scalar_type()))
                                          : at::empty({0}, h.options());
  at::Tensor dbias = bias.has_value() ? alloc_output({n}, h.options().dtype(bias->scalar_type()))
                                      : at::empty({0}, h.options());
  const int64_t programs = add_layer_norm_backward_programs(rows, n, multiprocessor_count());
  at::Tensor workspace;
  if (weight.has_value() || bias.has_value()) workspace = at::empty({2 * programs * n}, h.options().dtype(at::kFloat));
  const cudaError_t err = add_layer_norm_backward(
      dy_rows.const_data_ptr(), dtype_of(dy_rows, op, "grad_y"), dy_rows.stride(0),
      dh.defined() ? dh.const_data_ptr() : nullptr, dh.defined() ? dh.stride(0) : 0, h_rows.const_data_ptr(), h_dtype,
      h_rows.stride(0), float_ptr_or_null(weight32), mean32.const_data_ptr<float>(), rstd32.const_data_ptr<float>(),
      dx.data_ptr(), weight.has_value() ? dweight.data_ptr() : nullptr, dtype_of(dweight, op, "weight"),
      bias.has_value() ? dbias.data_ptr() : nullptr, dtype_of(dbias, op, "bias"),
      workspace.defined() ? workspace.data_ptr<float>() : nullptr, programs, rows, n, is_rms_norm,
      current_stream(h.device()));
  check_launch(err, op);
  return {dx, dweight, dbias};
}

}  // namespace
}  // namespace cuda
}  // namespace fastgpt

TORCH_LIBRARY_IMPL(fastgpt, CUDA, m) {
  m.impl("native_attention_forward", &fastgpt::cuda::attention_forward_op);
  m.impl("native_add_layer_norm_forward", &fastgpt::cuda::add_layer_norm_forward_op);
  m.impl("native_add_layer_norm_backward", &fastgpt::cuda::add_layer_norm_backward_op);
}
