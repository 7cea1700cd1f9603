// What the CUDA kernels accept, in plain C++ (no CUDA or torch header), so that both sides read
// one definition: the kernels and launchers.h check inputs against it, and csrc/extension.cpp
// reports it in build_info(), where fastgpt/native.py reads it instead of keeping a copy.
#pragma once

#include <cstdint>

namespace fastgpt {
namespace cuda {

// The element types the kernels read and write; float32 statistics are always plain float*.
enum class DType { kFloat32, kFloat16, kBFloat16 };

// The attention kernels run on tensor cores (WMMA): half-precision inputs, a few head dims.
constexpr DType kAttentionDTypes[] = {DType::kFloat16, DType::kBFloat16};
constexpr int64_t kAttentionHeadDims[] = {32, 64, 96, 128};

// The largest hidden size the add+LayerNorm kernels accept (each thread keeps its columns in
// registers); larger rows are reported as unsupported by the Python side.
constexpr int64_t kAddLayerNormMaxHidden = 16384;

}  // namespace cuda
}  // namespace fastgpt
