"""attn_dense_colsum: reference vs naive formulas, Triton (interpreter / GPU) vs reference."""

import math

import pytest
import torch
import torch.nn.functional as F
from kernel_testutils import DEV, TOL, rel_err

from chipmunk_compile.kernels import attn_dense_colsum_ref, get_kernel


def _inputs(B, Hq, Hkv, N, Nk, D, dtype, masked, permuted, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, N, Hq, D, generator=g).transpose(1, 2)  # permuted view, like diffusers
    k = torch.randn(B, Hkv, Nk, D, generator=g)
    v = torch.randn(B, Hkv, Nk, D, generator=g)
    km = (torch.rand(B, Nk, generator=g) > 0.3) if masked else None
    if km is not None:
        km[:, 0] = True
    perm = torch.randperm(N, generator=g).to(torch.int32) if permuted else None
    prev = torch.randn(B, Hq, N, generator=g) + 3.0
    to = dict(device=DEV)
    return (q.to(dtype=dtype, **to), k.to(dtype=dtype, **to), v.to(dtype=dtype, **to),
            None if km is None else km.to(**to), None if perm is None else perm.to(**to), prev.to(**to))


def _bias(kind, B, Hq, N, Nk, dtype, km=None, seed=0):
    """An additive score bias, and key_mask with the band's centre keys kept (every row keeps a key).
    full: (B, Hq, N, Nk) in q's dtype, a strided view; bcast: (N, Nk) in another dtype; band: 0 in
    a window of 7 keys around the scaled diagonal, else -inf (most rows are all -inf in some tiles)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "full":
        bias = (torch.randn(B, N, Hq, Nk, generator=g) * 2).transpose(1, 2).to(dtype)
    elif kind == "bcast":
        bias = (torch.randn(N, Nk, generator=g) * 2).to(torch.float16 if dtype == torch.float32 else torch.float32)
    else:
        centre = torch.arange(N) * Nk // N
        far = (torch.arange(Nk)[None, :] - centre[:, None]).abs() > 3
        bias = torch.zeros(N, Nk).masked_fill(far, float("-inf")).to(dtype)
        if km is not None:
            km = km.clone()
            km[:, centre.to(km.device)] = True
    return bias.to(DEV), km


def _naive_colsum(q, k, scale, G, km, perm, lse_ref, bias=None):
    B, Hq, N, _ = q.shape
    rep = Hq // k.shape[1]
    s = torch.einsum("bhnd,bhkd->bhnk", q.double(), k.double().repeat_interleave(rep, 1)) * scale
    if bias is not None:
        s = s + bias.double()
    if km is not None:
        s = s.masked_fill(~km[:, None, None, :], float("-inf"))
    p = torch.exp(s - lse_ref.double()[..., None])
    order = torch.arange(N, device=q.device) if perm is None else perm.long()
    out = torch.zeros(B, Hq, math.ceil(N / G), k.shape[2], dtype=torch.float64, device=q.device)
    for gi in range(out.shape[2]):
        out[:, :, gi] = p[:, :, order[gi * G:(gi + 1) * G]].sum(2)
    return out


@pytest.mark.parametrize("masked,permuted,prev", [(False, False, False), (True, True, True), (True, False, False)])
def test_ref_matches_sdpa_and_naive_colsum(masked, permuted, prev):
    q, k, v, km, perm, prev_lse = _inputs(2, 4, 2, 37, 45, 64, torch.float32, masked, permuted)
    scale, G = 0.11, 8
    o, lse, cs = attn_dense_colsum_ref(q, k, v, scale=scale, group=G, key_mask=km, perm=perm,
                                       prev_lse=prev_lse if prev else None)
    rep = 2
    mask = None if km is None else km[:, None, None, :]
    o_sdpa = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                            attn_mask=mask, scale=scale)
    assert rel_err(o, o_sdpa) < 1e-5
    assert o.transpose(1, 2).is_contiguous()  # (B, N, H, D) buffer
    s = torch.einsum("bhnd,bhkd->bhnk", q.double(), k.double().repeat_interleave(rep, 1)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    assert rel_err(lse, torch.logsumexp(s, -1)) < 1e-6
    naive = _naive_colsum(q, k, scale, G, km, perm, prev_lse if prev else lse)
    assert rel_err(cs, naive) < 1e-5
    if km is not None:
        assert (cs.masked_select(~km[:, None, None, :].expand_as(cs)) == 0).all()


@pytest.mark.parametrize("kind", ["full", "bcast", "band"])
@pytest.mark.parametrize("masked,permuted,prev", [(False, False, False), (True, True, True)])
def test_ref_bias_matches_sdpa_and_naive_colsum(kind, masked, permuted, prev):
    q, k, v, km, perm, prev_lse = _inputs(2, 4, 2, 37, 45, 64, torch.float32, masked, permuted)
    bias, km = _bias(kind, 2, 4, 37, 45, torch.float32, km)
    scale, G = 0.11, 8
    o, lse, cs = attn_dense_colsum_ref(q, k, v, scale=scale, group=G, key_mask=km, perm=perm,
                                       prev_lse=prev_lse if prev else None, bias=bias)
    mask = bias.float() if km is None else bias.float().masked_fill(~km[:, None, None, :], float("-inf"))
    o_sdpa = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                            attn_mask=mask, scale=scale)
    assert rel_err(o, o_sdpa) < 1e-5
    s = torch.einsum("bhnd,bhkd->bhnk", q.double(), k.double().repeat_interleave(2, 1)) * scale + mask.double()
    assert rel_err(lse, torch.logsumexp(s, -1)) < 1e-6
    assert rel_err(cs, _naive_colsum(q, k, scale, G, km, perm, prev_lse if prev else lse, bias)) < 1e-5


CASES = [
    # B, Hq, Hkv, N, Nk, G, masked, permuted, prev
    (1, 2, 2, 70, 70, 32, False, False, True),    # G multiple of the interpreter tile
    (1, 4, 2, 45, 83, 48, True, True, True),      # GQA, tiles straddle two groups, mask, perm
    (2, 2, 1, 29, 31, 16, True, False, False),    # G < tile: loop over groups; current-lse 2nd pass
    (1, 2, 2, 200, 150, 64, False, True, False),
]


@pytest.mark.parametrize("mma", ["0", "1"], ids=["rowsum", "mma-colsum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_triton_matches_ref(triton_mode, case, dtype, mma, monkeypatch):
    monkeypatch.setenv("CHIPMUNK_COLSUM_MMA", mma)  # both column-sum implementations
    B, Hq, Hkv, N, Nk, G, masked, permuted, prev = case
    q, k, v, km, perm, prev_lse = _inputs(B, Hq, Hkv, N, Nk, 64, dtype, masked, permuted, seed=N)
    kw = dict(scale=0.125, group=G, key_mask=km, perm=perm, prev_lse=prev_lse if prev else None)
    fn = get_kernel("attn_dense_colsum", q, k, v, head_dim=64)
    assert fn is not attn_dense_colsum_ref
    o, lse, cs = fn(q, k, v, **kw)
    o_r, lse_r, cs_r = attn_dense_colsum_ref(q, k, v, **kw)
    assert o.shape == o_r.shape and o.stride() == o_r.stride()
    assert rel_err(o, o_r) < TOL[dtype]
    assert rel_err(lse, lse_r) < 1e-5
    assert rel_err(cs, cs_r) < max(TOL[dtype], 1e-5) * 2
    o2, lse2, cs2 = fn(q, k, v, **{**kw, "want_colsum": False})
    assert cs2 is None and rel_err(o2, o_r) < TOL[dtype]


BIAS_CASES = [
    # B, Hq, Hkv, N, Nk, G, masked, permuted
    (1, 4, 2, 45, 83, 48, True, True),    # GQA, tiles straddle two groups, mask, perm
    (2, 2, 1, 29, 70, 16, False, False),  # G < tile, Nk tail
    (1, 2, 2, 70, 37, 32, False, True),
]


@pytest.mark.parametrize("kind", ["full", "bcast", "band"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", BIAS_CASES)
def test_triton_bias_matches_ref(triton_mode, case, dtype, kind):
    """Bias in both passes (with prev_lse: one pass; without: the column-sum pass), at original query rows."""
    B, Hq, Hkv, N, Nk, G, masked, permuted = case
    q, k, v, km, perm, prev_lse = _inputs(B, Hq, Hkv, N, Nk, 64, dtype, masked, permuted, seed=N)
    bias, km = _bias(kind, B, Hq, N, Nk, dtype, km, seed=Nk)
    fn = get_kernel("attn_dense_colsum", q, k, v, head_dim=64)
    assert fn is not attn_dense_colsum_ref
    for prev in (prev_lse, None):
        kw = dict(scale=0.125, group=G, key_mask=km, perm=perm, prev_lse=prev, bias=bias)
        (o, lse, cs), (o_r, lse_r, cs_r) = fn(q, k, v, **kw), attn_dense_colsum_ref(q, k, v, **kw)
        assert rel_err(o, o_r) < TOL[dtype]
        assert rel_err(lse, lse_r) < 1e-5
        assert rel_err(cs, cs_r) < max(TOL[dtype], 1e-5) * 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("D", [40, 72, 96, 256])
def test_triton_padded_head_dims(triton_mode, D, dtype):
    """Head dims that are not a power of two: tiles of the next one, the columns past D masked."""
    q, k, v, km, perm, prev_lse = _inputs(1, 4, 2, 45, 83, D, dtype, True, True, seed=D)
    kw = dict(scale=D ** -0.5, group=48, key_mask=km, perm=perm, prev_lse=prev_lse)
    fn = get_kernel("attn_dense_colsum", q, k, v)
    assert fn is not attn_dense_colsum_ref
    (o, lse, cs), (o_r, lse_r, cs_r) = fn(q, k, v, **kw), attn_dense_colsum_ref(q, k, v, **kw)
    assert rel_err(o, o_r) < TOL[dtype] and rel_err(lse, lse_r) < 1e-5
    assert rel_err(cs, cs_r) < max(TOL[dtype], 1e-5) * 2


@pytest.mark.gpu
@pytest.mark.parametrize("D", [72, 96, 256])
def test_gpu_bf16_padded_head_dims(D):
    q, k, v, km, perm, prev_lse = _inputs(1, 16, 16, 4096, 4096, D, torch.bfloat16, True, True, seed=D)
    kw = dict(scale=D ** -0.5, group=128, key_mask=km, perm=perm, prev_lse=prev_lse)
    (o, lse, cs), (o_r, lse_r, cs_r) = get_kernel("attn_dense_colsum", q, k, v)(q, k, v, **kw), \
        attn_dense_colsum_ref(q, k, v, **kw)
    assert rel_err(o, o_r) < TOL[torch.bfloat16] and rel_err(lse, lse_r) < 1e-3 and rel_err(cs, cs_r) < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("N,G,Hq,Hkv", [(4352, 192, 4, 4), (4352, 128, 4, 2), (1000, 192, 2, 2)])
def test_gpu_bf16_real_shapes(N, G, Hq, Hkv):
    q, k, v, km, perm, prev_lse = _inputs(1, Hq, Hkv, N, N, 128, torch.bfloat16, True, True, seed=1)
    kw = dict(scale=128 ** -0.5, group=G, key_mask=km, perm=perm, prev_lse=prev_lse)
    fn = get_kernel("attn_dense_colsum", q, k, v)
    o, lse, cs = fn(q, k, v, **kw)
    o_r, lse_r, cs_r = attn_dense_colsum_ref(q, k, v, **kw)
    assert rel_err(o, o_r) < TOL[torch.bfloat16]
    assert rel_err(lse, lse_r) < 1e-3
    assert rel_err(cs, cs_r) < 2e-2
    o, lse, cs = fn(q, k, v, **{**kw, "prev_lse": None})
    o_r, lse_r, cs_r = attn_dense_colsum_ref(q, k, v, **{**kw, "prev_lse": None})
    assert rel_err(cs, cs_r) < 2e-2


@pytest.mark.gpu
def test_gpu_bf16_bias():
    N = 4352
    q, k, v, km, perm, prev_lse = _inputs(1, 24, 24, N, N, 128, torch.bfloat16, True, True, seed=2)
    g = torch.Generator().manual_seed(3)
    bias = torch.randn(N, N, generator=g).masked_fill(torch.rand(N, N, generator=g) < 0.2, float("-inf"))
    bias[:1000, 2048:] = float("-inf")  # whole tiles at -inf for these rows
    bias = bias.to(DEV)
    fn = get_kernel("attn_dense_colsum", q, k, v)
    for prev in (prev_lse, None):
        kw = dict(scale=128 ** -0.5, group=128, perm=perm, prev_lse=prev, bias=bias, key_mask=km)
        (o, lse, cs), (o_r, lse_r, cs_r) = fn(q, k, v, **kw), attn_dense_colsum_ref(q, k, v, **kw)
        assert rel_err(o, o_r) < TOL[torch.bfloat16] and rel_err(lse, lse_r) < 1e-3 and rel_err(cs, cs_r) < 2e-2
