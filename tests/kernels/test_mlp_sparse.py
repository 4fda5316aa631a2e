"""Sparse MLP mm1/mm2 and block means: references vs dense formulas, Triton vs references."""

import math

import pytest
import torch
import torch.nn.functional as F
from kernel_testutils import DEV, TOL, rel_err

from chipmunk_compile.kernels import (get_kernel, mlp_alloc_h_cache, mlp_block_means_ref, mlp_sparse_mm1_ref,
                                      mlp_sparse_mm2_ref)
from chipmunk_compile.kernels.mlp_sparse_mm1_ref import apply_act


def _weights(C, Fh, Co, dtype, gated, bias, g):
    d = dict(device=DEV, dtype=dtype)
    w_act = (torch.randn(Fh, C, generator=g) / math.sqrt(C)).to(**d)
    w_lin = (torch.randn(Fh, C, generator=g) / math.sqrt(C)).to(**d) if gated else None
    b_act = torch.randn(Fh, generator=g).to(**d) if bias else None
    b_lin = torch.randn(Fh, generator=g).to(**d) if (bias and gated) else None
    w2 = (torch.randn(Co, Fh, generator=g) / math.sqrt(Fh)).to(**d)
    return w_act, b_act, w_lin, b_lin, w2


def _indices(B, NB, Fh, frac, g, full=False):
    K = Fh if full else max(1, int(frac * Fh))
    idx = torch.zeros(B, NB, K, dtype=torch.int32)
    cnt = torch.full((B, NB), K, dtype=torch.int32) if full else torch.randint(0, K + 1, (B, NB), generator=g).int()
    if not full:
        cnt.view(-1)[0] = K
    for i in range(B * NB):
        c = int(cnt.view(-1)[i])
        idx.view(-1, K)[i, :c] = torch.randperm(Fh, generator=g)[:c].sort().values.int()
    return idx.to(DEV), cnt.to(DEV)


def _dense_h(x, w_act, b_act, w_lin, b_lin, act):
    h = apply_act(F.linear(x.double(), w_act.double(), None if b_act is None else b_act.double()), act)
    if w_lin is not None:
        h = h * F.linear(x.double(), w_lin.double(), None if b_lin is None else b_lin.double())
    return h


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "silu", "relu"])
@pytest.mark.parametrize("gated", [False, True])
def test_ref_full_selection_equals_dense_delta(act, gated):
    g = torch.Generator().manual_seed(0)
    B, M, C, Fh, Co, blk = 2, 37, 24, 40, 16, 16
    w_act, b_act, w_lin, b_lin, w2 = _weights(C, Fh, Co, torch.float64, gated, True, g)
    x_old = torch.randn(B, M, C, generator=g, dtype=torch.float64).to(DEV)
    x = x_old + 0.3 * torch.randn(B, M, C, generator=g, dtype=torch.float64).to(DEV)
    perm = torch.randperm(M, generator=g).int().to(DEV)
    idx, cnt = _indices(B, math.ceil(M / blk), Fh, 1.0, g, full=True)
    h_old = _dense_h(x_old, w_act, b_act, w_lin, b_lin, act)
    hc = mlp_alloc_h_cache(B, M, Fh, torch.float64, DEV)
    hc.copy_(h_old[:, perm.long()])  # h_cache rows are grouped positions: row p holds token perm[p]
    yc = F.linear(h_old, w2)
    delta = mlp_sparse_mm1_ref(x, w_act, b_act, w_lin, b_lin, idx, cnt, hc, act=act, block=blk, perm=perm)
    h_new = _dense_h(x, w_act, b_act, w_lin, b_lin, act)
    # refs compute in fp32; full set: packed column c == neuron c; delta rows are grouped positions too
    assert rel_err(delta, (h_new - h_old)[:, perm.long()]) < 1e-5
    assert rel_err(hc, h_new[:, perm.long()]) < 1e-5
    y = mlp_sparse_mm2_ref(delta, w2, idx, cnt, yc, block=blk, perm=perm)
    assert rel_err(y, F.linear(h_new, w2)) < 1e-5 and rel_err(yc, y) == 0
    assert y.data_ptr() != yc.data_ptr()


@pytest.mark.parametrize("permuted", [False, True])
def test_ref_sparse_update_keeps_invariant(permuted):
    """After a sparse step, y_cache == fc2(h_cache) still holds (rolling MLP cache invariant), with
    h_cache in grouped order (row p = token perm[p]) and y_cache in token order."""
    g = torch.Generator().manual_seed(1)
    B, M, C, Fh, Co, blk = 1, 50, 16, 32, 8, 16
    w_act, b_act, _, _, w2 = _weights(C, Fh, Co, torch.float64, False, True, g)
    x = torch.randn(B, M, C, generator=g, dtype=torch.float64).to(DEV)
    perm = torch.randperm(M, generator=g).int().to(DEV) if permuted else None
    unperm = torch.arange(M) if perm is None else torch.argsort(perm.long().cpu())
    hc = mlp_alloc_h_cache(B, M, Fh, torch.float64, DEV)
    hc.copy_(torch.randn(B, M, Fh, generator=g, dtype=torch.float64))
    yc = F.linear(hc[:, unperm.to(DEV)], w2)
    idx, cnt = _indices(B, math.ceil(M / blk), Fh, 0.4, g)
    d = mlp_sparse_mm1_ref(x, w_act, b_act, None, None, idx, cnt, hc, act="gelu_tanh", block=blk, perm=perm)
    y = mlp_sparse_mm2_ref(d, w2, idx, cnt, yc, block=blk, perm=perm)
    assert rel_err(y, F.linear(hc[:, unperm.to(DEV)], w2)) < 1e-5
    # the selected neurons of every token now hold exactly their new activation
    h_true = F.gelu(F.linear(x, w_act, b_act), approximate="tanh")
    order = torch.arange(M) if perm is None else perm.long().cpu()
    for m in range(cnt.shape[1]):
        p = torch.arange(m * blk, min((m + 1) * blk, M))
        cols = idx[0, m, :int(cnt[0, m])].long()
        assert rel_err(hc[0][p[:, None], cols], h_true[0][order[p][:, None], cols]) < 1e-5
    K = idx.shape[-1]
    for m in range(cnt.shape[1]):
        assert (d[0, m * blk:(m + 1) * blk, int(cnt[0, m]):K] == 0).all()


def test_block_means_ref():
    x = torch.randn(2, 45, 7, device=DEV)
    perm = torch.randperm(45).int().to(DEV)
    out = mlp_block_means_ref(x, block=16, perm=perm)
    xp = x[:, perm.long()]
    ref = torch.stack([xp[:, i:i + 16].mean(1) for i in range(0, 45, 16)], 1)
    assert out.shape == (2, 3, 7) and rel_err(out, ref) < 1e-6


CASES = [
    # B, M, C, Fh, Co, blk, gated, bias, permuted, act, w2_colmajor
    (1, 64, 64, 96, 48, 32, False, True, False, "gelu_tanh", False),
    (2, 77, 48, 80, 40, 32, True, True, True, "silu", True),     # SwiGLU, odd M, perm, (F, Cout) w2
    (1, 100, 64, 64, 33, 48, False, False, True, "gelu", False),  # block not a tile multiple, no bias
    (1, 40, 32, 50, 20, 64, True, False, False, "relu", True),    # one partial block
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_triton_matches_ref(triton_mode, case, dtype):
    B, M, C, Fh, Co, blk, gated, bias, permuted, act, w2_cm = case
    g = torch.Generator().manual_seed(M)
    w_act, b_act, w_lin, b_lin, w2 = _weights(C, Fh, Co, dtype, gated, bias, g)
    if w2_cm:
        w2 = w2.t().contiguous().t()
    x = torch.randn(B, M, C, generator=g).to(DEV, dtype)
    perm = torch.randperm(M, generator=g).int().to(DEV) if permuted else None
    idx, cnt = _indices(B, math.ceil(M / blk), Fh, 0.5, g)
    hc = mlp_alloc_h_cache(B, M, Fh, dtype, DEV)
    hc.copy_(torch.randn(B, M, Fh, generator=g))
    hc_r = hc.clone()
    mm1 = get_kernel("mlp_sparse_mm1", x, w_act, hc)
    assert mm1 is not mlp_sparse_mm1_ref
    d = mm1(x, w_act, b_act, w_lin, b_lin, idx, cnt, hc, act=act, block=blk, perm=perm)
    d_r = mlp_sparse_mm1_ref(x, w_act, b_act, w_lin, b_lin, idx, cnt, hc_r, act=act, block=blk, perm=perm)
    assert rel_err(d, d_r) < TOL[dtype] and rel_err(hc, hc_r) < TOL[dtype]
    # delta rows are padded to 64 elements; the kernel may write the pad, but only zeros, never past it
    Kp = d.stride(1)
    padded = d.as_strided((B, M, Kp), d.stride())
    pad = padded[..., d.shape[-1]:]
    assert Kp % 64 == 0 and ((pad == 0) | pad.isnan()).all()  # NaN: poisoned and not written
    yc = torch.randn(B, M, Co, generator=g).to(DEV, dtype)
    yc_r = yc.clone()
    mm2 = get_kernel("mlp_sparse_mm2", d_r, w2, yc)
    y = mm2(d_r, w2, idx, cnt, yc, block=blk, perm=perm)
    y_r = mlp_sparse_mm2_ref(d_r, w2, idx, cnt, yc_r, block=blk, perm=perm)
    assert rel_err(y, y_r) < TOL[dtype] and rel_err(yc, y_r) < TOL[dtype]
    assert y.data_ptr() != yc.data_ptr()


@pytest.mark.gpu
@pytest.mark.parametrize("gated", [False, True])
def test_gpu_bf16_real_shapes(gated):
    g = torch.Generator().manual_seed(3)
    B, M, C, Fh, Co, blk = 1, 4352, 3072, 12288 if not gated else 4096, 3072, 128
    dt = torch.bfloat16
    w_act, b_act, w_lin, b_lin, w2 = _weights(C, Fh, Co, dt, gated, True, g)
    x = torch.randn(B, M, C, generator=g).to(DEV, dt)
    perm = torch.randperm(M, generator=g).int().to(DEV)
    NB = math.ceil(M / blk)
    K = int(0.3 * Fh)
    idx = torch.rand(B, NB, Fh, device=DEV).topk(K, dim=-1).indices.sort(-1).values.int()
    cnt = torch.randint(K // 2, K + 1, (B, NB), device=DEV).int()
    hc = mlp_alloc_h_cache(B, M, Fh, dt, DEV)
    hc.normal_()
    hc_r = hc.clone()
    act = "gelu_tanh"
    d = get_kernel("mlp_sparse_mm1", x)(x, w_act, b_act, w_lin, b_lin, idx, cnt, hc, act=act, block=blk, perm=perm)
    d_r = mlp_sparse_mm1_ref(x, w_act, b_act, w_lin, b_lin, idx, cnt, hc_r, act=act, block=blk, perm=perm)
    assert rel_err(d, d_r) < TOL[dt] and rel_err(hc, hc_r) < TOL[dt]
    yc = torch.randn(B, M, Co, device=DEV, dtype=dt)
    yc_r = yc.clone()
    y = get_kernel("mlp_sparse_mm2", d_r)(d_r, w2, idx, cnt, yc, block=blk, perm=perm)
    y_r = mlp_sparse_mm2_ref(d_r, w2, idx, cnt, yc_r, block=blk, perm=perm)
    assert rel_err(y, y_r) < TOL[dt]
