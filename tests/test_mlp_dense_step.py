"""The dense MLP step fills the activation cache in the kernels' contract (rows in grouped order,
neuron-major) and returns the exact MLP output in token order."""

import pytest
import torch
import torch.nn.functional as F

from chipmunk_compile.kernels import mlp_alloc_h_cache
from chipmunk_compile.kernels.mlp_sparse_mm1_ref import apply_act
from chipmunk_compile.ops.mlp import _dense_into_cache


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "silu", "relu", "relu2"])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("permuted", [False, True])
@pytest.mark.parametrize("layout", ["neuron_major", "token_major"])
def test_dense_step_fills_cache_in_grouped_order(act, gated, permuted, layout):
    g = torch.Generator().manual_seed(7)
    B, M, C, Fh, Co = 2, 37, 12, 20, 9
    dt = torch.float64
    x = torch.randn(B, M, C, generator=g, dtype=dt)
    w_act, w_lin = torch.randn(Fh, C, generator=g, dtype=dt), torch.randn(Fh, C, generator=g, dtype=dt)
    b_act, b_lin = torch.randn(Fh, generator=g, dtype=dt), torch.randn(Fh, generator=g, dtype=dt)
    w2, b2 = torch.randn(Co, Fh, generator=g, dtype=dt), torch.randn(Co, generator=g, dtype=dt)
    if not gated:
        w_lin = b_lin = None
    perm = torch.randperm(M, generator=g).int() if permuted else None
    if layout == "neuron_major":
        hc = mlp_alloc_h_cache(B, M, Fh, dt, "cpu")
    else:
        hc = torch.empty(B, M, Fh, dtype=dt)
    hc.fill_(float("nan"))  # every element must be written
    y = _dense_into_cache(x, w_act, b_act, w_lin, b_lin, w2, b2, act, perm, hc)
    h = apply_act(F.linear(x, w_act, b_act), act)
    if gated:
        h = h * F.linear(x, w_lin, b_lin)
    order = torch.arange(M) if perm is None else perm.long()
    torch.testing.assert_close(hc, h[:, order])
    torch.testing.assert_close(y, F.linear(h, w2, b2))
    assert y.is_contiguous() and y.shape == (B, M, Co)
