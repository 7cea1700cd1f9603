"""The public ops: one entry per op that validates its inputs, picks a backend and wires autograd.

Each op is a ``torch.library`` custom op (``torch.ops.fastgpt.*``), so ``torch.compile`` sees
one opaque node per call and ``torch.library.opcheck`` can check its schema, fake tensor
and autograd registrations. Backend resolution happens inside the op, at run time, so that
``backend="auto"`` and ``FASTGPT_BACKEND`` never break a compiled graph.

How a call picks its backend is ``fastgpt.dispatch``; the backends, what each implements and where
``auto`` may use them are listed in ``fastgpt.registry``; the contract every backend keeps is in
``docs/architecture.md``.
"""

import math
import numbers
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fastgpt import dispatch
from fastgpt.dispatch import BackendError  # what the ops raise: fastgpt.ops.BackendError for callers
from fastgpt.contract import residual_stream_dtype


def _check_tensor(name, t, ndim=None):
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-dimensional, got shape {tuple(t.shape)}")


def _check_same(name, t, ref_name, ref):
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {t.device}")


def _check_qkv(q, k, v, ndim):
    """q, k and v are floating-point tensors of ``ndim`` dimensions with one dtype and one device:
    one combined test on the common path, the named checks only to say what is wrong."""
    if (
        isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor)
        and q.dtype == k.dtype == v.dtype and q.is_floating_point()
        and q.dim() == ndim and k.dim() == ndim and v.dim() == ndim
        and q.device == k.device == v.device
    ):
        return
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t, ndim)
    _check_same("k", k, "q", q)
    _check_same("v", v, "q", q)


def _needs_grad(*tensors):
    """Whether a backward can follow this call (what ``auto``'s table calls training)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# ----------------------------------------------------------------------------- attention


_NO_OPTIONS = {}  # the keyword arguments of plain attention: none
_VARLEN = frozenset({"varlen"})


def _variant_options(causal, window, softcap):
    """``(causal, options)``: the keyword arguments the backend receives for ``window`` and
    ``softcap`` (only those the call uses; their names are the variants it needs), after checking
    them. A window's right side is 0 when causal, and a window whose right side is 0 is causal;
    a window that hides nothing beyond that is dropped."""
    options = {}
    if window is not None:
        if not isinstance(window, (tuple, list)) or len(window) != 2 or not all(_is_int(w) for w in window):
            raise TypeError(f"window must be None or a pair of ints (left, right), got {window!r}")
        left, right = int(window[0]), int(window[1])
        if left < -1 or right < -1:
            raise ValueError(f"window sizes must be >= -1 (-1 leaves that side unbounded), got window={window!r}")
        if causal or right == 0:
            causal, right = True, 0
        if left >= 0 or (right >= 0 and not causal):
            options["window"] = (left, right)
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"softcap must be a float (0 turns it off), got {softcap!r}")
    if not (math.isfinite(softcap) and softcap >= 0):
        raise ValueError(f"softcap must be a finite float >= 0 (0 turns it off), got {softcap!r}")
    if softcap > 0:
        options["softcap"] = float(softcap)
    return causal, options


def _is_int(x):
    """An int (numpy's too), or a SymInt under torch.compile; never a bool."""
    return isinstance(x, (numbers.Integral, torch.SymInt)) and not isinstance(x, bool)


def _schema_options(options):
    """(window_left, window_right, softcap): ``options`` as the custom ops' arguments."""
    left, right = options.get("window", (-1, -1))
    return left, right, options.get("softcap", 0.0)


@torch.library.custom_op("fastgpt::attention", mutates_args=())
def _attention_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool,
    scale: float,
    backend: str,
    training: bool = False,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
) -> Tuple[Tensor, Tensor]:
    causal, options = _variant_options(causal, (window_left, window_right), softcap)
    impl = dispatch.resolve("attention", backend, (q, k, v), training, frozenset(options))
    return impl.attention_forward(q, k, v, causal, scale, **options)


@_attention_op.register_fake
def _(q, k, v, causal, scale, backend, training=False, window_left=-1, window_right=-1, softcap=0.0):
    b, h, s, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((b, h, s), dtype=torch.float32)


@torch.library.custom_op("fastgpt::attention_backward", mutates_args=())
def _attention_backward_op(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Tensor,
    causal: bool,
    scale: float,
    backend: str,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
) -> Tuple[Tensor, Tensor, Tensor]:
    causal, options = _variant_options(causal, (window_left, window_right), softcap)
    impl = dispatch.resolve("attention", backend, (q, k, v), True, frozenset(options))  # the forward's choice
    return impl.attention_backward(do, q, k, v, o, lse, causal, scale, **options)


@_attention_backward_op.register_fake
def _(do, q, k, v, o, lse, causal, scale, backend, window_left=-1, window_right=-1, softcap=0.0):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_setup_context(ctx, inputs, output):
    q, k, v, causal, scale, backend, _training, *options = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.causal, ctx.scale, ctx.backend, ctx.options = causal, scale, backend, options
    ctx.mark_non_differentiable(lse)


def _attention_autograd(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.fastgpt.attention_backward(
        do, q, k, v, o, lse, ctx.causal, ctx.scale, ctx.backend, *ctx.options
    )
    return dq, dk, dv, None, None, None, None, None, None, None


_attention_op.register_autograd(_attention_autograd, setup_context=_attention_setup_context)


class _AttentionFunction(torch.autograd.Function):
    """The eager path: the same forward and backward as the custom op, without its dispatch."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale, impl, options):
        o, lse = impl.attention_forward(q, k, v, causal, scale, **options)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.scale, ctx.impl, ctx.options = causal, scale, impl, options
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = ctx.impl.attention_backward(do, q, k, v, o, lse, ctx.causal, ctx.scale, **ctx.options)
        return dq, dk, dv, None, None, None, None


def _check_scale(scale, head_dim):
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite float or None, got {scale!r}")
    return float(scale)


def attention(q, k, v, *, causal=True, scale=None, window=None, softcap=0.0, backend="auto"):
    """Multi-head attention ``softmax(q kᵀ · scale) v`` without materializing the score matrix.

    q: ``(batch, heads, seq_q, head_dim)``; k, v: ``(batch, kv_heads, seq_k, head_dim)`` with
    ``heads % kv_heads == 0`` (GQA/MQA share each key/value head without copying). Any strides.
    ``causal`` masks aligned bottom-right: query ``i`` sees keys ``j <= i + seq_k - seq_q``
    (a row that sees no key outputs zeros and gets zero gradient). ``scale`` defaults to
    ``1/sqrt(head_dim)``. ``window=(left, right)``: query ``i`` sees key ``j`` only when
    ``i + off - left <= j <= i + off + right`` with ``off = seq_k - seq_q``; -1 leaves a side
    unbounded, None is ``(-1, -1)``, and with ``causal`` the right side is 0. ``softcap > 0``
    turns each score into ``softcap * tanh(score * scale / softcap)`` before the softmax.
    Returns the output, shaped like ``q`` and contiguous.
    """
    backend = dispatch.requested_backend(backend)
    _check_qkv(q, k, v, 4)
    b, heads, seq_q, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(
            f"k must have shape (batch={b}, kv_heads, seq_k, head_dim={d}) to match q {tuple(q.shape)}, "
            f"got {tuple(k.shape)}"
        )
    kv_heads, seq_k = k.shape[1], k.shape[2]
    if min(b, heads, seq_q, d, kv_heads, seq_k) < 1:
        raise ValueError(f"q, k and v must have no empty dimension, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if heads % kv_heads:
        raise ValueError(f"q's heads ({heads}) must be a multiple of k's and v's kv_heads ({kv_heads})")
    causal, scale = bool(causal), _check_scale(scale, d)
    options = _NO_OPTIONS
    if window is not None or softcap != 0.0:  # only backends that declare these variants run them
        causal, options = _variant_options(causal, window, softcap)
    training = _needs_grad(q, k, v)
    if torch.compiler.is_compiling():  # one opaque node in the graph
        o, _ = torch.ops.fastgpt.attention(q, k, v, causal, scale, backend, training, *_schema_options(options))
        return o
    impl = dispatch.resolve("attention", backend, (q, k, v), training, frozenset(options))
    if not training:
        return impl.attention_forward(q, k, v, causal, scale, **options)[0]
    wired = getattr(impl, "attention_with_autograd", None)  # the backend's own autograd: cheaper per call
    o = None if wired is None else wired(q, k, v, causal, scale, **options)
    return _AttentionFunction.apply(q, k, v, causal, scale, impl, options) if o is None else o


# ----------------------------------------------------------------------------- varlen attention


def _dense_views(q, k, v):
    """Packed ``(total, heads, head_dim)`` tensors as ``(1, heads, total, head_dim)`` views: what
    ``*_unsupported`` and ``auto``'s buckets take (a packed batch counts as one long sequence)."""
    return tuple(t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))


def _check_cu_seqlens(name, cu, device):
    if not isinstance(cu, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int32 offsets, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must have dtype torch.int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be 1-dimensional with batch + 1 >= 2 offsets, got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} must be on the device of q ({device}), got {cu.device}")


def _check_max_seqlen(name, hint):
    """The hint as the custom op takes it: None, or an int (a SymInt stays one)."""
    if hint is None:
        return None
    if not _is_int(hint):
        raise TypeError(f"{name} must be None or an int, got {hint!r}")
    if hint < 0:
        raise ValueError(f"{name} must be >= 0, got {hint}")
    return hint if isinstance(hint, torch.SymInt) else int(hint)


def _longest_sequences(cu_seqlens_q, cu_seqlens_k, total_q, total_k, max_seqlen_q, max_seqlen_k):
    """(max_seqlen_q, max_seqlen_k) read from the offsets, after checking them (one read each)."""
    longest = []
    for name, cu, total, rows, hint_name, hint in (
        ("cu_seqlens_q", cu_seqlens_q, total_q, "q", "max_seqlen_q", max_seqlen_q),
        ("cu_seqlens_k", cu_seqlens_k, total_k, "k and v", "max_seqlen_k", max_seqlen_k),
    ):
        offsets = cu.tolist()
        if offsets[0] != 0:
            raise ValueError(f"{name} must start at 0, got {offsets[0]}")
        lengths = [end - start for start, end in zip(offsets, offsets[1:])]
        if min(lengths) < 0:
            i = lengths.index(min(lengths))
            raise ValueError(f"{name} must not decrease, got {offsets[i]} then {offsets[i + 1]} at index {i}")
        if offsets[-1] != total:
            raise ValueError(f"{name} must end at the number of rows of {rows} ({total}), got {offsets[-1]}")
        if hint is not None and hint < max(lengths):
            raise ValueError(f"{hint_name} ({hint}) is less than the longest sequence in {name} ({max(lengths)})")
        longest.append(max(lengths))
    return tuple(longest)


@torch.library.custom_op("fastgpt::varlen_attention", mutates_args=())
def _varlen_attention_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: Optional[int],
    max_seqlen_k: Optional[int],
    causal: bool,
    scale: float,
    backend: str,
    training: bool = False,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
) -> Tuple[Tensor, Tensor]:
    causal, options = _variant_options(causal, (window_left, window_right), softcap)
    longest = _longest_sequences(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], max_seqlen_q, max_seqlen_k)
    impl = dispatch.resolve("attention", backend, _dense_views(q, k, v), training, _VARLEN | frozenset(options))
    return impl.varlen_attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, *longest, causal, scale, **options)


@_varlen_attention_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, backend, training=False,
      window_left=-1, window_right=-1, softcap=0.0):
    total_q, heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((heads, total_q), dtype=torch.float32)


@torch.library.custom_op("fastgpt::varlen_attention_backward", mutates_args=())
def _varlen_attention_backward_op(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: Optional[int],
    max_seqlen_k: Optional[int],
    causal: bool,
    scale: float,
    backend: str,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
) -> Tuple[Tensor, Tensor, Tensor]:
    causal, options = _variant_options(causal, (window_left, window_right), softcap)
    longest = _longest_sequences(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], max_seqlen_q, max_seqlen_k)
    impl = dispatch.resolve("attention", backend, _dense_views(q, k, v), True, _VARLEN | frozenset(options))
    return impl.varlen_attention_backward(
        do, q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, *longest, causal, scale, **options
    )


@_varlen_attention_backward_op.register_fake
def _(do, q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, backend,
      window_left=-1, window_right=-1, softcap=0.0):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _varlen_attention_setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, backend, _training, *options = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, cu_q, cu_k)
    ctx.arguments = (max_q, max_k, causal, scale, backend, *options)
    ctx.mark_non_differentiable(lse)


def _varlen_attention_autograd(ctx, do, _dlse):
    q, k, v, o, lse, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = torch.ops.fastgpt.varlen_attention_backward(do, q, k, v, o, lse, cu_q, cu_k, *ctx.arguments)
    return (dq, dk, dv) + (None,) * 11


_varlen_attention_op.register_autograd(_varlen_attention_autograd, setup_context=_varlen_attention_setup_context)


class _VarlenAttentionFunction(torch.autograd.Function):
    """The eager path of ``varlen_attention``, as ``_AttentionFunction`` is ``attention``'s."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, impl, options):
        o, lse = impl.varlen_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, **options)
        ctx.save_for_backward(q, k, v, o, lse, cu_q, cu_k)
        ctx.arguments, ctx.impl, ctx.options = (max_q, max_k, causal, scale), impl, options
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cu_q, cu_k = ctx.saved_tensors
        dq, dk, dv = ctx.impl.varlen_attention_backward(do, q, k, v, o, lse, cu_q, cu_k, *ctx.arguments, **ctx.options)
        return (dq, dk, dv) + (None,) * 8


def varlen_attention(
    q, k, v, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q=None, max_seqlen_k=None,
    causal=True, scale=None, window=None, softcap=0.0, backend="auto",
):
    """``attention`` over a packed batch of sequences of different lengths, without padding.

    q: ``(total_q, heads, head_dim)``; k, v: ``(total_k, kv_heads, head_dim)`` (GQA as in
    ``attention``). ``cu_seqlens_q``/``cu_seqlens_k``: int32 offsets of length ``batch + 1``
    (first 0, last the total, never decreasing): sequence ``b`` is rows
    ``cu_seqlens[b]:cu_seqlens[b + 1]`` and attends only within itself, with the causal mask and
    the window aligned bottom-right per sequence; a sequence may be empty. ``max_seqlen_q`` and
    ``max_seqlen_k`` are optional hints (at least the longest sequence). Returns
    ``(total_q, heads, head_dim)``, contiguous.
    """
    backend = dispatch.requested_backend(backend)
    _check_qkv(q, k, v, 3)
    _, heads, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[2] != d:
        raise ValueError(f"k must have shape (total_k, kv_heads, head_dim={d}) to match q {tuple(q.shape)}, got {tuple(k.shape)}")
    kv_heads = k.shape[1]
    if min(heads, d, kv_heads) < 1:
        raise ValueError(f"q, k and v must have heads and a head dim, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if heads % kv_heads:
        raise ValueError(f"q's heads ({heads}) must be a multiple of k's and v's kv_heads ({kv_heads})")
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.device)
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, q.device)
    if cu_seqlens_k.numel() != cu_seqlens_q.numel():
        raise ValueError(
            f"cu_seqlens_k must have as many offsets as cu_seqlens_q (batch + 1 = {cu_seqlens_q.numel()}), "
            f"got {cu_seqlens_k.numel()}"
        )
    max_seqlen_q = _check_max_seqlen("max_seqlen_q", max_seqlen_q)
    max_seqlen_k = _check_max_seqlen("max_seqlen_k", max_seqlen_k)
    scale = _check_scale(scale, d)
    causal, options = _variant_options(bool(causal), window, softcap)
    training = _needs_grad(q, k, v)
    if torch.compiler.is_compiling():  # the offsets are read inside the op: no graph break
        o, _ = torch.ops.fastgpt.varlen_attention(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, backend, training,
            *_schema_options(options),
        )
        return o
    longest = _longest_sequences(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], max_seqlen_q, max_seqlen_k)
    impl = dispatch.resolve("attention", backend, _dense_views(q, k, v), training, _VARLEN | frozenset(options))
    if not training:
        return impl.varlen_attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, *longest, causal, scale, **options)[0]
    return _VarlenAttentionFunction.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, *longest, causal, scale, impl, options)


def scaled_dot_product_attention(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
):
    """``torch.nn.functional.scaled_dot_product_attention`` with fastgpt's attention where it applies.

    Same signature and semantics as torch (its causal mask is aligned top-left). Calls that
    fastgpt does not accelerate — an explicit mask, dropout, a causal mask with
    ``seq_q != seq_k``, other layouts — go to torch unchanged.
    """
    fast = (
        isinstance(query, Tensor)
        and attn_mask is None
        and dropout_p == 0.0
        and query.dim() == 4
        and isinstance(key, Tensor)
        and isinstance(value, Tensor)
        and key.dim() == 4
        and key.shape == value.shape
        and query.dtype == key.dtype == value.dtype
        and (query.shape[1] == key.shape[1] or (enable_gqa and query.shape[1] % key.shape[1] == 0))
        and (not is_causal or query.shape[2] == key.shape[2])
    )
    if not fast:
        kwargs = {"enable_gqa": enable_gqa} if enable_gqa else {}
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kwargs
        )
    return attention(query, key, value, causal=is_causal, scale=scale)


# ----------------------------------------------------------------------------- add + LayerNorm


@torch.library.custom_op("fastgpt::add_layer_norm", mutates_args=())
def _add_layer_norm_op(
    x: Tensor,
    residual: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    is_rms_norm: bool,
    residual_in_fp32: bool,
    backend: str,
    training: bool = False,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    impl = dispatch.resolve("add_layer_norm", backend, (x, residual, weight, bias), training)
    return impl.add_layer_norm_forward(x, residual, weight, bias, eps, is_rms_norm, residual_in_fp32)


@_add_layer_norm_op.register_fake
def _(x, residual, weight, bias, eps, is_rms_norm, residual_in_fp32, backend, training=False):
    stats = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return x.new_empty(x.shape), x.new_empty(x.shape, dtype=residual_stream_dtype(x.dtype, residual_in_fp32)), stats, stats.clone()


@torch.library.custom_op("fastgpt::add_layer_norm_backward", mutates_args=())
def _add_layer_norm_backward_op(
    dy: Tensor,
    dh: Optional[Tensor],
    h: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    mean: Tensor,
    rstd: Tensor,
    is_rms_norm: bool,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    impl = dispatch.resolve("add_layer_norm", backend, (h, h, weight, bias), training=True)  # the forward's choice
    dx, dweight, dbias = impl.add_layer_norm_backward(dy, dh, h, weight, bias, mean, rstd, is_rms_norm)
    # a custom op returns tensors, not None: absent parameters get an empty gradient
    return dx, h.new_empty(0) if dweight is None else dweight, h.new_empty(0) if dbias is None else dbias


@_add_layer_norm_backward_op.register_fake
def _(dy, dh, h, weight, bias, mean, rstd, is_rms_norm, backend):
    def like(p):
        return h.new_empty(0) if p is None else p.new_empty(p.shape)

    return h.new_empty(h.shape), like(weight), like(bias)


def _add_layer_norm_setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps, is_rms_norm, residual_in_fp32, backend, _training = inputs
    _, h, mean, rstd = output
    ctx.save_for_backward(h, weight, bias, mean, rstd)
    ctx.is_rms_norm, ctx.backend = is_rms_norm, backend
    ctx.x_dtype, ctx.residual_dtype = x.dtype, residual.dtype
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # post-norm never uses h: skip reading a zero dh


def _add_layer_norm_grads(backward, ctx, dy, dh):
    """The gradients of x, residual, weight and bias, given ``backward`` (the op or a backend's)."""
    h, weight, bias, mean, rstd = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(h, dtype=ctx.x_dtype)
    dx, dweight, dbias = backward(dy, dh, h, weight, bias, mean, rstd, ctx.is_rms_norm)
    return (
        dx.to(ctx.x_dtype),
        dx.to(ctx.residual_dtype),
        dweight if weight is not None else None,
        dbias if bias is not None else None,
    )


def _add_layer_norm_autograd(ctx, dy, dh, _dmean, _drstd):
    def backward(*args):
        return torch.ops.fastgpt.add_layer_norm_backward(*args, ctx.backend)

    return _add_layer_norm_grads(backward, ctx, dy, dh) + (None,) * 5


_add_layer_norm_op.register_autograd(_add_layer_norm_autograd, setup_context=_add_layer_norm_setup_context)


class _AddLayerNormFunction(torch.autograd.Function):
    """The eager path: the same forward and backward as the custom op, without its dispatch."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, is_rms_norm, residual_in_fp32, impl):
        y, h, mean, rstd = impl.add_layer_norm_forward(x, residual, weight, bias, eps, is_rms_norm, residual_in_fp32)
        ctx.save_for_backward(h, weight, bias, mean, rstd)
        ctx.is_rms_norm, ctx.impl = is_rms_norm, impl
        ctx.x_dtype, ctx.residual_dtype = x.dtype, residual.dtype
        ctx.set_materialize_grads(False)  # post-norm never uses h: skip reading a zero dh
        return y, h

    @staticmethod
    def backward(ctx, dy, dh):
        return _add_layer_norm_grads(ctx.impl.add_layer_norm_backward, ctx, dy, dh) + (None,) * 4


def _add_norm(op_name, x, residual, weight, bias, eps, is_rms_norm, residual_in_fp32, backend):
    backend = dispatch.requested_backend(backend)
    _check_tensor("x", x)
    _check_tensor("residual", residual)
    if x.dim() < 1 or x.shape[-1] < 1 or x.numel() == 0:
        raise ValueError(f"x must have a non-empty last (hidden) dimension, got shape {tuple(x.shape)}")
    if residual.shape != x.shape:
        raise ValueError(f"residual must have the shape of x {tuple(x.shape)}, got {tuple(residual.shape)}")
    if residual.device != x.device:
        raise ValueError(f"residual must be on the device of x ({x.device}), got {residual.device}")
    if residual.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"residual must have the dtype of x ({x.dtype}) or float32, got {residual.dtype}")
    n = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        _check_tensor(name, p)
        if p.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},) to match x's last dimension, got {tuple(p.shape)}")
        if p.device != x.device:
            raise ValueError(f"{name} must be on the device of x ({x.device}), got {p.device}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    eps, residual_in_fp32 = float(eps), bool(residual_in_fp32)
    training = _needs_grad(x, residual, weight, bias)
    if torch.compiler.is_compiling():  # one opaque node in the graph
        y, h, _, _ = torch.ops.fastgpt.add_layer_norm(
            x, residual, weight, bias, eps, is_rms_norm, residual_in_fp32, backend, training
        )
        return y, h
    impl = dispatch.resolve("add_layer_norm", backend, (x, residual, weight, bias), training)
    if not training:
        return impl.add_layer_norm_forward(x, residual, weight, bias, eps, is_rms_norm, residual_in_fp32)[:2]
    wired = getattr(impl, "add_layer_norm_with_autograd", None)  # the backend's own autograd: cheaper per call
    if wired is not None:
        return wired(x, residual, weight, bias, eps, is_rms_norm, residual_in_fp32)
    return _AddLayerNormFunction.apply(x, residual, weight, bias, eps, is_rms_norm, residual_in_fp32, impl)


def add_layer_norm(x, residual, weight=None, bias=None, eps=1e-5, *, residual_in_fp32=False, backend="auto"):
    """Fused ``h = x + residual; y = layer_norm(h) * weight + bias`` → ``(y, h)``.

    Post-norm blocks use ``y``; pre-norm blocks carry ``h`` on as the residual stream.
    ``weight``/``bias`` of shape ``(hidden,)`` are optional. ``residual`` may be float32 when
    ``x`` is half precision, and ``residual_in_fp32=True`` keeps ``h`` in float32. Mean and
    1/std are computed in float32 whatever the input dtype.
    """
    return _add_norm("add_layer_norm", x, residual, weight, bias, eps, False, residual_in_fp32, backend)


def add_rms_norm(x, residual, weight=None, eps=1e-5, *, residual_in_fp32=False, backend="auto"):
    """Fused ``h = x + residual; y = h / rms(h) * weight`` → ``(y, h)`` (RMSNorm: no mean, no bias)."""
    return _add_norm("add_rms_norm", x, residual, weight, None, eps, True, residual_in_fp32, backend)
