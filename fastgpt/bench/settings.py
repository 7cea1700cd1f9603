"""What one run measures and how long it may spend: device, size set, dtypes, repetitions."""

from dataclasses import dataclass, field
from typing import Optional

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass
class Settings:
    device: str
    sizes: str  # "full", "quick" or "tiny"
    budget_s: float  # wall time each measurement may spend on timed repetitions
    min_reps: int
    max_reps: int
    warmup: int
    compile_skip_reason: Optional[str]  # None: time torch.compile baselines
    rotate_bytes: int  # input sets cycled per case add up to at least this many bytes
    dtypes: Optional[list] = None
    notes: list = field(default_factory=list)


def default_dtypes(op, device):
    """The dtypes an op is timed in when ``--dtype`` is not given."""
    if device == "cpu":
        return [torch.float32]
    return [torch.bfloat16, torch.float32] if op == "add_layer_norm" else [torch.bfloat16]
