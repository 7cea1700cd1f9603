"""How a call picks its backend: ``FASTGPT_BACKEND``, ``use_backend``, an explicit name, or ``auto``'s
measured choice (``fastgpt.auto_rule``) among the backends of ``fastgpt.registry`` that support the
inputs, with the reference as the fallback and one warning naming why. ``fastgpt.ops`` asks
``resolve`` on every call; decisions are remembered, so a call pays a dictionary lookup.

How a backend is chosen is described in ``docs/architecture.md`` ("Choosing a backend").
"""

import contextlib
import os
import sys
import threading
import warnings

import torch

from fastgpt import auto_rule, registry


class BackendError(RuntimeError):
    """A backend was named explicitly but cannot run these inputs (or is not installed)."""


def backends():
    """``{name: {"available": bool, "reason": str}}`` for every registered backend."""
    report = {}
    for name in registry.names():
        ok, reason = registry.get(name).availability()
        report[name] = {"available": ok, "reason": reason}
    return report


def unsupported_reason(op, name, args, variants=frozenset()):
    """None when backend ``name`` can run ``op`` (``"attention"`` or ``"add_layer_norm"``) on
    ``args`` (the op's tensors as its ``*_unsupported`` takes them) with the attention
    ``variants`` (some of ``registry.VARIANTS``), else why not."""
    backend = registry.get(name)
    ok, reason = backend.availability()
    if not ok:
        return reason
    if op not in backend.modules:
        return f"the {name} backend does not implement {op}"
    if variants:
        reason = backend.missing_variants(variants)
        if reason is not None:
            return reason
    try:
        impl = backend.module(op)
    except ImportError as exc:
        return f"cannot import {backend.modules[op]}: {exc}"
    reason = getattr(impl, f"{op}_unsupported")(*args)
    if reason is None and variants and hasattr(impl, "attention_variants_unsupported"):
        reason = impl.attention_variants_unsupported(*args, variants)  # declared, but not on every device
    return reason


_warned = set()


def _warn_once(message):
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=_stacklevel_outside_library())


def _stacklevel_outside_library():
    """The ``stacklevel`` that makes a warning name the user's line: the first caller outside
    fastgpt and torch (the custom-op dispatch, or torch.compile, sits between the two)."""
    level, frame = 2, sys._getframe(2)  # level 1 is _warn_once, which calls warnings.warn
    while frame is not None and (
        frame.f_globals.get("__name__", "").split(".")[0] in ("fastgpt", "torch")
        or frame.f_code.co_filename.startswith(_TORCH_DIR)  # code torch.compile generated
    ):
        level, frame = level + 1, frame.f_back
    return level


_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


def _environment_backend():
    name = os.environ.get("FASTGPT_BACKEND") or "auto"
    if name != "auto" and name not in registry.choices():
        raise ValueError(f"FASTGPT_BACKEND must be one of {registry.choices()}, got {name!r}")
    return name


def resolve(op, backend, args, training=True, variants=frozenset()):
    """The implementation module that runs ``op``: the named backend, or ``auto``'s choice.

    ``training``: whether a backward will follow (``auto``'s table may pick differently for
    inference). ``variants``: the attention variants the call uses, which the backend must
    declare. Decisions are remembered per backend, registry state, device, dtypes, sizes
    (``auto_rule.decision_key``) and variants, so a call costs a dictionary lookup once its kind
    has been seen.
    """
    if backend == "auto":
        backend = _environment_backend()
    first = args[0]
    key = (
        op, backend, training, registry.version(), first.device, first.dtype,
        tuple([None if t is None else t.dtype for t in args[1:]]), auto_rule.decision_key(op, args), variants,
    )
    decision = _decisions.get(key)
    if decision is None:
        decision = _decide(op, backend, args, training, variants)
        if len(_decisions) >= _DECISIONS_KEPT:  # a process that sees ever new sizes stays bounded
            _decisions.clear()
        _decisions[key] = decision
    _name, impl, warning = decision
    if warning is not None:
        _warn_once(warning)
    return impl


def auto_choice(op, args, training=False, variants=frozenset()):
    """The name of the backend ``auto`` runs ``op`` on for ``args`` (the op's tensors, as its
    ``*_unsupported`` takes them), whether a backward follows and the attention variants used;
    ``fastgpt info`` shows a few."""
    return _decide(op, "auto", args, training, frozenset(variants))[0]


_decisions = {}
_DECISIONS_KEPT = 4096


def forget_decisions():
    """Decide again on the next calls (after a table or a backend's availability changed)."""
    _decisions.clear()
    auto_rule.forget_tables()


def _decide(op, backend, args, training, variants):
    """(backend name, implementation module, fallback warning or None) for one kind of call."""
    public_name = "varlen_attention" if "varlen" in variants else op
    if backend != "auto":
        reason = unsupported_reason(op, backend, args, variants)
        if reason is not None:
            raise BackendError(f"fastgpt.ops.{public_name}: backend {backend!r} cannot run these inputs: {reason}")
        return backend, registry.get(backend).module(op), None
    candidates = [b.name for b in registry.auto_candidates(args[0].device.type)]
    # the tables time plain calls: a call with a variant (torch's window is a full mask) takes the order
    preferred = None if variants else auto_rule.preferred_backend(op, args, training)
    if preferred in candidates:  # measured fastest for this kind of call: try it first
        candidates.remove(preferred)
        candidates.insert(0, preferred)
    reasons = []
    for name in candidates:
        reason = unsupported_reason(op, name, args, variants)
        if reason is None:
            return name, registry.get(name).module(op), None
        reasons.append(f"{name}: {reason}")
    warning = f"fastgpt.ops.{public_name} falls back to the {registry.FALLBACK} backend ({'; '.join(reasons)})" if reasons else None
    return registry.FALLBACK, registry.get(registry.FALLBACK).module(op), warning


# a process-wide choice (not per thread): autograd may run a backward on another thread, and it
# must run the backend that ran the forward
_backend_override = None
_override_lock = threading.Lock()


@contextlib.contextmanager
def use_backend(name):
    """Run every op called with ``backend="auto"`` (the default) on backend ``name`` inside the block.

    An explicit ``backend=`` argument still wins; ``use_backend`` wins over ``FASTGPT_BACKEND``.
    The choice is process-wide and restored on exit; nested blocks work.
    """
    global _backend_override
    check_backend_name(name)
    with _override_lock:
        previous, _backend_override = _backend_override, name
    try:
        yield
    finally:
        with _override_lock:
            _backend_override = previous


def requested_backend(backend):
    """``backend`` as the op receives it: ``auto`` becomes the ``use_backend`` choice when there is one."""
    check_backend_name(backend)
    return _backend_override if backend == "auto" and _backend_override is not None else backend


def check_backend_name(backend, argument="backend"):
    """Raise ``ValueError`` unless ``backend`` is ``"auto"`` or a registered backend's name."""
    if backend != "auto" and (not isinstance(backend, str) or backend not in registry.choices()):
        raise ValueError(f"{argument} must be one of {registry.choices()}, got {backend!r}")
