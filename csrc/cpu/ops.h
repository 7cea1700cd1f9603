// CPU implementations of the native ops, registered for the CPU dispatch key in extension.cpp.
// Schemas are in extension.cpp; the contract they implement is in docs/architecture.md.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace fastgpt::cpu {

// The largest head_dim the attention kernels take (reported by build_info() as max_head_dim).
constexpr int64_t kAttentionMaxHeadDim = 256;

// Attention of (batch, heads, seq, head_dim) tensors with the variants of docs/architecture.md:
// window_left/window_right = -1 for an unbounded side, softcap = 0 for none (the plain ops pass these).
std::tuple<at::Tensor, at::Tensor> attention_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal, double scale,
    int64_t window_left, int64_t window_right, double softcap);

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, bool causal, double scale, int64_t window_left,
    int64_t window_right, double softcap);

// The same on packed (total, heads, head_dim) tensors: sequence b is rows cu_seqlens[b]:cu_seqlens[b+1]
// (int32 offsets on the CPU); lse is (heads, total_q).
std::tuple<at::Tensor, at::Tensor> varlen_attention_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, bool causal, double scale, int64_t window_left, int64_t window_right,
    double softcap);

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
    bool causal, double scale, int64_t window_left, int64_t window_right, double softcap);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_forward(
    const at::Tensor& x, const at::Tensor& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, bool is_rms_norm, bool residual_in_fp32);

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_layer_norm_backward(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_h, const at::Tensor& h,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, const at::Tensor& mean,
    const at::Tensor& rstd, bool is_rms_norm);

}  // namespace fastgpt::cpu
