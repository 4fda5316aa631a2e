"""Triton: column-sparse attention of each query group over its own gathered key columns.

Same signature and contract as ``attn_column_sparse_ref.attn_column_sparse_ref`` (read it first).

Kernel invariants:
- Work items are BLOCK_M-row tiles of one query group g of one (b, h), numbered group-fastest then
  (b, h) (a 1-D grid; concurrently running programs share the K/V of a few heads in L2). A group of
  G rows is covered by ceil(G / BLOCK_M) tiles (the last one masked when BLOCK_M does not divide G:
  prefer G % BLOCK_M == 0). G is a constexpr.
- Wave tail: with P = NUM_SMS * OCC resident programs and T tiles, the last T % P tiles would run
  as a short last wave on few SMs; when (T % P) * SPLIT <= P each of them is split into SPLIT
  programs of BLOCK_M // SPLIT rows (same keys), so the tail takes ~1/SPLIT of a tile's time.
  Every (row) is still owned by exactly one program: no cross-program reduction, deterministic.
- The key loop runs over the group's first counts indices only: floor(counts / BLOCK_N) full
  BLOCK_N tiles with no masks, then ceil(rem / TAIL_N) masked TAIL_N tiles (TAIL_N <= BLOCK_N, so
  a ragged count wastes < TAIL_N columns of compute). K/V rows are gathered by index into dense
  tiles (pointer gathers, software-pipelined). Masked entries load index 0 (always a valid row)
  and get score -inf / weight 0, so the index padding is never trusted.
- Scores stay raw (q.k) and are scaled inside the exp2 argument (qk_scale = scale * log2e, one FMA
  per element). Self-normalized mode: online softmax over S alone; every loop step has >= 1 valid
  column, so the running max is finite after the first step; counts == 0 yields 0.
  Exact-normalizer mode (lse given): p = exp2(s * qk_scale - lse * log2e), no max/renormalisation.
- ``bias`` (HAS_BIAS constexpr; without it the code is what it was): each key tile loads the bias at
  (the rows' query index, the gathered column), fp32 times log2e, and adds it to the scaled scores.
  Every tile then takes the masked-step form (the one-loop path, whatever TAIL_N). A row's scores
  may be all -inf in a tile or over all of S, so the running max is made safe (0 is subtracted
  where it is still -inf): p = 0 and alpha finite there, and a row that never sees a finite score
  ends with l = 0 and adds 0, as counts == 0 does. Offsets inside one (b, h) of the bias are int32
  (checked on the host): 64-bit row pointers took FLUX's tile (64 x 32, 4 warps) past the 168
  registers that let three programs share an SM.
- Epilogue: o = o_base + sign * attn_S in one store (o_base read once, in the epilogue; the output
  is a fresh (B, N, Hq, D)-layout buffer or the caller's ``out`` of that layout, never o_base); with
  the residual forecast also + coef * o_slope (coef read from a device scalar, so recorded graphs
  stay valid), o_slope read beside o_base at the same offsets. Where that cannot be (other strides)
  the sum is formed first (``slope_into_base``). With ``measure`` (a refresh measuring the
  forecast's slope) the same program also reads prev at o's offsets before storing o (prev may be
  ``out`` itself: every row has one owner) and stores (o − prev) · inv_dt from the fp32 o; where the
  strides differ ``write_out`` does it in separate passes. The Gluon kernels' epilogue does the
  same (``attn_column_sparse_hopper.epilogue_reason`` says when it cannot).
- Index lists of >= HOPPER_MIN_KEYS on Hopper may go to a Gluon kernel (same contract): the ping-pong one
  (``attn_column_sparse_pingpong.py``: producer and two consumer warpgroups, groups of a multiple of
  128) or the single-warpgroup one (``attn_column_sparse_hopper.py``). ``use_hopper_kernel`` says
  whether a call qualifies, from host-known shapes only. Which kernel runs a qualifying call is
  measured on the first call of each shape (``faster_choice``; CHIPMUNK_GLUON=1 forces the first
  Gluon kernel that qualifies, 0 forbids both): the single-warpgroup kernel was 3-7% faster than
  Triton at 75-119k keys on the H200 of sessions 11-15 and 1.56x slower on the H200 of session 17
  (same code, same Triton 3.6, CUDA 13 driver), so no fixed rule holds on every machine.
  The Gluon kernels take no bias: a call with ``bias`` never qualifies and always runs the Triton kernel.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from ._tiles import block_rows, load_bias, load_cols, num_sms, padded_head_dim, row_col_mask, wave_grid, wave_tail_tile
from ._common import (LOG2E, autotune, bias_view, cdiv, dot_precision, empty_bnhd, faster_choice, int32_index_args,
                      interpreting, launch)

# Bench/test hook: a triton.Config (plus "OCC"/"SPLIT"/"TAIL_N" in its kwargs) that bypasses autotuning.
_force_config = None
_INTERP_META = dict(BLOCK_M=32, BLOCK_N=32, TAIL_N=16, OCC=1, SPLIT=2)




@triton.jit
def _csp_masked_step(q, k_base, v_base, idx_base, c, cnt, m_i, l_i, acc, ref2, qk_scale, skn, skd, svn, svd, offs_d,
                     bias_base, bias_rows, row_ok, sak,
                     HAS_LSE: tl.constexpr, DOT_PREC: tl.constexpr, HEAD_DIM: tl.constexpr, D_ACT: tl.constexpr,
                     HAS_BIAS: tl.constexpr):
    c_ok = c < cnt
    j = tl.load(idx_base + c, mask=c_ok, other=0)
    k = load_cols(k_base + j[:, None] * skn + offs_d[None, :] * skd, HEAD_DIM, D_ACT)
    v = load_cols(v_base + j[:, None] * svn + offs_d[None, :] * svd, HEAD_DIM, D_ACT)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    if HAS_BIAS:
        s += load_bias(bias_base + (bias_rows[:, None] + j[None, :] * sak), row_ok[:, None] & c_ok[None, :])
    s = tl.where(c_ok[None, :], s, float("-inf"))
    if HAS_LSE:
        p = tl.exp2(s - ref2[:, None])
        acc += tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if HAS_BIAS:  # rows with no finite score yet subtract 0: p = 0, alpha = 0 (not NaN)
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:  # every step has a valid column: m_new is finite
            m_sub = m_new
        p = tl.exp2(s - m_sub[:, None])
        alpha = tl.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _csp_rows(Q, K, V, O, OB, OS, COEF, PREV, SOUT, INV, IDX, CNT, LSE, PERM, BIAS,  #
              sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod, sbb, sbh, sbn, sbd,  #
              sib, sih, sig, scb, sch, sab, sah, san, sak,  #
              N, HQ, KV_REP, qk_scale, sign, bh, g, row0,  #
              G: tl.constexpr, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,  #
              TAIL_N: tl.constexpr, HAS_PERM: tl.constexpr, HAS_OB: tl.constexpr, HAS_SLOPE: tl.constexpr,  #
              HAS_MEASURE: tl.constexpr, HAS_LSE: tl.constexpr, DOT_PREC: tl.constexpr, POS_SCALE: tl.constexpr,
              D_ACT: tl.constexpr, HAS_BIAS: tl.constexpr):
    b = bh // HQ
    h = bh % HQ
    hk = h // KV_REP
    pos, row_ok, qi = block_rows(PERM, g, row0, G, N, ROWS, HAS_PERM)
    offs_d = tl.arange(0, HEAD_DIM)
    rd_ok = row_col_mask(row_ok, HEAD_DIM, D_ACT)  # rows that exist, columns below the real head dim
    q = tl.load(Q + b * sqb + h * sqh + qi[:, None] * sqn + offs_d[None, :] * sqd, mask=rd_ok, other=0.0)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    idx_base = IDX + b * sib + h * sih + g * sig
    cnt = tl.load(CNT + b * scb + h * sch + g)
    n_full = (cnt // BLOCK_N) * BLOCK_N

    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    if HAS_LSE:
        ref2 = tl.load(LSE + bh * N + qi, mask=row_ok, other=float("inf")) * 1.4426950408889634
    else:
        ref2 = m_i  # unused
    if HAS_BIAS:  # a (B, Hq, N, Nk) bias may pass 2^31 elements: (b, h)'s base in 64 bits, rows in 32
        bias_base = BIAS + b.to(tl.int64) * sab + h.to(tl.int64) * sah
        bias_rows = qi * san
    else:
        bias_base = BIAS  # unused
        bias_rows = qi  # unused

    offs_n = tl.arange(0, BLOCK_N)
    if TAIL_N == BLOCK_N or HAS_BIAS:
        # One loop, every step masked (the form with the fewest shared-memory buffers; with a bias
        # always: only the masked step adds it).
        for start in range(0, cnt, BLOCK_N):
            m_i, l_i, acc = _csp_masked_step(q, k_base, v_base, idx_base, start + offs_n, cnt, m_i, l_i, acc,
                                             ref2, qk_scale, skn, skd, svn, svd, offs_d, bias_base, bias_rows,
                                             row_ok, sak, HAS_LSE, DOT_PREC, HEAD_DIM, D_ACT, HAS_BIAS)
    else:
        for start in range(0, n_full, BLOCK_N):
            j = tl.load(idx_base + start + offs_n)
            k = load_cols(k_base + j[:, None] * skn + offs_d[None, :] * skd, HEAD_DIM, D_ACT)
            v = load_cols(v_base + j[:, None] * svn + offs_d[None, :] * svd, HEAD_DIM, D_ACT)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
            if HAS_LSE:
                p = tl.exp2(s * qk_scale - ref2[:, None])
                acc += tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
            else:
                if POS_SCALE:
                    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
                else:
                    m_new = tl.maximum(m_i, tl.max(s * qk_scale, 1))
                p = tl.exp2(s * qk_scale - m_new[:, None])
                alpha = tl.exp2(m_i - m_new)
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
                m_i = m_new
        # Ragged rest in TAIL_N steps, not software-pipelined (no extra shared-memory stages).
        offs_t = tl.arange(0, TAIL_N)
        for start in tl.range(n_full, cnt, TAIL_N, num_stages=1):
            m_i, l_i, acc = _csp_masked_step(q, k_base, v_base, idx_base, start + offs_t, cnt, m_i, l_i, acc,
                                             ref2, qk_scale, skn, skd, svn, svd, offs_d, bias_base, bias_rows,
                                             row_ok, sak, HAS_LSE, DOT_PREC, HEAD_DIM, D_ACT, HAS_BIAS)

    if HAS_LSE:
        out = acc * sign
    else:
        out = acc * (sign / tl.where(l_i > 0, l_i, 1.0))[:, None]
    if HAS_OB:
        ob_offs = b * sbb + h * sbh + qi[:, None] * sbn + offs_d[None, :] * sbd
        ob = tl.load(OB + ob_offs, mask=rd_ok, other=0.0)
        out += ob.to(tl.float32)
        if HAS_SLOPE:  # o_slope shares o_base's strides (checked on the host)
            os_ = tl.load(OS + ob_offs, mask=rd_ok, other=0.0)
            out += tl.load(COEF) * os_.to(tl.float32)
    o_offs = b * sob + h * soh + qi[:, None] * son + offs_d[None, :] * sod
    if HAS_MEASURE:  # prev and slope_out share O's strides (checked on the host); prev may be O itself
        prev = tl.load(PREV + o_offs, mask=rd_ok, other=0.0)
        rate = (out - prev.to(tl.float32)) * tl.load(INV)
        tl.store(SOUT + o_offs, rate.to(SOUT.dtype.element_ty), mask=rd_ok)
    tl.store(O + o_offs, out.to(O.dtype.element_ty), mask=rd_ok)


@triton.jit
def _attn_column_sparse_kernel(
    Q, K, V, O, OB, OS, COEF, PREV, SOUT, INV, IDX, CNT, LSE, PERM, BIAS,  #
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod, sbb, sbh, sbn, sbd,  #
    sib, sih, sig, scb, sch, sab, sah, san, sak,  #
    N, HQ, KV_REP, NG, NBH, NUM_SMS, qk_scale, sign,  #
    G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  #
    TAIL_N: tl.constexpr, OCC: tl.constexpr, SPLIT: tl.constexpr,  #
    HAS_PERM: tl.constexpr, HAS_OB: tl.constexpr, HAS_SLOPE: tl.constexpr, HAS_MEASURE: tl.constexpr,
    HAS_LSE: tl.constexpr, DOT_PREC: tl.constexpr, POS_SCALE: tl.constexpr, D_ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    TPG: tl.constexpr = (G + BLOCK_M - 1) // BLOCK_M
    per_bh = NG * TPG
    pid = tl.program_id(0)
    tile, t_main = wave_tail_tile(pid, NBH * per_bh, NUM_SMS * OCC, SPLIT)
    if SPLIT == 1:  # constexpr: one body only
        bh = pid // per_bh
        r = pid % per_bh
        _csp_rows(Q, K, V, O, OB, OS, COEF, PREV, SOUT, INV, IDX, CNT, LSE, PERM, BIAS,
                  sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod, sbb, sbh, sbn, sbd,
                  sib, sih, sig, scb, sch, sab, sah, san, sak, N, HQ, KV_REP, qk_scale, sign, bh, r // TPG,
                  (r % TPG) * BLOCK_M,
                  G, HEAD_DIM, BLOCK_M, BLOCK_N, TAIL_N, HAS_PERM, HAS_OB, HAS_SLOPE, HAS_MEASURE, HAS_LSE, DOT_PREC,
                  POS_SCALE, D_ACT, HAS_BIAS)
    elif pid < t_main:
        bh = pid // per_bh
        r = pid % per_bh
        _csp_rows(Q, K, V, O, OB, OS, COEF, PREV, SOUT, INV, IDX, CNT, LSE, PERM, BIAS,
                  sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod, sbb, sbh, sbn, sbd,
                  sib, sih, sig, scb, sch, sab, sah, san, sak, N, HQ, KV_REP, qk_scale, sign, bh, r // TPG,
                  (r % TPG) * BLOCK_M,
                  G, HEAD_DIM, BLOCK_M, BLOCK_N, TAIL_N, HAS_PERM, HAS_OB, HAS_SLOPE, HAS_MEASURE, HAS_LSE, DOT_PREC,
                  POS_SCALE, D_ACT, HAS_BIAS)
    else:
        qq = pid - t_main
        bh = tile // per_bh
        r = tile % per_bh
        SUB: tl.constexpr = BLOCK_M // SPLIT
        _csp_rows(Q, K, V, O, OB, OS, COEF, PREV, SOUT, INV, IDX, CNT, LSE, PERM, BIAS,
                  sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod, sbb, sbh, sbn, sbd,
                  sib, sih, sig, scb, sch, sab, sah, san, sak, N, HQ, KV_REP, qk_scale, sign, bh, r // TPG,
                  (r % TPG) * BLOCK_M + (qq % SPLIT) * SUB,
                  G, HEAD_DIM, SUB, BLOCK_N, TAIL_N, HAS_PERM, HAS_OB, HAS_SLOPE, HAS_MEASURE, HAS_LSE, DOT_PREC,
                  POS_SCALE, D_ACT, HAS_BIAS)


# BLOCK_M, BLOCK_N, TAIL_N, warps, stages, OCC, SPLIT. TAIL_N == BLOCK_N and SPLIT == 1 is the
# previous kernel's schedule (its winner at FLUX 4352/G=128/85%: 64 x 32, 4 warps, 4 stages).
_TILES = [(64, 32, 32, 4, 4, 3, 1), (64, 32, 16, 4, 4, 3, 1), (64, 32, 32, 4, 3, 3, 1), (64, 64, 64, 4, 3, 2, 1),
          (64, 64, 16, 4, 3, 2, 1), (64, 64, 64, 4, 2, 2, 1), (128, 64, 64, 8, 3, 1, 1), (128, 128, 16, 8, 3, 1, 2)]
# Head-dim tiles of 256 (AuraFlow): a 64 x 256 fp32 accumulator wants 8 warps. Compiled for sm_90 (Triton
# 3.9, bf16; the slope epilogue for each, tests/kernels/test_attn_column_sparse.py, the measure one for the
# first, third and fourth) these keep <= 210 registers and no spills in <= 164 KB of shared memory (one
# program per SM); 4-warp or 128-row tiles spill 116-280 bytes in those epilogues.
_TILES_D256 = [(64, 32, 32, 8, 3, 1, 1), (64, 32, 16, 8, 3, 1, 1), (64, 32, 32, 8, 2, 1, 1), (64, 64, 64, 8, 2, 1, 1),
               (64, 64, 32, 8, 2, 1, 1)]


def _configs(tiles=_TILES):
    """Configs of a tile list (the <= 128 head-dim list unless told)."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "TAIL_N": tn, "OCC": occ, "SPLIT": sp}, num_warps=w,
                          num_stages=s) for bm, bn, tn, w, s, occ, sp in tiles]


def _tuner(**kw):
    """The autotuned kernel over both tile lists, pruned to the call's: HEAD_DIM 256 or up to 128."""
    narrow, wide = _configs(_TILES), _configs(_TILES_D256)

    def prune(configs, named_args, **kwargs):
        return wide if named_args.get("HEAD_DIM", kwargs.get("HEAD_DIM")) > 128 else narrow

    return autotune(configs=narrow + wide, key=_KEY, prune_configs_by={"early_config_prune": prune}, **kw)(
        _attn_column_sparse_kernel)


_KEY = ["N", "G", "HEAD_DIM", "D_ACT", "HAS_LSE", "HAS_OB", "HAS_SLOPE", "HAS_MEASURE", "HAS_BIAS", "DOT_PREC",
        "NUM_SMS"]
_tuned = _tuner()
# With ``measure`` O may be its prev, read before it is written: timing a config must not let one run's
# output become the next run's prev, so those calls tune with O restored after every run (restore_value;
# its copies are timed too, so only these calls pay them)
_tuned_measure = _tuner(restore_value=["O"])


# Index capacity from which the Gluon kernels are timed against Triton on a call's first shape. H200,
# replayed (session 28): the ping-pong kernel wins at FLUX's shape too (1x24x4352x128, G=128: 0.127
# against 0.134 ms at 653 keys, 0.155 against 0.190 at 1001, 0.195 against 0.229 at 1306) once its
# epilogue adds the forecast's slope and writes a refresh's cache and slope itself; below ~512 keys
# (small models) the compile and the timing are not worth it. CHIPMUNK_GLUON=0 turns it off.
HOPPER_MIN_KEYS = 512


def use_hopper_kernel(q, k, v, indices, *, scale, group, lse=None, o_base=None, bias=None) -> bool:
    if bias is not None:  # the Gluon kernels take no bias
        return False
    if _force_config is not None or interpreting() or os.environ.get("CHIPMUNK_GLUON", "1") == "0":
        return False
    if indices.shape[-1] < HOPPER_MIN_KEYS or q.shape[-1] != 128:  # head dim 64 runs correctly but is untimed
        return False
    from . import attn_column_sparse_hopper as hopper

    return hopper.supported(q, k, v, group=group, scale=scale, lse=lse, o_base=o_base) is None


def attn_column_sparse(q, k, v, indices, counts, *, scale: float, group: int, perm=None, o_base=None,
                       sign: float = 1.0, lse=None, o_slope=None, slope_coef=None, out=None, measure=None, bias=None):
    if o_slope is not None and (o_base is None or o_slope.stride() != o_base.stride()):
        o_base = slope_into_base(o_base, o_slope, slope_coef)
        o_slope = None
    if use_hopper_kernel(q, k, v, indices, scale=scale, group=group, lse=lse, o_base=o_base, bias=bias):
        return _attn_column_sparse_gluon(q, k, v, indices, counts, scale=scale, group=group, perm=perm, o_base=o_base,
                                         sign=sign, o_slope=o_slope, slope_coef=slope_coef, out=out, measure=measure)
    fused = fused_epilogue_fits(q, out, measure)
    o = _attn_column_sparse_triton(q, k, v, indices, counts, scale=scale, group=group, perm=perm, o_base=o_base,
                                   sign=sign, lse=lse, o_slope=o_slope, slope_coef=slope_coef,
                                   out=out if fused else None, measure=measure if fused else None, bias=bias)
    return o if fused else write_out(o, out, measure)


def fused_epilogue_fits(q, out, measure) -> bool:
    """Whether the Triton epilogue can write ``out`` and ``measure``'s slope itself: out of q's shape
    and dtype (any strides), prev and slope_out at out's strides (the new buffer's when out is None)."""
    B, Hq, N, D = q.shape
    strides = out.stride() if out is not None else (N * Hq * D, D, Hq * D, 1)  # empty_bnhd's
    if out is not None and (tuple(out.shape) != (B, Hq, N, D) or out.dtype != q.dtype):
        return False
    return measure is None or all(tuple(t.shape) == (B, Hq, N, D) and t.stride() == strides for t in measure[:2])


def write_out(o, out, measure):
    """What the fused epilogue does, as separate passes over a finished o (kernels that lack it)."""
    if measure is not None:
        prev, slope_out, inv_dt = measure
        slope_out.copy_((o.float() - prev.float()) * inv_dt.reshape(()).float())
    if out is None:
        return o
    return out.copy_(o)


def _attn_column_sparse_gluon(q, k, v, indices, counts, *, scale, group, perm, o_base, sign, o_slope, slope_coef,
                              out, measure):
    """A Hopper-qualified call: the ping-pong (one program per work item, or one per SM), single-warpgroup
    and Triton kernels timed once per shape on this call's inputs without ``out`` / ``measure`` (a run
    writing them would change the next run's prev), then the pick runs once with them. Each kernel
    fuses the slope term, ``out`` and ``measure`` into its epilogue where their strides allow, else
    adds separate passes."""
    from torch._dynamo.utils import counters

    from . import attn_column_sparse_pingpong as pingpong
    from .attn_column_sparse_hopper import attn_column_sparse_hopper, epilogue_reason

    gluon_fused = epilogue_reason(q, o_base, o_slope, out, measure) is None
    triton_fused = fused_epilogue_fits(q, out, measure)
    kw = dict(scale=scale, group=group, perm=perm, sign=sign)

    def call(name, o_out, o_measure):
        if name == "triton":
            o = _attn_column_sparse_triton(q, k, v, indices, counts, o_base=o_base, o_slope=o_slope,
                                           slope_coef=slope_coef, out=o_out if triton_fused else None,
                                           measure=o_measure if triton_fused else None, **kw)
            return o if triton_fused else write_out(o, o_out, o_measure)
        kern = attn_column_sparse_hopper
        if name == "pingpong":
            kern = pingpong.attn_column_sparse_pingpong
        elif name == "pingpong_persistent":
            kern = functools.partial(pingpong.attn_column_sparse_pingpong, programs=num_sms(q.device))
        if gluon_fused:
            return kern(q, k, v, indices, counts, o_base=o_base, o_slope=o_slope, slope_coef=slope_coef, out=o_out,
                        measure=o_measure, **kw)
        base = slope_into_base(o_base, o_slope, slope_coef) if o_slope is not None else o_base
        return write_out(kern(q, k, v, indices, counts, o_base=base, **kw), o_out, o_measure)

    # ping-pong on one program per work item, or one per SM looping over them (faster on short key
    # lists, where a program's start and first gather are a large share; not on long ones)
    pp = ["pingpong", "pingpong_persistent"] if pingpong.beyond_hopper(group) is None else []
    names = pp + ["gluon", "triton"]
    default = names[0]  # the ping-pong kernel where it qualifies, else the single-warpgroup one
    timed = {n: (lambda n=n: call(n, None, None)) for n in names}
    pick = default if os.environ.get("CHIPMUNK_GLUON") == "1" else faster_choice(
        ("attn_column_sparse", str(q.device), q.dtype, tuple(q.shape), k.shape[1], indices.shape[-1], int(group),
         perm is not None, o_base is not None, o_slope is not None), timed, default)
    if pick != "triton":
        counters["chipmunk"][f"kernel_{pick}:attn_column_sparse"] += 1  # eager calls and recordings, not replays
    return call(pick, out, measure)


def _attn_column_sparse_triton(q, k, v, indices, counts, *, scale, group, perm=None, o_base=None, sign=1.0, lse=None,
                               o_slope=None, slope_coef=None, out=None, measure=None, bias=None):
    B, Hq, N, D = q.shape
    Hkv = k.shape[1]
    assert Hq % Hkv == 0 and 1 <= D <= 256
    G = int(group)
    NG = indices.shape[2]
    assert NG == math.ceil(N / G), "indices must have ceil(N/G) groups"
    o = empty_bnhd(B, Hq, N, D, dtype=q.dtype, device=q.device) if out is None else out
    idx, cnt, pm = int32_index_args(indices, counts, perm)
    lse_c = None if lse is None else lse.float().contiguous()
    ob = o_base
    nsm = num_sms(q.device)
    coef = slope_coef.reshape(1).float() if o_slope is not None else cnt
    prev, slope_out, inv_dt = measure if measure is not None else (q, q, cnt)
    bv = bias_view(bias, q, k)
    if bv is not None and (N - 1) * bv.stride(2) + (k.shape[2] - 1) * bv.stride(3) >= 2 ** 31:
        raise ValueError(f"attn_column_sparse: one head's slice of a {tuple(bias.shape)} bias with strides "
                         f"{tuple(bias.stride())} is past int32 offsets")
    args = (
        q, k, v, o, ob if ob is not None else q, o_slope if o_slope is not None else q, coef,
        prev, slope_out, inv_dt.reshape(1).float() if measure is not None else cnt,
        idx, cnt, lse_c if lse_c is not None else cnt,
        pm if pm is not None else cnt, bv if bv is not None else q,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(), *(ob.stride() if ob is not None else q.stride()),
        idx.stride(0), idx.stride(1), idx.stride(2), cnt.stride(0), cnt.stride(1),
        *(bv.stride() if bv is not None else (0, 0, 0, 0)),
        N, Hq, Hq // Hkv, NG, B * Hq, nsm, scale * LOG2E, float(sign),
    )
    flags = dict(G=G, HEAD_DIM=padded_head_dim(D), D_ACT=D, HAS_PERM=pm is not None, HAS_OB=ob is not None,
                 HAS_SLOPE=o_slope is not None, HAS_MEASURE=measure is not None, HAS_LSE=lse_c is not None,
                 DOT_PREC=dot_precision(q.dtype), POS_SCALE=scale > 0, HAS_BIAS=bv is not None)
    grid = wave_grid(lambda meta: B * Hq * NG * cdiv(G, meta["BLOCK_M"]), nsm)
    launch(_attn_column_sparse_kernel, _tuned if measure is None else _tuned_measure, grid, args, flags,
           force_config=_force_config, interp_meta=_INTERP_META)
    return o


def slope_into_base(o_base, o_slope, slope_coef):
    """o_base + slope_coef * o_slope as one tensor, where the epilogue cannot read the slope itself."""
    base = o_base if o_base is not None else torch.zeros_like(o_slope)
    return torch.addcmul(base, o_slope, slope_coef.reshape(()))  # 0-dim fp32: the result keeps base's dtype
