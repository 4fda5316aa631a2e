"""Sparse MLP mm1/mm2 and block means: references vs dense formulas, Triton vs references."""

import math

import pytest
import torch
import torch.nn.functional as F
from kernel_testutils import DEV, TOL, compile_for_hopper, rel_err

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


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "silu", "relu", "relu2"])
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
    (1, 70, 32, 64, 24, 32, False, True, True, "relu2", False),   # squared relu, odd M
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


@pytest.mark.parametrize("epi_sub", [1, 2])
def test_epilogue_slices_match_ref(triton_mode, epi_sub):
    """The epilogue in one piece or in two column halves (and in the split wave tail's narrower
    tiles) writes the same delta, cache and output as the reference: every half gets its own
    columns' indices."""
    import triton

    from chipmunk_compile.kernels import mlp_sparse_mm1 as k1, mlp_sparse_mm2 as k2

    B, M, C, Fh, Co, blk = 2, 77, 32, 96, 40, 32
    g = torch.Generator().manual_seed(epi_sub)
    w_act, b_act, w_lin, b_lin, w2 = _weights(C, Fh, Co, torch.float32, True, True, g)
    x = torch.randn(B, M, C, generator=g).to(DEV)
    perm = torch.randperm(M, generator=g).int().to(DEV)
    idx, cnt = _indices(B, math.ceil(M / blk), Fh, 0.5, g)
    hc = mlp_alloc_h_cache(B, M, Fh, torch.float32, DEV)
    hc.copy_(torch.randn(B, M, Fh, generator=g))
    hc_r, yc = hc.clone(), torch.randn(B, M, Co, generator=g).to(DEV)
    yc_r = yc.clone()
    meta = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, OCC=1, SPLIT=2, EPI_SUB=epi_sub)
    k1._force_config = k2._force_config = triton.Config(meta, num_warps=4, num_stages=2)
    try:
        d = k1.mlp_sparse_mm1(x, w_act, b_act, w_lin, b_lin, idx, cnt, hc, act="silu", block=blk, perm=perm)
        y = k2.mlp_sparse_mm2(d, w2, idx, cnt, yc, block=blk, perm=perm)
    finally:
        k1._force_config = k2._force_config = None
    d_r = mlp_sparse_mm1_ref(x, w_act, b_act, w_lin, b_lin, idx, cnt, hc_r, act="silu", block=blk, perm=perm)
    y_r = mlp_sparse_mm2_ref(d_r, w2, idx, cnt, yc_r, block=blk, perm=perm)
    assert rel_err(d, d_r) < TOL[torch.float32] and rel_err(hc, hc_r) < TOL[torch.float32]
    assert rel_err(y, y_r) < TOL[torch.float32] and rel_err(yc, y_r) < TOL[torch.float32]


def test_mm1_reads_no_index_past_a_blocks_count(triton_mode):
    """A block's last tile runs columns past its count; they gather rows of the block's own selection
    (session 60: not all w1 row 0, which slowed FLUX's mm1 by 13%). Entries past the count are
    garbage in the backend's buffers: here rows far outside w1, which a read would fault on or pull
    into the result. Counts of 0, 1, partial and full tiles."""
    import triton

    from chipmunk_compile.kernels import mlp_sparse_mm1 as k1

    B, M, C, Fh, blk = 1, 128, 32, 96, 32
    g = torch.Generator().manual_seed(5)
    w_act, b_act, _, _, _ = _weights(C, Fh, 8, torch.float32, False, True, g)
    x = torch.randn(B, M, C, generator=g).to(DEV)
    idx, _ = _indices(B, M // blk, Fh, 0.5, g, full=True)
    idx = idx[..., :40].contiguous()
    cnt = torch.tensor([[0, 1, 37, 40]], dtype=torch.int32, device=DEV)
    for i, c in enumerate(cnt[0].tolist()):
        idx[0, i, c:] = 2 ** 30
    hc = mlp_alloc_h_cache(B, M, Fh, torch.float32, DEV)
    hc.copy_(torch.randn(B, M, Fh, generator=g))
    hc_r = hc.clone()
    k1._force_config = triton.Config(dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, OCC=1, SPLIT=2, EPI_SUB=2),
                                     num_warps=4, num_stages=2)
    try:
        d = k1.mlp_sparse_mm1(x, w_act, b_act, None, None, idx, cnt, hc, act="gelu_tanh", block=blk)
    finally:
        k1._force_config = None
    d_r = mlp_sparse_mm1_ref(x, w_act, b_act, None, None, idx, cnt, hc_r, act="gelu_tanh", block=blk)
    assert rel_err(d, d_r) < TOL[torch.float32] and rel_err(hc, hc_r) < TOL[torch.float32]


def _mm2_operands(seed, B=2, M=77, Fh=96, Co=40, blk=32):
    g = torch.Generator().manual_seed(seed)
    w2 = (torch.randn(Co, Fh, generator=g) / math.sqrt(Fh)).to(DEV)
    idx, cnt = _indices(B, math.ceil(M / blk), Fh, 0.5, g)
    d = torch.randn(B, M, idx.shape[-1], generator=g).to(DEV)
    perm = torch.randperm(M, generator=g).int().to(DEV)
    return d, w2, idx, cnt, torch.randn(B, M, Co, generator=g).to(DEV), perm, blk


def test_ref_forecast_reaches_the_output_only():
    """With the error forecast's slope the reference returns y + coef · slope (addcmul of the rounded
    cache), and the cache is what it is without: the forecast never enters the rolling cache."""
    d, w2, idx, cnt, yc, perm, blk = _mm2_operands(5)
    yc_plain = yc.clone()
    slope, coef = torch.randn_like(yc), torch.tensor(0.75, device=DEV)
    y_plain = mlp_sparse_mm2_ref(d, w2, idx, cnt, yc_plain, block=blk, perm=perm)
    y = mlp_sparse_mm2_ref(d, w2, idx, cnt, yc, block=blk, perm=perm, slope=slope, slope_coef=coef)
    assert torch.equal(yc, yc_plain) and torch.equal(y, torch.addcmul(y_plain, slope, coef))
    assert not torch.equal(y, y_plain)


@pytest.mark.parametrize("epi_sub", [1, 2])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_mm2_forecast_in_the_epilogue_matches_ref(triton_mode, epi_sub, layout):
    """The Triton epilogue adds coef · slope to the output only, in one piece or in two column halves
    and in the split wave tail's narrower tiles; a slope of other strides is read at the output's
    offsets after a copy. Output and cache match the reference's."""
    import triton

    from chipmunk_compile.kernels import mlp_sparse_mm2 as k2

    d, w2, idx, cnt, yc, perm, blk = _mm2_operands(6 + epi_sub)
    yc_r = yc.clone()
    B, M, Co = yc.shape
    slope = torch.randn(B, Co, M, device=DEV).transpose(1, 2) if layout == "strided" else torch.randn_like(yc)
    coef = torch.tensor(-1.5, device=DEV)
    meta = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, OCC=1, SPLIT=2, EPI_SUB=epi_sub, A_TMA=False)
    k2._force_config = triton.Config(meta, num_warps=4, num_stages=2)
    try:
        y = k2.mlp_sparse_mm2(d, w2, idx, cnt, yc, block=blk, perm=perm, slope=slope, slope_coef=coef)
    finally:
        k2._force_config = None
    y_r = mlp_sparse_mm2_ref(d, w2, idx, cnt, yc_r, block=blk, perm=perm, slope=slope, slope_coef=coef)
    assert rel_err(y, y_r) < TOL[torch.float32] and rel_err(yc, yc_r) < TOL[torch.float32]
    assert rel_err(y, yc) > 0.1  # the slope is in the output, not in the cache


@pytest.mark.parametrize("bad", ["slope_alone", "coef_alone", "shape", "dtype", "coef_not_scalar"])
@pytest.mark.parametrize("impl", ["ref", "triton"])
def test_mm2_forecast_operands_are_checked(monkeypatch, bad, impl):
    from chipmunk_compile.kernels import mlp_sparse_mm2 as k2

    d, w2, idx, cnt, yc, perm, blk = _mm2_operands(9)
    slope, coef = torch.randn_like(yc), torch.tensor(1.0, device=DEV)
    kw = {"slope_alone": dict(slope=slope), "coef_alone": dict(slope_coef=coef),
          "shape": dict(slope=slope[:, :-1], slope_coef=coef), "dtype": dict(slope=slope.double(), slope_coef=coef),
          "coef_not_scalar": dict(slope=slope, slope_coef=coef.reshape(1))}[bad]
    before = yc.clone()
    mm2 = mlp_sparse_mm2_ref if impl == "ref" else k2.mlp_sparse_mm2
    monkeypatch.setattr(k2, "launch", lambda *a, **k: pytest.fail("launched with bad forecast operands"))
    with pytest.raises(ValueError, match="slope"):
        mm2(d, w2, idx, cnt, yc, block=blk, perm=perm, **kw)
    assert torch.equal(yc, before)  # checked before the cache moves


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
    slope, coef = torch.randn_like(yc), torch.tensor(2.5, device=DEV)  # the error forecast in the epilogue
    y = get_kernel("mlp_sparse_mm2", d_r)(d_r, w2, idx, cnt, yc, block=blk, perm=perm, slope=slope, slope_coef=coef)
    y_r = mlp_sparse_mm2_ref(d_r, w2, idx, cnt, yc_r, block=blk, perm=perm, slope=slope, slope_coef=coef)
    assert rel_err(y, y_r) < TOL[dt] and rel_err(yc, yc_r) < TOL[dt]


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["mm1", "mm2"])
def test_gpu_bf16_tiles_match_ref_at_block_256(kernel):
    """Every config that can run on 256-token blocks (mm1's 256-row tiles, autotuned only there;
    mm2's delta tiles read through TMA or not) against the reference at FLUX's shape, each forced
    in turn: the tuner checks none of them."""
    from chipmunk_compile.kernels import mlp_sparse_mm1 as k1, mlp_sparse_mm2 as k2

    g = torch.Generator().manual_seed(5)
    B, M, C, Fh, Co, blk, dt = 1, 4352, 3072, 12288, 3072, 256, torch.bfloat16
    w_act, b_act, _, _, w2 = _weights(C, Fh, Co, dt, False, True, g)
    x = torch.randn(B, M, C, generator=g).to(DEV, dt)
    perm = torch.randperm(M, generator=g).int().to(DEV)
    NB, K = math.ceil(M / blk), int(0.3 * Fh)
    idx = torch.rand(B, NB, Fh, device=DEV).topk(K, dim=-1).indices.sort(-1).values.int()
    cnt = torch.randint(K // 2, K + 1, (B, NB), device=DEV).int()
    hc0 = mlp_alloc_h_cache(B, M, Fh, dt, DEV).normal_()
    hc_r = hc0.clone()
    d_r = mlp_sparse_mm1_ref(x, w_act, b_act, None, None, idx, cnt, hc_r, act="gelu_tanh", block=blk, perm=perm)
    yc0 = torch.randn(B, M, Co, device=DEV, dtype=dt)
    y_r = mlp_sparse_mm2_ref(d_r, w2, idx, cnt, yc0.clone(), block=blk, perm=perm)
    mod = k1 if kernel == "mm1" else k2
    cfgs = [c for c in mod._configs() if c.kwargs["BLOCK_M"] == 256 or c.kwargs.get("A_TMA")]
    assert cfgs
    for cfg in cfgs:
        mod._force_config = cfg
        try:
            if kernel == "mm1":
                hc = hc0.clone()
                d = k1.mlp_sparse_mm1(x, w_act, b_act, None, None, idx, cnt, hc, act="gelu_tanh", block=blk, perm=perm)
                assert rel_err(d, d_r) < TOL[dt] and rel_err(hc, hc_r) < TOL[dt], cfg
            else:
                yc = yc0.clone()
                y = k2.mlp_sparse_mm2(d_r, w2, idx, cnt, yc, block=blk, perm=perm)
                assert rel_err(y, y_r) < TOL[dt] and rel_err(yc, y_r) < TOL[dt], cfg
        finally:
            mod._force_config = None


def test_row_tiles_never_taller_than_the_token_block():
    """Autotuning keeps mm1's 256-row configs only for token blocks of >= 256; every block size keeps
    the 128-row configs (a 64-token block runs them with rows masked, as before). mm2 tunes its TMA
    configs only when the launcher built a delta descriptor."""
    from chipmunk_compile.kernels import mlp_sparse_mm1 as k1, mlp_sparse_mm2 as k2
    from chipmunk_compile.kernels._tiles import prune_row_tiles

    cfgs = k1._configs()
    for blk, tallest in ((64, 128), (128, 128), (200, 128), (256, 256), (512, 256)):
        kept = prune_row_tiles(cfgs, {}, BLK=blk)
        assert kept and max(c.kwargs["BLOCK_M"] for c in kept) == tallest
        assert len(kept) == sum(c.kwargs["BLOCK_M"] <= max(blk, 128) for c in cfgs)
    cfgs = k2._configs()
    with_desc = k2._prune(cfgs, {"DP_DESC": object()}, BLK=128)
    without = k2._prune(cfgs, {"DP_DESC": None}, BLK=128)
    assert len(with_desc) == len(cfgs) and any(c.kwargs["A_TMA"] for c in with_desc)
    assert without and not any(c.kwargs["A_TMA"] for c in without)


@pytest.mark.parametrize("case", ["batch_padded_rows", "batch_gap", "unaligned_rows"])
def test_mm2_reads_delta_through_tma_only_where_it_can(triton_mode, monkeypatch, case):
    """A delta TMA can read (rows 16-byte aligned, batches at one row pitch) gets a descriptor, and
    the kernel is launched to read it through it; other layouts fall back to cp.async loads, even
    under a forced TMA config. Both match the reference."""
    from chipmunk_compile.kernels import mlp_sparse_mm2 as k2

    g = torch.Generator().manual_seed(11)
    B, M, Fh, Co, blk, K = 2, 70, 96, 40, 32, 37
    w2 = torch.randn(Co, Fh, generator=g).to(DEV)
    pitch = {"batch_padded_rows": 64, "batch_gap": 64, "unaligned_rows": 39}[case]
    rows = M + (5 if case == "batch_gap" else 0)
    d = torch.randn(B, rows, pitch, generator=g).to(DEV)[:, :M, :K]
    idx, cnt = _indices(B, math.ceil(M / blk), Fh, (K + 0.5) / Fh, g)
    desc = k2._delta_descriptor(d)
    assert (desc is not None) == (case == "batch_padded_rows")
    yc = torch.randn(B, M, Co, generator=g).to(DEV)
    yc_r = yc.clone()
    launched = []  # the A_TMA the launcher ran with (interpreter meta or the forced config on the GPU, fixed)
    real_launch = k2.launch
    monkeypatch.setattr(k2, "launch", lambda *a, **kw: launched.append(kw["fix_meta"](
        kw["force_config"].kwargs if kw["force_config"] is not None else kw["interp_meta"])["A_TMA"])
        or real_launch(*a, **kw))
    if DEV == "cuda":  # the autotuner would pick a config by speed; force the TMA one where it may run
        monkeypatch.setattr(k2, "_force_config", next(c for c in k2._configs() if c.kwargs["A_TMA"]))
    y = k2.mlp_sparse_mm2(d, w2, idx, cnt, yc, block=blk)
    assert launched == [desc is not None]
    y_r = mlp_sparse_mm2_ref(d, w2, idx, cnt, yc_r, block=blk)
    assert rel_err(y, y_r) < TOL[torch.float32] and rel_err(yc, y_r) < TOL[torch.float32]


# Compiles one configuration for sm_90 with its integer arguments specialized as Triton does at
# run time for FLUX's MLP (4352 tokens, 3072 -> 12288, 30% of the neurons: 3686 packed columns, rows
# padded to 3712): 1 becomes a constant, multiples of 16 are marked divisible by 16. Prints ptxas'
# spill-store bytes.
_SPILLS_ON_HOPPER = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
mod, meta, warps, stages = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
M, C, F, KW, KWP = 4352, 3072, 12288, 3686, 3712
BLK = max(128, meta["BLOCK_M"])  # a 256-row tile runs only on token blocks of 256 (autotune pruning)
NB = -(-M // BLK)
common = dict(sdb=M * KWP, sdm=KWP, sdk=1, sib=NB * KW, sim=KW, scb=NB, M=M, NB=NB, NBATCH=1, NUM_SMS=132)
if mod == "mm1":
    from chipmunk_compile.kernels.mlp_sparse_mm1 import _mlp_sparse_mm1_kernel as k
    ptrs = dict(X="*bf16", WA="*bf16", BA="*bf16", WL="*bf16", BL="*bf16", IDX="*i32", CNT="*i32", HC="*bf16",
                DP="*bf16", PERM="*i32")
    ints = dict(common, sxb=M * C, sxm=C, sxc=1, swa_f=C, swa_c=1, swl_f=C, swl_c=1, shb=F * M, shm=1, shf=M,
                C=C, KW=KW, KWP=KWP)
    flags = dict(BLK=BLK, ACT=1, HAS_BA=True, HAS_WL=False, HAS_BL=False, HAS_PERM=True, KALIGN=256, DOT_PREC="tf32")
else:
    from chipmunk_compile.kernels.mlp_sparse_mm2 import _mlp_sparse_mm2_kernel as k
    ptrs = dict(DP="*bf16", W2T="*bf16", IDX="*i32", CNT="*i32", YC="*bf16", OUT="*bf16", PERM="*i32",
                SLOPE="*bf16", COEF="*fp32", DP_DESC=f"tensordesc<bf16[{meta['BLOCK_M']}, {meta['BLOCK_K']}]>")
    meta.setdefault("A_TMA", False)
    meta.setdefault("HAS_SLOPE", False)
    ints = dict(common, swf=C, swn=1, syb=M * C, sym=C, syn=1, sob=M * C, som=C, son=1, NOUT=C)
    flags = dict(BLK=BLK, HAS_PERM=True, DOT_PREC="tf32", NALIGN=256)
assert set(k.arg_names) == set(ptrs) | set(ints) | set(flags) | set(meta), set(k.arg_names) ^ (set(ptrs) | set(ints) | set(flags) | set(meta))
consts = {**flags, **meta, **{n: 1 for n, v in ints.items() if v == 1}}
sig = {n: "constexpr" if n in consts else ptrs.get(n, "i32") for n in k.arg_names}
div16 = [i for i, n in enumerate(k.arg_names) if (n in ptrs and ptrs[n][0] == "*") or (n in ints and ints[n] % 16 == 0 and ints[n] != 1)]
out = triton.compile(ASTSource(fn=k, signature=sig, constexprs=consts, attrs={(i,): [["tt.divisibility", 16]] for i in div16}),
                     target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
spills, regs = ptxas_resources(out.asm["ptx"])
print("SPILL_STORES", spills)
# OCC programs must fit one SM together (sm_90: 64K registers and up to 227 KB of shared memory per SM)
print("FITS_OCC", regs * 32 * warps * meta["OCC"] <= 65536 and out.metadata.shared * meta["OCC"] <= 227 * 1024)
"""


@pytest.mark.parametrize("mod,meta,warps,stages", [
    ("mm1", dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=64, OCC=1, SPLIT=2, EPI_SUB=2), 8, 4),
    ("mm1", dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=64, OCC=1, SPLIT=2, EPI_SUB=2), 8, 5),
    ("mm2", dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=64, OCC=1, SPLIT=4, EPI_SUB=2), 8, 4),
    ("mm2", dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=64, OCC=1, SPLIT=2, EPI_SUB=1), 4, 5),
    # 256-row tiles (token blocks of 256): the accumulator is as large as 128x256's
    ("mm1", dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, GROUP_M=64, OCC=1, SPLIT=2, EPI_SUB=2), 8, 4),
    # two programs per SM: 255 registers and 96 KB of shared memory at most
    ("mm1", dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=64, OCC=2, SPLIT=2, EPI_SUB=2), 4, 3),
    ("mm2", dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=64, OCC=1, SPLIT=2, EPI_SUB=1, A_TMA=True), 4, 5),
    # the error forecast's slope read in the epilogue
    ("mm2", dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=64, OCC=1, SPLIT=4, EPI_SUB=2, HAS_SLOPE=True), 8, 4),
    ("mm2", dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=64, OCC=1, SPLIT=2, EPI_SUB=1, A_TMA=True,
                 HAS_SLOPE=True), 4, 5),
])
def test_fast_configs_compile_for_hopper_without_spills(mod, meta, warps, stages):
    """The H200's chosen tiles keep their epilogue in registers (no local-memory spills): a
    whole-tile pointer tensor or a one-piece 128x256 epilogue spilled 88-380 bytes per thread. A
    config that claims OCC programs per SM fits them (registers, shared memory).
    Compiled for sm_90 here, with no GPU."""
    import json

    out = compile_for_hopper(_SPILLS_ON_HOPPER, mod, json.dumps(meta), warps, stages)
    assert "SPILL_STORES 0" in out, out
    assert "FITS_OCC True" in out, out  # the grid's wave-tail split counts OCC programs per SM


def test_w2_rows_caches_one_copy_per_weight_by_identity():
    """A row-major w2 is transposed once per weight (counted) and reused until it changes in place;
    the cache tells weights apart by identity, never by Tensor.__eq__ (which raises on a hash
    collision between two live weights)."""
    from torch._dynamo.utils import counters

    from chipmunk_compile.kernels.mlp_sparse_mm2 import w2_rows

    class Colliding(torch.Tensor):  # every instance hashes alike: a dict must compare them
        def __hash__(self):
            return 7

    a, b = (torch.Tensor._make_subclass(Colliding, torch.randn(6, 4)) for _ in range(2))
    counters.clear()
    ta, tb = w2_rows(a), w2_rows(b)
    assert torch.equal(ta, a.t()) and torch.equal(tb, b.t())
    assert w2_rows(a) is ta and w2_rows(b) is tb
    assert counters["chipmunk"]["kernel_note:mlp_sparse_mm2:w2_transposed_copy"] == 2
    a.mul_(2.0)  # an in-place update invalidates the copy
    assert torch.equal(w2_rows(a), a.t()) and counters["chipmunk"]["kernel_note:mlp_sparse_mm2:w2_transposed_copy"] == 3
    cols = torch.randn(4, 6).t()  # column-major: a view, no copy
    assert w2_rows(cols).data_ptr() == cols.data_ptr()


def test_w2_rows_of_an_inference_tensor_copies_every_call():
    """An inference tensor has no version counter (reading it raised): its transposed copy is made
    on every call, so an in-place change under inference mode is never missed, and none is kept."""
    from torch._dynamo.utils import counters

    from chipmunk_compile.kernels.mlp_sparse_mm2 import _W2T_CACHE, w2_rows

    with torch.inference_mode():
        w = torch.randn(6, 4)
    counters.clear()
    assert torch.equal(w2_rows(w), w.t())
    with torch.inference_mode():
        w.mul_(2.0)
    assert torch.equal(w2_rows(w), w.t())
    assert counters["chipmunk"]["kernel_note:mlp_sparse_mm2:w2_transposed_copy"] == 2 and w not in _W2T_CACHE
