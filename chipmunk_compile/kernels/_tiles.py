"""Tile scheduling helpers shared by the persistent-style Triton kernels (mm1, mm2, column-sparse attention).

Invariants (both are `@triton.jit`, inlined into the kernels):
- `wave_tail_tile`: programs [0, t_main) own one tile each; when the last wave is short (T % P
  tiles and SPLIT * (T % P) <= P programs), each of those tail tiles is split over SPLIT programs,
  which then get the same `tile` and tell their piece apart by (pid - t_main) % SPLIT.
- `grouped_tile`: GROUP_M row tiles run before the next column tile, so programs running at the
  same time gather the same (sorted) weight rows and hit them in L2.
"""

import triton
import triton.language as tl


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
