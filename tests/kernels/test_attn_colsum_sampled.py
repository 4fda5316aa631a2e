"""attn_colsum_sampled: offsets, reference vs naive / full column sums, Triton (interpreter / GPU) vs reference,
with and without an additive score bias."""

import math

import pytest
import torch
from kernel_testutils import DEV, TOL, rel_err

from chipmunk_compile.kernels import attn_colsum_sampled_ref, attn_dense_colsum_ref, get_kernel
from chipmunk_compile.kernels.attn_colsum_sampled_ref import MAX_SAMPLES, sample_offsets, to_e4m3


def _inputs(B, Hq, Hkv, N, Nk, D, dtype, masked, permuted, seed=0, bias=None):
    """q, k, key mask, perm and the exact lse of the (biased, masked) scores, on DEV."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, N, Hq, D, generator=g).transpose(1, 2)  # permuted view, like diffusers
    k = torch.randn(B, Nk, Hkv, D, generator=g).transpose(1, 2)
    km = (torch.rand(B, Nk, generator=g) > 0.3) if masked else None
    if km is not None:
        km[:, 0] = True
    perm = torch.randperm(N, generator=g).to(torch.int32) if permuted else None
    rep = Hq // Hkv
    s = torch.einsum("bhnd,bhkd->bhnk", q.double(), k.double().repeat_interleave(rep, 1)) * 0.125
    if bias is not None:
        s = s + bias.double()
    if km is not None:
        s = s.masked_fill(~km[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(s, -1).float()
    to = dict(device=DEV)
    return (q.to(dtype=dtype, **to), k.to(dtype=dtype, **to), lse.to(**to),
            None if km is None else km.to(**to), None if perm is None else perm.to(**to))


def _bias(kind, B, Hq, N, Nk, dtype, seed=0):
    """A CPU bias: "full" (B, Hq, N, Nk) in q's dtype, strided like a permuted buffer; "broadcast" (N, Nk)
    in another dtype than q, a transposed view (key stride N); "banded" (1, 1, N, Nk) 0/-inf, a window
    of 7 keys around the diagonal plus key 0 (never a fully masked row), so most rows are -inf across
    most key tiles."""
    g = torch.Generator().manual_seed(seed)
    other = torch.float16 if dtype == torch.float32 else torch.float32
    if kind == "full":
        return (2 * torch.randn(B, N, Hq, Nk, generator=g)).transpose(1, 2).to(dtype)
    if kind == "broadcast":
        return (2 * torch.randn(Nk, N, generator=g)).to(other).t()
    diag = torch.arange(N)[:, None] * Nk // N
    j = torch.arange(Nk)[None, :]
    band = ((diag - j).abs() <= 3) | (j == 0)
    return torch.zeros(1, 1, N, Nk).masked_fill(~band, float("-inf")).to(dtype)


BIASES = ["full", "broadcast", "banded"]


@pytest.mark.parametrize("G,S", [(128, 32), (128, 128), (192, 64), (100, 32), (8, 32), (300, 200), (7, 3)])
def test_sample_offsets(G, S):
    offs = sample_offsets(G, S)
    used = [o for o in offs if o >= 0]
    n = min(S, G, MAX_SAMPLES)
    assert len(used) == n and used == sorted(set(used)) and 0 <= used[0] and used[-1] < G
    assert len(offs) >= 16 and len(offs) & (len(offs) - 1) == 0 and len(offs) < 2 * max(n, 16)
    assert all(o == -1 for o in offs[n:])
    if S >= G and G <= MAX_SAMPLES:
        assert used == list(range(G))  # every query


def test_sample_offsets_rejects_bad_input():
    with pytest.raises(ValueError):
        sample_offsets(0, 4)
    with pytest.raises(ValueError):
        sample_offsets(128, 0)


@pytest.mark.parametrize("masked,permuted", [(False, False), (True, True)])
def test_ref_all_queries_equals_full_column_sums(masked, permuted):
    q, k, lse, km, perm = _inputs(2, 4, 2, 45, 39, 64, torch.float32, masked, permuted)
    v = torch.randn_like(k)
    G = 16
    cs = attn_colsum_sampled_ref(q, k, lse, scale=0.125, group=G, samples=G, key_mask=km, perm=perm)
    _, _, full = attn_dense_colsum_ref(q, k, v, scale=0.125, group=G, key_mask=km, perm=perm)
    assert cs.shape == full.shape == (2, 4, math.ceil(45 / G), 39)
    assert rel_err(cs, full) < 1e-5
    if km is not None:
        assert (cs.masked_select(~km[:, None, None, :].expand_as(cs)) == 0).all()


def test_ref_samples_only_the_offsets():
    q, k, lse, _, perm = _inputs(1, 2, 2, 40, 33, 64, torch.float32, False, True)
    G, S = 16, 4
    cs = attn_colsum_sampled_ref(q, k, lse, scale=0.125, group=G, samples=S, perm=perm)
    offs = [o for o in sample_offsets(G, S) if o >= 0]
    assert offs == [0, 5, 10, 15]  # a diagonal of each 4x4 window
    p = torch.exp(torch.einsum("bhnd,bhkd->bhnk", q, k) * 0.125 - lse[..., None])
    for g in range(3):
        rows = [perm[g * G + o].item() for o in offs if g * G + o < 40]  # last group: 8 queries, 2 sampled
        assert rel_err(cs[:, :, g], p[:, :, rows].sum(2)) < 1e-5


@pytest.mark.parametrize("qk_fp8", [False, True])
@pytest.mark.parametrize("kind", BIASES)
def test_ref_bias_matches_naive(kind, qk_fp8):
    """colsum[g, j] = sum over the sampled queries i of exp(scale q_i·k_j + bias[i, j] - lse_i), in float64,
    with the bias indexed by the query (after perm); -inf pairs give exactly 0."""
    B, Hq, Hkv, N, Nk, G, S = 2, 4, 2, 45, 39, 16, 4
    bias = _bias(kind, B, Hq, N, Nk, torch.float32, seed=1)
    q, k, lse, km, perm = _inputs(B, Hq, Hkv, N, Nk, 64, torch.float32, True, True, bias=bias)
    bias = bias.to(DEV)
    kw = dict(scale=0.125, group=G, samples=S, key_mask=km, perm=perm, qk_fp8=qk_fp8)
    cs = attn_colsum_sampled_ref(q, k, lse, **kw, bias=bias)
    qd, kd = (to_e4m3(q).double(), to_e4m3(k).double()) if qk_fp8 else (q.double(), k.double())
    s = torch.einsum("bhnd,bhkd->bhnk", qd, kd.repeat_interleave(Hq // Hkv, 1)) * 0.125 + bias.double()
    p = torch.exp(s.masked_fill(~km[:, None, None, :], float("-inf")) - lse.double()[..., None])
    offs = [o for o in sample_offsets(G, S) if o >= 0]
    naive = torch.stack([p[:, :, [perm[g * G + o].item() for o in offs if g * G + o < N]].sum(2)
                         for g in range(math.ceil(N / G))], 2)
    assert rel_err(cs, naive) < 1e-5
    assert rel_err(attn_colsum_sampled_ref(q, k, lse, **kw), naive) > 0.1  # the bias matters
    if kind == "banded":
        assert ((naive == 0) == (cs == 0)).all() and (cs == 0).float().mean() > 0.5


CASES = [
    # B, Hq, Hkv, N, Nk, G, S, masked, permuted
    (1, 2, 2, 70, 70, 32, 16, False, False),     # two groups per interpreter tile
    (1, 4, 2, 45, 83, 48, 16, True, True),       # GQA, short last group, key tail, mask, perm
    (2, 2, 1, 29, 31, 16, 16, True, False),      # every query (S = G), batch 2
    (1, 2, 2, 200, 150, 64, 32, False, True),
    (1, 2, 2, 130, 300, 128, 128, False, False),  # one group per tile, all 128 queries
    (1, 2, 2, 90, 61, 100, 3, False, True),      # G not a power of two, 3 of 16 slots used
]


@pytest.mark.parametrize("reduce", ["sum", "mma"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_triton_matches_ref(triton_mode, case, dtype, reduce, monkeypatch):
    monkeypatch.setenv("CHIPMUNK_COLSUM_REDUCE", reduce)
    B, Hq, Hkv, N, Nk, G, S, masked, permuted = case
    q, k, lse, km, perm = _inputs(B, Hq, Hkv, N, Nk, 64, dtype, masked, permuted, seed=N)
    kw = dict(scale=0.125, group=G, samples=S, key_mask=km, perm=perm)
    fn = get_kernel("attn_colsum_sampled", q, k, head_dim=64)
    assert fn is not attn_colsum_sampled_ref
    cs = fn(q, k, lse, **kw)
    cs_r = attn_colsum_sampled_ref(q, k, lse, **kw)
    assert cs.shape == cs_r.shape
    assert rel_err(cs, cs_r) < max(TOL[dtype], 1e-5) * 2  # also: no NaN-poisoned element left
    half = fn(q, k, lse, **kw, out_dtype=torch.float16)
    assert half.dtype == torch.float16 and rel_err(half, cs_r) < 2e-3


@pytest.mark.parametrize("reduce", ["sum", "mma"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind", BIASES)
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[5]])
def test_triton_bias_matches_ref(triton_mode, case, kind, dtype, reduce, monkeypatch):
    """The bias of each sampled query (permuted rows, odd N, key tails, key mask too), full or
    broadcast or banded with -inf across whole tiles."""
    monkeypatch.setenv("CHIPMUNK_COLSUM_REDUCE", reduce)
    B, Hq, Hkv, N, Nk, G, S, masked, permuted = case
    bias = _bias(kind, B, Hq, N, Nk, dtype, seed=N)
    q, k, lse, km, perm = _inputs(B, Hq, Hkv, N, Nk, 64, dtype, masked, permuted, seed=N, bias=bias)
    kw = dict(scale=0.125, group=G, samples=S, key_mask=km, perm=perm, bias=bias.to(DEV))
    fn = get_kernel("attn_colsum_sampled", q, k, head_dim=64)
    assert fn is not attn_colsum_sampled_ref
    cs = fn(q, k, lse, **kw)
    assert rel_err(cs, attn_colsum_sampled_ref(q, k, lse, **kw)) < max(TOL[dtype], 1e-5) * 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("D", [40, 72, 96, 256])
def test_triton_padded_head_dims(triton_mode, D, dtype):
    """Head dims that are not a power of two: tiles of the next one, the columns past D masked."""
    q, k, lse, km, perm = _inputs(1, 4, 2, 45, 83, D, dtype, True, True, seed=D)
    kw = dict(scale=D ** -0.5, group=48, samples=16, key_mask=km, perm=perm)
    fn = get_kernel("attn_colsum_sampled", q, k)
    assert fn is not attn_colsum_sampled_ref
    assert rel_err(fn(q, k, lse, **kw), attn_colsum_sampled_ref(q, k, lse, **kw)) < max(TOL[dtype], 1e-5) * 2


def test_ref_fp8_scores_round_q_and_k_and_saturate():
    """qk_fp8: the scores are those of e4m3-rounded q and k; values past e4m3's ±448 saturate
    instead of turning into NaN (e4m3 has no inf)."""
    q, k, lse, km, perm = _inputs(1, 2, 2, 96, 80, 64, torch.float32, True, True)
    kw = dict(scale=0.125, group=32, samples=16, key_mask=km, perm=perm)
    rounded = lambda x: to_e4m3(x).float()  # noqa: E731
    exact = attn_colsum_sampled_ref(q, k, lse, **kw)
    cs = attn_colsum_sampled_ref(q, k, lse, **kw, qk_fp8=True)
    assert torch.equal(cs, attn_colsum_sampled_ref(rounded(q), rounded(k), lse, **kw))
    assert 1e-3 < rel_err(cs, exact) < 0.3  # rounded, yet close
    big = k.clone()
    big[0, 0, 3] = 1e4
    assert to_e4m3(big).float().abs().max().item() == 448.0
    assert torch.isfinite(attn_colsum_sampled_ref(q, big, lse, **kw, qk_fp8=True)).all()


@pytest.mark.parametrize("reduce", ["sum", "mma"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES[:4])
def test_triton_fp8_scores_match_ref(triton_mode, case, dtype, reduce, monkeypatch):
    """The kernel's e4m3 scores equal the reference's rounding (the mma reduction also rounds p to fp16)."""
    monkeypatch.setenv("CHIPMUNK_COLSUM_REDUCE", reduce)
    B, Hq, Hkv, N, Nk, G, S, masked, permuted = case
    q, k, lse, km, perm = _inputs(B, Hq, Hkv, N, Nk, 64, dtype, masked, permuted, seed=N)
    kw = dict(scale=0.125, group=G, samples=S, key_mask=km, perm=perm, qk_fp8=True)
    cs = get_kernel("attn_colsum_sampled", q, k, head_dim=64)(q, k, lse, **kw)
    cs_r = attn_colsum_sampled_ref(q, k, lse, **kw)
    assert rel_err(cs, cs_r) < (1e-5 if reduce == "sum" else 2e-3)
    assert rel_err(cs, attn_colsum_sampled_ref(q, k, lse, **{**kw, "qk_fp8": False})) > 1e-3  # fp8 did happen


@pytest.mark.parametrize("reduce", ["sum", "mma"])
@pytest.mark.parametrize("kind", BIASES)
def test_triton_fp8_scores_with_bias_match_ref(triton_mode, kind, reduce, monkeypatch):
    """qk_fp8: the bias is added in fp32 to the e4m3 product's scores, as in the reference."""
    monkeypatch.setenv("CHIPMUNK_COLSUM_REDUCE", reduce)
    B, Hq, Hkv, N, Nk, G, S, masked, permuted = CASES[1]
    bias = _bias(kind, B, Hq, N, Nk, torch.float16, seed=3)
    q, k, lse, km, perm = _inputs(B, Hq, Hkv, N, Nk, 64, torch.float16, masked, permuted, seed=3, bias=bias)
    kw = dict(scale=0.125, group=G, samples=S, key_mask=km, perm=perm, qk_fp8=True, bias=bias.to(DEV))
    cs = get_kernel("attn_colsum_sampled", q, k, head_dim=64)(q, k, lse, **kw)
    assert rel_err(cs, attn_colsum_sampled_ref(q, k, lse, **kw)) < (1e-5 if reduce == "sum" else 2e-3)


def test_triton_key_split_covers_every_column(triton_mode, monkeypatch):
    """Few rows and many key tiles: the key axis is split over programs; every column is written once."""
    from chipmunk_compile.kernels import attn_colsum_sampled as mod

    assert mod.key_splits(1, 2, 10, 3) == 3 and mod.key_splits(100, 8, 10, 132) == 1
    q, k, lse, _, _ = _inputs(1, 1, 1, 20, 200, 64, torch.float32, False, False)
    cs = mod.attn_colsum_sampled(q, k, lse, scale=0.125, group=32, samples=16)
    assert rel_err(cs, attn_colsum_sampled_ref(q, k, lse, scale=0.125, group=32, samples=16)) < 1e-5


@pytest.mark.parametrize("reduce", ["sum", "mma"])
def test_triton_ablations_skip_their_work(triton_mode, reduce, monkeypatch):
    """benchmarks/kernel_ablation.py's switches: each changes the result (the work is skipped), none
    is on by default."""
    from chipmunk_compile.kernels import attn_colsum_sampled as mod

    monkeypatch.setenv("CHIPMUNK_COLSUM_REDUCE", reduce)
    q, k, lse, _, _ = _inputs(1, 2, 2, 70, 90, 64, torch.float16, False, False)
    kw = dict(scale=0.125, group=32, samples=16)
    ref = attn_colsum_sampled_ref(q, k, lse, **kw)
    assert rel_err(mod.attn_colsum_sampled(q, k, lse, **kw, ablate=""), ref) < 2e-3
    assert set(mod.ABLATIONS) == {"", "exp", "keys"}
    for name in ("exp", "keys"):
        out = mod.attn_colsum_sampled(q, k, lse, **kw, ablate=name)  # exponents as probabilities may give NaN
        assert torch.isnan(out).any() or rel_err(out, ref) > 0.1, name


@pytest.mark.gpu
@pytest.mark.parametrize("reduce", ["sum", "mma"])
@pytest.mark.parametrize("N,G,S,Hq,Hkv", [(4352, 128, 32, 4, 4), (4352, 128, 128, 4, 2), (1000, 192, 64, 2, 2)])
def test_gpu_bf16_real_shapes(N, G, S, Hq, Hkv, reduce, monkeypatch):
    monkeypatch.setenv("CHIPMUNK_COLSUM_REDUCE", reduce)
    q, k, lse, km, perm = _inputs(1, Hq, Hkv, N, N, 128, torch.bfloat16, True, True, seed=1)
    kw = dict(scale=0.125, group=G, samples=S, key_mask=km, perm=perm)
    cs = get_kernel("attn_colsum_sampled", q, k)(q, k, lse, **kw)
    assert rel_err(cs, attn_colsum_sampled_ref(q, k, lse, **kw)) < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("reduce", ["sum", "mma"])
@pytest.mark.parametrize("D,qk_fp8", [(72, False), (96, True), (256, False)])
def test_gpu_bf16_padded_head_dims(D, qk_fp8, reduce, monkeypatch):
    monkeypatch.setenv("CHIPMUNK_COLSUM_REDUCE", reduce)
    q, k, lse, km, perm = _inputs(1, 16, 16, 4096, 4096, D, torch.bfloat16, True, True, seed=D)
    kw = dict(scale=D ** -0.5, group=128, samples=32, key_mask=km, perm=perm, qk_fp8=qk_fp8)
    cs = get_kernel("attn_colsum_sampled", q, k)(q, k, lse, **kw)
    assert rel_err(cs, attn_colsum_sampled_ref(q, k, lse, **kw)) < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("reduce", ["sum", "mma"])
def test_gpu_bf16_fp8_scores(reduce, monkeypatch):
    """On the GPU q is cast to e4m3 inside the kernel (round to nearest, as torch's cast)."""
    monkeypatch.setenv("CHIPMUNK_COLSUM_REDUCE", reduce)
    q, k, lse, km, perm = _inputs(1, 4, 2, 20000, 20000, 128, torch.bfloat16, True, True, seed=2)
    kw = dict(scale=0.125, group=128, samples=32, key_mask=km, perm=perm, qk_fp8=True)
    cs = get_kernel("attn_colsum_sampled", q, k)(q, k, lse, **kw)
    assert rel_err(cs, attn_colsum_sampled_ref(q, k, lse, **kw)) < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("reduce", ["sum", "mma"])
def test_gpu_bf16_bias(reduce, monkeypatch):
    """FLUX's shape with a (N, Nk) fp32 bias: random, -inf outside a window of 2049 keys (whole -inf
    tiles, full tiles vectorised, the key tail masked), with the key mask and the permutation."""
    monkeypatch.setenv("CHIPMUNK_COLSUM_REDUCE", reduce)
    N, Nk = 4352, 4352
    bias = _bias("broadcast", 1, 24, N, Nk, torch.bfloat16, seed=4)
    j = torch.arange(Nk)[None, :]
    bias = bias.masked_fill(((torch.arange(N)[:, None] - j).abs() > 1024) & (j > 0), float("-inf"))
    assert bias.dtype == torch.float32
    q, k, lse, km, perm = _inputs(1, 24, 24, N, Nk, 128, torch.bfloat16, True, True, seed=4, bias=bias)
    kw = dict(scale=0.125, group=128, samples=32, key_mask=km, perm=perm, bias=bias.to(DEV))
    cs = get_kernel("attn_colsum_sampled", q, k)(q, k, lse, **kw)
    assert rel_err(cs, attn_colsum_sampled_ref(q, k, lse, **kw)) < 2e-2
