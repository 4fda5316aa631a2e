"""Reference (pure PyTorch) for the sparse-MLP first matmul with fused activation-cache update.

Contract (shared with ``mlp_sparse_mm1.py``):
- x (B, M, C); w_act/w_lin (F, C); b_act/b_lin (F,) or None; h_cache (B, M, F) any strides
  (``mlp_alloc_h_cache`` gives the preferred neuron-major layout).
- Grouped positions: position p of the grouped token order is x row r = perm[p] (r = p without
  perm); token block m = positions m*block .. (m+1)*block - 1. indices (B, ceil(M/block), K) int32,
  counts (B, ceil(M/block)) int32.
- h_cache and delta_packed are indexed by grouped position p, not by x row: the kernels then read
  and write a token block's cache rows contiguously whatever the permutation (a dense step stores
  h[:, perm] into h_cache). Only x (and mm2's y_cache) are indexed by row.
- For c < counts[b, m], j = indices[b, m, c], r = perm[p]:
  h_new = act(x_r . w_act[j] + b_act[j]) [* (x_r . w_lin[j] + b_lin[j])] computed in fp32 and rounded
  to h_cache.dtype; delta_packed[b, p, c] = h_new - h_cache[b, p, j] (fp32 difference, rounded to
  x.dtype); then h_cache[b, p, j] = h_new (in place). delta_packed[b, p, c] = 0 for c >= counts.
- Rounding h_new before the difference keeps y_cache == fc2(h_cache) up to delta rounding only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def apply_act(z: torch.Tensor, act: str, *, inplace: bool = False) -> torch.Tensor:
    """The named activation of z; with inplace=True z itself is overwritten and returned."""
    if act == "gelu":
        return torch.ops.aten.gelu_(z) if inplace else F.gelu(z)
    if act == "gelu_tanh":
        return torch.ops.aten.gelu_(z, approximate="tanh") if inplace else F.gelu(z, approximate="tanh")
    if act == "silu":
        return F.silu(z, inplace=inplace)
    if act == "relu":
        return F.relu(z, inplace=inplace)
    if act == "relu2":  # squared relu
        return F.relu(z, inplace=True).square_() if inplace else F.relu(z).square()
    raise ValueError(f"unknown activation {act!r}")


def block_rows(M: int, block: int, perm, device) -> list:
    """Row index tensor of each token block, in block order."""
    order = torch.arange(M, device=device) if perm is None else perm.long()
    return [order[i * block:(i + 1) * block] for i in range(math.ceil(M / block))]


def block_positions(M: int, block: int, device) -> list:
    """Grouped-position index tensor of each token block (where its h_cache / delta rows live)."""
    return [torch.arange(i * block, min((i + 1) * block, M), device=device) for i in range(math.ceil(M / block))]


def safe_columns(indices_row, counts_one, n_cols: int):
    """(cols, ok) for one token block without reading counts on the host (so a CUDA graph can
    record it): all K entries clamped into range(n_cols), those past counts pointed at the block's
    first column, which the callers then write with that column's own value (duplicate writes of
    equal values)."""
    K = indices_row.shape[-1]
    indices_row = indices_row.clamp(0, n_cols - 1)
    ok = torch.arange(K, device=indices_row.device) < counts_one
    cols = torch.where(ok, indices_row.long(), indices_row[..., :1].long())
    return cols, ok


def mlp_sparse_mm1_ref(x, w_act, b_act, w_lin, b_lin, indices, counts, h_cache, *, act: str, block: int,
                       perm=None):
    B, M, C = x.shape
    places = block_positions(M, block, x.device)
    delta = torch.zeros(B, M, indices.shape[-1], dtype=x.dtype, device=x.device)
    for b in range(B):
        for m, rows in enumerate(block_rows(M, block, perm, x.device)):
            at = places[m]
            cols, ok = safe_columns(indices[b, m], counts[b, m], h_cache.shape[-1])
            xr = x[b, rows].float()
            h = apply_act(xr @ w_act[cols].float().T + (b_act[cols].float() if b_act is not None else 0.0), act)
            if w_lin is not None:
                h = h * (xr @ w_lin[cols].float().T + (b_lin[cols].float() if b_lin is not None else 0.0))
            h = h.to(h_cache.dtype)
            old = h_cache[b][at[:, None], cols[None, :]]
            delta[b, at] = torch.where(ok, h.float() - old.float(), 0.0).to(x.dtype)
            # past counts: the first column's value, the new one when the block has any column
            first = torch.where(counts[b, m] > 0, h[:, :1], old[:, :1])
            h_cache[b][at[:, None], cols[None, :]] = torch.where(ok, h, first)
    return delta
