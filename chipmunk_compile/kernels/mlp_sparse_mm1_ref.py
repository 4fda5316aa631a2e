"""Reference (pure PyTorch) for the sparse-MLP first matmul with fused activation-cache update.

Contract (shared with ``mlp_sparse_mm1.py``):
- x (B, M, C); w_act/w_lin (F, C); b_act/b_lin (F,) or None; h_cache (B, M, F) any strides
  (``mlp_alloc_h_cache`` gives the preferred neuron-major layout).
- Token block m = rows perm[m*block:(m+1)*block] (or contiguous rows); indices (B, ceil(M/block), K)
  int32, counts (B, ceil(M/block)) int32.
- For c < counts[b, m], j = indices[b, m, c]:
  h_new = act(x_r . w_act[j] + b_act[j]) [* (x_r . w_lin[j] + b_lin[j])] computed in fp32 and rounded
  to h_cache.dtype; delta_packed[b, r, c] = h_new - h_cache[b, r, j] (fp32 difference, rounded to
  x.dtype); then h_cache[b, r, j] = h_new (in place). delta_packed[b, r, c] = 0 for c >= counts.
- Rounding h_new before the difference keeps y_cache == fc2(h_cache) up to delta rounding only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def apply_act(z: torch.Tensor, act: str) -> torch.Tensor:
    if act == "gelu":
        return F.gelu(z)
    if act == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if act == "silu":
        return F.silu(z)
    if act == "relu":
        return F.relu(z)
    raise ValueError(f"unknown activation {act!r}")


def block_rows(M: int, block: int, perm, device) -> list:
    """Row index tensor of each token block, in block order."""
    order = torch.arange(M, device=device) if perm is None else perm.long()
    return [order[i * block:(i + 1) * block] for i in range(math.ceil(M / block))]


def mlp_sparse_mm1_ref(x, w_act, b_act, w_lin, b_lin, indices, counts, h_cache, *, act: str, block: int,
                       perm=None):
    B, M, C = x.shape
    K = indices.shape[-1]
    delta = torch.zeros(B, M, K, dtype=x.dtype, device=x.device)
    for b in range(B):
        for m, rows in enumerate(block_rows(M, block, perm, x.device)):
            cnt = int(counts[b, m])
            if cnt <= 0:
                continue
            cols = indices[b, m, :cnt].long()
            xr = x[b, rows].float()
            h = apply_act(xr @ w_act[cols].float().T + (b_act[cols].float() if b_act is not None else 0.0), act)
            if w_lin is not None:
                h = h * (xr @ w_lin[cols].float().T + (b_lin[cols].float() if b_lin is not None else 0.0))
            h = h.to(h_cache.dtype)
            old = h_cache[b][rows[:, None], cols[None, :]]
            delta[b, rows, :cnt] = (h.float() - old.float()).to(x.dtype)
            h_cache[b][rows[:, None], cols[None, :]] = h
    return delta
