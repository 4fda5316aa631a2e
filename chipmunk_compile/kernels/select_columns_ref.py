"""Top-k key-column selection per (batch, head, query group) from column sums (PyTorch only).

Contract:
- colsum (B, H, Gc, Nk) float; with ``inplace=True`` an fp32 colsum is overwritten (scored in place). K = min(Nk, k + n_always + random_keys), n_always = always_keep.sum().
- Selected set = always_keep columns (all of them) + ``random_keys`` random draws per row (uniform, with
  replacement; blocked or duplicate draws fall back to top-k; ``draws`` (B, H, Gc, random_keys) int64
  gives them, else ``generator`` makes torch.randint reproducible) + the top columns by colsum filling the rest.
  ``n_always`` (= always_keep.sum()) may be given to avoid a device→host read (needed inside CUDA graphs). Masked keys (key_mask (B, Nk) False) are never selected.
- Returns indices (B, H, Gc, K) int32 with the valid entries first, sorted ascending, entries past
  counts set to 0; counts (B, H, Gc) int32 = min(K, number of selectable keys).
- Implemented as one torch.topk over boosted scores (+inf always, float-max random, -inf masked);
  fast enough on GPU (not a measured hotspot), so there is no Triton version.
"""

from __future__ import annotations

import torch


def select_columns_ref(colsum, *, k: int, key_mask=None, always_keep=None, random_keys: int = 0, generator=None,
                       inplace: bool = False, n_always=None, draws=None):
    B, H, Gc, Nk = colsum.shape
    dev = colsum.device
    if always_keep is None:
        n_always = 0
    elif n_always is None:
        n_always = int(always_keep.sum())
    K = max(1, min(Nk, int(k) + n_always + int(random_keys)))
    # inplace: the caller's colsum is a temporary and is scored in place (a copy would double a
    # (B, H, Gc, Nk) buffer that is GBs at video sizes)
    scores = colsum if inplace and colsum.dtype == torch.float32 else colsum.float().clone()
    blocked = torch.zeros(B, 1, 1, Nk, dtype=torch.bool, device=dev)
    if key_mask is not None:
        blocked |= ~key_mask.bool().view(B, 1, 1, Nk)
    if always_keep is not None:
        ak = always_keep.bool().view(1, 1, 1, Nk)
    if random_keys > 0:
        # random_keys draws with replacement: O(B·H·Gc·r) memory instead of a (B, H, Gc, Nk) field
        # (7 GB at HunyuanVideo size). Duplicates and blocked draws just leave those slots to top-k.
        pick = draws if draws is not None else torch.randint(0, Nk, (B, H, Gc, int(random_keys)), generator=generator, device=dev)
        excl = blocked if always_keep is None else (blocked | ak)
        ok = ~torch.gather(excl.expand(B, H, Gc, Nk), -1, pick)
        boost = torch.where(ok, torch.finfo(torch.float32).max, torch.gather(scores, -1, pick))
        scores.scatter_(-1, pick, boost)
    if always_keep is not None:
        scores.masked_fill_(ak, float("inf"))
    scores.masked_fill_(blocked, float("-inf"))
    vals, idx = scores.topk(K, dim=-1)
    valid = vals > float("-inf")
    idx = torch.where(valid, idx, torch.full_like(idx, Nk))  # invalid sort last
    idx, _ = idx.sort(dim=-1)
    counts = valid.sum(dim=-1).to(torch.int32)
    idx = torch.where(idx >= Nk, torch.zeros_like(idx), idx).to(torch.int32)
    return idx.contiguous(), counts
