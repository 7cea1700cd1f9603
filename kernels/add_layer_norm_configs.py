"""How the Triton add+LayerNorm kernels are launched: which rows stay in registers, how narrow rows
are packed into a tile, how many warps and programs."""

import functools

import torch
import triton

from . import interpreting

FORWARD_REGISTER_ROW = 16384  # widest padded row the forward holds in registers without spilling
BACKWARD_REGISTER_ROW = 8192  # same for the backward, which also holds dweight/dbias accumulators
COLUMN_BLOCK = 4096  # column block of the wide-row paths
TILE_ELEMENTS = 4096  # elements per program-iteration tile: narrow rows are packed up to this
ELEMENTS_PER_THREAD = 8  # 16-byte accesses for 16-bit dtypes
PROGRAMS_PER_SM = 2  # backward grid: a small multiple of the SM count
INTERPRETER_PROGRAMS = 4  # backward grid under the CPU interpreter, where programs run one by one
NUM_STAGES = 1  # no compiler pipelining: the backward prefetches its next tile by hand


def num_warps(tile_elements, max_warps=16):
    """Enough warps that each thread handles about ELEMENTS_PER_THREAD elements of the tile."""
    return max(1, min(max_warps, tile_elements // (32 * ELEMENTS_PER_THREAD)))


def _rows_per_tile(block_n, n_rows):
    """Pack narrow rows so that a tile has about TILE_ELEMENTS elements (never more rows than exist)."""
    return max(1, min(TILE_ELEMENTS // block_n, triton.next_power_of_2(n_rows)))


def forward_config(n_rows, N):
    """Launch parameters of the forward kernel for ``n_rows`` rows of ``N`` columns."""
    block_n = triton.next_power_of_2(N)
    if block_n <= FORWARD_REGISTER_ROW:
        rows_per_program = _rows_per_tile(block_n, n_rows)
        # the widest rows get up to 32 warps so that a 16384-wide row stays at 16 values per thread
        warps = num_warps(rows_per_program * block_n, max_warps=32 if block_n >= 16384 else 16)
        return dict(BLOCK_N=block_n, ROWS_PER_PROGRAM=rows_per_program, ROW_IN_REGISTERS=True, num_warps=warps)
    return dict(BLOCK_N=COLUMN_BLOCK, ROWS_PER_PROGRAM=1, ROW_IN_REGISTERS=False, num_warps=num_warps(COLUMN_BLOCK))


def backward_config(n_rows, N, num_programs_target):
    """Launch parameters of the backward kernel: tile, column split and rows per program."""
    block_n = triton.next_power_of_2(N)
    if block_n <= BACKWARD_REGISTER_ROW:
        rows_per_tile, column_blocks, split = _rows_per_tile(block_n, n_rows), 1, False
    else:
        block_n, rows_per_tile, column_blocks, split = COLUMN_BLOCK, 1, triton.cdiv(N, COLUMN_BLOCK), True
    row_programs = max(1, num_programs_target // column_blocks)
    rows_per_program = triton.cdiv(triton.cdiv(n_rows, row_programs), rows_per_tile) * rows_per_tile
    return dict(
        BLOCK_N=block_n,
        ROWS_PER_TILE=rows_per_tile,
        PRECOMPUTED_ROW_DOTS=split,
        PREFETCH_NEXT_TILE=rows_per_tile * block_n <= TILE_ELEMENTS,
        num_warps=num_warps(rows_per_tile * block_n),
        rows_per_program=rows_per_program,
        grid=(triton.cdiv(n_rows, rows_per_program), column_blocks),
    )


@functools.lru_cache(maxsize=None)
def _multiprocessor_count(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def backward_programs_target(device):
    """How many programs the backward spreads its rows over: enough to fill every SM."""
    if interpreting():
        return INTERPRETER_PROGRAMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    return PROGRAMS_PER_SM * _multiprocessor_count(index)


def as_rows(t, N):
    """``t`` as a (rows, N) matrix with unit column stride: a view when the layout allows, else a copy."""
    rows = t.reshape(-1, N)
    return rows if rows.stride(1) == 1 or N == 1 else rows.contiguous()
