"""A case: one point of a kernel op's sweep (op, pass, shape, dtype), the work it does and how to
make its inputs."""

from dataclasses import dataclass
from typing import Callable, Optional

import torch

PASSES = ("fwd", "fwd+bwd")


@dataclass
class Case:
    """One point of a sweep: its inputs, the work it does, and what to record about it."""

    op: str
    pass_: str
    shape: dict
    dtype: torch.dtype
    flops: Optional[float]
    bytes: Optional[float]
    make_inputs: Callable  # () -> one fresh input set (tuple of tensors; the last is the output gradient)
    extra_args: tuple = ()  # passed after the tensors, e.g. causal
    materialized_bytes: int = 0  # fp32 bytes of the score matrix an unfused implementation builds
