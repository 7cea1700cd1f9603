"""The ``native`` backend: thin wrappers over the C++/CUDA extension ``fastgpt._C``.

The kernels are the ops ``torch.ops.fastgpt.native_*`` defined by the extension (CPU always,
CUDA when it was built with a CUDA toolkit). This module registers their fake (meta)
implementations, says which inputs they cannot run (from the limits the extension reports in
``build_info()``), and wraps them in the backend contract of ``docs/architecture.md``. Importing it
never fails: without the extension ``available()`` says why.

The extension has no CUDA kernel for the attention backward: on CUDA tensors it runs Triton's
(or, without Triton, the reference's), and ``available()`` says so. The attention variants the
registry declares for this backend (sliding window, soft cap, packed sequences) are CPU kernels
(``native_attention_variants_*``, ``native_varlen_attention_*``); on CUDA tensors
``attention_variants_unsupported`` declines them.
"""

import functools

import torch

from fastgpt import extension
from fastgpt.contract import residual_stream_dtype
from fastgpt.registry import VARIANTS

# what this module reads from build_info(); a build from older sources lacks some of it
_LIMIT_KEYS = ("cpu_attention_max_head_dim", "cuda_attention_dtypes", "cuda_attention_head_dims",
               "cuda_add_layer_norm_max_hidden")

# the install-time build, or one made on first use (compiled now if need be: fastgpt/extension.py)
LOADED = extension.load()
_C, _LOAD_ERROR = LOADED.module, LOADED.error
if _C is not None:
    _missing = [key for key in _LIMIT_KEYS if key not in _C.build_info()]
    if _missing:
        _C, _LOAD_ERROR = None, f"fastgpt._C was built from older sources (build_info() lacks {_missing}): rebuild it"

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache  # asked on every op call; a loaded extension does not change
def available():
    """(available, reason) for the native backend; the reason says what runs where."""
    if _C is None:
        return False, _LOAD_ERROR
    info = _build_info()
    threads = f"OpenMP, {info['threads']} threads" if info["openmp"] else f"{info['threads']} threads"
    tiles = "torch's BLAS" if info["cpu_gemm"] == "blas" else "at::addmm"
    built = "built on first use" if LOADED.origin == "first-use" else "built at install time"
    return True, (
        f"C++ extension: CPU ({threads}, tile products in {tiles}) and {_cuda_summary(info)}; "
        f"{built} with {info['compiler']} for torch {info['torch']}"
    )


def _cuda_summary(info):
    if not info["cuda"]:
        return "no CUDA"
    if info["cuda_attention_backward"]:
        return f"CUDA {', '.join(info['cuda_archs'])}"
    name, _ = _cuda_backward_fallback()
    return f"CUDA {', '.join(info['cuda_archs'])} (the attention backward on CUDA runs {name}, the extension has none of its own)"


@functools.cache
def _build_info():
    return _C.build_info() if _C is not None else {}


@functools.cache
def _has_kernel(op_name, device_type):
    """Whether the extension registered a kernel for ``fastgpt::<op_name>`` on this device type."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"fastgpt::{op_name}", key)


def _device_reason(op_name, device):
    if _C is None:
        return _LOAD_ERROR
    if device.type == "cuda" and not _build_info()["cuda"]:
        return "fastgpt._C was built without CUDA (rebuild with a CUDA toolkit, FASTGPT_CUDA=1)"
    if not _has_kernel(op_name, device.type):
        return f"fastgpt._C has no {device.type} kernel for {op_name}"
    return None


def _dtype_reason(name, t):
    if t.dtype not in SUPPORTED_DTYPES:
        return f"{name} dtype {t.dtype} is not float32, float16 or bfloat16"
    return None


# ----------------------------------------------------------------------------- attention


def attention_unsupported(q, k, v):
    reason = _device_reason("native_attention_forward", q.device)
    if reason is not None:
        return reason
    for name, t in (("q", q), ("k", k), ("v", v)):
        reason = _dtype_reason(name, t)
        if reason is not None:
            return reason
    info = _build_info()
    head_dim = q.shape[-1]
    if q.device.type == "cuda":
        dtypes = info["cuda_attention_dtypes"]
        if str(q.dtype).removeprefix("torch.") not in dtypes:
            return f"the CUDA attention kernel takes {'/'.join(dtypes)}, not {q.dtype}"
        if head_dim not in info["cuda_attention_head_dims"]:
            return f"the CUDA attention kernel takes head dims {tuple(info['cuda_attention_head_dims'])}, not {head_dim}"
    elif head_dim > info["cpu_attention_max_head_dim"]:
        return f"head dim {head_dim} > {info['cpu_attention_max_head_dim']}"
    return None


def attention_variants_unsupported(q, k, v, variants):
    """The variants the registry declares for this backend are CPU kernels: on another device they
    are unsupported (``auto`` passes by, a backend named explicitly raises), plain calls are not."""
    if q.device.type != "cpu":
        missing = " or ".join(VARIANTS[name] for name in VARIANTS if name in variants)
        return f"the native backend has no {missing} kernel on {q.device.type} (its variant kernels are CPU only)"
    return None


def attention_forward(q, k, v, causal, scale, *, window=None, softcap=0.0):
    if window is None and softcap == 0.0:
        return torch.ops.fastgpt.native_attention_forward(q, k, v, causal, scale)
    return torch.ops.fastgpt.native_attention_variants_forward(q, k, v, causal, scale, *_variant_arguments(window, softcap))


def _variant_arguments(window, softcap):
    """(window_left, window_right, softcap) as the variant ops take them."""
    left, right = (-1, -1) if window is None else window
    return left, right, softcap


@functools.cache
def _cuda_backward_fallback():
    """(name, module) of the backend that runs the attention backward on CUDA, where the extension has no
    CUDA kernel for it: Triton's when Triton is available, else the reference."""
    from fastgpt import kernels

    if kernels.available()[0]:
        from fastgpt.kernels import attention

        return "the Triton kernel", attention
    from fastgpt import reference

    return "the reference (Triton is unavailable)", reference


def attention_with_autograd(q, k, v, causal, scale, **variants):
    """The output wired into autograd by the extension itself (csrc/autograd.cpp), which costs less per
    call than fastgpt.ops' Python autograd.Function; None where the extension's own backward does not
    run (the variants, CUDA without its backward kernel), so that fastgpt.ops wires the backward."""
    if variants or (q.device.type == "cuda" and not _build_info()["cuda_attention_backward"]):
        return None
    return torch.ops.fastgpt.native_attention(q, k, v, causal, scale)


def attention_backward(do, q, k, v, o, lse, causal, scale, *, window=None, softcap=0.0):
    if window is not None or softcap != 0.0:
        return torch.ops.fastgpt.native_attention_variants_backward(
            do, q, k, v, o, lse, causal, scale, *_variant_arguments(window, softcap)
        )
    if q.device.type == "cuda" and not _build_info()["cuda_attention_backward"]:
        _, fallback = _cuda_backward_fallback()
        return fallback.attention_backward(do, q, k, v, o, lse, causal, scale)
    return torch.ops.fastgpt.native_attention_backward(do, q, k, v, o, lse, causal, scale)


# max_seqlen_* are not needed: the kernel reads the offsets (it walks every sequence's tiles anyway)
def varlen_attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, *,
                             window=None, softcap=0.0):
    return torch.ops.fastgpt.native_varlen_attention_forward(
        q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, *_variant_arguments(window, softcap)
    )


def varlen_attention_backward(do, q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                              scale, *, window=None, softcap=0.0):
    return torch.ops.fastgpt.native_varlen_attention_backward(
        do, q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, causal, scale, *_variant_arguments(window, softcap)
    )


# ----------------------------------------------------------------------------- add + LayerNorm


def add_layer_norm_unsupported(x, residual, weight, bias):
    reason = _device_reason("native_add_layer_norm_forward", x.device)
    if reason is not None:
        return reason
    for name, t in (("x", x), ("residual", residual), ("weight", weight), ("bias", bias)):
        reason = None if t is None else _dtype_reason(name, t)
        if reason is not None:
            return reason
    max_hidden = _build_info()["cuda_add_layer_norm_max_hidden"]
    if x.device.type == "cuda" and x.shape[-1] > max_hidden:
        return f"the CUDA add+LayerNorm kernel takes hidden sizes up to {max_hidden}"
    return None


def add_layer_norm_forward(x, residual, weight, bias, eps, is_rms_norm, residual_in_fp32):
    return torch.ops.fastgpt.native_add_layer_norm_forward(x, residual, weight, bias, eps, is_rms_norm, residual_in_fp32)


def add_layer_norm_backward(dy, dh, h, weight, bias, mean, rstd, is_rms_norm):
    dx, dweight, dbias = torch.ops.fastgpt.native_add_layer_norm_backward(
        dy, dh, h, weight, bias, mean, rstd, is_rms_norm
    )
    # the op returns empty tensors for absent parameters: the contract says None
    return dx, dweight if weight is not None else None, dbias if bias is not None else None


def add_layer_norm_with_autograd(x, residual, weight, bias, eps, is_rms_norm, residual_in_fp32):
    """``(y, h)`` wired into autograd by the extension itself (csrc/autograd.cpp): fastgpt.ops takes it
    instead of its Python autograd.Function, which costs more than the kernel on small inputs."""
    return torch.ops.fastgpt.native_add_layer_norm(x, residual, weight, bias, eps, is_rms_norm, residual_in_fp32)


# ----------------------------------------------------------------------------- fake tensors


def _register_fakes():
    """Shapes and dtypes of the native ops' outputs, for torch.compile and opcheck (every device)."""

    @torch.library.register_fake("fastgpt::native_attention_forward")
    def _(q, k, v, causal, scale):
        return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)

    @torch.library.register_fake("fastgpt::native_attention")
    def _(q, k, v, causal, scale):
        return q.new_empty(q.shape)

    @torch.library.register_fake("fastgpt::native_attention_backward")
    def _(grad_out, q, k, v, out, lse, causal, scale):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    @torch.library.register_fake("fastgpt::native_attention_variants_forward")
    def _(q, k, v, causal, scale, window_left, window_right, softcap):
        return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)

    @torch.library.register_fake("fastgpt::native_attention_variants_backward")
    def _(grad_out, q, k, v, out, lse, causal, scale, window_left, window_right, softcap):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    @torch.library.register_fake("fastgpt::native_varlen_attention_forward")
    def _(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, window_left, window_right, softcap):
        return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)

    @torch.library.register_fake("fastgpt::native_varlen_attention_backward")
    def _(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, causal, scale, window_left, window_right, softcap):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    @torch.library.register_fake("fastgpt::native_add_layer_norm_forward")
    def _(x, residual, weight, bias, eps, is_rms_norm, residual_in_fp32):
        stats = x.new_empty(x.shape[:-1], dtype=torch.float32)
        h = x.new_empty(x.shape, dtype=residual_stream_dtype(x.dtype, residual_in_fp32))
        return x.new_empty(x.shape), h, stats, stats.clone()

    @torch.library.register_fake("fastgpt::native_add_layer_norm")
    def _(x, residual, weight, bias, eps, is_rms_norm, residual_in_fp32):
        return x.new_empty(x.shape), x.new_empty(x.shape, dtype=residual_stream_dtype(x.dtype, residual_in_fp32))

    @torch.library.register_fake("fastgpt::native_add_layer_norm_backward")
    def _(grad_y, grad_h, h, weight, bias, mean, rstd, is_rms_norm):
        def like(p):
            return h.new_empty(0) if p is None else p.new_empty(p.shape)

        return h.new_empty(h.shape), like(weight), like(bias)


# once per process: reloading this module (tests do) must not register them twice
if _C is not None and not getattr(_C, "_fakes_registered", False):
    _register_fakes()
    _C._fakes_registered = True
