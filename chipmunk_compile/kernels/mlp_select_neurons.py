"""Triton: one program per (batch, token block) selects the sparse MLP step's neurons in one launch.

Same signature and contract as ``mlp_select_neurons_ref.mlp_select_neurons_ref`` (read it first).
It replaces a chain of ~10 small torch kernels (difference, random boost, top-k, mask scatter,
cumsum compaction, index scatter, reference-mean update), each a few µs on rows of only ~12K
neurons, which made a selection step ~5-7 ms slower than an index-reuse step on FLUX.

Kernel invariants:
- A row (Fh ≤ BLOCK scores) lives in registers from its load to its last store: the score, the
  selection and the compaction never re-read it. Random draws go through a per-row scratch row
  (store the scores, barrier, store +inf at the draws, barrier, reload): a scatter into registers
  does not exist.
- Scores become order-preserving uint32 keys (sign bit set for positives, all bits flipped for
  negatives). The exact key T of the K-th largest is found bit by bit from the top, one block-wide
  count per bit (32 counts of the registers; a 4-pass 8-bit ``tl.histogram`` radix select took
  0.165 ms for FLUX's 34 rows on an H200, slower than the torch chain it replaced; two bits per
  count, three counts packed in one int64 sum, 16 counts instead of 32, was slower still: 43 against
  36 µs). The compaction writes keys > T and the first ties at T in neuron order: ascending indices
  with no sort. Exactly K are written. Both prefix counts (above T, tied at T) come from one scan of
  an int64 packing the two (two int32 scans: 40.5 µs per FLUX call, one: 36.2; H200, session 31).
- basis may be bf16/fp16 (the model's linear output as is), read as fp32: no cast kernel per site
  and half the bytes (33.2 µs per FLUX call).
- Random draws are either given (an int64 (B, nb, r) tensor) or hashed by the row's own program
  (``HashDraws``: draw r of row b·nb + n is random_draws_ref.hash_ints at flat position
  (b·nb + n)·r_count + r, the numbers the reference materializes): no draws tensor, which the ops
  built from ~17 small torch kernels per site and selection step (~1.5 ms of FLUX's step graph).
- The selected neurons' reference means are stored from the registers holding basis.
No host sync and no allocation but the scratch row: safe under CUDA graphs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import interpreting
from .random_draws import hash_base, hash_draw
from .mlp_select_neurons_ref import check_draws


@triton.jit
def _mlp_select_neurons_kernel(BASIS, BM, SCORE, DRAWS, SCRATCH, IDX, STEP, Fh, K, R, NB, salt_term,
                               s_bb, s_bn, s_mb, s_mn, s_sb, s_sn, s_db, s_dn, s_ib, s_in,
                               GATED: tl.constexpr, HAS_SCORE: tl.constexpr, BLOCK: tl.constexpr,
                               BLOCK_R: tl.constexpr, HASH_DRAWS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = row // NB
    n = row - b * NB
    offs = tl.arange(0, BLOCK)
    inb = offs < Fh
    bp = BASIS + b * s_bb + n * s_bn
    mp = BM + b * s_mb + n * s_mn
    x = tl.load(bp + offs, mask=inb, other=0.0).to(tl.float32)
    if GATED:
        x2 = tl.load(bp + Fh + offs, mask=inb, other=0.0).to(tl.float32)
    if HAS_SCORE:
        sc = tl.load(SCORE + b * s_sb + n * s_sn + offs, mask=inb, other=0.0)
    else:
        sc = tl.abs(x - tl.load(mp + offs, mask=inb, other=0.0))
        if GATED:
            sc += tl.abs(x2 - tl.load(mp + Fh + offs, mask=inb, other=0.0))
    if BLOCK_R > 0:
        sp = SCRATCH + row * BLOCK
        tl.store(sp + offs, sc)
        tl.debug_barrier()
        r = tl.arange(0, BLOCK_R)
        if HASH_DRAWS:
            d = hash_draw(row * R + r, hash_base(STEP, salt_term), Fh)
        else:
            d = tl.load(DRAWS + b * s_db + n * s_dn + r, mask=r < R, other=0)
        tl.store(sp + d, tl.full([BLOCK_R], float("inf"), tl.float32), mask=r < R)
        tl.debug_barrier()
        sc = tl.load(sp + offs, volatile=True)

    u = sc.to(tl.uint32, bitcast=True)
    key = tl.where((u >> 31) != 0, ~u, u | 0x80000000)
    # T = the K-th largest key, built from the top bit down: keep a bit when at least K keys are
    # >= the prefix with it set (block-wide counts of the registers; no histogram, no re-read)
    T = tl.zeros([], tl.uint32)
    for i in tl.static_range(32):
        cand = T | tl.full([], 1 << (31 - i), tl.uint32)
        n_ge = tl.sum((inb & (key >= cand)).to(tl.int32))
        T = tl.where(n_ge >= K, cand, T)
    gt = inb & (key > T)
    eq = inb & (key == T)
    need = K - tl.sum(gt.to(tl.int32))
    # one scan gives both prefix counts, of keys above T and of ties at T (taken in neuron order
    # up to `need`): the neurons taken up to i are cum_gt(i) + min(cum_eq(i), need)
    cum = tl.cumsum(gt.to(tl.int64) + (eq.to(tl.int64) << 32), 0)
    cum_gt, cum_eq = (cum & 0xFFFFFFFF).to(tl.int32), (cum >> 32).to(tl.int32)
    take = gt | (eq & (cum_eq <= need))
    pos = cum_gt + tl.minimum(cum_eq, need) - 1
    tl.store(IDX + b * s_ib + n * s_in + pos, offs.to(tl.int32), mask=take)
    tl.store(mp + offs, x, mask=take)
    if GATED:
        tl.store(mp + Fh + offs, x2, mask=take)


# Bench hook: num_warps for the launch (None: by the row width, as below).
_force_warps = None


def mlp_select_neurons(basis, bm_cache, indices, *, gated: bool = False, score=None, draws=None,
                       n_draws: int = 0) -> None:
    B, nb, Fb = basis.shape
    Fh = Fb // 2 if gated else Fb
    K = indices.shape[-1]
    if K > Fh:
        raise ValueError(f"mlp_select_neurons: K={K} exceeds the {Fh} neurons")
    if basis.dtype not in (torch.float32, torch.bfloat16, torch.float16) or basis.stride(-1) != 1:
        raise ValueError("mlp_select_neurons: basis must be fp32, bf16 or fp16 with a contiguous last dim")
    for name, t in (("bm_cache", bm_cache), ("score", score)):
        if t is not None and (t.dtype != torch.float32 or t.stride(-1) != 1):
            raise ValueError(f"mlp_select_neurons: {name} must be fp32 with a contiguous last dim")
    if indices.dtype != torch.int32 or indices.stride(-1) != 1:
        raise ValueError("mlp_select_neurons: indices must be int32 with a contiguous last dim")
    if B * nb == 0 or K == 0:
        return
    BLOCK = triton.next_power_of_2(Fh)
    hashed = check_draws(draws, n_draws)
    r = int(n_draws) if hashed else (draws.shape[-1] if draws is not None else 0)
    BLOCK_R = triton.next_power_of_2(r) if r else 0
    scratch = torch.empty(B * nb * BLOCK if r else 1, dtype=torch.float32, device=basis.device)
    sc = score if score is not None else basis
    dr = draws if draws is not None and not hashed else indices
    dr = dr if dr.stride(-1) == 1 else dr.contiguous()
    step, salt_term = (draws.step, draws.salt_term) if hashed else (dr, 0)
    warps = 4 if interpreting() else _force_warps or max(4, min(16, BLOCK // 1024))
    _mlp_select_neurons_kernel[(B * nb,)](
        basis, bm_cache, sc, dr, scratch, indices, step, Fh, K, r, nb, salt_term,
        basis.stride(0), basis.stride(1), bm_cache.stride(0), bm_cache.stride(1), sc.stride(0), sc.stride(1),
        dr.stride(0), dr.stride(1), indices.stride(0), indices.stride(1),
        GATED=gated, HAS_SCORE=score is not None, BLOCK=BLOCK, BLOCK_R=BLOCK_R, HASH_DRAWS=hashed, num_warps=warps)
