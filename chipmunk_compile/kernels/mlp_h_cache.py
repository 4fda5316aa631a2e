"""Allocation of the sparse-MLP activation cache in the layout the kernels prefer.

Invariant: the returned tensor has logical shape (B, M, F) and physical layout (B, F, M_pad)
(neuron-major per batch, the method's column-major cache), M_pad = M rounded up to a multiple of
``ROW_ALIGN``. The pad columns belong to no token: the dense step writes junk there (it runs its
GEMMs over M_pad tokens) and nothing reads them. Rows are positions in the grouped token order
(mm1's contract), so the 128 rows of one token block for one neuron are contiguous and mm1's
gathered read-modify-write of h_cache[b, block rows, j] is coalesced under any permutation.
Any other (B, M, F) layout is still accepted by the kernels, only slower.

Why the pad: the dense step writes fc1 transposed into this cache and fc2 reads it transposed, so
the token count is the contiguous dimension of both GEMMs. At a count that is not a multiple of 8
(OmniGen's single-stream blocks: 64 + 1 + 4096 = 4161 tokens) cuBLAS leaves its tensor-core kernels
for sm75 ones: OmniGen's dense MLP took 6.3 ms against 1.0 (H200, session 38). Padded, the GEMMs run
over M_pad columns (`ops.mlp._dense_into_cache`), and the Triton kernels see a row stride divisible
by 16. The pad costs F * (M_pad - M) elements per batch: at most 63 tokens' worth of activations.
"""

from __future__ import annotations

import torch

ROW_ALIGN = 64  # elements: 128-byte rows for bf16/fp16


def mlp_alloc_h_cache(B: int, M: int, F: int, dtype, device) -> torch.Tensor:
    m_pad = -(-M // ROW_ALIGN) * ROW_ALIGN
    return torch.empty(B, F, m_pad, dtype=dtype, device=device)[:, :, :M].transpose(1, 2)
