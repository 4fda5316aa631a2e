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
    if layout == "neuron_major":  # M = 37: each neuron's row padded to 64; both GEMMs run over the 64 rows
        hc = mlp_alloc_h_cache(B, M, Fh, dt, "cpu")
        storage = torch.empty(0, dtype=dt).set_(hc.untyped_storage())
        storage.fill_(-7.0)
    else:
        hc = torch.empty(B, M, Fh, dtype=dt)
    hc.fill_(float("nan"))  # every element must be written
    y = _dense_into_cache(x, w_act, b_act, w_lin, b_lin, w2, b2, act, perm, hc)
    if layout == "neuron_major":  # the pad rows were computed (token 0 again) and are never part of the view
        assert storage.numel() == B * Fh * 64 and not (storage == -7.0).any()
    h = apply_act(F.linear(x, w_act, b_act), act)
    if gated:
        h = h * F.linear(x, w_lin, b_lin)
    order = torch.arange(M) if perm is None else perm.long()
    torch.testing.assert_close(hc, h[:, order])
    torch.testing.assert_close(y, F.linear(h, w2, b2))
    assert y.is_contiguous() and y.shape == (B, M, Co)


@pytest.mark.parametrize("gated", [False, True])
def test_dense_step_with_the_triton_bias_act_kernel(monkeypatch, gated):
    """The neuron-major path's bias, activation and gate run in the mlp_bias_act Triton kernel (the
    interpreter here, fp32): the cache and the output are the eager MLP's, and the kernel did run."""
    import chipmunk_compile.kernels.mlp_bias_act as triton_bias_act
    from chipmunk_compile.ops import _dispatch

    monkeypatch.setenv("CHIPMUNK_KERNELS", "triton")
    monkeypatch.setattr(_dispatch, "_memo", {})  # a fresh lookup finds the counting wrapper below
    calls = []
    real = triton_bias_act.mlp_bias_act
    monkeypatch.setattr(triton_bias_act, "mlp_bias_act", lambda *a, **k: calls.append(1) or real(*a, **k))
    g = torch.Generator().manual_seed(11)
    B, M, C, Fh, Co = 2, 37, 16, 24, 8
    x = torch.randn(B, M, C, generator=g)
    w_act, b_act = torch.randn(Fh, C, generator=g), torch.randn(Fh, generator=g)
    w_lin, b_lin = (torch.randn(Fh, C, generator=g), torch.randn(Fh, generator=g)) if gated else (None, None)
    w2, b2 = torch.randn(Co, Fh, generator=g), torch.randn(Co, generator=g)
    perm = torch.randperm(M, generator=g).int()
    hc = mlp_alloc_h_cache(B, M, Fh, torch.float32, "cpu").fill_(float("nan"))
    y = _dense_into_cache(x, w_act, b_act, w_lin, b_lin, w2, b2, "gelu_tanh", perm, hc)
    assert len(calls) == B
    h = F.gelu(F.linear(x, w_act, b_act), approximate="tanh")
    if gated:
        h = h * F.linear(x, w_lin, b_lin)
    torch.testing.assert_close(hc, h[:, perm.long()], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, F.linear(h, w2, b2), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [4161, 4352])
def test_dense_step_at_an_odd_token_count_matches_eager_bf16(M):
    """OmniGen's 4161 tokens (64 + 1 + 4096) and FLUX's 4352, SwiGLU at OmniGen's width, bf16 on the GPU:
    the GEMMs over the padded cache rows give what the eager MLP gives (same cuBLAS rounding per GEMM)."""
    g = torch.Generator("cuda").manual_seed(3)
    kw = dict(generator=g, device="cuda", dtype=torch.bfloat16)
    C, Fh = 3072, 8192
    x = torch.randn(1, M, C, **kw)
    w_act, w_lin = torch.randn(Fh, C, **kw) * C ** -0.5, torch.randn(Fh, C, **kw) * C ** -0.5
    w2 = torch.randn(C, Fh, **kw) * Fh ** -0.5
    perm = torch.randperm(M, generator=g, device="cuda").int()
    hc = mlp_alloc_h_cache(1, M, Fh, torch.bfloat16, "cuda")
    y = _dense_into_cache(x, w_act, None, w_lin, None, w2, None, "silu", perm, hc)
    h = F.silu(F.linear(x, w_act)) * F.linear(x, w_lin)
    torch.testing.assert_close(hc.float(), h[:, perm.long()].float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y.float(), F.linear(h, w2).float(), rtol=2e-2, atol=2e-2)


def test_padded_rows_only_where_the_storage_holds_the_pad():
    """The dense step runs its GEMMs over M_pad rows only when every (neuron, row < M_pad) lies in the
    cache's own storage; other layouts take the plain path (None)."""
    from chipmunk_compile.ops.mlp import _padded_rows

    assert _padded_rows(mlp_alloc_h_cache(2, 37, 6, torch.float32, "cpu")) == 64
    assert _padded_rows(mlp_alloc_h_cache(1, 128, 6, torch.float32, "cpu")) == 128  # no pad needed
    assert _padded_rows(torch.empty(2, 37, 6)) is None  # token-major
    short = torch.empty(6 * 40 - 3).as_strided((1, 37, 6), (240, 1, 40))  # the last neuron's pad is not there
    assert _padded_rows(short) is None
    two = torch.empty(2, 6, 48).as_strided((2, 37, 6), (6 * 40 + 8, 1, 40))  # batches not F * M_pad apart
    assert _padded_rows(two) is None
