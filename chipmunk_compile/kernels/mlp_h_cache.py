"""Allocation of the sparse-MLP activation cache in the layout the kernels prefer.

Invariant: the returned tensor has logical shape (B, M, F) and physical layout (B, F, M)
(neuron-major per batch, the method's column-major cache). Rows are positions in the grouped token
order (mm1's contract), so the 128 rows of one token block for one neuron are contiguous and mm1's
gathered read-modify-write of h_cache[b, block rows, j] is coalesced under any permutation.
Any other (B, M, F) layout is still accepted by the kernels, only slower.
"""

from __future__ import annotations

import torch


def mlp_alloc_h_cache(B: int, M: int, F: int, dtype, device) -> torch.Tensor:
    return torch.empty(B, F, M, dtype=dtype, device=device).transpose(1, 2)
