"""mlp_select_neurons: the reference's contract, and the one-launch Triton kernel against it."""

import pytest
import torch
from kernel_testutils import DEV, compile_for_hopper

from chipmunk_compile.kernels import get_kernel, mlp_select_neurons_ref
from chipmunk_compile.kernels.mlp_select_neurons_ref import neuron_scores
from chipmunk_compile.kernels.random_draws_ref import HashDraws, hash_ints


def _inputs(B, nb, Fh, gated, kind, g):
    Fb = 2 * Fh if gated else Fh
    bm = torch.randn(B, nb, Fb, generator=g)
    if kind == "ties":  # few distinct changes: the K-th score is tied
        step = torch.randint(0, 5, (B, nb, Fb), generator=g).float() / 4
    else:
        step = torch.randn(B, nb, Fb, generator=g)
    return bm + step, bm


def _check_selection(scores, idx, K):
    """K distinct ascending neurons holding a top-K score set, ties at the threshold lowest-first."""
    assert idx.dtype == torch.int32 and idx.shape[-1] == K
    for s, sel in zip(scores.reshape(-1, scores.shape[-1]), idx.reshape(-1, K)):
        sel = sel.long()
        assert (sel[1:] > sel[:-1]).all() and int(sel.min()) >= 0 and int(sel.max()) < s.numel()
        assert torch.equal(s[sel].sort().values, s.topk(K).values.sort().values)
        t = s[sel].min()
        tied = (s == t).nonzero().view(-1)
        taken = sel[s[sel] == t]
        assert torch.equal(taken, tied[:len(taken)])


@pytest.mark.parametrize("gated", [False, True])
def test_reference_contract(gated):
    g = torch.Generator().manual_seed(1)
    B, nb, Fh, K = 2, 3, 50, 12
    basis, bm = _inputs(B, nb, Fh, gated, "ties", g)
    draws = torch.randint(0, Fh, (B, nb, 4), generator=g)
    draws[..., 1] = draws[..., 0]  # a repeated draw leaves its slot to the top-k
    bm0 = bm.clone()
    idx = torch.full((B, nb, K), -7, dtype=torch.int32)
    mlp_select_neurons_ref(basis, bm, idx, gated=gated, draws=draws)
    scores = neuron_scores(basis, bm0, gated=gated, draws=draws)
    _check_selection(scores, idx, K)
    for b in range(B):
        for n in range(nb):
            assert set(draws[b, n].tolist()) <= set(idx[b, n].tolist())
    picked = torch.zeros(B, nb, Fh, dtype=torch.bool).scatter_(-1, idx.long(), True)
    both = torch.cat([picked, picked], -1) if gated else picked
    assert torch.equal(bm, torch.where(both, basis, bm0))  # only the picked means move
    with pytest.raises(ValueError, match="exceeds"):
        mlp_select_neurons_ref(basis, bm, torch.empty(B, nb, Fh + 1, dtype=torch.int32), gated=gated)
    with pytest.raises(ValueError, match="n_draws counts HashDraws"):
        mlp_select_neurons_ref(basis, bm, idx, gated=gated, draws=draws, n_draws=4)


@pytest.mark.parametrize("Fh,K,gated,kind,rnd,given", [
    (300, 37, False, "distinct", 0, False),
    (300, 37, False, "ties", 5, False),
    (257, 64, True, "distinct", 3, False),  # not a power of two, gated
    (200, 50, True, "ties", 0, False),
    (1000, 350, False, "distinct", 50, True),  # a given score (the output rule)
    (40, 40, False, "ties", 2, False),  # K = Fh: every neuron
])
def test_triton_matches_reference(triton_mode, Fh, K, gated, kind, rnd, given):
    from chipmunk_compile.kernels.mlp_select_neurons import mlp_select_neurons

    g = torch.Generator().manual_seed(Fh + K)
    B, nb = 2, 3
    basis, bm = (t.to(DEV) for t in _inputs(B, nb, Fh, gated, kind, g))  # on a GPU machine the kernel runs there
    score = torch.rand(B, nb, Fh, generator=g).to(DEV) if given else None
    draws = torch.randint(0, Fh, (B, nb, rnd), generator=g).to(DEV) if rnd else None
    assert get_kernel("mlp_select_neurons", basis) is mlp_select_neurons
    bm_k, bm_r = bm.clone(), bm.clone()
    idx_k = torch.full((B, nb, K), torch.iinfo(torch.int32).min, dtype=torch.int32, device=DEV)  # poisoned
    idx_r = torch.empty(B, nb, K, dtype=torch.int32, device=DEV)
    mlp_select_neurons(basis, bm_k, idx_k, gated=gated, score=score, draws=draws)
    mlp_select_neurons_ref(basis, bm_r, idx_r, gated=gated, score=score, draws=draws)
    assert torch.equal(idx_k, idx_r)  # both take ties at the lowest neuron ids
    assert torch.equal(bm_k, bm_r)
    _check_selection(neuron_scores(basis, bm, gated=gated, score=score, draws=draws), idx_k, K)


@pytest.mark.parametrize("Fh,K,gated,rnd,step,salt,given", [
    (300, 37, False, 5, 3, 41, False),
    (257, 64, True, 13, 0, 6, False),  # gated, Fh not a power of two
    (1000, 200, False, 50, 48, 113, False),  # a deep layer's salt
    (500, 120, False, 25, 9, 7, True),  # a given score (the output rule)
])
def test_triton_hashes_the_draws_the_reference_materializes(triton_mode, Fh, K, gated, rnd, step, salt, given):
    """HashDraws draws (what ops/mlp.py passes): the kernel hashes them in its programs and picks
    exactly what it picks from the same draws materialized by hash_ints, and what the reference
    picks from the HashDraws; every drawn neuron is selected."""
    from chipmunk_compile.kernels.mlp_select_neurons import mlp_select_neurons

    g = torch.Generator().manual_seed(Fh + rnd)
    B, nb = 2, 3
    basis, bm = (t.to(DEV) for t in _inputs(B, nb, Fh, gated, "distinct", g))
    score = torch.rand(B, nb, Fh, generator=g).to(DEV) if given else None
    hd = HashDraws(torch.tensor([step], dtype=torch.int64, device=DEV), salt)
    draws = hash_ints(hd.step, salt, (B, nb, rnd), Fh)
    outs = []
    for fn, kw in ((mlp_select_neurons, dict(draws=hd, n_draws=rnd)), (mlp_select_neurons, dict(draws=draws)),
                   (mlp_select_neurons_ref, dict(draws=hd, n_draws=rnd))):
        bm_o = bm.clone()
        idx = torch.full((B, nb, K), torch.iinfo(torch.int32).min, dtype=torch.int32, device=DEV)
        fn(basis, bm_o, idx, gated=gated, score=score, **kw)
        outs.append((idx, bm_o))
    for idx, bm_o in outs[1:]:
        assert torch.equal(outs[0][0], idx) and torch.equal(outs[0][1], bm_o)
    for b in range(B):
        for n in range(nb):
            assert set(draws[b, n].tolist()) <= set(outs[0][0][b, n].tolist())
    # another step draws other neurons
    hd2 = HashDraws(torch.tensor([step + 1], dtype=torch.int64, device=DEV), salt)
    assert not torch.equal(hash_ints(hd2.step, salt, (B, nb, rnd), Fh), draws)


def test_triton_writes_into_a_strided_index_view(triton_mode):
    """The op's state may hand a view whose rows are longer than K: only [..., :K] is written."""
    from chipmunk_compile.kernels.mlp_select_neurons import mlp_select_neurons

    g = torch.Generator().manual_seed(3)
    basis, bm = (t.to(DEV) for t in _inputs(1, 4, 100, False, "distinct", g))
    wide = torch.full((1, 4, 33), -5, dtype=torch.int32, device=DEV)
    mlp_select_neurons(basis, bm.clone(), wide[..., :30])
    ref = torch.empty(1, 4, 30, dtype=torch.int32, device=DEV)
    mlp_select_neurons_ref(basis, bm.clone(), ref)
    assert torch.equal(wide[..., :30], ref) and (wide[..., 30:] == -5).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("B,nb,Fh,gated,dtype", [(1, 34, 12288, False, torch.float32), (2, 20, 13824, False, torch.float32),
                                                  (1, 16, 8192, True, torch.float32), (1, 34, 12288, False, torch.bfloat16),
                                                  (1, 16, 8192, True, torch.bfloat16)])
def test_gpu_real_shapes(B, nb, Fh, gated, dtype):
    from chipmunk_compile.kernels.mlp_select_neurons import mlp_select_neurons

    g = torch.Generator(device="cuda").manual_seed(0)
    Fb = 2 * Fh if gated else Fh
    bm = torch.randn(B, nb, Fb, device="cuda", generator=g)
    basis = (bm + 0.1 * torch.randn(B, nb, Fb, device="cuda", generator=g)).to(dtype)  # bf16: as ops/mlp.py
    K, rnd = round(0.35 * Fh), round(0.05 * Fh)
    draws = torch.randint(0, Fh, (B, nb, rnd), device="cuda", generator=g)
    assert get_kernel("mlp_select_neurons", basis) is mlp_select_neurons
    bm_k, bm_r = bm.clone(), bm.clone()
    idx_k = torch.full((B, nb, K), -1, dtype=torch.int32, device="cuda")
    idx_r = torch.empty(B, nb, K, dtype=torch.int32, device="cuda")
    mlp_select_neurons(basis, bm_k, idx_k, gated=gated, draws=draws)
    mlp_select_neurons_ref(basis, bm_r, idx_r, gated=gated, draws=draws)
    assert torch.equal(idx_k, idx_r) and torch.equal(bm_k, bm_r)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_hashed_draws_real_shape():
    """FLUX's shape with the draws hashed in the kernel, as ops/mlp.py runs it: the same selection as
    from the materialized draws, and inside a CUDA graph a new device step draws anew."""
    from chipmunk_compile.kernels.mlp_select_neurons import mlp_select_neurons

    g = torch.Generator(device="cuda").manual_seed(0)
    B, nb, Fh = 1, 34, 12288
    bm = torch.randn(B, nb, Fh, device="cuda", generator=g)
    basis = bm + 0.1 * torch.randn(B, nb, Fh, device="cuda", generator=g)
    K, rnd = round(0.35 * Fh), round(0.05 * Fh)
    step = torch.tensor([7], dtype=torch.int64, device="cuda")
    hd = HashDraws(step, 21)
    idx_h, idx_m = (torch.full((B, nb, K), -1, dtype=torch.int32, device="cuda") for _ in range(2))
    bm_h, bm_m = bm.clone(), bm.clone()
    mlp_select_neurons(basis, bm_h, idx_h, draws=hd, n_draws=rnd)
    mlp_select_neurons(basis, bm_m, idx_m, draws=hash_ints(step, 21, (B, nb, rnd), Fh))
    assert torch.equal(idx_h, idx_m) and torch.equal(bm_h, bm_m)
    graph, bm_g = torch.cuda.CUDAGraph(), bm.clone()
    with torch.cuda.graph(graph):
        mlp_select_neurons(basis, bm_g, idx_h, draws=hd, n_draws=rnd)
    step.fill_(8)
    bm_g.copy_(bm)
    graph.replay()
    mlp_select_neurons(basis, bm.clone(), idx_m, draws=hash_ints(step, 21, (B, nb, rnd), Fh))
    assert torch.equal(idx_h, idx_m)


_COMPILE_FOR_HOPPER = """
import sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from chipmunk_compile.kernels.mlp_select_neurons import _mlp_select_neurons_kernel as k
gated, has_score, block_r, hashed = (int(a) for a in sys.argv[1:])
types = ["*fp32", "*fp32", "*fp32", "*i64", "*fp32", "*i32", "*i64"] + ["i32"] * 4 + ["i64"] * 11
sig = {**dict(zip(k.arg_names, types)), **{n: "constexpr" for n in k.arg_names[len(types):]}}
consts = {"GATED": bool(gated), "HAS_SCORE": bool(has_score), "BLOCK": 16384, "BLOCK_R": block_r,
          "HASH_DRAWS": bool(hashed)}
out = triton.compile(ASTSource(fn=k, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                     options={"num_warps": 16})
assert ".entry" in out.asm["ptx"]
"""


@pytest.mark.parametrize("gated,has_score,block_r,hashed", [(0, 0, 1024, 0), (0, 0, 1024, 1), (1, 1, 0, 0)])
def test_compiles_for_hopper_without_a_gpu(gated, has_score, block_r, hashed):
    """The interpreter accepts code the GPU compiler rejects (e.g. a constexpr re-bound in a static
    loop): compile the kernel for sm_90 here, with no GPU, so CI catches that."""
    compile_for_hopper(_COMPILE_FOR_HOPPER, gated, has_score, block_r, hashed)


@pytest.mark.parametrize("gated", [False, True])
def test_half_precision_basis_is_read_as_fp32(triton_mode, gated):
    """ops/mlp.py passes the model's linear output as is: an fp16 basis selects and stores exactly
    what its fp32 upcast does, in the kernel and in the reference (bf16 is checked on the GPU: the
    interpreter's bf16 loads are wrong)."""
    from chipmunk_compile.kernels.mlp_select_neurons import mlp_select_neurons

    g = torch.Generator().manual_seed(11)
    basis, bm = (t.to(DEV) for t in _inputs(2, 3, 300, gated, "distinct", g))
    half = basis.half()
    for fn in (mlp_select_neurons, mlp_select_neurons_ref):
        outs = []
        for b in (half, half.float()):
            bm_o, idx = bm.clone(), torch.full((2, 3, 70), -1, dtype=torch.int32, device=DEV)
            fn(b, bm_o, idx, gated=gated)
            outs.append((idx, bm_o))
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    with pytest.raises(ValueError, match="basis must be"):
        mlp_select_neurons(basis.double(), bm, torch.empty(2, 3, 70, dtype=torch.int32, device=DEV), gated=gated)
