"""Top-k key-column selection per (batch, head, query group) from column sums (PyTorch only).

Contract:
- colsum (B, H, Gc, Nk) float. K = min(Nk, k + n_always + random_keys), n_always = always_keep.sum().
- Selected set = always_keep columns (all of them) + ``random_keys`` random columns per row (uniform
  among selectable, non-always columns; ``generator`` makes it reproducible) + the top columns by
  colsum filling the rest. Masked keys (key_mask (B, Nk) False) are never selected.
- Returns indices (B, H, Gc, K) int32 with the valid entries first, sorted ascending, entries past
  counts set to 0; counts (B, H, Gc) int32 = min(K, number of selectable keys).
- Implemented as one torch.topk over boosted scores (+inf always, float-max random, -inf masked);
  fast enough on GPU (not a measured hotspot), so there is no Triton version.
"""

from __future__ import annotations

import torch


def select_columns_ref(colsum, *, k: int, key_mask=None, always_keep=None, random_keys: int = 0, generator=None):
    B, H, Gc, Nk = colsum.shape
    dev = colsum.device
    n_always = int(always_keep.sum()) if always_keep is not None else 0
    K = max(1, min(Nk, int(k) + n_always + int(random_keys)))
    scores = colsum.float().clone()
    blocked = torch.zeros(B, 1, 1, Nk, dtype=torch.bool, device=dev)
    if key_mask is not None:
        blocked |= ~key_mask.bool().view(B, 1, 1, Nk)
    if always_keep is not None:
        ak = always_keep.bool().view(1, 1, 1, Nk)
    if random_keys > 0:
        r = torch.rand(B, H, Gc, Nk, generator=generator, device=dev)
        excl = blocked if always_keep is None else (blocked | ak)
        r = r.masked_fill(excl, -1.0)
        pick = r.topk(min(int(random_keys), Nk), dim=-1).indices
        scores.scatter_(-1, pick, torch.finfo(torch.float32).max)
    if always_keep is not None:
        scores = scores.masked_fill(ak, float("inf"))
    scores = scores.masked_fill(blocked, float("-inf"))
    vals, idx = scores.topk(K, dim=-1)
    valid = vals > float("-inf")
    idx = torch.where(valid, idx, torch.full_like(idx, Nk))  # invalid sort last
    idx, _ = idx.sort(dim=-1)
    counts = valid.sum(dim=-1).to(torch.int32)
    idx = torch.where(idx >= Nk, torch.zeros_like(idx), idx).to(torch.int32)
    return idx.contiguous(), counts
