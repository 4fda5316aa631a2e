"""Reference (pure PyTorch) for the sparse-MLP second matmul accumulating into the output cache.

Contract (shared with ``mlp_sparse_mm2.py``):
- delta_packed (B, M, K) from mm1; w2 (Cout, F) any strides; y_cache (B, M, Cout);
  indices/counts/block/perm exactly as given to mm1.
- delta_packed rows are grouped positions p (as mm1 writes them), y_cache rows are token rows
  r = perm[p]: y_cache[b, r, :] += sum_{c < counts[b, m]} delta_packed[b, p, c] * w2[:, indices[b, m, c]]
  accumulated in fp32 and rounded once to y_cache.dtype (updated in place).
- Returns a fresh tensor equal to the updated y_cache (never the cache itself, so callers may
  keep the result while the cache moves on); with ``slope`` (B, M, Cout) and ``slope_coef`` (a 0-dim
  fp32 tensor; the error forecast) it returns ``torch.addcmul(y_cache, slope, slope_coef)`` instead:
  y + coef · slope from the rounded cache, rounded once. y_cache never holds the forecast.
"""

from __future__ import annotations

import torch

from .mlp_sparse_mm1_ref import block_positions, block_rows, safe_columns


def check_slope(slope, slope_coef, y_cache) -> None:
    """The forecast's operands: both or neither, slope shaped like y_cache, coef a 0-dim tensor."""
    if (slope is None) != (slope_coef is None):
        raise ValueError("mlp_sparse_mm2: slope and slope_coef come together")
    if slope is not None and (slope.shape != y_cache.shape or slope.dtype != y_cache.dtype or slope_coef.dim() != 0
                              or slope_coef.device != y_cache.device):
        raise ValueError(f"mlp_sparse_mm2: slope must be {tuple(y_cache.shape)} {y_cache.dtype} and slope_coef a "
                         f"0-dim tensor on {y_cache.device}; got {tuple(slope.shape)} {slope.dtype}, "
                         f"{slope_coef.dim()}-dim on {slope_coef.device}")


def mlp_sparse_mm2_ref(delta_packed, w2, indices, counts, y_cache, *, block: int, perm=None, slope=None,
                       slope_coef=None):
    check_slope(slope, slope_coef, y_cache)
    B, M, _ = delta_packed.shape
    places = block_positions(M, block, delta_packed.device)
    for b in range(B):
        for m, rows in enumerate(block_rows(M, block, perm, delta_packed.device)):
            cols, ok = safe_columns(indices[b, m], counts[b, m], w2.shape[1])
            acc = torch.where(ok, delta_packed[b, places[m]].float(), 0.0) @ w2[:, cols].float().T  # no host read of counts
            y_cache[b, rows] = (y_cache[b, rows].float() + acc).to(y_cache.dtype)
    return y_cache.clone() if slope is None else torch.addcmul(y_cache, slope, slope_coef)
