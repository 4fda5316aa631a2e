"""Top-k key-column selection per (batch, head, query group) from column sums (PyTorch only).

Contract:
- colsum (B, H, Gc, Nk) float; with ``inplace=True`` an fp32/fp16 colsum is overwritten (scored in
  place, in its own dtype; other dtypes are scored in an fp32 copy). K = min(Nk, k + n_always + random_keys), n_always = always_keep.sum().
- Selected set = always_keep columns (all of them) + ``random_keys`` random draws per row (uniform, with
  replacement; blocked or duplicate draws fall back to top-k; ``draws`` (B, H, Gc, random_keys) int64
  gives them, else ``generator`` makes torch.randint reproducible) + the top columns by colsum filling the rest.
  ``n_always`` (= always_keep.sum()) may be given to avoid a device→host read (needed inside CUDA graphs). Masked keys (key_mask (B, Nk) False) are never selected.
- Returns indices (B, H, Gc, K) int32 with the valid entries first, sorted ascending, entries past
  counts set to 0; counts (B, H, Gc) int32 = min(K, number of selectable keys).
- Implemented as one unsorted torch.topk over boosted scores (+inf always, float-max random, -inf
  masked) and an int32 sort of the picked indices; without a key mask the -inf pass and the
  validity count are skipped (all K picks are valid). At video sizes this is ~0.4x of a cuDNN
  attention call on H100 (benchmarks/bench_refresh.py), so passes over the scores matter.
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
    in_place = inplace and colsum.dtype in (torch.float32, torch.float16)
    scores = colsum if in_place else colsum.float().clone()
    blocked = torch.zeros(B, 1, 1, Nk, dtype=torch.bool, device=dev)
    if key_mask is not None:  # without a key mask nothing is blocked and no -inf pass is made
        blocked |= ~key_mask.bool().view(B, 1, 1, Nk)
    if always_keep is not None:
        ak = always_keep.bool().view(1, 1, 1, Nk)
    if random_keys > 0:
        # random_keys draws with replacement: O(B·H·Gc·r) memory instead of a (B, H, Gc, Nk) field
        # (7 GB at HunyuanVideo size). Duplicates and blocked draws just leave those slots to top-k.
        pick = draws if draws is not None else torch.randint(0, Nk, (B, H, Gc, int(random_keys)), generator=generator, device=dev)
        excl = blocked if always_keep is None else (blocked | ak)
        ok = ~torch.gather(excl.expand(B, H, Gc, Nk), -1, pick)
        boost = torch.where(ok, torch.finfo(scores.dtype).max, torch.gather(scores, -1, pick))
        scores.scatter_(-1, pick, boost)
    if always_keep is not None:
        scores.masked_fill_(ak, float("inf"))
    if key_mask is None:
        # nothing is blocked: every one of the K picks is valid (column sums are finite, >= 0)
        idx = scores.topk(K, dim=-1, sorted=False)[1].to(torch.int32)
        counts = torch.full((B, H, Gc), K, dtype=torch.int32, device=dev)
        return idx.sort(dim=-1)[0].contiguous(), counts
    scores.masked_fill_(blocked, float("-inf"))
    vals, idx = scores.topk(K, dim=-1, sorted=False)
    valid = vals > float("-inf")
    idx = torch.where(valid, idx.to(torch.int32), Nk)  # invalid sort last
    idx, _ = idx.sort(dim=-1)
    counts = valid.sum(dim=-1).to(torch.int32)
    return torch.where(idx >= Nk, 0, idx).contiguous(), counts
