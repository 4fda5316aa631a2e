"""Triton: per-token-block means of the MLP input, rows gathered through the grouping permutation.

Same signature and contract as ``mlp_block_means_ref.mlp_block_means_ref`` (read it first).
The reference is four memory passes over x (row gather, fp32 copy, reduction, cast): ~50 µs per
MLP site and selection step at FLUX's 4608 x 3072 on an H200 (profile_e2e.py). This is one read.

Kernel invariants:
- One program per (batch * block, BLOCK_C channels); it owns its output tile, so no atomics and a
  deterministic result. ``TILE`` holds the GPU's (ROWS, BLOCK_C, warps). Rows are read ROWS at a
  time through perm (or contiguously) with masks: rows past M or past the block are never read,
  nothing is padded.
- Sums are fp32; the mean divides by the block's real row count (a partial last block averages
  its real rows), then rounds once to x.dtype.
- Any strides of x. No allocation but the output; no host sync: safe under CUDA graphs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cdiv, interpreting, new_empty


@triton.jit
def _mlp_block_means_kernel(
    X, PERM, OUT,  #
    sxb, sxm, sxc, sob, son, soc,  #
    M, C, NB,  #
    BLK: tl.constexpr, HAS_PERM: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // NB
    mb = pid % NB
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    acc = tl.zeros([BLOCK_C], tl.float32)
    for r0 in range(0, BLK, ROWS):
        loc = r0 + tl.arange(0, ROWS)
        pos = mb * BLK + loc
        row_ok = (loc < BLK) & (pos < M)
        if HAS_PERM:
            ri = tl.load(PERM + pos, mask=row_ok, other=0).to(tl.int64)
        else:
            ri = pos.to(tl.int64)
        x = tl.load(X + b * sxb + ri[:, None] * sxm + c[None, :] * sxc, mask=row_ok[:, None] & c_ok[None, :],
                    other=0.0)
        acc += tl.sum(x.to(tl.float32), axis=0)
    n_real = tl.minimum(M - mb * BLK, BLK).to(tl.float32)
    tl.store(OUT + b * sob + mb * son + c * soc, (acc / n_real).to(OUT.dtype.element_ty), mask=c_ok)


# (rows per load, channels per program, warps). H200, graph-replayed: FLUX 4352 x 3072, 128-row
# blocks, 0.0103 ms against 0.0247 for (32, 256, 4); HunyuanVideo 118800 x 3072, 256-row blocks,
# 0.202 against 0.455 ms: 128 x 64 tiles put 4x more programs in flight, each with all its
# loads issued before the first sum (benchmarks/results/block_means_tiles_h200_session28.txt).
TILE = (128, 64, 4)


def mlp_block_means(x, *, block: int, perm=None):
    B, M, C = x.shape
    nb = cdiv(M, block)
    out = new_empty(B, nb, C, dtype=x.dtype, device=x.device)
    if B * nb == 0 or C == 0:
        return out
    pm = None if perm is None else perm.to(torch.int32).contiguous()
    rows_max, block_c, warps = (32, 32, 4) if interpreting() else TILE
    rows = min(rows_max, triton.next_power_of_2(int(block)))
    grid = (B * nb, cdiv(C, block_c))
    _mlp_block_means_kernel[grid](
        x, pm if pm is not None else out, out, *x.stride(), *out.stride(), M, C, nb,
        BLK=int(block), HAS_PERM=pm is not None, ROWS=rows, BLOCK_C=block_c, num_warps=warps)
    return out
