"""Triton: exact non-causal attention (FA2-style online softmax) + per-query-group column sums.

Same signature and contract as ``attn_dense_colsum_ref.attn_dense_colsum_ref`` (read it first).

Kernel invariants:
- One program = BLOCK_M consecutive *positions* of the query order (perm order when perm is given)
  of one (b, h). Q rows are gathered through perm, O/lse rows are scattered back through perm, so
  outputs are always in original query order. Group of position p is p // G, so any G works; a
  tile touching several groups adds one partial column sum per group it touches.
- G is a constexpr (one compile per group size; G % BLOCK_M == 0 is the fastest case).
- Column sums are accumulated with fp32 atomics into a zero-initialised (B, Hq, ceil(N/G), Nk)
  buffer (summation order is not deterministic; ~1e-6 relative).
- With prev_lse: one pass; p_ref = p * exp2(m_i - lse_ref) reuses the softmax numerator (no second
  exp per score). Without prev_lse (lse_ref = the current lse): a first pass computes o and lse, a
  second QK^T-only pass (COMPUTE_O=False) computes the column sums: cost about 1.5x dense.
- Scores are kept in the log2 domain (qk_scale = scale * log2 e); lse is stored in natural log.
- bias (HAS_BIAS, constexpr: unbiased calls compile to the same code as without it): its
  (B, Hq, N, Nk) view is read by strides at the program's original query rows (after the perm
  gather) and added to the scores in the log2 domain, in both passes, before the max and exp2.
- Masked keys (key_mask False), -inf bias entries and the Nk tail get score -inf; a tile that is
  fully masked for a row uses a safe max of 0 so no NaN appears, and the column-sum pass gets
  exp2(-inf - ref2) = 0 (rows masked everywhere are not supported).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ._common import LOG2E, autotune, bias_view, cdiv, dot_precision, empty_bnhd, interpreting, new_empty
from ._tiles import key_allowed, load_bias, load_rows, padded_head_dim, row_col_mask


@triton.jit
def _colsum(pr, MMA: tl.constexpr, DT: tl.constexpr, BLOCK_M: tl.constexpr):
    """Column sums of a [BLOCK_M, BLOCK_N] probability tile. MMA: on tensor cores, as prᵀ·1 with a
    [BLOCK_M, 16] ones operand (pr rounded to the input dtype, fp32 accumulation; all 16 result
    columns are equal, so the max over them is exact); else a reduction over rows (cross-warp)."""
    if MMA:
        ones = tl.full([BLOCK_M, 16], 1.0, DT)
        return tl.max(tl.dot(tl.trans(pr.to(DT)), ones), 1)
    else:
        return tl.sum(pr, 0)


@triton.jit
def _tile(q, k_base, v_base, KMASK, cs_base, b, start_n, m_i, l_i, acc, ref2, grp, g_lo, g_hi, skn, skd, svn, svd,
          NK, qk_scale, bias_rows, sbk, row_ok, G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
          BLOCK_N: tl.constexpr, HAS_KMASK: tl.constexpr, HAS_BIAS: tl.constexpr, COMPUTE_O: tl.constexpr,
          WANT_COLSUM: tl.constexpr, TAIL: tl.constexpr, DOT_PREC: tl.constexpr, MMA: tl.constexpr,
          D_ACT: tl.constexpr):
    # One BLOCK_N key tile (TAIL: the one crossing Nk, the only one with masked loads).
    cols = start_n + tl.arange(0, BLOCK_N)
    col_in = cols < NK
    k = load_rows(k_base, cols, col_in, skn, skd, HEAD_DIM, TAIL, D_ACT)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    if HAS_BIAS:  # int64 column offsets: a transposed bias has sbk = N
        s += load_bias(bias_rows + cols.to(tl.int64)[None, :] * sbk, row_ok[:, None] & col_in[None, :])
    if HAS_KMASK:
        s = tl.where(key_allowed(KMASK, b, cols, col_in, NK)[None, :], s, float("-inf"))
    elif TAIL:
        s = tl.where(col_in[None, :], s, float("-inf"))
    if COMPUTE_O:
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = load_rows(v_base, cols, col_in, svn, svd, HEAD_DIM, TAIL, D_ACT)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
        if WANT_COLSUM:
            pr = p * tl.exp2(m_safe - ref2)[:, None]
    else:
        pr = tl.exp2(s - ref2[:, None])
    if WANT_COLSUM:
        # G is constexpr, so the group bookkeeping resolves at compile time.
        if G % BLOCK_M == 0:  # the tile lies inside one group
            tl.atomic_add(cs_base + g_lo * NK + cols, _colsum(pr, MMA, q.dtype, BLOCK_M), mask=col_in, sem="relaxed")
        elif BLOCK_M <= G:  # at most two groups
            cs0 = _colsum(tl.where((grp == g_lo)[:, None], pr, 0.0), MMA, q.dtype, BLOCK_M)
            cs1 = _colsum(tl.where((grp != g_lo)[:, None], pr, 0.0), MMA, q.dtype, BLOCK_M)
            tl.atomic_add(cs_base + g_lo * NK + cols, cs0, mask=col_in, sem="relaxed")
            if g_hi > g_lo:
                tl.atomic_add(cs_base + g_hi * NK + cols, cs1, mask=col_in, sem="relaxed")
        else:
            for g in range(g_lo, g_hi + 1):
                cs = _colsum(tl.where((grp == g)[:, None], pr, 0.0), MMA, q.dtype, BLOCK_M)
                tl.atomic_add(cs_base + g * NK + cols, cs, mask=col_in, sem="relaxed")
    return m_i, l_i, acc


@triton.jit
def _attn_dense_colsum_kernel(
    Q, K, V, O, LSE, LSE_REF, COLSUM, KMASK, PERM, BIAS,  #
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod, sbb, sbh, sbn, sbk,  #
    N, NK, HQ, KV_REP, NG, qk_scale,  #
    G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  #
    HAS_PERM: tl.constexpr, HAS_KMASK: tl.constexpr, HAS_BIAS: tl.constexpr, COMPUTE_O: tl.constexpr,  #
    WANT_COLSUM: tl.constexpr,  #
    DOT_PREC: tl.constexpr, COLSUM_MMA: tl.constexpr, D_ACT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    hk = h // KV_REP
    pos = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = pos < N
    if HAS_PERM:
        qi = tl.load(PERM + pos, mask=row_ok, other=0)
    else:
        qi = pos
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * sqb + h * sqh + qi[:, None] * sqn + offs_d[None, :] * sqd,
                mask=row_col_mask(row_ok, HEAD_DIM, D_ACT), other=0.0)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    if HAS_BIAS:  # (BLOCK_M, 1) row pointers; a full bias at video sizes has > 2**31 elements
        bias_rows = BIAS + b.to(tl.int64) * sbb + h.to(tl.int64) * sbh + qi.to(tl.int64)[:, None] * sbn
    else:  # unused placeholder
        bias_rows = BIAS

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if WANT_COLSUM:
        # Rows past N get lse_ref = +inf so their p_ref is exactly 0.
        ref2 = tl.load(LSE_REF + pid_bh * N + qi, mask=row_ok, other=float("inf")) * 1.4426950408889634
        g_lo = (pid_m * BLOCK_M) // G
        g_hi = (tl.minimum(pid_m * BLOCK_M + BLOCK_M, N) - 1) // G
        grp = pos // G
        cs_base = COLSUM + pid_bh.to(tl.int64) * NG * NK  # > 2**31 elements at video sizes
    else:  # unused placeholders
        ref2 = m_i
        grp = pos
        g_lo = 0
        g_hi = 0
        cs_base = LSE
    n_full = (NK // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        m_i, l_i, acc = _tile(q, k_base, v_base, KMASK, cs_base, b, start_n, m_i, l_i, acc, ref2, grp, g_lo, g_hi,
                              skn, skd, svn, svd, NK, qk_scale, bias_rows, sbk, row_ok, G, HEAD_DIM, BLOCK_M, BLOCK_N,
                              HAS_KMASK, HAS_BIAS, COMPUTE_O, WANT_COLSUM, False, DOT_PREC, COLSUM_MMA, D_ACT)
    if n_full < NK:
        m_i, l_i, acc = _tile(q, k_base, v_base, KMASK, cs_base, b, n_full, m_i, l_i, acc, ref2, grp, g_lo, g_hi,
                              skn, skd, svn, svd, NK, qk_scale, bias_rows, sbk, row_ok, G, HEAD_DIM, BLOCK_M, BLOCK_N,
                              HAS_KMASK, HAS_BIAS, COMPUTE_O, WANT_COLSUM, True, DOT_PREC, COLSUM_MMA, D_ACT)

    if COMPUTE_O:
        o = acc / l_i[:, None]
        tl.store(O + b * sob + h * soh + qi[:, None] * son + offs_d[None, :] * sod, o.to(O.dtype.element_ty),
                 mask=row_col_mask(row_ok, HEAD_DIM, D_ACT))
        tl.store(LSE + pid_bh * N + qi, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=row_ok)


# Column sums on tensor cores (_colsum MMA) or by a row reduction; CHIPMUNK_COLSUM_MMA=0/1 overrides.
COLSUM_MMA_DEFAULT = "0"


def _configs():
    out = []
    for bm, bn, w, s in [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 3)]:
        out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s))
    return out


_tuned = autotune(configs=_configs(), key=["N", "NK", "G", "HEAD_DIM", "D_ACT", "HAS_BIAS", "COMPUTE_O", "WANT_COLSUM",
                                          "DOT_PREC", "COLSUM_MMA"],
                  reset_to_zero=["COLSUM"])(_attn_dense_colsum_kernel)


def _launch(q, k, v, o, lse, lse_ref, colsum, key_mask, perm, bias, *, scale, G, NG, compute_o, want_colsum):
    B, Hq, N, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    dummy = lse  # placeholder pointer for absent optional tensors (never dereferenced)
    args = (
        q, k, v, o if o is not None else q, lse, lse_ref if lse_ref is not None else dummy,
        colsum if colsum is not None else dummy,
        key_mask if key_mask is not None else dummy, perm if perm is not None else dummy,
        bias if bias is not None else dummy,
        *q.stride(), *k.stride(), *v.stride(), *(o.stride() if o is not None else q.stride()),
        *(bias.stride() if bias is not None else (0, 0, 0, 0)),
        N, Nk, Hq, Hq // Hkv, NG, scale * LOG2E,
    )
    flags = dict(G=G, HEAD_DIM=padded_head_dim(D), D_ACT=D, HAS_PERM=perm is not None, HAS_KMASK=key_mask is not None,
                 HAS_BIAS=bias is not None, COMPUTE_O=compute_o,
                 WANT_COLSUM=want_colsum, DOT_PREC=dot_precision(q.dtype),
                 COLSUM_MMA=want_colsum and os.environ.get("CHIPMUNK_COLSUM_MMA", COLSUM_MMA_DEFAULT) == "1")
    if interpreting():
        _attn_dense_colsum_kernel[(cdiv(N, 32), B * Hq)](*args, BLOCK_M=32, BLOCK_N=32, **flags)
    else:
        grid = lambda meta: (cdiv(N, meta["BLOCK_M"]), B * Hq)  # noqa: E731
        _tuned[grid](*args, **flags)


def attn_dense_colsum(q, k, v, *, scale: float, group: int, key_mask=None, perm=None, prev_lse=None,
                      want_colsum: bool = True, bias=None):
    B, Hq, N, D = q.shape
    Nk = k.shape[2]
    assert Hq % k.shape[1] == 0 and k.shape[2] == v.shape[2] and 1 <= D <= 256
    G = int(group)
    NG = math.ceil(N / G)
    o = empty_bnhd(B, Hq, N, D, dtype=q.dtype, device=q.device)
    lse = new_empty(B, Hq, N, dtype=torch.float32, device=q.device)
    km = None
    if key_mask is not None:
        km = key_mask.to(torch.int8).contiguous()
    pm = None if perm is None else perm.to(torch.int32).contiguous()
    bv = bias_view(bias, q, k)
    colsum = torch.zeros(B, Hq, NG, Nk, dtype=torch.float32, device=q.device) if want_colsum else None
    if want_colsum and prev_lse is not None:
        _launch(q, k, v, o, lse, prev_lse.float().contiguous(), colsum, km, pm, bv, scale=scale, G=G, NG=NG,
                compute_o=True, want_colsum=True)
    else:
        _launch(q, k, v, o, lse, None, None, km, pm, bv, scale=scale, G=G, NG=NG, compute_o=True, want_colsum=False)
        if want_colsum:
            _launch(q, k, v, None, lse, lse, colsum, km, pm, bv, scale=scale, G=G, NG=NG, compute_o=False,
                    want_colsum=True)
    return o, lse, colsum
