"""Allocation of the sparse-MLP activation cache in the layout the kernels prefer.

Invariant: the returned tensor has logical shape (B, M, F) and physical layout (B, F, M_pad)
(neuron-major per batch, the method's column-major cache), M_pad = M rounded up to a multiple of
``ROW_ALIGN``; the pad columns are never read or written. Rows are positions in the grouped token
order (mm1's contract), so the 128 rows of one token block for one neuron are contiguous and mm1's
gathered read-modify-write of h_cache[b, block rows, j] is coalesced under any permutation.
Any other (B, M, F) layout is still accepted by the kernels, only slower.

Why the pad: a neuron row of M elements with M not a multiple of 8 (OmniGen's 64 + 1 + 4096 = 4161
tokens, SD3's 4096 + 333) is not 16-byte aligned. cuBLAS then leaves its tensor-core kernels for
the dense step's fc1 (written straight into this cache) and fc2 (read from it): OmniGen's dense MLP
steps took ~5.5 ms per layer against ~1 ms (H200, session 38), and Triton specializes a stride
divisible by 16 only. The pad costs F * (M_pad - M) elements per batch, < 1 MB per site at FLUX size.
"""

from __future__ import annotations

import torch

ROW_ALIGN = 64  # elements: 128-byte rows for bf16/fp16


def mlp_alloc_h_cache(B: int, M: int, F: int, dtype, device) -> torch.Tensor:
    m_pad = -(-M // ROW_ALIGN) * ROW_ALIGN
    return torch.empty(B, F, m_pad, dtype=dtype, device=device)[:, :, :M].transpose(1, 2)
