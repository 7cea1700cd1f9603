// The CPU decode kernel: attention of a few queries per sequence against a (long) KV cache.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace fastgpt::cpu {

// The most queries per sequence the decode kernel takes.
constexpr int64_t kDecodeMaxQueries = 4;

// Whether attention_forward() runs these (checked) inputs on the decode kernel rather than the
// tiled forward: the measured rule in attention_decode.cpp, or what the test hook forces.
bool use_decode_kernel(const at::Tensor& q, const at::Tensor& k);

// out and lse (allocated by the caller, contiguous) of attention for q with seq_q <= kDecodeMaxQueries,
// inputs checked by the caller; the contract of attention_forward().
void attention_decode_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                              double scale, at::Tensor& out, at::Tensor& lse);

}  // namespace fastgpt::cpu
