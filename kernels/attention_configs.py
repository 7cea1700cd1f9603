"""How the Triton attention kernels are launched: the tiles each GPU generation's autotuner may
pick, which of them fit the device's shared memory (by their compiled size, from the table in
``attention_resources``), which of them compile without spills for the call's variants (from
``attention_variant_resources``), and the fixed small tile of the interpreter."""

import dataclasses
import functools
from typing import Optional, Tuple

import torch
import triton

from . import interpreting
from .attention_resources import RESOURCES
from .attention_variant_resources import VARIANT_STACK

# Under the interpreter every program runs one after another in numpy: one small tile, no autotuning.
INTERPRETER_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16}

# (BLOCK_M, BLOCK_N, num_warps, num_stages) the autotuner may pick, per (GPU generation, bytes per
# element). BLOCK_M is the query tile and BLOCK_N the key tile in every kernel. On Hopper a 128-row
# tile with 8 warps (two warpgroups of 64 rows) lets tl.dot lower to wgmma; K/V (or Q/dO) tiles are
# software pipelined num_stages deep through shared memory. The small tiles at the end of each 16-bit
# list (FALLBACK_TILES) are tried only where none of the others fits (head dim 256, 99 KB parts) or
# where none of the others compiles without spills for the call's specialization. fp32 runs its
# products on the tensor cores ("tf32x3", ``dot_precision``) but holds each operand twice (tf32
# high and low parts) at twice the bytes per element, so its tiles are smaller: each fp32 list has
# a tile that compiles without a stack frame (no spills) at every head dim <= 128 on sm_80 and
# sm_90 (its last), and larger ones the selection keeps where they compile without one too
# (spilling tiles are dropped while a clean one fits); each window/soft-cap/varlen specialization
# has a clean fp32 tile of each kernel there too (not always the last one: the variant table).
# Whether a tile fits a device is decided from its compiled shared memory (``attention_resources``),
# never from an estimate.
_SMALL_FORWARD = [(64, 32, 4, 2), (32, 32, 4, 2)]
FORWARD_CONFIGS = {
    ("hopper", 2): [(128, 128, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3), *_SMALL_FORWARD],
    ("ampere", 2): [(128, 64, 8, 3), (64, 64, 4, 3), *_SMALL_FORWARD],
    # fp32, without a stack frame: 128x64 (sm_90) and 64x64 (sm_80) up to head dim 32, the 64-row
    # wgmma tile up to 64 (sm_90), 32x64 (sm_80) and 32x32 with 8 warps at every head dim <= 128
    ("hopper", 4): [(128, 64, 8, 2), (64, 64, 4, 2), (32, 32, 8, 2)],
    ("ampere", 4): [(64, 64, 8, 2), (32, 64, 8, 2), (32, 32, 8, 2)],
}
# dK/dV: one key tile (BLOCK_N) stays in registers while query tiles (BLOCK_M) stream past it
_SMALL_DKDV = [(16, 32, 4, 2)]
DKDV_CONFIGS = {  # at head dim 128 on sm_90 the 64x128 and 32x64 tiles spill (600, 72 B): 16x128 does not
    ("hopper", 2): [(64, 128, 8, 2), (32, 64, 8, 2), (16, 128, 8, 2), *_SMALL_DKDV],
    ("ampere", 2): [(64, 128, 8, 2), (32, 64, 8, 2), *_SMALL_DKDV],
    # fp32, without a stack frame: 32x64 (wgmma on sm_90) up to head dim 32, 16 queries x 32 keys
    # up to 64, 16 keys with 8 warps (16 or 32 queries on sm_90, 16 on sm_80) at every head dim <= 128
    ("hopper", 4): [(32, 64, 4, 2), (16, 32, 8, 2), (32, 16, 8, 2), (16, 16, 8, 2)],
    ("ampere", 4): [(16, 32, 8, 2), (16, 16, 8, 2)],
}
# dQ: one query tile stays in registers while key tiles stream past it
_SMALL_DQ = [(32, 32, 4, 2)]
DQ_CONFIGS = {
    ("hopper", 2): [(128, 64, 8, 2), (64, 64, 4, 2), *_SMALL_DQ],
    ("ampere", 2): [(128, 64, 8, 2), (64, 64, 4, 2), *_SMALL_DQ],
    # fp32, without a stack frame: 128x64 and 64x32 (wgmma) up to head dim 64 on sm_90, 64x32 up
    # to 32 and 32x64 at 16 and 64 on sm_80, 16 queries with 4 warps at every head dim <= 128
    ("hopper", 4): [(128, 64, 8, 2), (64, 32, 4, 2), (16, 32, 4, 2)],
    ("ampere", 4): [(64, 32, 8, 2), (32, 64, 8, 2), (16, 32, 4, 2)],
}
# decode: (BLOCK_N, num_stages) of the key tile per bytes per element, in order of preference;
# BLOCK_M is the GQA group's rows (16 up to decode_max_rows), 4 warps.
DECODE_TILES = {2: [(64, 3), (64, 2), (32, 2), (16, 2)], 4: [(64, 2), (32, 2), (16, 2), (16, 1)]}
DECODE_MAX_ROWS = 64  # at most this many rows (queries × GQA group size) in one decode tile, but:
# (bytes per element, padded head dim) -> fewer rows where 64 spill in every key tile: fp32 at
# head dim 128 (sm_80 616-13,560 B of stack, sm_90 104-552 B); 16 rows compile clean there. More
# rows go to the forward kernel.
DECODE_FEWER_ROWS = {(4, 128): 16}
DECODE_WARPS = 4
FALLBACK_TILES = {"forward": _SMALL_FORWARD, "backward_dkdv": _SMALL_DKDV, "backward_dq": _SMALL_DQ}
CONFIGS = {"forward": FORWARD_CONFIGS, "backward_dkdv": DKDV_CONFIGS, "backward_dq": DQ_CONFIGS}
# The variant specializations a call can combine, in the order combination names list them
VARIANT_NAMES = ("window", "softcap", "varlen")
# {bytes per element: padded head dims} at which attention_variant_resources lists every tile a
# variant call can be offered (benchmarks/aot_table.py --variants); beyond them (head dim 256) the
# plain kernel's stack stands for the variants'
VARIANT_HEAD_DIMS = {2: (16, 32, 64, 128), 4: (16, 32, 64, 128)}
ARCH_OF_TARGET = {80: "ampere", 90: "hopper"}  # the compile target each generation's table comes from
# opt-in shared memory per block: the limits of the parts the tables are checked against
SHARED_MEMORY_LIMITS = {"sm_80": 166912, "sm_86": 101376, "sm_89": 101376, "sm_90": 232448}
KNOWN_SHARED_MEMORY = {"hopper": SHARED_MEMORY_LIMITS["sm_90"], "ampere": SHARED_MEMORY_LIMITS["sm_86"]}


def head_dim_padded(head_dim):
    return max(16, triton.next_power_of_2(head_dim))  # tl.dot needs power-of-two tiles of at least 16


def dot_precision(dtype):
    # fp32 inputs get "tf32x3": each operand split into a tf32 high part (rounded to nearest) and
    # the rest (read as tf32 by the tensor core), three tensor-core products lo*hi + hi*lo + hi*hi
    # summed in fp32: about fp32 products' accuracy (tests/test_attention_tf32x3.py) at tensor-core
    # speed, where "ieee" runs on the FMA units. Triton's interpreter ignores the setting (its dot is
    # np.matmul in fp32), so the CPU tests cannot see the rounding. fp16/bf16 operands ignore it too.
    return "tf32x3" if dtype == torch.float32 else "tf32"


def seq_bucket(n):
    """Autotuning bucket of a sequence length: decode (1), then powers of two up to 16k."""
    return min(triton.next_power_of_2(n), 16384)


def strides(t):
    return tuple(t.stride())


def all_blocks(configs_by_arch):
    """Every configuration of any generation, in a stable order without repeats."""
    return list(dict.fromkeys(b for blocks in configs_by_arch.values() for b in blocks))


def decode_max_rows(itemsize, padded_head_dim):
    """At most this many rows (queries × GQA group size) go to the decode kernel."""
    return DECODE_FEWER_ROWS.get((itemsize, padded_head_dim), DECODE_MAX_ROWS)


def decode_blocks(itemsize, padded_head_dim, block_n, num_stages):
    """The decode configuration the resource table lists for a key tile: its widest tile of rows."""
    return (decode_max_rows(itemsize, padded_head_dim), block_n, DECODE_WARPS, num_stages)


def decode_candidates(itemsize, padded_head_dim):
    """The decode configurations the table lists at this element size and head dim, in order of
    preference."""
    return [decode_blocks(itemsize, padded_head_dim, n, stages) for n, stages in DECODE_TILES[itemsize]]


def resources(kernel, arch, itemsize, padded_head_dim, blocks):
    """``{"registers", "stack", "shared"}`` of one configuration as compiled ahead of time
    (``attention_resources``), or None when the table does not list it."""
    entry = RESOURCES.get((kernel, arch, itemsize, padded_head_dim, tuple(blocks)))
    return None if entry is None else dict(zip(("registers", "stack", "shared"), entry))


def fitting_blocks(kernel, candidates, arch, shared_limit, padded_head_dim, itemsize):
    """The candidates whose compiled shared memory fits ``shared_limit`` bytes. A candidate the
    table lacks is never picked (tests/test_attention_triton_aot.py keeps the table complete)."""
    return [b for b in candidates
            if (usage := resources(kernel, arch, itemsize, padded_head_dim, b)) is not None
            and usage["shared"] <= shared_limit]


def combination(causal, variants=frozenset()):
    """The name of a call's specialization in ``attention_variant_resources``: "causal" and the
    ``variants`` used, joined by "+" ("causal+window+varlen", "softcap"); "" or "causal" for the
    plain kernels of ``attention_resources``."""
    return "+".join((["causal"] if causal else []) + [name for name in VARIANT_NAMES if name in variants])


def combination_of(constexprs):
    """``combination`` of a specialization given by its CAUSAL, WINDOW, SOFTCAP and VARLEN switches."""
    return combination(constexprs["CAUSAL"], {name for name in VARIANT_NAMES if constexprs[name.upper()]})


def stack_bytes(kernel, arch, itemsize, padded_head_dim, blocks, combo=""):
    """Stack bytes (spills) of one configuration compiled for the specialization ``combo``: from
    the variant table where it lists it (the tiles a variant call can be offered at
    VARIANT_HEAD_DIMS, bf16 standing for both 16-bit dtypes, and fp32), else the plain kernel's
    (a plain call; a variant call at head dim 256, which was not compiled)."""
    stack = VARIANT_STACK.get((kernel, arch, itemsize, padded_head_dim, tuple(blocks), combo))
    return resources(kernel, arch, itemsize, padded_head_dim, blocks)["stack"] if stack is None else stack


def usable_blocks(kernel, arch, shared_limit, padded_head_dim, itemsize, combo=""):
    """The configurations of a tuned ``kernel`` that fit this device, in tiers: its generation's
    tiles that fit and compiled without a stack frame (no spills) for the call's specialization
    ``combo`` (``combination``); else the small fallback tiles likewise; else the generation's
    tiles that fit, spilling; else the fallback ones. Empty when nothing fits."""
    listed, fallback = CONFIGS[kernel][arch, itemsize], FALLBACK_TILES[kernel]
    tiers = [b for b in listed if b not in fallback], [b for b in listed if b in fallback]
    fits = [fitting_blocks(kernel, tier, arch, shared_limit, padded_head_dim, itemsize) for tier in tiers]
    clean = [[b for b in tier if stack_bytes(kernel, arch, itemsize, padded_head_dim, b, combo) == 0]
             for tier in fits]
    return next((tier for tier in (*clean, *fits) if tier), [])


def select_blocks(kernel, arch, shared_limit, padded_head_dim, itemsize, seq_q, seq_k, combo=""):
    """The configurations of ``kernel`` the autotuner may try on this device for a call of the
    specialization ``combo`` (``combination``): usable ones (``usable_blocks``) without tiles far
    larger than the sequences. Empty when none fits, which ``unsupported_reason`` reports before
    any launch."""
    usable = usable_blocks(kernel, arch, shared_limit, padded_head_dim, itemsize, combo)
    if not usable:
        return []
    bound_m = max(triton.next_power_of_2(seq_q), min(b[0] for b in usable))
    bound_n = max(triton.next_power_of_2(seq_k), min(b[1] for b in usable))
    return [b for b in usable if b[0] <= bound_m and b[1] <= bound_n] or usable


def decode_tile(arch, shared_limit, padded_head_dim, itemsize, combo=""):
    """(BLOCK_N, num_stages) of the decode kernel (not autotuned) for a call of the specialization
    ``combo`` (``combination``): the first of DECODE_TILES that fits with the smallest stack frame
    for it (``stack_bytes``; none: no spills); None when none fits."""
    fits = fitting_blocks("decode", decode_candidates(itemsize, padded_head_dim), arch, shared_limit, padded_head_dim,
                          itemsize)
    if not fits:
        return None
    best = min(fits, key=lambda b: stack_bytes("decode", arch, itemsize, padded_head_dim, b, combo))  # first of ties
    return best[1], best[3]


def unsupported_reason(arch, shared_limit, padded_head_dim, itemsize):
    """None when every attention kernel has a configuration whose compiled shared memory fits
    ``shared_limit`` bytes, else which kernel has none."""
    for kernel in (*CONFIGS, "decode"):
        if kernel == "decode":
            candidates = decode_candidates(itemsize, padded_head_dim)
            fits = decode_tile(arch, shared_limit, padded_head_dim, itemsize) is not None
        else:
            candidates = CONFIGS[kernel][arch, itemsize]
            fits = bool(usable_blocks(kernel, arch, shared_limit, padded_head_dim, itemsize))
        if not fits:
            needs = [u["shared"] for b in candidates
                     if (u := resources(kernel, arch, itemsize, padded_head_dim, b)) is not None]
            smallest = f"the smallest tile needs {min(needs)} B" if needs else "no tile of it was compiled"
            return (f"no {kernel} tile at head dim {padded_head_dim} (padded) with {itemsize}-byte elements fits "
                    f"this GPU's {shared_limit} B of shared memory per block ({smallest})")
    return None


def _as_config(blocks):
    block_m, block_n, num_warps, num_stages = blocks
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages)


def _blocks_of(config):
    return (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages)


def arch_of(device):
    """The generation whose configurations and resource table a CUDA device uses."""
    major, _ = torch.cuda.get_device_capability(device)
    return "hopper" if major == 9 else "ampere"


@functools.cache
def _device_limits(index):
    device = torch.device("cuda", index)
    arch = arch_of(device)
    try:
        limit = triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]
    except Exception:  # noqa: BLE001 - an older driver API: fall back to the generation's known limit
        limit = KNOWN_SHARED_MEMORY[arch]
    return arch, limit


def device_limits(device):
    """(generation, opt-in shared memory bytes per block) of a CUDA device."""
    return _device_limits(device.index if device.index is not None else torch.cuda.current_device())


def _pruner(kernel):
    def prune(configs, named_args, **kwargs):
        q = named_args["q_ptr"]
        arch, limit = device_limits(q.device)
        combo = combination_of(kwargs)
        chosen = set(select_blocks(kernel, arch, limit, kwargs["HEAD_DIM_PADDED"], q.element_size(),
                                   named_args["seq_q"], named_args["seq_k"], combo))
        return [c for c in configs if _blocks_of(c) in chosen]

    return prune


def autotuned(jit_kernel, kernel):
    """``jit_kernel`` behind an autotuner over the configurations of ``kernel`` (a CONFIGS key) of
    every generation and dtype, pruned to this device's generation, dtype and shared memory."""
    return triton.autotune(
        configs=[_as_config(b) for b in all_blocks(CONFIGS[kernel])],
        # tensor dtypes join the key automatically
        key=["HEAD_DIM", "CAUSAL", "WINDOW", "SOFTCAP", "VARLEN", "seq_q_bucket", "seq_k_bucket"],
        prune_configs_by={"early_config_prune": _pruner(kernel)},
    )(jit_kernel)


def launch(tuned, kernel, grid, args, constexprs):
    """Launch through the autotuner on a GPU; one fixed small tile under the interpreter (fast CPU tests)."""
    if interpreting():
        kernel[grid](*args, **constexprs, **INTERPRETER_BLOCKS)
    else:
        tuned[grid](*args, **constexprs)


@dataclasses.dataclass(frozen=True)
class Variant:
    """Which attention the kernels compute, as ``fastgpt.ops`` hands it over: the causal mask, a
    sliding ``window`` (left, right) already normalized (causal: (left >= 0, 0); else at least one
    side bounded, -1 for an open side), a ``softcap`` (0: off), and packed sequences (``cu_seqlens_q``
    and ``cu_seqlens_k`` int32 offsets with the longest lengths; the tensors are then passed as
    (1, heads, total, head_dim) views whose batch stride the kernels never use)."""

    causal: bool
    window: Optional[Tuple[int, int]] = None
    softcap: float = 0.0
    cu_seqlens_q: Optional[torch.Tensor] = None
    cu_seqlens_k: Optional[torch.Tensor] = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0

    @property
    def varlen(self):
        return self.cu_seqlens_q is not None

    def batch(self, q):
        """How many sequences (programs per head along the batch axis)."""
        return self.cu_seqlens_q.shape[0] - 1 if self.varlen else q.shape[0]

    def lengths(self, q, k):
        """(seq_q, seq_k) the kernels take: the longest sequences when packed."""
        return (self.max_seqlen_q, self.max_seqlen_k) if self.varlen else (q.shape[2], k.shape[2])

    def strides(self, t):
        """The strides of a (batch, heads, seq, ...) tensor or packed view; a packed view's batch stride is 0
        (a program's sequence starts at its offset instead)."""
        return (0, *t.stride()[1:]) if self.varlen else tuple(t.stride())

    def window_args(self, seq_q, seq_k):
        """(window_left, window_right) the kernels take: an open side becomes seq_q + seq_k, a bound no
        key index reaches; (0, 0) without a window (unused)."""
        if self.window is None:
            return 0, 0
        return tuple(side if side >= 0 else seq_q + seq_k for side in self.window)

    def combination(self):
        """The specialization's name in the variant resource table (``combination``)."""
        return combination_of(self.constexprs())

    def constexprs(self):
        return dict(CAUSAL=bool(self.causal), WINDOW=self.window is not None, SOFTCAP=self.softcap > 0,
                    VARLEN=self.varlen)


def shape_constexprs(head_dim, dtype, variant):
    """The compile-time constants every attention kernel but the preprocess takes."""
    return dict(HEAD_DIM=head_dim, HEAD_DIM_PADDED=head_dim_padded(head_dim), **variant.constexprs(),
                DOT_PRECISION=dot_precision(dtype))
