"""Per-token-block means (pure PyTorch; a memory-bound reduction that torch does well enough).

Contract: x (B, M, C) -> (B, ceil(M/block), C) in x.dtype, fp32 accumulation; block m = rows
perm[m*block:(m+1)*block] (or contiguous rows); a partial last block is the mean of its real rows.
"""

from __future__ import annotations

import math

import torch


def mlp_block_means_ref(x, *, block: int, perm=None):
    B, M, C = x.shape
    nb = math.ceil(M / block)
    xf = x.float() if perm is None else x[:, perm.long()].float()
    pad = nb * block - M
    if pad:
        xf = torch.cat([xf, xf.new_zeros(B, pad, C)], dim=1)
    means = xf.view(B, nb, block, C).sum(dim=2) / block
    if pad:  # the last block holds block - pad real rows (scalar ops only: no host->device copy)
        means[:, -1] *= block / (block - pad)
    return means.to(x.dtype)
