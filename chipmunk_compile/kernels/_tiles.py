"""Tile scheduling helpers shared by the persistent-style Triton kernels (mm1, mm2, column-sparse attention).

Invariants (both are `@triton.jit`, inlined into the kernels):
- `wave_tail_tile`: programs [0, t_main) own one tile each; when the last wave is short (T % P
  tiles and SPLIT * (T % P) <= P programs), each of those tail tiles is split over SPLIT programs,
  which then get the same `tile` and tell their piece apart by (pid - t_main) % SPLIT.
- `grouped_tile`: GROUP_M row tiles run before the next column tile, so programs running at the
  same time gather the same (sorted) weight rows and hit them in L2.
- `load_rows`: rows `cols` of a (N, HEAD_DIM) K or V slice; only the TAIL tile (the one crossing
  N) is load-masked, so the others stay vectorised and software-pipelined. `key_allowed`: the
  tile's columns that exist and are not masked out by a (B, N) int8 key mask. `column_halves`:
  the two column halves of a register tile, for epilogues done in slices.
Host side: `wave_grid` is the matching launch grid (one program per tile, SPLIT per split tail
tile), `num_sms` the SM count it plans waves for (INTERP_NUM_SMS under the interpreter),
`pow2_align` a dimension's power-of-two alignment (masks only where tiles do not divide it).
"""

import torch
import triton
import triton.language as tl

from ._common import interpreting

INTERP_NUM_SMS = 3  # the interpreter "GPU": small, so tests exercise the split wave tail


def num_sms(device) -> int:
    if interpreting() or device.type != "cuda":
        return INTERP_NUM_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def tail_split(T: int, P: int, split: int) -> int:
    """Number of (final) tiles split into `split` programs: the T % P tiles of a short last wave."""
    rem = T % P
    return rem if split > 1 and rem * split <= P else 0


def pow2_align(n: int, cap: int = 256) -> int:
    """Largest power of two <= cap dividing n: a constexpr that tells a kernel which tile widths
    divide a dimension (those loops and loads then need no masks)."""
    a = 1
    while a < cap and n % (2 * a) == 0:
        a *= 2
    return a


def wave_grid(tiles, nsm: int):
    """Triton grid for `tiles(meta)` tiles on `nsm` SMs with meta["OCC"] programs per SM."""
    def grid(meta):
        t = tiles(meta)
        return (t + tail_split(t, nsm * meta["OCC"], meta["SPLIT"]) * (meta["SPLIT"] - 1),)
    return grid


@triton.jit
def wave_tail_tile(pid, T, P, SPLIT: tl.constexpr):
    rem = T % P
    n_tail = 0
    if SPLIT > 1:
        if rem * SPLIT <= P:
            n_tail = rem
    t_main = T - n_tail
    if pid < t_main:
        tile = pid
    else:
        tile = t_main + (pid - t_main) // SPLIT
    return tile, t_main


@triton.jit
def grouped_tile(r, n_mt, NT_N, GROUP_M: tl.constexpr):
    per_group = GROUP_M * NT_N
    first_mt = (r // per_group) * GROUP_M
    gsize = tl.minimum(n_mt - first_mt, GROUP_M)
    return first_mt + (r % per_group) % gsize, (r % per_group) // gsize


@triton.jit
def load_rows(base, cols, col_in, stride_n, stride_d, HEAD_DIM: tl.constexpr, TAIL: tl.constexpr):
    offs_d = tl.arange(0, HEAD_DIM)
    ptrs = base + cols[:, None] * stride_n + offs_d[None, :] * stride_d
    if TAIL:
        x = tl.load(ptrs, mask=col_in[:, None], other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def key_allowed(KMASK, b, cols, col_in, NK):
    km = tl.load(KMASK + b * NK + cols, mask=col_in, other=0)
    return col_in & (km != 0)


@triton.jit
def column_halves(x, ROWS: tl.constexpr, H: tl.constexpr):
    """Columns [0, H) and [H, 2H) of a (ROWS, 2H) register tile (an epilogue done in slices keeps
    fewer temporaries live beside the accumulator)."""
    return tl.split(tl.permute(tl.reshape(x, [ROWS, 2, H]), (0, 2, 1)))
