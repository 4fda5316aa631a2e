"""Tile scheduling helpers shared by the persistent-style Triton kernels (mm1, mm2, column-sparse attention).

Invariants (both are `@triton.jit`, inlined into the kernels):
- `wave_tail_tile`: programs [0, t_main) own one tile each; when the last wave is short (T % P
  tiles and SPLIT * (T % P) <= P programs), each of those tail tiles is split over SPLIT programs,
  which then get the same `tile` and tell their piece apart by (pid - t_main) % SPLIT.
- `grouped_tile`: GROUP_M row tiles run before the next column tile, so programs running at the
  same time gather the same (sorted) weight rows and hit them in L2. `token_block_tile` composes
  both for the sparse-MLP kernels (batch, token block, row tile in it, first column).
- `load_rows`: rows `cols` of a (N, HEAD_DIM) K or V slice; only the TAIL tile (the one crossing
  N) is load-masked, so the others stay vectorised and software-pipelined. Head dims: HEAD_DIM is
  the tile's power of two, D_ACT the tensors' own head dim (72, 96, ...): where D_ACT < HEAD_DIM
  the columns past it load as zeros (they add nothing to QKᵀ or PV) and are never stored
  (`load_cols`, `row_col_mask`); where they are equal the code is what it was without them.
  `key_allowed`: the tile's columns that exist and are not masked out by a (B, N) int8 key mask.
  `load_bias`: a tile of an additive score bias (SDPA's float attn_mask, natural-log units) as
  fp32 in the kernels' log2 domain; entries masked off read 0, -inf stays -inf.
  `column_halves`: the two column halves of a register tile, for epilogues done in slices.
  `block_rows`: the rows of one tile of a token block (attention query group or MLP token block),
  in grouped order and as tokens (through the permutation).
Host side: `padded_head_dim` is the HEAD_DIM of a D_ACT; `wave_grid` is the matching launch grid
(one program per tile, SPLIT per split tail tile), `num_sms` the SM count it plans waves for
(INTERP_NUM_SMS under the interpreter), `pow2_align` a dimension's power-of-two alignment (masks only where tiles do not divide it),
`prune_row_tiles` mm1's autotune pruning (no row tile taller than the token block).
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


def prune_row_tiles(configs, named_args, **kwargs):
    """Autotune pruning for the token-block kernels: no BLOCK_M taller than the token block (BLK),
    beyond the 128 rows every config list starts from (a taller tile would only mask rows off)."""
    blk = kwargs.get("BLK", named_args.get("BLK"))
    return [c for c in configs if c.kwargs["BLOCK_M"] <= max(int(blk), 128)]


def padded_head_dim(d: int) -> int:
    """The power of two >= d (and >= 16, tl.dot's least K) a kernel's head-dim tile spans."""
    return max(16, 1 << (int(d) - 1).bit_length())


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
def load_rows(base, cols, col_in, stride_n, stride_d, HEAD_DIM: tl.constexpr, TAIL: tl.constexpr,
              D_ACT: tl.constexpr):
    offs_d = tl.arange(0, HEAD_DIM)
    ptrs = base + cols[:, None] * stride_n + offs_d[None, :] * stride_d
    if TAIL:
        x = tl.load(ptrs, mask=row_col_mask(col_in, HEAD_DIM, D_ACT), other=0.0)
    else:
        x = load_cols(ptrs, HEAD_DIM, D_ACT)
    return x


@triton.jit
def load_cols(ptrs, HEAD_DIM: tl.constexpr, D_ACT: tl.constexpr):
    """A (rows, HEAD_DIM) tile at ptrs, its columns past D_ACT as zeros (unmasked when none are)."""
    if D_ACT < HEAD_DIM:
        x = tl.load(ptrs, mask=(tl.arange(0, HEAD_DIM) < D_ACT)[None, :], other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def row_col_mask(rows_ok, HEAD_DIM: tl.constexpr, D_ACT: tl.constexpr):
    """The mask of a (rows, HEAD_DIM) tile: rows_ok, and the columns below D_ACT where HEAD_DIM pads it."""
    if D_ACT < HEAD_DIM:
        m = rows_ok[:, None] & (tl.arange(0, HEAD_DIM) < D_ACT)[None, :]
    else:
        m = rows_ok[:, None]
    return m


@triton.jit
def key_allowed(KMASK, b, cols, col_in, NK):
    km = tl.load(KMASK + b * NK + cols, mask=col_in, other=0)
    return col_in & (km != 0)


@triton.jit
def load_bias(ptrs, mask):
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32) * 1.4426950408889634


@triton.jit
def column_halves(x, ROWS: tl.constexpr, H: tl.constexpr):
    """Columns [0, H) and [H, 2H) of a (ROWS, 2H) register tile (an epilogue done in slices keeps
    fewer temporaries live beside the accumulator)."""
    return tl.split(tl.permute(tl.reshape(x, [ROWS, 2, H]), (0, 2, 1)))


@triton.jit
def block_rows(PERM, block, row0, BLK, M, ROWS: tl.constexpr, HAS_PERM: tl.constexpr):
    """(positions in the grouped order, in-range mask, token rows) of rows row0 + [0, ROWS) of
    block `block` (BLK rows each, M in all); a position is its token when there is no permutation."""
    loc = row0 + tl.arange(0, ROWS)
    pos = block * BLK + loc
    row_ok = (loc < BLK) & (pos < M)
    if HAS_PERM:
        rows = tl.load(PERM + pos, mask=row_ok, other=0)
    else:
        rows = pos
    return pos, row_ok, rows


@triton.jit
def token_block_tile(NB, NCOLS, NBATCH, NUM_SMS, BLK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     GROUP_M: tl.constexpr, OCC: tl.constexpr, SPLIT: tl.constexpr):
    """This program's (pid, t_main, batch, token block, row tile in the block, first column) over
    NBATCH x NB blocks of BLK rows x NCOLS columns, in BLOCK_M x BLOCK_N tiles (wave tail and
    grouped order as above; a split tail program adds its piece's offset to the first column)."""
    TPB: tl.constexpr = (BLK + BLOCK_M - 1) // BLOCK_M
    NT_N = tl.cdiv(NCOLS, BLOCK_N)
    n_mt = NB * TPB
    per_b = n_mt * NT_N
    pid = tl.program_id(0)
    tile, t_main = wave_tail_tile(pid, NBATCH * per_b, NUM_SMS * OCC, SPLIT)
    b = tile // per_b
    mt, pid_n = grouped_tile(tile % per_b, n_mt, NT_N, GROUP_M)
    return pid, t_main, b, mt // TPB, mt % TPB, pid_n * BLOCK_N
