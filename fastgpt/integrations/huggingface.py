"""fastgpt as a Hugging Face transformers attention implementation: ``attn_implementation="fastgpt"``.

Tested with transformers 5.24.0 and 4.53.3 (registration needs 4.53 or later, the first with
``AttentionMaskInterface``). ``import fastgpt`` registers the name as soon as transformers is
imported (or at once, when it already was), without importing transformers itself; ``register()``
does it explicitly.

transformers hands each attention layer q ``(batch, heads, seq_q, head_dim)`` and k/v
``(batch, kv_heads, seq_k, head_dim)`` and expects ``(batch, seq_q, heads, head_dim)`` back. fastgpt
uses the same masks as ``"sdpa"``: a batch without padding arrives with ``attention_mask=None`` and
runs on ``fastgpt.ops.attention`` (GQA without repeating K/V); a mask that is exactly causal + key
padding (+ the layer's sliding window) runs on fastgpt's variable-length path (``hf_padding``).
``sliding_window`` W is fastgpt's ``window=(W - 1, 0)`` and ``softcap`` its ``softcap``. Everything
else — other masks, dropout, position biases, attention sinks, a compiled graph's masks — goes to
transformers' own SDPA function unchanged, so the answer is the one ``"sdpa"`` gives.
"""

import importlib.abc
import importlib.util
import sys
import warnings

import torch

from fastgpt import ops
from fastgpt.integrations import hf_padding

NAME = "fastgpt"
MIN_TRANSFORMERS = "4.53"

# keyword arguments whose presence changes the result in ways fastgpt's attention does not compute
_UNSUPPORTED_KWARGS = ("position_bias", "s_aux", "output_attentions")

_sdpa_attention_forward = None  # transformers' SDPA function, captured by register()
_warned_dropout = False


def attention_forward(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs
):
    """The function transformers calls for ``attn_implementation="fastgpt"`` (its attention-interface
    signature); returns ``(output (batch, seq_q, heads, head_dim), None)``."""
    # the caller's is_causal goes to SDPA unchanged: transformers 4.53's SDPA honours an explicit
    # True even beside a mask, which would hide every cached key but the first from a decode step
    causal_here = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    softcap = kwargs.get("softcap") or 0.0
    if dropout > 0.0:
        _warn_dropout_once(dropout)
    elif _fastgpt_computes(query, key, value, kwargs):
        if attention_mask is None and not (causal_here and query.shape[2] > 1 and key.shape[2] < query.shape[2]):
            # SDPA's causal mask is top-left: with fewer keys than queries it is not fastgpt's bottom-right one
            causal = causal_here and query.shape[2] > 1
            if causal and key.shape[2] > query.shape[2]:
                # Only a static cache's first prefill gets here (the mask function returns None for it):
                # keys past the queries are empty slots, and SDPA's top-left causal mask never reaches them.
                key, value = key[:, :, : query.shape[2]], value[:, :, : query.shape[2]]
            out = ops.attention(query, key, value, causal=causal, scale=scaling, softcap=softcap)
            return out.transpose(1, 2).contiguous(), None
        if attention_mask is not None and is_causal is not True and not torch.compiler.is_compiling():
            # the mask alone says what each query sees (both versions' SDPA drop their own causal mask
            # beside one); reading it needs its values, which a compiled graph does not have
            plan = hf_padding.plan(
                attention_mask, query.shape[0], query.shape[2], key.shape[2], _window_left(kwargs.get("sliding_window"))
            )
            if plan is not None:
                return hf_padding.attention(plan, query, key, value, scaling, softcap), None
    if softcap:
        # 5.24's SDPA raises this itself; 4.53's would drop the cap without a word
        raise ValueError(
            f"fastgpt cannot run this soft-capped attention call ({_why_not(attention_mask, dropout, kwargs)}) and "
            'transformers\' SDPA has no softcap: use attn_implementation="eager" for this model'
        )
    return _sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )


def _window_left(sliding_window):
    """transformers' ``sliding_window`` W (a query sees itself and the W - 1 keys before it: its mask
    functions keep ``kv_idx > q_idx - W``) as fastgpt's window left side."""
    return None if not sliding_window else int(sliding_window) - 1


def _fastgpt_computes(query, key, value, kwargs):
    """Whether fastgpt's attention takes these tensors and options (the mask is judged separately)."""
    return (
        all(kwargs.get(name) is None or kwargs.get(name) is False for name in _UNSUPPORTED_KWARGS)
        and query.dtype == key.dtype == value.dtype
        and key.shape == value.shape
        and query.shape[0] == key.shape[0]
        and query.shape[3] == key.shape[3]
        and query.shape[1] % key.shape[1] == 0
    )


def _why_not(attention_mask, dropout, kwargs):
    if dropout > 0.0:
        return f"attention dropout {dropout}"
    unsupported = [name for name in _UNSUPPORTED_KWARGS if kwargs.get(name) not in (None, False)]
    if unsupported:
        return f"{', '.join(unsupported)} given"
    return "its attention mask is not causal + padding" if attention_mask is not None else "its shapes"


def _warn_dropout_once(dropout):
    global _warned_dropout
    if not _warned_dropout:
        _warned_dropout = True
        warnings.warn(
            f"fastgpt attention has no dropout: layers training with attention dropout {dropout} run "
            "transformers' SDPA attention instead",
            RuntimeWarning,
            stacklevel=3,
        )


def register():
    """Register ``"fastgpt"`` with transformers' attention and attention-mask registries.

    Idempotent. Raises ``ImportError`` when transformers is missing or older than 4.53.
    """
    try:
        from transformers import masking_utils, modeling_utils
    except ImportError as exc:
        raise ImportError(f'attn_implementation="fastgpt" needs transformers>={MIN_TRANSFORMERS}: {exc}') from exc
    _register_attention(modeling_utils)
    _register_mask(masking_utils)


def _register_attention(modeling_utils):
    global _sdpa_attention_forward
    _sdpa_attention_forward = modeling_utils.ALL_ATTENTION_FUNCTIONS["sdpa"]
    modeling_utils.AttentionInterface.register(NAME, attention_forward)


def _register_mask(masking_utils):
    interface = getattr(masking_utils, "AttentionMaskInterface", None)
    if interface is None:
        raise ImportError(f'attn_implementation="fastgpt" needs transformers>={MIN_TRANSFORMERS}')
    # SDPA's masks: None for a causal batch without padding, a boolean (batch, 1, seq_q, seq_k) mask otherwise
    interface.register(NAME, masking_utils.ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def register_when_imported():
    """Register as soon as transformers' registries exist, without importing transformers.

    Does nothing when transformers is not installed; registers at once when it is already imported.
    """
    if "transformers.masking_utils" in sys.modules and "transformers.modeling_utils" in sys.modules:
        _register_quietly()
    elif importlib.util.find_spec("transformers") is not None:
        sys.meta_path.insert(0, _RegisterOnImport())


def _register_quietly():
    try:
        register()
    except ImportError:  # an older transformers: "fastgpt" stays unknown to it, as before
        pass


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Registers fastgpt once both transformers modules holding the registries have finished executing
    (either may import the other half way through its own execution)."""

    _WATCHED = ("transformers.modeling_utils", "transformers.masking_utils")

    def __init__(self):
        self._executed = set()

    def find_spec(self, fullname, path, target=None):
        if fullname not in self._WATCHED:
            return None
        spec = _spec_from_other_finders(self, fullname, path, target)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            self._executed.add(fullname)
            if self._executed.issuperset(self._WATCHED):
                sys.meta_path.remove(self)
                _register_quietly()

        spec.loader.exec_module = exec_module
        return spec


def _spec_from_other_finders(skip, fullname, path, target):
    for finder in sys.meta_path:
        if finder is not skip and hasattr(finder, "find_spec"):
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                return spec
    return None
