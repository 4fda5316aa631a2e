"""Triton: sparse-MLP first matmul over gathered neurons, fused activation, delta and cache writeback.

Same signature and contract as ``mlp_sparse_mm1_ref.mlp_sparse_mm1_ref`` (read it first).

Kernel invariants:
- Work items are (BLOCK_M-row tile of one token block, packed-column tile of BLOCK_N, batch b) on a
  1-D grid. Tiles whose first packed column is >= counts only write zeros into delta_packed.
- w_act / w_lin rows (fc1 output channels) are gathered by index (contiguous C-long rows, 16-byte
  loads); x rows of the block are gathered through perm when given. Columns past the block's count
  gather some row of the block's own selection (never an index past the count); their results are
  masked out of every store. h_cache and delta_packed rows
  are grouped positions (contract), so the epilogue's cache read-modify-write is contiguous along
  the block's rows (16-byte vectors in the neuron-major cache) with or without perm; indexing them
  by permuted row made every element a separate 2-byte access: in the FLUX profile (H200, 4+4
  blocks) mm1 took 0.433 ms per call that way and 0.288 ms now; the isolated benchmark, which
  repeats one call, shows no difference (0.282 ms both). The K loop has no column
  masks when C % BLOCK_K == 0 (KALIGN, the power-of-two alignment of C, is a constexpr).
- Epilogue: bias, activation (and the gated product) in fp32, round to the cache dtype, delta =
  h_new - h_cache (fp32), store delta (packed) and h_new (into h_cache) — the writeback is fused,
  each (row, neuron) is read and written once. Programs touch disjoint (row, neuron) sets, so the
  in-place update is race free. With EPI_SUB = 2 the epilogue runs on the two column halves
  of the accumulator, each loading its own indices; its offsets are int tiles beside one base
  pointer, not tiles of 64-bit pointers (compiled for sm_90 with the strides specialized as at run
  time, the 128x256 tile spilled 144 bytes per thread in one piece and none in halves).
- delta_packed rows are padded to a multiple of 64 elements (see the launcher); the pad columns
  may be written (zeros) and are never read.
- Program order is grouped (GROUP_M token tiles share one sweep over the packed columns) so the
  gathered weight rows of a column window stay in L2 while several token blocks use them.
- Wave tail: with P = NUM_SMS * OCC resident programs and T tiles, when (T % P) * SPLIT <= P the
  last T % P tiles (a short last wave) are each split into SPLIT programs of BLOCK_N // SPLIT
  columns; each (row, column) is still owned by exactly one program (no reduction, deterministic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tiles import block_rows, column_halves, num_sms, pow2_align, prune_row_tiles, token_block_tile, wave_grid
from ._common import ACT_CODE, autotune, cdiv, dot_precision, launch, new_empty


@triton.jit
def _act(z, ACT: tl.constexpr):
    if ACT == 0:  # gelu (erf)
        return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 1:  # gelu tanh: 0.5 z (1 + tanh(u)) == z * sigmoid(2u)
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        return z * tl.sigmoid(2.0 * u)
    elif ACT == 2:  # silu
        return z * tl.sigmoid(z)
    elif ACT == 3:  # relu
        return tl.maximum(z, 0.0)
    else:  # relu2: squared relu
        r = tl.maximum(z, 0.0)
        return r * r


@triton.jit
def _mm1_tile(
    X, WA, BA, WL, BL, IDX, CNT, HC, DP, PERM,  #
    sxb, sxm, sxc, swa_f, swa_c, swl_f, swl_c, shb, shm, shf, sdb, sdm, sdk, sib, sim, scb,  #
    M, C, KWP, b, mb, t, col0,  #
    BLK: tl.constexpr, ACT: tl.constexpr, HAS_BA: tl.constexpr, HAS_WL: tl.constexpr, HAS_BL: tl.constexpr,  #
    HAS_PERM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,  #
    EVEN_K: tl.constexpr, DOT_PREC: tl.constexpr, EPI_SUB: tl.constexpr,
):
    pos, row_ok, ri = block_rows(PERM, mb, t * BLOCK_M, BLK, M, BLOCK_M, HAS_PERM)
    cnt = tl.load(CNT + b * scb + mb)
    c = col0 + tl.arange(0, BLOCK_N)
    # delta columns up to the padded row width KWP (a multiple of 64) are written, pad included
    # (zeros, never read): with no column mask at KW the stores stay 16-byte vectors (masked at
    # K = 4300 they were 2-byte stores, 256 per thread and tile)
    st_mask = row_ok[:, None] & (c < KWP)[None, :]
    if col0 >= cnt:
        dp_ptrs = DP + b * sdb + pos[:, None] * sdm + c[None, :] * sdk
        tl.store(dp_ptrs, tl.zeros([BLOCK_M, BLOCK_N], DP.dtype.element_ty), mask=st_mask)
    else:
        c_ok = c < cnt
        # columns past the block's count (the last tile of a block whose count is no multiple of
        # BLOCK_N) gather rows of the block's own selection, c % cnt, not all row 0 (presumably an L2
        # hot spot: one w1 row read by every block's tail at once; not profiled). H100, FLUX shape,
        # 2457 of 12288 neurons: 0.175 -> 0.152-0.158 ms (session 60). Never reads past the count.
        j = tl.load(IDX + b * sib + mb * sim + tl.where(c_ok, c, c % cnt))
        offs_k = tl.arange(0, BLOCK_K)
        # Row bases stay [rows, 1] and the column offsets are rebuilt each step: loop-carried
        # [rows, BLOCK_K] pointer tensors (64-bit, one per pipeline stage) held ~128 registers
        # per thread and made the epilogue spill.
        x_rows = X + b * sxb + ri[:, None] * sxm
        wa_rows = WA + j[:, None] * swa_f
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if HAS_WL:
            wl_rows = WL + j[:, None] * swl_f
            acc2 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for kk in range(0, C, BLOCK_K):
            kc = kk + offs_k
            if EVEN_K:
                xa = tl.load(x_rows + kc[None, :] * sxc, mask=row_ok[:, None], other=0.0)
                wa = tl.load(wa_rows + kc[None, :] * swa_c)
            else:
                k_ok = kc < C
                xa = tl.load(x_rows + kc[None, :] * sxc, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                wa = tl.load(wa_rows + kc[None, :] * swa_c, mask=k_ok[None, :], other=0.0)
            acc = tl.dot(xa, tl.trans(wa), acc, input_precision=DOT_PREC)
            if HAS_WL:
                if EVEN_K:
                    wl = tl.load(wl_rows + kc[None, :] * swl_c)
                else:
                    wl = tl.load(wl_rows + kc[None, :] * swl_c, mask=(kc < C)[None, :], other=0.0)
                acc2 = tl.dot(xa, tl.trans(wl), acc2, input_precision=DOT_PREC)
        if not HAS_WL:
            acc2 = acc  # unused by the epilogue
        # the epilogue in two column halves with EPI_SUB = 2: fewer temporaries live beside the
        # accumulator (128x128 on 8 warps spilled 264 bytes per thread in one piece, none in two)
        if EPI_SUB == 1:
            _mm1_epilogue(acc, acc2, BA, BL, IDX, HC, DP, shb, shm, shf, sdb, sdm, sdk, sib, sim,
                          KWP, b, mb, pos, row_ok, cnt, col0, ACT, HAS_BA, HAS_WL, HAS_BL, BLOCK_N)
        else:
            H: tl.constexpr = BLOCK_N // 2
            a0, a1 = column_halves(acc, BLOCK_M, H)
            g0, g1 = column_halves(acc2, BLOCK_M, H)
            _mm1_epilogue(a0, g0, BA, BL, IDX, HC, DP, shb, shm, shf, sdb, sdm, sdk, sib, sim,
                          KWP, b, mb, pos, row_ok, cnt, col0, ACT, HAS_BA, HAS_WL, HAS_BL, H)
            _mm1_epilogue(a1, g1, BA, BL, IDX, HC, DP, shb, shm, shf, sdb, sdm, sdk, sib, sim,
                          KWP, b, mb, pos, row_ok, cnt, col0 + H, ACT, HAS_BA, HAS_WL, HAS_BL, H)


@triton.jit
def _mm1_epilogue(acc, acc2, BA, BL, IDX, HC, DP, shb, shm, shf, sdb, sdm, sdk, sib, sim,  #
                  KWP, b, mb, pos, row_ok, cnt, col0,  #
                  ACT: tl.constexpr, HAS_BA: tl.constexpr, HAS_WL: tl.constexpr, HAS_BL: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """Columns [col0, col0 + BLOCK_N) of a tile: bias, activation, delta against the cache, stores."""
    c = col0 + tl.arange(0, BLOCK_N)
    c_ok = c < cnt
    j = tl.load(IDX + b * sib + mb * sim + c, mask=c_ok, other=0)
    if HAS_BA:
        acc += tl.load(BA + j, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    hval = _act(acc, ACT)
    if HAS_WL:
        if HAS_BL:
            acc2 += tl.load(BL + j, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        hval = hval * acc2
    h_new = hval.to(HC.dtype.element_ty)
    # offsets, not pointer tiles: 64-bit pointers for a whole tile cost 2 * BLOCK_M * BLOCK_N /
    # threads registers, and the K loop's accumulator is still live here
    hc_off = pos[:, None] * shm + j[None, :] * shf
    hc_mask = row_ok[:, None] & c_ok[None, :]
    old = tl.load(HC + b * shb + hc_off, mask=hc_mask, other=0.0)
    delta = tl.where(c_ok[None, :], h_new.to(tl.float32) - old.to(tl.float32), 0.0)
    st_mask = row_ok[:, None] & (c < KWP)[None, :]
    tl.store(DP + b * sdb + pos[:, None] * sdm + c[None, :] * sdk, delta.to(DP.dtype.element_ty), mask=st_mask)
    tl.store(HC + b * shb + hc_off, h_new, mask=hc_mask)


@triton.jit
def _mlp_sparse_mm1_kernel(
    X, WA, BA, WL, BL, IDX, CNT, HC, DP, PERM,  #
    sxb, sxm, sxc, swa_f, swa_c, swl_f, swl_c, shb, shm, shf, sdb, sdm, sdk, sib, sim, scb,  #
    M, C, KW, KWP, NB, NBATCH, NUM_SMS,  #
    BLK: tl.constexpr, ACT: tl.constexpr, HAS_BA: tl.constexpr, HAS_WL: tl.constexpr, HAS_BL: tl.constexpr,  #
    HAS_PERM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,  #
    GROUP_M: tl.constexpr, OCC: tl.constexpr, SPLIT: tl.constexpr, KALIGN: tl.constexpr, DOT_PREC: tl.constexpr,
    EPI_SUB: tl.constexpr,
):
    EVEN_K: tl.constexpr = KALIGN % BLOCK_K == 0
    pid, t_main, b, mb, t, col0 = token_block_tile(NB, KW, NBATCH, NUM_SMS, BLK, BLOCK_M, BLOCK_N, GROUP_M, OCC, SPLIT)
    if pid < t_main:
        _mm1_tile(X, WA, BA, WL, BL, IDX, CNT, HC, DP, PERM,
                  sxb, sxm, sxc, swa_f, swa_c, swl_f, swl_c, shb, shm, shf, sdb, sdm, sdk, sib, sim, scb,
                  M, C, KWP, b, mb, t, col0,
                  BLK, ACT, HAS_BA, HAS_WL, HAS_BL, HAS_PERM, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, DOT_PREC, EPI_SUB)
    else:
        SUB: tl.constexpr = BLOCK_N // SPLIT
        _mm1_tile(X, WA, BA, WL, BL, IDX, CNT, HC, DP, PERM,
                  sxb, sxm, sxc, swa_f, swa_c, swl_f, swl_c, shb, shm, shf, sdb, sdm, sdk, sib, sim, scb,
                  M, C, KWP, b, mb, t, col0 + ((pid - t_main) % SPLIT) * SUB,
                  BLK, ACT, HAS_BA, HAS_WL, HAS_BL, HAS_PERM, BLOCK_M, SUB, BLOCK_K, EVEN_K, DOT_PREC, EPI_SUB)


def _configs():
    out = []
    #         BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, GROUP_M, OCC, SPLIT, EPI_SUB
    # H200 FLUX sweeps (bench_kernels_h200_sweep.csv, _session7.csv): 128x256x64 on 8 warps, 4 stages,
    # GROUP_M 64 was best (0.247-0.280 ms) while its epilogue spilled; 128x128 on 8 warps 0.250.
    # Compiled for sm_90 with the strides specialized as at run time: 128x256 spills 144 bytes per
    # thread in one epilogue piece and none in 2 or 4 column slices; 128x128 none in either.
    for bm, bn, bk, w, s, gm, occ, sp, es in [(128, 256, 64, 8, 4, 64, 1, 2, 1), (128, 256, 64, 8, 4, 64, 1, 2, 2),
                                              (128, 256, 64, 8, 3, 64, 1, 2, 1), (128, 256, 64, 8, 3, 16, 1, 2, 1),
                                              (128, 128, 64, 4, 4, 64, 1, 2, 1), (128, 128, 64, 8, 4, 64, 1, 2, 1),
                                              (128, 128, 64, 8, 5, 64, 1, 2, 1), (128, 128, 64, 8, 5, 64, 1, 2, 2),
                                              # 256-row tiles, for token blocks of >= 256 (mlp.block);
                                              # each gathered w_act row then serves 256 tokens
                                              (256, 128, 64, 8, 4, 64, 1, 2, 2), (256, 128, 64, 8, 3, 64, 1, 2, 2),
                                              # two programs per SM (96 KB of shared memory, 255 registers),
                                              # so one program's epilogue overlaps the other's K loop. H100,
                                              # FLUX shape: 0.2368 against 0.2473 ms autotuned without it at
                                              # 30% of the neurons, 0.2005 against 0.1805 at 20%
                                              # (bench_kernels_sweep_h100_session59.txt)
                                              (128, 128, 64, 4, 3, 64, 2, 2, 2)]:
        out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": gm, "OCC": occ,
                                  "SPLIT": sp, "EPI_SUB": es}, num_warps=w, num_stages=s))
    return out


# Bench/test hook: a triton.Config that bypasses autotuning (None: autotune / interpreter meta).
_force_config = None
_INTERP_META = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, OCC=1, SPLIT=2, EPI_SUB=2)

_tuned = autotune(configs=_configs(), key=["M", "C", "KW", "BLK", "ACT", "HAS_WL", "DOT_PREC", "NUM_SMS"],
                  restore_value=["HC"], prune_configs_by={"early_config_prune": prune_row_tiles})(_mlp_sparse_mm1_kernel)


def mlp_sparse_mm1(x, w_act, b_act, w_lin, b_lin, indices, counts, h_cache, *, act: str, block: int, perm=None):
    B, M, C = x.shape
    NB, KW = indices.shape[1], indices.shape[2]
    assert NB == cdiv(M, block) and h_cache.shape == (B, M, w_act.shape[0])
    # Rows padded to a multiple of 64 elements: keeps delta rows 16-byte aligned so the stores here
    # and mm2's loads stay vectorised (K = 3686 made mm2 5x slower). A plain contiguous tensor when
    # K % 64 == 0; otherwise a (B, M, K) view of a (B, M, Kp) buffer whose pad is never read.
    KWp = cdiv(KW, 64) * 64
    delta = new_empty(B, M, KWp, dtype=x.dtype, device=x.device)[..., :KW]
    idx = indices.to(torch.int32)
    idx = idx if idx.stride(-1) == 1 else idx.contiguous()
    cnt = counts.to(torch.int32).contiguous()
    pm = None if perm is None else perm.to(torch.int32).contiguous()
    dummy = cnt
    wl = w_lin if w_lin is not None else w_act
    nsm = num_sms(x.device)
    args = (
        x, w_act, b_act if b_act is not None else dummy, wl, b_lin if b_lin is not None else dummy, idx, cnt,
        h_cache, delta, pm if pm is not None else dummy,
        *x.stride(), *w_act.stride(), *wl.stride(), *h_cache.stride(), *delta.stride(), idx.stride(0),
        idx.stride(1), cnt.stride(0),
        M, C, KW, KWp, NB, B, nsm,
    )
    flags = dict(BLK=int(block), ACT=ACT_CODE[act], HAS_BA=b_act is not None, HAS_WL=w_lin is not None,
                 HAS_BL=b_lin is not None, HAS_PERM=pm is not None, KALIGN=pow2_align(C),
                 DOT_PREC=dot_precision(x.dtype))

    grid = wave_grid(lambda meta: B * NB * cdiv(block, meta["BLOCK_M"]) * cdiv(KW, meta["BLOCK_N"]), nsm)

    launch(_mlp_sparse_mm1_kernel, _tuned, grid, args, flags, force_config=_force_config, interp_meta=_INTERP_META)
    return delta
