"""``patch_sdpa()``: every ``torch.nn.functional.scaled_dot_product_attention`` call in the process
goes through ``fastgpt.ops.scaled_dot_product_attention``.

Models call SDPA as ``F.scaled_dot_product_attention`` (nanoGPT, ``nn.MultiheadAttention``'s slow
path, most libraries), which looks the function up on the module at each call, so replacing that
one attribute reaches them all. fastgpt takes the calls it accelerates and hands the others to the
function that was installed before the patch (torch's, or another library's patch), captured at
patch time: fastgpt's own fallback calls ``F.scaled_dot_product_attention`` too, and a per-thread
flag sends that inner call to the captured function instead of back into fastgpt.

The patch stays while any hold is open: a ``with patch_sdpa():`` block holds it until the block
ends; a plain ``patch_sdpa()`` call holds it until ``unpatch_sdpa()``, which releases every plain
hold at once (so repeated plain calls are idempotent). When the last hold goes, the captured
function is put back, unless someone else has replaced the attribute since: theirs stays.
"""

import functools
import threading
import warnings

import torch.nn.functional as F

from fastgpt import ops

_lock = threading.Lock()
_holds = []  # open _SdpaPatch holds, plain and scoped
_installed = None  # the routing function on F while patched
_replaced = None  # what F.scaled_dot_product_attention was before it
_inside_fastgpt = threading.local()  # set while fastgpt runs a routed call


class _SdpaPatch:
    """One hold on the patch; a context manager that releases it on exit."""

    def __init__(self):
        self.scoped = False

    def __enter__(self):
        self.scoped = True
        return self

    def __exit__(self, *exc):
        _release(lambda hold: hold is self)
        return False


def patch_sdpa():
    """Route ``torch.nn.functional.scaled_dot_product_attention`` through fastgpt (thread-safe).

    Use as ``with fastgpt.patch_sdpa(): ...`` or as a plain call undone by ``fastgpt.unpatch_sdpa()``.
    """
    global _installed, _replaced
    hold = _SdpaPatch()
    with _lock:
        if not _holds:
            _replaced = F.scaled_dot_product_attention
            _installed = _routing_function(_replaced)
            F.scaled_dot_product_attention = _installed
        _holds.append(hold)
    return hold


def unpatch_sdpa():
    """Release the plain ``patch_sdpa()`` calls; the patch goes once no ``with patch_sdpa()`` block holds it."""
    _release(lambda hold: not hold.scoped)


def is_sdpa_patched():
    """Whether ``torch.nn.functional.scaled_dot_product_attention`` currently routes through fastgpt."""
    return _installed is not None and F.scaled_dot_product_attention is _installed


def _release(matches):
    global _installed, _replaced
    with _lock:
        _holds[:] = [hold for hold in _holds if not matches(hold)]
        if _holds or _installed is None:
            return
        if F.scaled_dot_product_attention is _installed:
            F.scaled_dot_product_attention = _replaced
        else:
            warnings.warn(
                "torch.nn.functional.scaled_dot_product_attention was replaced after fastgpt.patch_sdpa(); "
                "unpatch_sdpa() leaves that replacement in place",
                RuntimeWarning,
                stacklevel=3,
            )
        _installed = _replaced = None


def _routing_function(replaced):
    @functools.wraps(replaced)
    def scaled_dot_product_attention(
        query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
    ):
        if getattr(_inside_fastgpt, "active", False):  # fastgpt's fallback, calling F.scaled_dot_product_attention
            gqa = {"enable_gqa": enable_gqa} if enable_gqa else {}  # a replaced patch may predate the argument
            return replaced(
                query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **gqa
            )
        _inside_fastgpt.active = True
        try:
            return ops.scaled_dot_product_attention(
                query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa
            )
        finally:
            _inside_fastgpt.active = False

    return scaled_dot_product_attention
