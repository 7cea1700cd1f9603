"""The ``native`` backend: thin wrappers over the C++/CUDA extension ``fastgpt._C``."""


def available():
    """(available, reason) for the native backend."""
    try:
        from fastgpt import _C
    except ImportError as exc:
        return False, f"the C++ extension fastgpt._C is not built or failed to load ({exc})"
    return True, str(_C.build_info())
