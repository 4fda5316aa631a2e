"""Top-k key-column selection per (batch, head, query group) from column sums (PyTorch only).

Contract:
- colsum (B, H, Gc, Nk) float; with ``inplace=True`` an fp32/fp16 colsum is overwritten (scored in
  place, in its own dtype; other dtypes are scored in an fp32 copy). K = min(Nk, k + n_always + random_keys), n_always = always_keep.sum().
- Selected set = always_keep columns (all of them) + ``random_keys`` random draws per row (uniform, with
  replacement; blocked or duplicate draws fall back to top-k; ``draws`` gives them, as a (B, H, Gc,
  random_keys) int64 tensor or a ``random_draws_ref.HashDraws`` (the hash at flat position
  ((b·H + h)·Gc + g)·random_keys + j, which the Triton kernel computes in place), else
  ``generator`` makes torch.randint reproducible) + the top columns by colsum filling the rest.
  ``n_always`` (= always_keep.sum()) may be given to avoid a device→host read (needed inside CUDA graphs). Masked keys (key_mask (B, Nk) False) are never selected.
- Returns indices (B, H, Gc, K) int32 with the valid entries first, sorted ascending, entries past
  counts set to 0; counts (B, H, Gc) int32 = min(K, number of selectable keys).
- Among equal scores the lowest column ids are selected (deterministic, and the same set as the
  Triton twin ``select_columns.py``, a radix select + in-order compaction with no sort).
- Implemented as a stable descending sort of the boosted scores (+inf always, float-max random,
  -inf masked) and an int32 sort of the first K ids: the CPU path and the oracle (an unsorted
  torch.topk, used before the kernel, costs 0.16-0.19x a cuDNN attention call at video sizes).
"""

from __future__ import annotations

import torch

from .random_draws_ref import HashDraws

SLAB = 1 << 26  # score elements sorted at once by the reference


def selection_width(colsum, k: int, always_keep, random_keys: int, n_always) -> tuple[int, int]:
    """(K, n_always): the index width K = min(Nk, k + n_always + random_keys), at least 1."""
    if always_keep is None:
        n_always = 0
    elif n_always is None:
        n_always = int(always_keep.sum())
    return max(1, min(colsum.shape[-1], int(k) + n_always + int(random_keys))), n_always


def boost_random_draws(scores, key_mask, always_keep, random_keys: int, generator=None, draws=None) -> None:
    """Raise `random_keys` random columns per row to the dtype's max score, in place.

    Draws are uniform with replacement: O(B·H·Gc·r) memory instead of a (B, H, Gc, Nk) field (7 GB
    at HunyuanVideo size). Masked or always-kept draws, and duplicates, leave their slot to top-k."""
    B, H, Gc, Nk = scores.shape
    if isinstance(draws, HashDraws):
        pick = draws.ints((B, H, Gc, int(random_keys)), Nk)
    elif draws is not None:
        pick = draws
    else:
        pick = torch.randint(0, Nk, (B, H, Gc, int(random_keys)), generator=generator, device=scores.device)
    excl = torch.zeros(B, 1, 1, Nk, dtype=torch.bool, device=scores.device)
    if key_mask is not None:
        excl |= ~key_mask.bool().view(B, 1, 1, Nk)
    if always_keep is not None:
        excl |= always_keep.bool().view(1, 1, 1, Nk)
    ok = ~torch.gather(excl.expand(B, H, Gc, Nk), -1, pick)
    boost = torch.where(ok, torch.finfo(scores.dtype).max, torch.gather(scores, -1, pick))
    scores.scatter_(-1, pick, boost)


def select_columns_ref(colsum, *, k: int, key_mask=None, always_keep=None, random_keys: int = 0, generator=None,
                       inplace: bool = False, n_always=None, draws=None):
    B, H, Gc, Nk = colsum.shape
    dev = colsum.device
    K, n_always = selection_width(colsum, k, always_keep, random_keys, n_always)
    # inplace: the caller's colsum is a temporary and is scored in place (a copy would double a
    # (B, H, Gc, Nk) buffer that is GBs at video sizes)
    in_place = inplace and colsum.dtype in (torch.float32, torch.float16)
    scores = colsum if in_place else colsum.float().clone()
    if random_keys > 0:
        boost_random_draws(scores, key_mask, always_keep, random_keys, generator, draws)
    if always_keep is not None:
        scores.masked_fill_(always_keep.bool().view(1, 1, 1, Nk), float("inf"))
    if key_mask is not None:
        scores.masked_fill_(~key_mask.bool().view(B, 1, 1, Nk), float("-inf"))
    # a stable descending sort: among equal scores the lowest column ids win (as in the Triton kernel);
    # rows in slabs of ~SLAB elements, so the sort's int64 ids stay small at video sizes (GBs per call)
    rows = scores.reshape(-1, Nk)
    vals = torch.empty(rows.shape[0], K, dtype=scores.dtype, device=dev)
    idx = torch.empty(rows.shape[0], K, dtype=torch.int32, device=dev)
    step = max(1, SLAB // Nk)
    for r in range(0, rows.shape[0], step):
        v, i = rows[r:r + step].sort(dim=-1, descending=True, stable=True)
        vals[r:r + step], idx[r:r + step] = v[:, :K], i[:, :K]
    vals, idx = vals.view(B, H, Gc, K), idx.view(B, H, Gc, K)
    if key_mask is None:  # nothing is blocked: every one of the K picks is valid
        counts = torch.full((B, H, Gc), K, dtype=torch.int32, device=dev)
        return idx.sort(dim=-1)[0].contiguous(), counts
    valid = vals > float("-inf")
    idx = torch.where(valid, idx, Nk)  # invalid sort last
    idx, _ = idx.sort(dim=-1)
    counts = valid.sum(dim=-1).to(torch.int32)
    return torch.where(idx >= Nk, 0, idx).contiguous(), counts
