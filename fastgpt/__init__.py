"""fastgpt: fast GPT kernels for PyTorch — fused causal attention and add+LayerNorm in Triton
and C++/CUDA, each checked against a plain-PyTorch reference, and a GPT that uses them."""

from fastgpt import ops
from fastgpt.ops import BackendError, backends

__version__ = "0.1.0"
__all__ = ["ops", "backends", "BackendError", "__version__"]
