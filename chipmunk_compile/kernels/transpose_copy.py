"""Triton: a 2-D copy between memory orders in tiles (a row-major weight into its column-major copy).

Same signature and contract as ``transpose_copy_ref.transpose_copy_ref`` (read it first).

Kernel invariants:
- One program per (BLOCK_R, BLOCK_C) tile of the (R, C) shape: it loads the tile through src's
  strides and stores it through dst's. Triton lays each access out along its own contiguous
  dimension and moves the tile between the two layouts through shared memory, so both the read
  and the write are coalesced whatever the two orders are. Masked at R and C; 64-bit offsets.
- Programs own disjoint tiles; no allocation, no host sync (safe inside recorded step graphs).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import cdiv, interpreting
from .transpose_copy_ref import check_pair

TILE = (64, 64, 4)  # BLOCK_R, BLOCK_C, warps on a GPU
_INTERP_TILE = (16, 16, 1)


@triton.jit
def _transpose_copy_kernel(DST, SRC, R, C, s_dr, s_dc, s_sr, s_sc, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    c = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    mask = (r < R)[:, None] & (c < C)[None, :]
    tile = tl.load(SRC + r[:, None] * s_sr + c[None, :] * s_sc, mask=mask)
    tl.store(DST + r[:, None] * s_dr + c[None, :] * s_dc, tile, mask=mask)


def transpose_copy(dst, src):
    check_pair(dst, src)
    R, C = dst.shape
    block_r, block_c, warps = _INTERP_TILE if interpreting() else TILE
    _transpose_copy_kernel[(cdiv(R, block_r), cdiv(C, block_c))](
        dst, src, R, C, dst.stride(0), dst.stride(1), src.stride(0), src.stride(1),
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps)
    return dst
