"""Reference (pure PyTorch) for column-sparse attention over per-query-group key sets.

Contract (shared with the Triton kernel ``attn_column_sparse.py``):
- q (B, Hq, N, D), k/v (B, Hkv, Nk, D), any strides; GQA kv head = h // (Hq // Hkv).
- indices (B, Hq, ceil(N/G), K) int32, counts (B, Hq, ceil(N/G)) int32: group g of head h attends
  exactly the key columns indices[b, h, g, :counts[b, h, g]] (entries past counts are ignored).
- Default ("self-normalized", the published form): attn_S = softmax over S of (q k_S^T * scale) @ v_S.
  With lse (B, Hq, N) fp32 given ("exact normalizer"): attn_S = sum_{j in S} exp(s_qj - lse_q) v_j.
  A group with counts == 0 contributes 0.
- ``bias`` (SDPA's float attn_mask: broadcasts to (B, Hq, N, Nk), any float dtype, may hold -inf;
  read through ``_common.bias_view``) is added to the scaled scores of the selected columns:
  s_qj = scale * q·k_j + bias[b, h, q, j], q the original query row, j the gathered column. A row
  whose selected scores are all -inf contributes 0 (as counts == 0; no NaN).
- Returns o = o_base + slope_coef * o_slope + sign * attn_S (o_base / o_slope None -> 0; o_slope
  (B, Hq, N, D) any strides, slope_coef a 1-element fp32 device tensor: the residual forecast of
  ops/attention.py, read on the device) in q.dtype, stored as a (B, N, Hq, D) buffer; rows in
  original query order (perm only decides which queries form a group).
- ``out`` (B, Hq, N, D), any strides: o is written there (and returned) instead of a new buffer;
  it may be ``measure``'s prev, never o_base / o_slope.
- ``measure`` = (prev, slope_out, inv_dt): also slope_out = (o − prev) · inv_dt from o before its
  rounding to q.dtype (prev and slope_out (B, Hq, N, D), inv_dt a 1-element fp32 device tensor);
  prev is read before out is written. The refresh's cache build and the residual forecast's slope
  in one pass (ops/attention.py).
- fp32 math, vectorized over the groups of one (b, h).
"""

from __future__ import annotations

import torch

from ._common import bias_view, empty_bnhd


def attn_column_sparse_ref(q, k, v, indices, counts, *, scale: float, group: int, perm=None, o_base=None,
                           sign: float = 1.0, lse=None, o_slope=None, slope_coef=None, out=None, measure=None,
                           bias=None):
    B, Hq, N, D = q.shape
    bias = bias_view(bias, q, k)
    coef = slope_coef.reshape(()).float() if o_slope is not None else None
    if measure is not None:
        prev, slope_out, inv_dt = measure
        inv_dt = inv_dt.reshape(()).float()
    rep = Hq // k.shape[1]
    G = int(group)
    Gc, K = indices.shape[2], indices.shape[3]
    pad = Gc * G - N
    order = torch.arange(N, device=q.device) if perm is None else perm.long()
    # Row positions of each group (padded with row 0, masked out below).
    rows = torch.cat([order, order.new_zeros(pad)]).view(Gc, G)
    col_ok = torch.arange(K, device=q.device)[None, :] < counts.long()[..., None]  # (B,Hq,Gc,K)
    o = empty_bnhd(B, Hq, N, D, dtype=q.dtype, device=q.device) if out is None else out
    for b in range(B):
        for h in range(Hq):
            idx = indices[b, h].long().clamp_(0, k.shape[2] - 1)
            qg = q[b, h].float()[rows]  # (Gc, G, D)
            kg = k[b, h // rep].float()[idx]  # (Gc, K, D)
            vg = v[b, h // rep].float()[idx]
            s = torch.einsum("gqd,gkd->gqk", qg, kg) * scale
            if bias is not None:
                s = s + bias[b, h][rows[:, :, None], idx[:, None, :]].float()  # (Gc, G, K)
            ok = col_ok[b, h][:, None, :]
            if lse is None:
                s = s.masked_fill(~ok, float("-inf"))
                m = s.amax(dim=-1, keepdim=True).clamp_min(-1e30)  # all -inf rows (count 0, bias) -> 0
                p = torch.exp(s - m)
                l = p.sum(dim=-1, keepdim=True)
                p = torch.where(l > 0, p / l.clamp_min(1e-30), torch.zeros_like(p))
            else:
                p = torch.exp(s - lse[b, h].float()[rows][..., None]) * ok
            # (N, D) in group order: the padded rows come last (a slice, not a mask: no host sync,
            # so a CUDA graph can record this path, the GPU fallback for head dims the kernel lacks)
            a = torch.einsum("gqk,gkd->gqd", p, vg).reshape(Gc * G, D)[:N]
            a = sign * a
            if o_base is not None:
                a = a + o_base[b, h].float()[order]
            if o_slope is not None:
                a = a + coef * o_slope[b, h].float()[order]
            if measure is not None:  # (b, h)'s prev rows are read before its out rows are written
                slope_out[b, h, order] = ((a - prev[b, h].float()[order]) * inv_dt).to(slope_out.dtype)
            o[b, h, order] = a.to(o.dtype)
    return o
