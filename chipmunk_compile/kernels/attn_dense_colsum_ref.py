"""Reference (pure PyTorch) for exact attention + per-query-group column sums.

Contract (shared with the Triton kernel ``attn_dense_colsum.py``, see docs/design.md):
- q (B, Hq, N, D), k/v (B, Hkv, Nk, D), any strides, Hq % Hkv == 0 (kv head = h // (Hq // Hkv)).
- Returns ``(o, lse, colsum)``: o (B, Hq, N, D) in q.dtype stored as a (B, N, Hq, D) buffer;
  lse (B, Hq, N) fp32 natural-log softmax normalizer; colsum (B, Hq, ceil(N/G), Nk) fp32 or None.
- colsum[b, h, g, j] = sum over queries q of group g of exp(s_qj - lse_ref_q) with
  lse_ref = prev_lse if given else the current lse. Group g = queries perm[g*G:(g+1)*G] when perm
  is given, else g*G .. g*G+G-1; the last group may be short.
- bias: None or a float tensor broadcasting to (B, Hq, N, Nk) (SDPA's float attn_mask, read through
  ``bias_view``), added to the scaled scores: s_qj = scale * q.k_j + bias[b, h, q, j]; it may hold -inf.
  Rows are original query indices (perm only orders the groups).
- key_mask (B, Nk) bool, False keys get score -inf (never attended, colsum 0); key_mask and bias
  both apply. Every row must have at least one attendable key: rows that key_mask and bias together
  mask entirely are not supported (their o is NaN).
- All math in fp32; loops over heads so the (N, Nk) score matrix of one head is the peak memory.
"""

from __future__ import annotations

import math

import torch

from ._common import bias_view, empty_bnhd


def attn_dense_colsum_ref(q, k, v, *, scale: float, group: int, key_mask=None, perm=None, prev_lse=None,
                          want_colsum: bool = True, bias=None):
    B, Hq, N, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    rep = Hq // Hkv
    G = int(group)
    Gc = math.ceil(N / G)
    o = empty_bnhd(B, Hq, N, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, N, dtype=torch.float32, device=q.device)
    colsum = torch.zeros(B, Hq, Gc, Nk, dtype=torch.float32, device=q.device) if want_colsum else None
    if perm is not None:
        perm_l = perm.long()
    bv = bias_view(bias, q, k)
    for b in range(B):
        kmask = None if key_mask is None else key_mask[b].bool()
        for h in range(Hq):
            qf = q[b, h].float()
            kf = k[b, h // rep].float()
            vf = v[b, h // rep].float()
            s = (qf @ kf.T) * scale  # (N, Nk)
            if bv is not None:
                s = s + bv[b, h].float()
            if kmask is not None:
                s = s.masked_fill(~kmask[None, :], float("-inf"))
            row_lse = torch.logsumexp(s, dim=-1)
            o[b, h] = (torch.exp(s - row_lse[:, None]) @ vf).to(q.dtype)
            lse[b, h] = row_lse
            if want_colsum:
                ref = row_lse if prev_lse is None else prev_lse[b, h].float()
                p = torch.exp(s - ref[:, None])
                if perm is not None:
                    p = p[perm_l]
                pad = Gc * G - N
                if pad:
                    p = torch.cat([p, p.new_zeros(pad, Nk)], dim=0)
                colsum[b, h] = p.view(Gc, G, Nk).sum(dim=1)
    return o, lse, colsum
