"""How the Triton attention kernels are launched: the tiles each GPU generation's autotuner may
pick, which of them fit the device's shared memory, and the fixed small tile of the interpreter."""

import torch
import triton

from . import interpreting

# Under the interpreter every program runs one after another in numpy: one small tile, no autotuning.
INTERPRETER_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16}

# (BLOCK_M, BLOCK_N, num_warps, num_stages) the autotuner may pick, per GPU generation. BLOCK_M is
# the query tile and BLOCK_N the key tile in every kernel. On Hopper a 128-row tile with 8 warps
# (two warpgroups of 64 rows) lets tl.dot lower to wgmma; K/V (or Q/dO) tiles are software
# pipelined num_stages deep through shared memory.
FORWARD_CONFIGS = {
    "hopper": [(128, 128, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3)],
    "ampere": [(128, 64, 8, 3), (64, 64, 4, 3)],
}
# dK/dV: one key tile (BLOCK_N) stays in registers while query tiles (BLOCK_M) stream past it
DKDV_CONFIGS = {
    "hopper": [(64, 128, 8, 2), (32, 64, 4, 2)],
    "ampere": [(64, 128, 8, 2), (32, 64, 4, 2)],
}
# dQ: one query tile stays in registers while key tiles stream past it
DQ_CONFIGS = {
    "hopper": [(128, 64, 8, 2), (64, 64, 4, 2)],
    "ampere": [(128, 64, 8, 2), (64, 64, 4, 2)],
}
KNOWN_SHARED_MEMORY = {"hopper": 232448, "ampere": 166912}  # opt-in bytes per block, sm_90 and sm_80


def head_dim_padded(head_dim):
    return max(16, triton.next_power_of_2(head_dim))  # tl.dot needs power-of-two tiles of at least 16


def dot_precision(dtype):
    # fp32 inputs get true fp32 products ("ieee": several times slower than tf32 tensor cores, but
    # float32 users asked for float32 accuracy); the setting does not affect fp16/bf16 operands
    return "ieee" if dtype == torch.float32 else "tf32"


def seq_bucket(n):
    """Autotuning bucket of a sequence length: decode (1), then powers of two up to 16k."""
    return min(triton.next_power_of_2(n), 16384)


def strides(t):
    return tuple(t.stride())


def forward_shared_bytes(block_m, block_n, num_stages, padded_head_dim, itemsize):
    return (block_m + 2 * num_stages * block_n) * padded_head_dim * itemsize  # Q + pipelined K, V


def dkdv_shared_bytes(block_m, block_n, num_stages, padded_head_dim, itemsize):
    return (2 * block_n + 2 * num_stages * block_m) * padded_head_dim * itemsize  # K, V + pipelined Q, dO


def dq_shared_bytes(block_m, block_n, num_stages, padded_head_dim, itemsize):
    return (2 * block_m + 2 * num_stages * block_n) * padded_head_dim * itemsize  # Q, dO + pipelined K, V


def all_blocks(configs_by_arch):
    """Every configuration of any generation, in a stable order without repeats."""
    return list(dict.fromkeys(b for blocks in configs_by_arch.values() for b in blocks))


def _as_config(blocks):
    block_m, block_n, num_warps, num_stages = blocks
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages)


def _blocks_of(config):
    return (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages)


def _arch_of(device):
    major, _ = torch.cuda.get_device_capability(device)
    return "hopper" if major == 9 else "ampere"


def _shared_memory_limit(device, arch):
    try:
        return triton.runtime.driver.active.utils.get_device_properties(device.index)["max_shared_mem"]
    except Exception:  # noqa: BLE001 - an older driver API: fall back to the generation's known limit
        return KNOWN_SHARED_MEMORY[arch]


def select_blocks(configs_by_arch, shared_bytes, arch, shared_limit, padded_head_dim, itemsize, seq_q, seq_k):
    """This generation's configurations whose shared memory fits (with room for Triton's own
    scratch), without tiles far larger than the sequences; the smallest one if none fits."""
    candidates = configs_by_arch[arch]
    smallest_m = min(b[0] for b in candidates)
    smallest_n = min(b[1] for b in candidates)
    fits = [
        b
        for b in candidates
        if shared_bytes(b[0], b[1], b[3], padded_head_dim, itemsize) + 8192 <= shared_limit
        and b[0] <= max(triton.next_power_of_2(seq_q), smallest_m)
        and b[1] <= max(triton.next_power_of_2(seq_k), smallest_n)
    ]
    if fits:
        return fits
    return [min(candidates, key=lambda b: shared_bytes(b[0], b[1], b[3], padded_head_dim, itemsize))]


def _pruner(configs_by_arch, shared_bytes):
    def prune(configs, named_args, **kwargs):
        q = named_args["q_ptr"]
        arch = _arch_of(q.device)
        chosen = set(
            select_blocks(
                configs_by_arch, shared_bytes, arch, _shared_memory_limit(q.device, arch),
                kwargs["HEAD_DIM_PADDED"], q.element_size(), named_args["seq_q"], named_args["seq_k"],
            )
        )
        return [c for c in configs if _blocks_of(c) in chosen]

    return prune


def autotuned(kernel, configs_by_arch, shared_bytes):
    """``kernel`` behind an autotuner over the configurations of every generation, pruned to this
    device's generation and shared memory."""
    return triton.autotune(
        configs=[_as_config(b) for b in all_blocks(configs_by_arch)],
        # tensor dtypes join the key automatically
        key=["HEAD_DIM", "CAUSAL", "seq_q_bucket", "seq_k_bucket"],
        prune_configs_by={"early_config_prune": _pruner(configs_by_arch, shared_bytes)},
    )(kernel)


def launch(tuned, kernel, grid, args, constexprs):
    """Launch through the autotuner on a GPU; one fixed small tile under the interpreter (fast CPU tests)."""
    if interpreting():
        kernel[grid](*args, **constexprs, **INTERPRETER_BLOCKS)
    else:
        tuned[grid](*args, **constexprs)


def shape_constexprs(head_dim, dtype, causal):
    """The compile-time constants every attention kernel but the preprocess takes."""
    return dict(HEAD_DIM=head_dim, HEAD_DIM_PADDED=head_dim_padded(head_dim), CAUSAL=bool(causal),
                DOT_PRECISION=dot_precision(dtype))
