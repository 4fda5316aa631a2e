"""Bias, activation and gate applied in place to a neuron-major fc1 product (pure PyTorch).

Contract: ``mlp_bias_act_ref(h, bias, *, act, gate=None, gate_bias=None) -> h`` (the same tensor).
- h: (F, M), any strides: the dense MLP step's fc1 product hᵀ = w_act · xᵀ with no bias yet (row f
  is neuron f, as in the neuron-major activation cache). bias: (F,) or None.
- gate / gate_bias: the gated MLP's second product w_lin · xᵀ, (F, M), and its (F,) bias, or None.
- h ← act(h + bias[:, None]) · (gate + gate_bias[:, None]), computed in fp32 (fp64 for fp64 h) from
  the stored values and rounded once to h's dtype. ``act`` is one of ``_common.ACTS``.
The dense step runs its GEMMs without a bias (a bias along the rows of a transposed product is not
a cuBLAS epilogue: addmm first writes the broadcast bias over the whole output and the GEMM reads it
back) and calls this once: one read and one write of the activation instead of three passes.
"""

from __future__ import annotations

import torch

from .mlp_sparse_mm1_ref import apply_act


def check_shapes(h, gate) -> None:
    """The contract's shapes (the Triton launcher checks the same): a gate is never broadcast."""
    if h.dim() != 2 or (gate is not None and gate.shape != h.shape):
        raise ValueError(f"mlp_bias_act takes h (F, M) and a gate of the same shape, got {tuple(h.shape)} and "
                         f"{None if gate is None else tuple(gate.shape)}")


def mlp_bias_act_ref(h, bias, *, act: str, gate=None, gate_bias=None):
    check_shapes(h, gate)
    wide = torch.promote_types(h.dtype, torch.float32)
    z = h.to(wide, copy=True)
    if bias is not None:
        z += bias.to(wide)[:, None]
    z = apply_act(z, act, inplace=True)
    if gate is not None:
        g = gate.to(wide, copy=True)
        if gate_bias is not None:
            g += gate_bias.to(wide)[:, None]
        z *= g
    return h.copy_(z)
