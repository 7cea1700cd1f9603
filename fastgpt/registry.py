"""The one list of backends: each backend's name, the module that implements each op, whether it
can run here, and on which devices ``auto`` may pick it.

``fastgpt.ops`` dispatches through this list, and the model, the CLI, ``fastgpt bench`` and the
tests read their backend names from it. Adding a backend is one module that implements the
contract of ``docs/architecture.md`` plus one ``register_backend`` call.
"""

import functools
import importlib
from dataclasses import dataclass, field
from typing import Callable, FrozenSet, Mapping, Tuple

OPS = ("attention", "add_layer_norm")
FALLBACK = "reference"  # runs every valid input on every device: what `auto` falls back to
# the attention variants a backend may declare, and how a reason names the kernel it lacks
VARIANTS = {"window": "sliding-window", "softcap": "soft-capping", "varlen": "variable-length (packed)"}


@dataclass(frozen=True)
class Backend:
    """One backend of fastgpt's ops.

    ``modules`` maps each op to the module that implements its contract functions
    (``<op>_forward``, ``<op>_backward``, ``<op>_unsupported``). ``availability`` returns
    ``(available, reason)`` without touching a tensor; it is asked on every op call, so it must be
    cheap (cache it). ``auto_devices`` lists the device types where ``auto`` may pick this
    backend, which it tries in registration order before the fallback. ``variants`` names the
    attention variants (keys of ``VARIANTS``) its attention module implements; a call that uses
    another one is unsupported on this backend, so ``auto`` passes it by.
    """

    name: str
    modules: Mapping[str, str]
    availability: Callable[[], Tuple[bool, str]]
    auto_devices: Tuple[str, ...] = ()
    description: str = field(default="", compare=False)
    variants: FrozenSet[str] = frozenset()

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.isidentifier() or self.name == "auto":
            raise ValueError(f"Backend.name must be an identifier other than 'auto', got {self.name!r}")
        unknown = sorted(set(self.modules) - set(OPS))
        if unknown or not self.modules:
            raise ValueError(f"Backend.modules must map some of {OPS} to module names, got {dict(self.modules)!r}")
        if isinstance(self.variants, str):  # frozenset("window") would be a set of letters
            raise TypeError(f"Backend.variants must be a collection of names, got the string {self.variants!r}")
        variants = frozenset(self.variants)
        if not variants <= VARIANTS.keys() or (variants and "attention" not in self.modules):
            raise ValueError(
                f"Backend.variants must name some of {tuple(VARIANTS)} for a backend with attention, "
                f"got {sorted(variants)}"
            )
        object.__setattr__(self, "variants", variants)  # frozen: any collection given is stored as a frozenset

    def missing_variants(self, variants):
        """None when this backend implements every one of ``variants``, else a reason naming what it lacks."""
        missing = [VARIANTS[v] for v in VARIANTS if v in variants and v not in self.variants]
        return f"the {self.name} backend has no {' or '.join(missing)} kernel" if missing else None

    def module(self, op):
        """The module implementing ``op`` (imported on first use); KeyError if this backend lacks ``op``."""
        return _import(self.modules[op])


@functools.cache  # asked on every op call; import_module's own lookup costs microseconds
def _import(module_name):
    return importlib.import_module(module_name)


_BACKENDS = {}
_version = 0  # changes with every registration, so decisions taken before it are not reused


def version():
    return _version


def register_backend(backend, *, replace=False):
    """Add ``backend`` to the registry (after the ones already there; in its old place when it
    replaces one). Returns it."""
    global _version
    if not isinstance(backend, Backend):
        raise TypeError(f"backend must be a fastgpt.registry.Backend, got {type(backend).__name__}")
    if backend.name in _BACKENDS and not replace:
        raise ValueError(f"a backend named {backend.name!r} is already registered (pass replace=True)")
    _BACKENDS[backend.name] = backend
    _version += 1
    return backend


def unregister_backend(name):
    """Remove a registered backend; the fallback cannot be removed."""
    if name == FALLBACK:
        raise ValueError(f"the {FALLBACK!r} backend is the fallback and cannot be unregistered")
    global _version
    if name not in _BACKENDS:
        raise KeyError(f"no backend named {name!r} is registered (registered: {', '.join(_BACKENDS)})")
    del _BACKENDS[name]
    _version += 1


def names():
    """Every registered backend's name, in registration order."""
    return tuple(_BACKENDS)


def choices():
    """What a ``backend=`` argument accepts: ``"auto"`` and every registered name."""
    return ("auto",) + names()


def get(name):
    """The registered ``Backend`` called ``name``."""
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(f"backend must be one of {choices()}, got {name!r}") from None


def auto_candidates(device_type):
    """The backends ``auto`` tries on ``device_type``, in order (the fallback comes after them)."""
    return tuple(b for b in _BACKENDS.values() if device_type in b.auto_devices)


# ----------------------------------------------------------------------------- the built-in backends


def _always(reason):
    return lambda: (True, reason)


def _triton_availability():
    try:
        from fastgpt import kernels
    except ImportError as exc:  # an install without the fastgpt.kernels mapping (e.g. a failed build)
        return False, f"fastgpt.kernels is not installed ({exc})"
    return kernels.available()


def _native_availability():
    from fastgpt import native

    return native.available()


register_backend(
    Backend(
        "triton",
        {"attention": "fastgpt.kernels.attention", "add_layer_norm": "fastgpt.kernels.add_layer_norm"},
        _triton_availability,
        auto_devices=("cuda",),
        description="Triton kernels (kernels/): CUDA GPUs, or the CPU through TRITON_INTERPRET=1",
        variants={"window", "softcap", "varlen"},
    )
)
register_backend(
    Backend(
        "native",
        {"attention": "fastgpt.native", "add_layer_norm": "fastgpt.native"},
        _native_availability,
        auto_devices=("cuda", "cpu"),
        description="the C++/CUDA extension fastgpt._C (csrc/)",
        variants=set(VARIANTS),  # CPU kernels; on CUDA native.attention_variants_unsupported declines them
    )
)
register_backend(
    Backend(
        "torch",
        {"attention": "fastgpt.torch_kernels", "add_layer_norm": "fastgpt.torch_kernels"},
        _always("torch's own kernels (scaled_dot_product_attention, layer_norm, rms_norm)"),
        auto_devices=("cuda", "cpu"),
        description="torch's own kernels behind fastgpt's contract: the baseline fastgpt is measured against",
        variants={"window", "varlen"},  # windows as an explicit mask, packed batches one sequence at a time
    )
)
register_backend(
    Backend(
        FALLBACK,
        {"attention": "fastgpt.reference", "add_layer_norm": "fastgpt.reference"},
        _always("plain PyTorch, runs anywhere"),
        description="the textbook formulas in plain PyTorch: the oracle and the fallback",
        variants=set(VARIANTS),  # the fallback runs every variant
    )
)
