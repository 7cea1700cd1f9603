// The fastgpt._C extension: the native ops' schemas, their CPU registrations, and the Python module.
//
// Layout of csrc/: this file and alloc_output.h (output allocation every kernel shares) at the
// root; the CPU kernels and their helpers in cpu/; the CUDA kernels in cuda/ (.cu files with no
// torch header, behind the plain launchers of cuda/launchers.h) and cuda/bindings.cpp, which
// registers them for the CUDA dispatch key in CUDA builds. fastgpt/native.py registers the fake
// (meta) implementations and wraps the ops in the backend contract of docs/architecture.md.
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>

#include "alloc_output.h"
#include "cpu/gemm.h"
#include "cpu/ops.h"
#include "cuda/limits.h"

// variadic, so that FASTGPT_CUDA_ARCHS=80,90 (commas: no quotes for a shell to strip) stringifies whole
#define FASTGPT_TEXT_(...) #__VA_ARGS__
#define FASTGPT_TEXT(...) FASTGPT_TEXT_(__VA_ARGS__)
#ifdef _GLIBCXX_USE_CXX11_ABI
#define FASTGPT_CXX11_ABI_TEXT FASTGPT_TEXT(_GLIBCXX_USE_CXX11_ABI)
#else
#define FASTGPT_CXX11_ABI_TEXT "none"
#endif

namespace fastgpt {

namespace {
std::atomic<bool> poison_outputs_flag{false};

bool has_cuda_kernel(const char* op_name) {
  auto op = c10::Dispatcher::singleton().findSchema({op_name, ""});
  return op.has_value() && op->hasKernelForDispatchKey(c10::DispatchKey::CUDA);
}

const char* compiler_name() {
#if defined(__clang__)
  return "clang " __clang_version__;
#elif defined(__GNUC__)
  return "gcc " __VERSION__;
#elif defined(_MSC_VER)
  return "msvc";
#else
  return "unknown";
#endif
}

#ifdef FASTGPT_WITH_CUDA
const char* dtype_name(cuda::DType dtype) {
  switch (dtype) {
    case cuda::DType::kFloat32: return "float32";
    case cuda::DType::kFloat16: return "float16";
    case cuda::DType::kBFloat16: return "bfloat16";
  }
  return "unknown";
}
#endif
}  // namespace

bool poison_outputs_enabled() { return poison_outputs_flag.load(std::memory_order_relaxed); }

void set_poison_outputs(bool enabled) { poison_outputs_flag.store(enabled, std::memory_order_relaxed); }

}  // namespace fastgpt

// The torch this file was compiled against, readable from the .so without loading it:
// fastgpt/_build.py refuses an extension built for another torch before dlopen, where it would
// fail with undefined symbols (or worse). Format: "fastgpt-build-stamp:torch=2.13.0;cxx11_abi=1;".
extern "C" __attribute__((used, visibility("default"))) const char fastgpt_build_stamp[] =
    "fastgpt-build-stamp:torch=" TORCH_VERSION ";cxx11_abi=" FASTGPT_CXX11_ABI_TEXT ";";

TORCH_LIBRARY(fastgpt, m) {
  m.def("native_attention_forward(Tensor q, Tensor k, Tensor v, bool causal, float scale) -> (Tensor, Tensor)");
  m.def(
      "native_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "bool causal, float scale) -> (Tensor, Tensor, Tensor)");
  // the attention variants (CPU only): sliding window (-1: unbounded side), soft cap (0: off), packed sequences
  m.def(
      "native_attention_variants_forward(Tensor q, Tensor k, Tensor v, bool causal, float scale, int window_left, "
      "int window_right, float softcap) -> (Tensor, Tensor)");
  m.def(
      "native_attention_variants_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "bool causal, float scale, int window_left, int window_right, float softcap) -> (Tensor, Tensor, Tensor)");
  m.def(
      "native_varlen_attention_forward(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "bool causal, float scale, int window_left, int window_right, float softcap) -> (Tensor, Tensor)");
  m.def(
      "native_varlen_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor cu_seqlens_q, Tensor cu_seqlens_k, bool causal, float scale, int window_left, int window_right, "
      "float softcap) -> (Tensor, Tensor, Tensor)");
  m.def(
      "native_add_layer_norm_forward(Tensor x, Tensor residual, Tensor? weight, Tensor? bias, float eps, "
      "bool is_rms_norm, bool residual_in_fp32) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "native_add_layer_norm_backward(Tensor grad_y, Tensor? grad_h, Tensor h, Tensor? weight, Tensor? bias, "
      "Tensor mean, Tensor rstd, bool is_rms_norm) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastgpt, CPU, m) {
  m.impl("native_attention_forward", [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                                        double scale) {
    return fastgpt::cpu::attention_forward(q, k, v, causal, scale, -1, -1, 0.0);
  });
  m.impl("native_attention_backward",
         [](const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
            const at::Tensor& out, const at::Tensor& lse, bool causal, double scale) {
           return fastgpt::cpu::attention_backward(grad_out, q, k, v, out, lse, causal, scale, -1, -1, 0.0);
         });
  m.impl("native_attention_variants_forward", &fastgpt::cpu::attention_forward);
  m.impl("native_attention_variants_backward", &fastgpt::cpu::attention_backward);
  m.impl("native_varlen_attention_forward", &fastgpt::cpu::varlen_attention_forward);
  m.impl("native_varlen_attention_backward", &fastgpt::cpu::varlen_attention_backward);
  m.impl("native_add_layer_norm_forward", &fastgpt::cpu::add_layer_norm_forward);
  m.impl("native_add_layer_norm_backward", &fastgpt::cpu::add_layer_norm_backward);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "fastgpt native kernels: ops are torch.ops.fastgpt.native_*; see fastgpt/native.py";
  module.def(
      "build_info",
      []() {
        pybind11::dict info;
#ifdef FASTGPT_WITH_CUDA
        info["cuda"] = true;
        pybind11::list archs;
        const std::string arch_list = FASTGPT_TEXT(FASTGPT_CUDA_ARCHS);  // "80,90"
        size_t start = 0;
        while (start <= arch_list.size()) {
          size_t end = arch_list.find(',', start);
          if (end == std::string::npos) end = arch_list.size();
          if (end > start) archs.append(arch_list.substr(start, end - start));
          start = end + 1;
        }
        info["cuda_archs"] = archs;
#else
        info["cuda"] = false;
        info["cuda_archs"] = pybind11::list();
#endif
        // which ops have a CUDA kernel, read from the dispatcher so it is true by construction
        info["cuda_attention_forward"] = fastgpt::has_cuda_kernel("fastgpt::native_attention_forward");
        info["cuda_attention_backward"] = fastgpt::has_cuda_kernel("fastgpt::native_attention_backward");
        info["cuda_add_layer_norm"] = fastgpt::has_cuda_kernel("fastgpt::native_add_layer_norm_forward") &&
                                      fastgpt::has_cuda_kernel("fastgpt::native_add_layer_norm_backward");
        // the inputs the kernels take, so Python never keeps a copy (the CPU add+LayerNorm takes any size)
        info["cpu_attention_max_head_dim"] = fastgpt::cpu::kAttentionMaxHeadDim;
        pybind11::list cuda_attention_dtypes, cuda_attention_head_dims;
        int64_t cuda_add_layer_norm_max_hidden = 0;
#ifdef FASTGPT_WITH_CUDA
        for (const auto dtype : fastgpt::cuda::kAttentionDTypes) cuda_attention_dtypes.append(fastgpt::dtype_name(dtype));
        for (const int64_t dim : fastgpt::cuda::kAttentionHeadDims) cuda_attention_head_dims.append(dim);
        cuda_add_layer_norm_max_hidden = fastgpt::cuda::kAddLayerNormMaxHidden;
#endif
        info["cuda_attention_dtypes"] = cuda_attention_dtypes;
        info["cuda_attention_head_dims"] = cuda_attention_head_dims;
        info["cuda_add_layer_norm_max_hidden"] = cuda_add_layer_norm_max_hidden;
#ifdef _OPENMP
        info["openmp"] = true;
#else
        info["openmp"] = false;
#endif
        info["threads"] = at::get_num_threads();
        info["cpu_gemm"] = fastgpt::cpu::gemm_path();
        info["cpu_bf16_gemm"] = fastgpt::cpu::bf16_gemm_available();
        info["cpu_bf16_dot"] = fastgpt::cpu::bf16_dot_available();
        info["torch"] = TORCH_VERSION;
        info["cxx11_abi"] = std::string(FASTGPT_CXX11_ABI_TEXT) == "1";
        info["compiler"] = fastgpt::compiler_name();
        return info;
      },
      "How this extension was built: CUDA (and for which archs), which ops have CUDA kernels, the inputs the "
      "kernels take (cpu_attention_max_head_dim; the CPU add+LayerNorm takes any hidden size; "
      "cuda_attention_dtypes, cuda_attention_head_dims, cuda_add_layer_norm_max_hidden), OpenMP, threads, torch "
      "and its C++ ABI, compiler, and how the CPU kernels multiply tiles (cpu_gemm: 'blas', torch's BLAS called "
      "directly, or 'aten'; cpu_bf16_gemm: bf16 tiles multiplied in bf16 on this CPU; cpu_bf16_dot: AVX512-BF16's "
      "dot product used, e.g. for bf16 decode scores).");
  module.def(
      "cpu_output_cache",
      []() {
        const fastgpt::CpuOutputCacheStats stats = fastgpt::cpu_output_cache_stats();
        pybind11::dict info;
        info["allocated_bytes"] = stats.allocated_bytes;
        info["cached_bytes"] = stats.cached_bytes;
        info["limit_bytes"] = stats.limit_bytes;
        return info;
      },
      "Bytes of large CPU outputs alive (allocated_bytes) and kept for reuse (cached_bytes), and the cache limit.");
  module.def("set_cpu_output_cache_limit", &fastgpt::set_cpu_output_cache_limit, pybind11::arg("limit_bytes"),
             "Keep at most limit_bytes of freed CPU outputs for reuse (0: none); frees what is over it.");
  module.def("empty_cpu_output_cache", &fastgpt::empty_cpu_output_cache,
             "Free every CPU output buffer kept for reuse.");
  module.def("_set_force_aten_gemm", &fastgpt::cpu::set_force_aten_gemm, pybind11::arg("enabled"),
             "Test hook: when on, the CPU kernels multiply tiles through at::cpu::addmm_ instead of the BLAS, and "
             "bf16 on the portable vector path instead of the CPU's bf16 units.");
  module.def("_set_poison_outputs", &fastgpt::set_poison_outputs, pybind11::arg("enabled"),
             "Test hook: when on, every output the native kernels allocate is filled with NaN first.");
}
