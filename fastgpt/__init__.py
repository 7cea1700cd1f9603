"""fastgpt: fast GPT kernels for PyTorch — fused causal attention and add+LayerNorm in Triton
and C++/CUDA, each checked against a plain-PyTorch reference, and a GPT that uses them."""

from fastgpt import ops
from fastgpt.integrations import huggingface as _huggingface
from fastgpt.dispatch import BackendError, backends, use_backend
from fastgpt.patching import patch_sdpa, unpatch_sdpa
from fastgpt.registry import Backend, register_backend

__version__ = "0.1.0"
__all__ = [
    "ops",
    "backends",
    "use_backend",
    "Backend",
    "register_backend",
    "BackendError",
    "patch_sdpa",
    "unpatch_sdpa",
    "__version__",
]

# attn_implementation="fastgpt" in Hugging Face transformers, once transformers is imported (never imports it)
_huggingface.register_when_imported()
