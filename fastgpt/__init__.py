"""fastgpt: fast GPT kernels for PyTorch — fused causal attention and add+LayerNorm in Triton
and C++/CUDA, each checked against a plain-PyTorch reference, and a GPT that uses them."""

from fastgpt import ops
from fastgpt.ops import BackendError, backends, use_backend
from fastgpt.registry import Backend, register_backend

__version__ = "0.1.0"
__all__ = ["ops", "backends", "use_backend", "Backend", "register_backend", "BackendError", "__version__"]
