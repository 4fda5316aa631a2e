"""Triton: per-query-group column sums of exact attention probabilities, from sampled queries.

Same signature and contract as ``attn_colsum_sampled_ref.attn_colsum_sampled_ref`` (read it first).

Kernel invariants:
- Sampled rows are laid out as (group, slot): row r is slot r % SLOTS of group r // SLOTS, and
  slot j holds the query at position g*G + OFFS[j] (OFFS[j] = -1: an empty slot). One program owns
  BLOCK_M rows = BLOCK_M // SLOTS whole groups, so every column sum is a reduction inside one tile
  and is written by exactly one program (plain stores, no atomics, no zero-init: deterministic).
- QKᵀ only (no PV, no online softmax): p = exp2(s·log2e − lse·log2e) with the exact lse of the
  same step. Empty slots, rows past N and padded groups load lse = +inf, so their p is exactly 0;
  masked keys get s = −inf.
- HAS_BIAS: the bias tile of the sampled rows (by query index, after perm) is added to s in the
  log2 domain after QKᵀ (fp32, also after the fp8 one); the mma reduction loads it transposed.
  Empty and padded rows read 0 (their p stays 0); a −inf bias gives p = 0, never NaN, since a
  sampled row's lse is finite. Without a bias none of this is compiled.
- Two reductions over a group's rows, chosen by autotuning (CHIPMUNK_COLSUM_REDUCE=sum|mma pins
  one): a reshape + sum of the (BLOCK_M × BLOCK_N) tile, or a transposed tile whose probabilities
  feed a tensor-core product with a 0/1 row-to-group matrix (fp32 accumulation of p rounded to the
  input dtype, as FlashAttention's P·V).
- Sums accumulate in fp32 and are stored in the output's dtype (fp16 halves the buffer and the
  top-k passes over it; sums lie in [0, samples], so fp16 keeps 11 bits where the top-k looks).
- QK_FP8 (the reference's qk_fp8): k arrives as an e4m3 copy made by the launcher, q rows are
  cast once per program (round to nearest, saturating at ±448, as torch's cast after a clamp; the
  interpreter's in-kernel cast does not round to nearest, so there q arrives cast too). The key
  tiles are half the bytes and the QKᵀ runs at the fp8 tensor-core rate: 47.0 -> 33.0 ms at the
  HunyuanVideo shape on the H200 (S=32, e4m3 copy of k 0.7 ms included); no gain at FLUX's 4352
  keys. Since then the exponentials bound it (benchmarks/kernel_ablation.py: 22% faster without
  them, 4% without the key tiles and QKᵀ). Half-precision ones (ex2.approx.f16x2) gave nothing:
  ptxas issues one MUFU.EX2.F16 per value, the same work for the multi-function unit.
- The key axis is split over grid axis 2 when (row tiles × heads) alone would not fill the GPU;
  tiles fully inside Nk load without masks (vectorised, pipelined), only the last one is masked.
- ABLATE (constexpr, 0 = off in every real call) drops one piece of work for
  benchmarks/kernel_ablation.py; its branches fold away at compile time.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ._common import LOG2E, autotune, bias_view, cdiv, dot_precision, interpreting, new_empty
from ._tiles import key_allowed, load_bias, load_rows, num_sms, padded_head_dim, row_col_mask
from .attn_colsum_sampled_ref import sample_offsets, to_e4m3


@triton.jit
def _fp8(x):
    """The q rows as e4m3 (saturating: e4m3 has no inf, and a plain cast of |x| > 448 is NaN); the
    interpreter's q arrives cast already."""
    if x.dtype == tl.float8e4nv:
        return x
    return tl.clamp(x.to(tl.float32), -448.0, 448.0).to(tl.float8e4nv)


@triton.jit
def _colsum_tile(q, lse2, k_base, KMASK, brow, ok, sbk, cs_base, b, gs, start_n, skn, skd, NK, NG, qk_scale,
                 SLOTS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 HAS_KMASK: tl.constexpr, HAS_BIAS: tl.constexpr, TAIL: tl.constexpr, DOT_PREC: tl.constexpr,
                 ABLATE: tl.constexpr, D_ACT: tl.constexpr):
    cols = start_n + tl.arange(0, BLOCK_N)
    col_in = cols < NK
    if ABLATE == 2:  # "keys": no key tiles, no QKᵀ (scores that vary by column)
        s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32) + cols[None, :].to(tl.float32) * -1e-3
    else:
        k = load_rows(k_base, cols, col_in, skn, skd, HEAD_DIM, TAIL, D_ACT)  # e4m3 already when QK_FP8
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    if HAS_BIAS:  # inside Nk only the rows are masked: the loads stay vectorised
        bmask = ok[:, None] & col_in[None, :] if TAIL else ok[:, None]
        s += load_bias(brow[:, None] + cols[None, :] * sbk, bmask)
    if HAS_KMASK:
        s = tl.where(key_allowed(KMASK, b, cols, col_in, NK)[None, :], s, float("-inf"))
    if ABLATE == 1:  # "exp": the exponent stands in for the probability
        p = s - lse2[:, None]
    else:
        p = tl.exp2(s - lse2[:, None])
    cs = tl.sum(tl.reshape(p, (BLOCK_M // SLOTS, SLOTS, BLOCK_N)), 1)
    ptrs = cs_base + gs[:, None].to(tl.int64) * NK + cols[None, :]
    tl.store(ptrs, cs.to(cs_base.dtype.element_ty), mask=(gs < NG)[:, None] & col_in[None, :])


@triton.jit
def _colsum_tile_mma(qt, lse2, member, k_base, KMASK, brow, ok, sbk, cs_base, b, g0, start_n, skn, skd, NK, NG,
                     qk_scale, SLOTS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, HAS_KMASK: tl.constexpr, HAS_BIAS: tl.constexpr, TAIL: tl.constexpr,
                     DOT_PREC: tl.constexpr, ABLATE: tl.constexpr, D_ACT: tl.constexpr):
    # Transposed tile: sᵀ = k·qᵀ (BLOCK_N × BLOCK_M), so the probabilities are the A operand of the
    # group reduction pᵀ·member (member[r, g] = 1 if row r belongs to local group g): the
    # FlashAttention P·V pattern, kept in registers, instead of a cross-row reduction.
    cols = start_n + tl.arange(0, BLOCK_N)
    col_in = cols < NK
    if ABLATE == 2:  # "keys"
        st = tl.zeros([BLOCK_N, BLOCK_M], tl.float32) + cols[:, None].to(tl.float32) * -1e-3
    else:
        k = load_rows(k_base, cols, col_in, skn, skd, HEAD_DIM, TAIL, D_ACT)  # e4m3 already when QK_FP8
        st = tl.dot(k, qt, input_precision=DOT_PREC) * qk_scale
    if HAS_BIAS:  # the bias tile transposed
        bmask = ok[None, :] & col_in[:, None] if TAIL else ok[None, :]
        st += load_bias(brow[None, :] + cols[:, None] * sbk, bmask)
    if HAS_KMASK:
        st = tl.where(key_allowed(KMASK, b, cols, col_in, NK)[:, None], st, float("-inf"))
    if ABLATE == 1:  # "exp"
        pt = (st - lse2[None, :]).to(member.dtype)
    else:
        pt = tl.exp2(st - lse2[None, :]).to(member.dtype)
    cs = tl.dot(pt, member, input_precision=DOT_PREC)  # (BLOCK_N, 16)
    lg = tl.arange(0, 16)
    ptrs = cs_base + (g0 + lg)[None, :].to(tl.int64) * NK + cols[:, None]
    tl.store(ptrs, cs.to(cs_base.dtype.element_ty), mask=(lg < BLOCK_M // SLOTS)[None, :] & (g0 + lg < NG)[None, :] & col_in[:, None])


@triton.jit
def _attn_colsum_sampled_kernel(
    Q, K, LSE, OFFS, PERM, KMASK, BIAS, COLSUM,  #
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, sbb, sbh, sbn, sbk,  #
    N, NK, HQ, KV_REP, NG, G, qk_scale,  #
    SLOTS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  #
    HAS_PERM: tl.constexpr, HAS_KMASK: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr,
    MMA_REDUCE: tl.constexpr, QK_FP8: tl.constexpr, D_ACT: tl.constexpr, ABLATE: tl.constexpr = 0,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bh // HQ
    h = pid_bh % HQ
    hk = h // KV_REP
    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    g = r // SLOTS
    off = tl.load(OFFS + r % SLOTS)
    pos = g * G + off
    ok = (off >= 0) & (pos < N) & (g < NG)
    if HAS_PERM:
        qi = tl.load(PERM + pos, mask=ok, other=0)
    else:
        qi = tl.where(ok, pos, 0)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * sqb + h * sqh + qi[:, None] * sqn + offs_d[None, :] * sqd,
                mask=row_col_mask(ok, HEAD_DIM, D_ACT), other=0.0)
    if QK_FP8:
        q = _fp8(q)
    lse2 = tl.load(LSE + pid_bh * N + qi, mask=ok, other=float("inf")) * 1.4426950408889634
    if HAS_BIAS:  # each sampled row's bias row (rows that are not sampled: masked off)
        brow = BIAS + b.to(tl.int64) * sbb + h.to(tl.int64) * sbh + qi.to(tl.int64) * sbn
    else:
        brow = BIAS
    gs = pid_m * (BLOCK_M // SLOTS) + tl.arange(0, BLOCK_M // SLOTS)
    k_base = K + b * skb + hk * skh
    cs_base = COLSUM + pid_bh.to(tl.int64) * NG * NK

    n_tiles = tl.cdiv(NK, BLOCK_N)
    per = tl.cdiv(n_tiles, tl.num_programs(2))
    t_lo = pid_s * per
    t_hi = tl.minimum(t_lo + per, n_tiles)
    t_full = tl.minimum(t_hi, NK // BLOCK_N)
    if MMA_REDUCE:
        qt = tl.trans(q)
        if QK_FP8:  # q is e4m3 by now; the probabilities are rounded to fp16 for the reduction
            member = ((tl.arange(0, BLOCK_M) // SLOTS)[:, None] == tl.arange(0, 16)[None, :]).to(tl.float16)
        else:
            member = ((tl.arange(0, BLOCK_M) // SLOTS)[:, None] == tl.arange(0, 16)[None, :]).to(Q.dtype.element_ty)
        g0 = pid_m * (BLOCK_M // SLOTS)
        for t in range(t_lo, t_full):
            _colsum_tile_mma(qt, lse2, member, k_base, KMASK, brow, ok, sbk, cs_base, b, g0, t * BLOCK_N, skn, skd,
                             NK, NG, qk_scale, SLOTS, HEAD_DIM, BLOCK_M, BLOCK_N, HAS_KMASK, HAS_BIAS, False,
                             DOT_PREC, ABLATE, D_ACT)
        if t_hi > t_full:
            if t_full >= t_lo:
                _colsum_tile_mma(qt, lse2, member, k_base, KMASK, brow, ok, sbk, cs_base, b, g0, t_full * BLOCK_N,
                                 skn, skd, NK, NG, qk_scale, SLOTS, HEAD_DIM, BLOCK_M, BLOCK_N, HAS_KMASK, HAS_BIAS,
                                 True, DOT_PREC, ABLATE, D_ACT)
    else:
        for t in range(t_lo, t_full):
            _colsum_tile(q, lse2, k_base, KMASK, brow, ok, sbk, cs_base, b, gs, t * BLOCK_N, skn, skd, NK, NG,
                         qk_scale, SLOTS, HEAD_DIM, BLOCK_M, BLOCK_N, HAS_KMASK, HAS_BIAS, False, DOT_PREC, ABLATE,
                         D_ACT)
        if t_hi > t_full:
            if t_full >= t_lo:
                _colsum_tile(q, lse2, k_base, KMASK, brow, ok, sbk, cs_base, b, gs, t_full * BLOCK_N, skn, skd, NK,
                             NG, qk_scale, SLOTS, HEAD_DIM, BLOCK_M, BLOCK_N, HAS_KMASK, HAS_BIAS, True, DOT_PREC,
                             ABLATE, D_ACT)


def _configs():
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "MMA_REDUCE": mma}, num_warps=w, num_stages=s)
            for mma in (False, True)
            for bm, bn, w, s in [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 128, 4, 3),
                                 (128, 128, 8, 2)]]


def _prune(configs, named_args, **kwargs):
    """BLOCK_M holds whole groups (>= SLOTS)."""
    slots = named_args.get("SLOTS", kwargs.get("SLOTS"))
    return [c for c in configs if c.kwargs["BLOCK_M"] >= slots]


_tuners: dict = {}


def _tuned(pin: str):
    """The autotuned kernel over both reductions, or over one (CHIPMUNK_COLSUM_REDUCE=sum|mma); one
    autotuner (and tuning cache) per choice, so a pinned run never reuses another's pick."""
    if pin not in _tuners:
        configs = [c for c in _configs() if pin not in ("sum", "mma") or c.kwargs["MMA_REDUCE"] == (pin == "mma")]
        _tuners[pin] = autotune(configs=configs, key=["N", "NK", "NG", "SLOTS", "HEAD_DIM", "D_ACT", "HAS_KMASK",
                                                      "HAS_BIAS", "QK_FP8", "DOT_PREC"],
                                prune_configs_by={"early_config_prune": _prune})(_attn_colsum_sampled_kernel)
    return _tuners[pin]


_offsets_cache: dict = {}


def _offsets(G: int, samples: int, device) -> torch.Tensor:
    key = (G, samples, device)
    if key not in _offsets_cache:  # built once per (group, samples, device): no copy per call
        _offsets_cache[key] = torch.tensor(sample_offsets(G, samples), dtype=torch.int32, device=device)
    return _offsets_cache[key]


def key_splits(row_tiles: int, bh: int, key_tiles: int, nsm: int) -> int:
    """Programs along the key axis: enough for about two waves, never more than there are key tiles."""
    return max(1, min(key_tiles, cdiv(2 * nsm, row_tiles * bh)))


# What ``ablate`` may skip (timing only, benchmarks/kernel_ablation.py): the exponentials, or the key
# tiles with their QKᵀ product.
ABLATIONS = {"": 0, "exp": 1, "keys": 2}


def attn_colsum_sampled(q, k, lse, *, scale: float, group: int, samples: int, key_mask=None, perm=None,
                        out_dtype=torch.float32, qk_fp8: bool = False, bias=None, ablate: str = ""):
    """``ablate`` (one of ABLATIONS; the result is then wrong) skips a piece of work, so that the time
    without it shows what the piece costs. The autotuner keeps the configuration it picked for the
    real call (ABLATE is not in its key): time the real call first."""
    B, Hq, N, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    assert Hq % Hkv == 0 and 1 <= D <= 256
    G = int(group)
    NG = math.ceil(N / G)
    offs = _offsets(G, samples, q.device)
    slots = offs.numel()
    colsum = new_empty(B, Hq, NG, Nk, dtype=out_dtype, device=q.device)
    bv = bias_view(bias, q, k)
    if qk_fp8:
        k = to_e4m3(k)
        if interpreting():  # the interpreter's in-kernel e4m3 cast does not round to nearest
            q = to_e4m3(q)
    lse_c = lse.reshape(B * Hq, N)
    if lse_c.dtype != torch.float32 or not lse_c.is_contiguous():
        lse_c = lse_c.float().contiguous()
    km = key_mask.to(torch.int8).contiguous() if key_mask is not None else lse_c
    pm = perm.to(torch.int32) if perm is not None and perm.dtype != torch.int32 else perm
    args = (q, k, lse_c, offs, pm if pm is not None else offs, km, bv if bv is not None else lse_c, colsum,
            *q.stride(), *k.stride(), *(bv.stride() if bv is not None else (0, 0, 0, 0)),
            N, Nk, Hq, Hq // Hkv, NG, G, scale * LOG2E)
    flags = dict(SLOTS=slots, HEAD_DIM=padded_head_dim(D), D_ACT=D, HAS_PERM=perm is not None,
                 HAS_KMASK=key_mask is not None, HAS_BIAS=bv is not None, DOT_PREC=dot_precision(q.dtype),
                 QK_FP8=qk_fp8, ABLATE=ABLATIONS[ablate])
    nsm = num_sms(q.device)

    def grid(meta):
        rows = cdiv(NG * slots, meta["BLOCK_M"])
        return rows, B * Hq, key_splits(rows, B * Hq, cdiv(Nk, meta["BLOCK_N"]), nsm)

    if interpreting():
        mma = os.environ.get("CHIPMUNK_COLSUM_REDUCE", "sum") == "mma"
        _attn_colsum_sampled_kernel[grid({"BLOCK_M": max(32, slots), "BLOCK_N": 32})](
            *args, BLOCK_M=max(32, slots), BLOCK_N=32, MMA_REDUCE=mma, **flags)
    else:
        _tuned(os.environ.get("CHIPMUNK_COLSUM_REDUCE", ""))[grid](*args, **flags)
    return colsum
