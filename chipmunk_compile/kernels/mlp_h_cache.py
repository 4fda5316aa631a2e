"""Allocation of the sparse-MLP activation cache in the layout the kernels prefer.

Invariant: the returned tensor has logical shape (B, M, F) and physical layout (B, F, M)
(neuron-major per batch, the method's column-major cache): the 128 rows of one token block for one
neuron are contiguous, so mm1's gathered read-modify-write of h_cache[b, rows, j] is coalesced.
Any other (B, M, F) layout is still accepted by the kernels, only slower.
"""

from __future__ import annotations

import torch


def mlp_alloc_h_cache(B: int, M: int, F: int, dtype, device) -> torch.Tensor:
    return torch.empty(B, F, M, dtype=dtype, device=device).transpose(1, 2)
