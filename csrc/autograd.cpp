// Autograd for the native ops, registered in C++.
//
// The eager path of fastgpt.ops wires a backend's forward and backward into autograd with a Python
// autograd.Function, which costs several microseconds per call: more than the whole kernel on the
// small inputs of a small model. The ops defined here do the same wiring in C++ (one dispatcher
// call and one C++ autograd node), and fastgpt/native.py hands them to fastgpt.ops as the
// backend's optional `*_with_autograd` entries (docs/architecture.md, the contract): plain
// attention (fastgpt.ops wires the variants) and add+LayerNorm. The forward and backward they run
// are the native ops themselves, called through the dispatcher, so each device reaches its own
// kernels; native.py does not hand out the attention node where the extension has no CUDA
// attention backward. torch.compile never sees these ops (it calls the torch.library custom ops of
// fastgpt/ops.py). The kernel ops get autograd's "not implemented" kernel, so that differentiating
// a backward raises instead of silently giving zeros.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace fastgpt {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using AddLayerNormForward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double,
    bool, bool);
using AddLayerNormBackward = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, bool);

template <typename Signature>
c10::TypedOperatorHandle<Signature> native_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

std::optional<at::Tensor> present(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// (y, h) = add + LayerNorm (or RMSNorm) of (x, residual); mean and rstd are saved, not returned.
std::tuple<at::Tensor, at::Tensor> add_layer_norm_no_grad(const at::Tensor& x, const at::Tensor& residual,
                                                           const std::optional<at::Tensor>& weight,
                                                           const std::optional<at::Tensor>& bias, double eps,
                                                           bool is_rms_norm, bool residual_in_fp32) {
  static const auto forward = native_op<AddLayerNormForward>("fastgpt::native_add_layer_norm_forward");
  auto [y, h, mean, rstd] = forward.call(x, residual, weight, bias, eps, is_rms_norm, residual_in_fp32);
  return {y, h};
}

class AddLayerNormFunction : public torch::autograd::Function<AddLayerNormFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& residual,
                               const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                               double eps, bool is_rms_norm, bool residual_in_fp32) {
    static const auto forward_op = native_op<AddLayerNormForward>("fastgpt::native_add_layer_norm_forward");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, h, mean, rstd] = forward_op.call(x, residual, weight, bias, eps, is_rms_norm, residual_in_fp32);
    ctx->save_for_backward({h, weight.value_or(at::Tensor()), bias.value_or(at::Tensor()), mean, rstd});
    ctx->saved_data["is_rms_norm"] = is_rms_norm;
    ctx->saved_data["x_dtype"] = x.scalar_type();
    ctx->saved_data["residual_dtype"] = residual.scalar_type();
    ctx->set_materialize_grads(false);  // post-norm never uses h: no zero dh to read
    return {y, h};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto backward_op = native_op<AddLayerNormBackward>("fastgpt::native_add_layer_norm_backward");
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &h = saved[0], &weight = saved[1], &bias = saved[2], &mean = saved[3], &rstd = saved[4];
    const auto x_dtype = ctx->saved_data["x_dtype"].toScalarType();
    const auto residual_dtype = ctx->saved_data["residual_dtype"].toScalarType();
    at::Tensor dy = grads[0].defined() ? grads[0] : at::zeros_like(h, h.options().dtype(x_dtype));
    auto [dx, dweight, dbias] = backward_op.call(dy, present(grads[1]), h, present(weight), present(bias), mean, rstd,
                                                 ctx->saved_data["is_rms_norm"].toBool());
    // the native op returns empty tensors for absent parameters: autograd wants undefined ones
    return {dx.to(x_dtype), dx.to(residual_dtype), weight.defined() ? dweight : at::Tensor(),
            bias.defined() ? dbias : at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> add_layer_norm_with_autograd(const at::Tensor& x, const at::Tensor& residual,
                                                                 const std::optional<at::Tensor>& weight,
                                                                 const std::optional<at::Tensor>& bias, double eps,
                                                                 bool is_rms_norm, bool residual_in_fp32) {
  variable_list outputs = AddLayerNormFunction::apply(x, residual, weight, bias, eps, is_rms_norm, residual_in_fp32);
  return {outputs[0], outputs[1]};
}

using AttentionForward = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                             bool, double);
using AttentionBackward = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    bool, double);

at::Tensor attention_no_grad(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal, double scale) {
  static const auto forward = native_op<AttentionForward>("fastgpt::native_attention_forward");
  return std::get<0>(forward.call(q, k, v, causal, scale));
}

class AttentionFunction : public torch::autograd::Function<AttentionFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               bool causal, double scale) {
    static const auto forward_op = native_op<AttentionForward>("fastgpt::native_attention_forward");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [o, lse] = forward_op.call(q, k, v, causal, scale);
    ctx->save_for_backward({q, k, v, o, lse});
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["scale"] = scale;
    return {o};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto backward_op = native_op<AttentionBackward>("fastgpt::native_attention_backward");
    const variable_list saved = ctx->get_saved_variables();
    auto [dq, dk, dv] = backward_op.call(grads[0], saved[0], saved[1], saved[2], saved[3], saved[4],
                                         ctx->saved_data["causal"].toBool(), ctx->saved_data["scale"].toDouble());
    return {dq, dk, dv, at::Tensor(), at::Tensor()};
  }
};

at::Tensor attention_with_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                                   double scale) {
  return AttentionFunction::apply(q, k, v, causal, scale)[0];
}

}  // namespace
}  // namespace fastgpt

TORCH_LIBRARY_FRAGMENT(fastgpt, m) {
  m.def("native_attention(Tensor q, Tensor k, Tensor v, bool causal, float scale) -> Tensor");
  m.def(
      "native_add_layer_norm(Tensor x, Tensor residual, Tensor? weight, Tensor? bias, float eps, bool is_rms_norm, "
      "bool residual_in_fp32) -> (Tensor, Tensor)");
}

// inference tensors skip the Autograd key: they take the plain forward
TORCH_LIBRARY_IMPL(fastgpt, CompositeExplicitAutograd, m) {
  m.impl("native_attention", &fastgpt::attention_no_grad);
  m.impl("native_add_layer_norm", &fastgpt::add_layer_norm_no_grad);
}

TORCH_LIBRARY_IMPL(fastgpt, Autograd, m) {
  m.impl("native_attention", &fastgpt::attention_with_autograd);
  m.impl("native_add_layer_norm", &fastgpt::add_layer_norm_with_autograd);
  // The kernels themselves have no derivative: differentiating through them (a backward with
  // create_graph=True, then another backward) raises "not implemented" instead of torch's default,
  // a warning and silently zero gradients.
  for (const char* op : {"native_attention_forward", "native_attention_backward", "native_attention_variants_forward",
                         "native_attention_variants_backward", "native_varlen_attention_forward",
                         "native_varlen_attention_backward", "native_add_layer_norm_forward",
                         "native_add_layer_norm_backward"}) {
    m.impl(op, torch::autograd::autogradNotImplementedFallback());
  }
}
