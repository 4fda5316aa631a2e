"""Triton: column-sparse attention of each query group over its own gathered key columns.

Same signature and contract as ``attn_column_sparse_ref.attn_column_sparse_ref`` (read it first).

Kernel invariants:
- One program = one BLOCK_M-row tile of one query group g of one (b, h); a group of G rows is
  covered by ceil(G / BLOCK_M) tiles (the last one masked when BLOCK_M does not divide G, which
  wastes compute: prefer G % BLOCK_M == 0). G is a constexpr.
- The loop runs over ceil(counts / BLOCK_N) tiles of the group's index list only; K/V rows are
  gathered by index into dense tiles (pointer gathers, software-pipelined). Entries past counts
  are masked to index 0 (always a valid row) and their scores set to -inf / weight 0, so the
  index padding is never trusted.
- Self-normalized mode: online softmax over S alone; a group with counts == 0 yields 0.
  Exact-normalizer mode (lse given): p = exp2(s*log2e - lse*log2e), no max/renormalisation.
- Epilogue: o = o_base + sign * attn_S in one store (o_base read as the accumulator init; the
  output is a fresh (B, N, Hq, D)-layout buffer, so o_base may alias nothing it writes).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import LOG2E, cdiv, dot_precision, empty_bnhd, interpreting


@triton.jit
def _attn_column_sparse_kernel(
    Q, K, V, O, OB, IDX, CNT, LSE, PERM,  #
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod, sbb, sbh, sbn, sbd,  #
    sib, sih, sig, scb, sch,  #
    N, HQ, KV_REP, NG, qk_scale, sign,  #
    G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  #
    HAS_PERM: tl.constexpr, HAS_OB: tl.constexpr, HAS_LSE: tl.constexpr, DOT_PREC: tl.constexpr,
):
    TPG: tl.constexpr = (G + BLOCK_M - 1) // BLOCK_M
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    g = pid // TPG
    t = pid % TPG
    b = pid_bh // HQ
    h = pid_bh % HQ
    hk = h // KV_REP
    loc = t * BLOCK_M + tl.arange(0, BLOCK_M)
    pos = g * G + loc
    row_ok = (loc < G) & (pos < N)
    if HAS_PERM:
        qi = tl.load(PERM + pos, mask=row_ok, other=0)
    else:
        qi = pos
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * sqb + h * sqh + qi[:, None] * sqn + offs_d[None, :] * sqd, mask=row_ok[:, None], other=0.0)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    idx_base = IDX + b * sib + h * sih + g * sig
    cnt = tl.load(CNT + b * scb + h * sch + g)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if HAS_LSE:
        ref2 = tl.load(LSE + pid_bh * N + qi, mask=row_ok, other=float("inf")) * 1.4426950408889634

    for start in range(0, cnt, BLOCK_N):
        c = start + tl.arange(0, BLOCK_N)
        c_ok = c < cnt
        j = tl.load(idx_base + c, mask=c_ok, other=0)
        k = tl.load(k_base + j[:, None] * skn + offs_d[None, :] * skd)
        v = tl.load(v_base + j[:, None] * svn + offs_d[None, :] * svd)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        s = tl.where(c_ok[None, :], s, float("-inf"))
        if HAS_LSE:
            p = tl.exp2(s - ref2[:, None])
            acc += tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
            m_i = m_new

    if HAS_LSE:
        out = acc * sign
    else:
        out = acc * (sign / tl.where(l_i > 0, l_i, 1.0))[:, None]
    if HAS_OB:
        ob = tl.load(OB + b * sbb + h * sbh + qi[:, None] * sbn + offs_d[None, :] * sbd, mask=row_ok[:, None],
                     other=0.0)
        out += ob.to(tl.float32)
    tl.store(O + b * sob + h * soh + qi[:, None] * son + offs_d[None, :] * sod, out.to(O.dtype.element_ty),
             mask=row_ok[:, None])


def _configs():
    out = []
    for bm, bn, w, s in [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (64, 64, 4, 4),
                         (64, 128, 4, 3), (64, 64, 4, 2), (64, 32, 4, 4)]:
        out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s))
    return out


_tuned = triton.autotune(configs=_configs(), key=["N", "G", "HEAD_DIM", "HAS_LSE", "HAS_OB", "DOT_PREC"])(
    _attn_column_sparse_kernel)


def attn_column_sparse(q, k, v, indices, counts, *, scale: float, group: int, perm=None, o_base=None,
                       sign: float = 1.0, lse=None):
    B, Hq, N, D = q.shape
    Hkv = k.shape[1]
    assert Hq % Hkv == 0 and D in (16, 32, 64, 128, 256)
    G = int(group)
    NG = indices.shape[2]
    assert NG == math.ceil(N / G), "indices must have ceil(N/G) groups"
    o = empty_bnhd(B, Hq, N, D, dtype=q.dtype, device=q.device)
    idx = indices if indices.stride(-1) == 1 else indices.contiguous()
    idx = idx.to(torch.int32)
    cnt = counts.to(torch.int32)
    if cnt.stride(-1) != 1:
        cnt = cnt.contiguous()
    pm = None if perm is None else perm.to(torch.int32).contiguous()
    lse_c = None if lse is None else lse.float().contiguous()
    ob = o_base
    args = (
        q, k, v, o, ob if ob is not None else q, idx, cnt, lse_c if lse_c is not None else cnt,
        pm if pm is not None else cnt,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(), *(ob.stride() if ob is not None else q.stride()),
        idx.stride(0), idx.stride(1), idx.stride(2), cnt.stride(0), cnt.stride(1),
        N, Hq, Hq // Hkv, NG, scale * LOG2E, float(sign),
    )
    flags = dict(G=G, HEAD_DIM=D, HAS_PERM=pm is not None, HAS_OB=ob is not None, HAS_LSE=lse_c is not None,
                 DOT_PREC=dot_precision(q.dtype))
    if interpreting():
        _attn_column_sparse_kernel[(NG * cdiv(G, 32), B * Hq)](*args, BLOCK_M=32, BLOCK_N=32, **flags)
    else:
        grid = lambda meta: (NG * cdiv(G, meta["BLOCK_M"]), B * Hq)  # noqa: E731
        _tuned[grid](*args, **flags)
    return o
