"""Tile helpers that both Triton ops build on: the pointers of a 2-D tile addressed through its
strides, and loads and stores that mask only the edges that can fall inside the tile (a mask the
compiler can prove is all-true still costs predicates and blocks 16-byte accesses)."""

import triton
import triton.language as tl


@triton.jit
def tile_pointers(base, rows, stride_row, cols, stride_col):
    """Pointers to the (rows, cols) tile of the matrix at ``base`` with these strides."""
    return base + rows[:, None] * stride_row + cols[None, :] * stride_col


@triton.jit
def load_tile(ptrs, rows, n_rows, cols, n_cols, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """The tile at ``ptrs`` in its own dtype, zeros at rows >= n_rows (checked when CHECK_ROWS) and
    at cols >= n_cols (checked when CHECK_COLS)."""
    if CHECK_ROWS and CHECK_COLS:
        tile = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)
    elif CHECK_ROWS:
        tile = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    elif CHECK_COLS:
        tile = tl.load(ptrs, mask=cols[None, :] < n_cols, other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def store_tile(ptrs, tile, rows, n_rows, cols, n_cols, CHECK_COLS: tl.constexpr):
    """Store the rows < n_rows of ``tile`` (only its cols < n_cols when CHECK_COLS) at ``ptrs``."""
    if CHECK_COLS:
        tl.store(ptrs, tile, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols))
    else:
        tl.store(ptrs, tile, mask=rows[:, None] < n_rows)
