"""Reference (pure PyTorch) for the sparse-MLP second matmul accumulating into the output cache.

Contract (shared with ``mlp_sparse_mm2.py``):
- delta_packed (B, M, K) from mm1; w2 (Cout, F) any strides; y_cache (B, M, Cout);
  indices/counts/block/perm exactly as given to mm1.
- delta_packed rows are grouped positions p (as mm1 writes them), y_cache rows are token rows
  r = perm[p]: y_cache[b, r, :] += sum_{c < counts[b, m]} delta_packed[b, p, c] * w2[:, indices[b, m, c]]
  accumulated in fp32 and rounded once to y_cache.dtype (updated in place).
- Returns a fresh tensor equal to the updated y_cache (never the cache itself, so callers may
  keep the result while the cache moves on).
"""

from __future__ import annotations

import torch

from .mlp_sparse_mm1_ref import block_positions, block_rows, safe_columns


def mlp_sparse_mm2_ref(delta_packed, w2, indices, counts, y_cache, *, block: int, perm=None):
    B, M, _ = delta_packed.shape
    places = block_positions(M, block, delta_packed.device)
    for b in range(B):
        for m, rows in enumerate(block_rows(M, block, perm, delta_packed.device)):
            cols, ok = safe_columns(indices[b, m], counts[b, m], w2.shape[1])
            acc = torch.where(ok, delta_packed[b, places[m]].float(), 0.0) @ w2[:, cols].float().T  # no host read of counts
            y_cache[b, rows] = (y_cache[b, rows].float() + acc).to(y_cache.dtype)
    return y_cache.clone()
