"""select_columns: properties of the reference's index sets; the Triton kernel (radix select, sampled
threshold) against it."""

import math

import pytest
import torch
from kernel_testutils import compile_for_hopper

from chipmunk_compile.kernels import get_kernel, select_columns_ref
from chipmunk_compile.kernels.random_draws_ref import HashDraws, hash_ints
from chipmunk_compile.kernels.select_columns_ref import boost_random_draws


def test_topk_sorted_masked_always_random():
    g = torch.Generator().manual_seed(0)
    B, H, Gc, Nk = 2, 3, 4, 40
    cs = torch.rand(B, H, Gc, Nk, generator=g)
    km = torch.rand(B, Nk, generator=g) > 0.25
    ak = torch.zeros(Nk, dtype=torch.bool)
    ak[[1, 5, 7]] = True
    km[:, 5] = False  # masked beats always_keep
    idx, cnt = select_columns_ref(cs, k=6, key_mask=km, always_keep=ak, random_keys=2,
                              generator=torch.Generator().manual_seed(1))
    K = 6 + 3 + 2
    assert idx.shape == (B, H, Gc, K) and idx.dtype == torch.int32 and cnt.dtype == torch.int32
    for b in range(B):
        for h in range(H):
            for gi in range(Gc):
                c = int(cnt[b, h, gi])
                assert c == min(K, int(km[b].sum()))
                sel = idx[b, h, gi, :c].long()
                assert (sel[1:] > sel[:-1]).all()  # sorted, unique
                assert (idx[b, h, gi, c:] == 0).all()
                assert km[b, sel].all()
                assert {c for c in (1, 7) if km[b, c]} <= set(sel.tolist())
                # top-6 selectable non-always columns by colsum are all present
                sc = cs[b, h, gi].masked_fill(~km[b] | ak, -1)
                top = sc.topk(6).indices
                assert set(top.tolist()) <= set(sel.tolist())


def test_unmasked_path_always_random_and_draws():
    """No key mask (the fast path): always-kept + drawn columns + top-k fill K distinct sorted slots."""
    g = torch.Generator().manual_seed(3)
    B, H, Gc, Nk, k = 1, 2, 3, 50, 7
    cs = torch.rand(B, H, Gc, Nk, generator=g)
    ak = torch.zeros(Nk, dtype=torch.bool)
    ak[[0, 1]] = True
    draws = torch.randint(0, Nk, (B, H, Gc, 3), generator=g)
    draws[..., 0] = 1  # an always-kept column drawn: that slot goes to top-k
    idx, cnt = select_columns_ref(cs.clone(), k=k, always_keep=ak, random_keys=3, n_always=2, draws=draws)
    K = k + 2 + 3
    assert (cnt == K).all() and idx.shape[-1] == K
    for h in range(H):
        for gi in range(Gc):
            sel = idx[0, h, gi].long()
            assert (sel[1:] > sel[:-1]).all()
            want = {0, 1} | set(draws[0, h, gi].tolist())
            rest = cs[0, h, gi].clone()
            rest[list(want)] = -1
            want |= set(rest.topk(K - len(want)).indices.tolist())
            assert set(sel.tolist()) == want


def test_counts_when_few_keys_and_no_extras():
    cs = torch.rand(1, 1, 2, 10)
    km = torch.zeros(1, 10, dtype=torch.bool)
    km[0, [2, 4, 9]] = True
    idx, cnt = select_columns_ref(cs, k=5, key_mask=km)
    assert cnt.tolist() == [[[3, 3]]]
    assert idx[0, 0, 0].tolist() == [2, 4, 9, 0, 0]
    idx, cnt = select_columns_ref(cs, k=4)
    ref = cs.topk(4, dim=-1).indices.sort(-1).values
    assert torch.equal(idx.long(), ref) and (cnt == 4).all()


def test_dispatch_returns_reference_on_cpu():
    assert get_kernel("select_columns", torch.zeros(1)) is select_columns_ref


# ---- Triton radix select (interpreter on CPU, GPU below) against the reference ----

def _scores(shape, dtype, kind, g):
    if kind == "distinct":  # a permutation of distinct values: exactly representable in fp16
        n = shape[-1]
        return torch.stack([torch.randperm(n, generator=g) for _ in range(math.prod(shape[:-1]))]).view(shape).to(
            dtype) / 8
    if kind == "ties":  # few distinct values: the k-th score is tied
        return torch.randint(0, 6, shape, generator=g).to(dtype) / 4
    return torch.randn(shape, generator=g).to(dtype)  # signed values: the key transform's negative half


def _draws(draw, shape, Nk, g, device="cpu"):
    """Random draws of `shape` over Nk columns: an explicit tensor, or hash draws (made in the
    Triton kernel itself) from a step tensor and a salt."""
    if not shape[-1]:
        return None
    if draw == "hash":
        step, salt = torch.randint(0, 1000, (1,), generator=g), int(torch.randint(0, 99, (1,), generator=g))
        return HashDraws(step.to(device), salt)
    return torch.randint(0, Nk, shape, generator=g).to(device)


def _effective(cs, km, ak, rnd, draws):
    """The scores the selection ranks: random draws boosted, always-kept +inf, masked -inf."""
    eff = cs.clone()
    if rnd:
        boost_random_draws(eff, km, ak, rnd, draws=draws)
    eff = eff.float()
    if ak is not None:
        eff = eff.masked_fill(ak, float("inf"))
    if km is not None:
        eff = eff.masked_fill(~km[:, None, None, :], float("-inf"))
    return eff


def _check_against_ref(eff, idx, cnt, ref_idx, ref_cnt, *, exact):
    assert idx.dtype == torch.int32 and cnt.dtype == torch.int32 and idx.shape == ref_idx.shape
    assert torch.equal(cnt, ref_cnt)
    if exact:  # both break ties by the lowest column id
        assert torch.equal(idx, ref_idx)
    for row in range(cnt.numel()):
        c = int(cnt.view(-1)[row])
        sel, ref = idx.view(-1, idx.shape[-1])[row], ref_idx.view(-1, idx.shape[-1])[row]
        assert (sel[c:] == 0).all() and (sel[1:c] > sel[:max(c - 1, 0)]).all()
        s = eff.reshape(-1, eff.shape[-1])[row]
        assert torch.equal(s[sel[:c].long()].sort()[0], s[ref[:c].long()].sort()[0])  # same score multiset
        if c:  # ties at the threshold go to the lowest column ids
            t = s[sel[:c].long()].min()
            tied = (s == t).nonzero().view(-1)
            taken = sel[:c][s[sel[:c].long()] == t].long()
            assert torch.equal(taken, tied[:len(taken)])


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("kind,Nk,k,masked,always,rnd,draw", [
    ("distinct", 300, 37, False, False, 0, None),
    ("distinct", 300, 37, True, True, 3, "tensor"),
    ("distinct", 300, 37, True, True, 3, "hash"),
    ("signed", 257, 64, True, False, 0, None),
    ("ties", 200, 50, False, True, 0, None),
    ("ties", 131, 20, True, True, 2, "tensor"),
    ("ties", 131, 20, False, False, 9, "hash"),
    ("distinct", 5000, 700, True, False, 0, None),  # several CHUNKs, ragged last one
    ("distinct", 5000, 700, False, True, 50, "hash"),
    ("distinct", 40, 45, False, False, 0, None),  # K >= Nk: every column
])
def test_triton_matches_reference(triton_mode, dtype, kind, Nk, k, masked, always, rnd, draw):
    from chipmunk_compile.kernels.select_columns import select_columns

    g = torch.Generator().manual_seed(Nk + k)
    B, H, Gc = (1, 1, 2) if Nk > 1000 else (2, 2, 3)
    cs = _scores((B, H, Gc, Nk), dtype, kind, g)
    km = (torch.rand(B, Nk, generator=g) > 0.4) if masked else None
    if km is not None:
        km[-1] = False  # a batch with no selectable key: counts 0, indices 0
    ak = None
    if always:
        ak = torch.zeros(Nk, dtype=torch.bool)
        ak[[0, 3, Nk - 1]] = True
    draws = _draws(draw, (B, H, Gc, rnd), Nk, g)
    assert get_kernel("select_columns", cs) is select_columns
    idx, cnt = select_columns(cs.clone(), k=k, key_mask=km, always_keep=ak, random_keys=rnd, draws=draws)
    ref_idx, ref_cnt = select_columns_ref(cs.clone(), k=k, key_mask=km, always_keep=ak, random_keys=rnd, draws=draws)
    _check_against_ref(_effective(cs, km, ak, rnd, draws), idx, cnt, ref_idx, ref_cnt, exact=True)
    if km is not None:
        assert (cnt[-1] == 0).all() and (idx[-1] == 0).all()
    if draw == "hash" and km is None:  # every hashed column is in (none is blocked)
        picks = hash_ints(draws.step, draws.salt, (B, H, Gc, rnd), Nk)
        assert all(set(p.tolist()) <= set(i.tolist()) for p, i in zip(picks.view(-1, rnd), idx.view(-1, idx.shape[-1])))


@pytest.mark.parametrize("dtype,Nk,rnd", [(torch.float16, 300, 700), (torch.float32, 40, 5)])
def test_triton_hash_draws_boost_the_reference_columns(triton_mode, dtype, Nk, rnd):
    """In place, the kernel leaves the scores exactly as the reference's boost does: the dtype's
    max at the hashed columns of each row, everything else untouched (700 draws: two chunks of
    the kernel's draw loop)."""
    from chipmunk_compile.kernels.select_columns import select_columns

    g = torch.Generator().manual_seed(Nk)
    cs = _scores((2, 3, 2, Nk), dtype, "signed", g)
    draws = HashDraws(torch.tensor([123456789]), 77)
    want = cs.clone()
    boost_random_draws(want, None, None, rnd, draws=draws)
    assert (want == torch.finfo(dtype).max).any(-1).all()
    select_columns(cs, k=3, random_keys=rnd, draws=draws, inplace=True)
    assert torch.equal(cs, want)


def test_triton_inplace_contract(triton_mode):
    """inplace=False leaves the caller's scores alone even with random draws; inplace=True may boost them."""
    from chipmunk_compile.kernels.select_columns import select_columns

    g = torch.Generator().manual_seed(5)
    cs = _scores((1, 2, 2, 100), torch.float16, "distinct", g)
    draws = torch.randint(0, 100, (1, 2, 2, 4), generator=g)
    before = cs.clone()
    select_columns(cs, k=10, random_keys=4, draws=draws)
    assert torch.equal(cs, before)
    idx, _ = select_columns(cs, k=10, random_keys=4, draws=draws, inplace=True)
    assert set(draws[0, 0, 0].tolist()) <= set(idx[0, 0, 0].tolist())



@pytest.mark.parametrize("dtype,radix", [(torch.float16, (8, 8)), (torch.float16, (6, 5)), (torch.float16, (4, 6)),
                                         (torch.float32, (7, 5))])
@pytest.mark.parametrize("kind", ["ties", "signed"])
@pytest.mark.parametrize("sparse", ["never", "always"])
def test_triton_radix_schedules(triton_mode, dtype, radix, kind, sparse):
    """Every digit schedule finds the same threshold and tie count: ties across several chunks,
    a masked batch, always-kept columns; with every refine pass counting by tl.histogram, and
    with every one counting by atomics (the kernel picks per pass by the candidates left)."""
    from chipmunk_compile.kernels.select_columns import select_columns

    g = torch.Generator().manual_seed(11)
    cs = _scores((2, 1, 2, 5000), dtype, kind, g)
    km = torch.rand(2, 5000, generator=g) > 0.3
    ak = torch.zeros(5000, dtype=torch.bool)
    ak[[2, 4999]] = True
    for k in (1, 1500, 3600):
        idx, cnt = select_columns(cs.clone(), k=k, key_mask=km, always_keep=ak, radix=radix,
                                  sparse_refine=-1 if sparse == "never" else 5000)
        ref_idx, ref_cnt = select_columns_ref(cs.clone(), k=k, key_mask=km, always_keep=ak)
        _check_against_ref(_effective(cs, km, ak, 0, None), idx, cnt, ref_idx, ref_cnt, exact=True)
    with pytest.raises(AssertionError, match="must make 16 bits"):
        select_columns(cs.half(), k=3, radix=(5, 5))


def _sampled_bracket_hits(row, k, sample, z, bins):
    """Python model of the kernel's sampled bracket on one row of effective scores (fp16 keys):
    (window holds the k-th largest, shift). Tells the tests which path a case takes."""
    u = row.half().view(torch.int16).to(torch.int32) & 0xFFFF
    keys = torch.where(row == float("inf"), 0xFFFF, torch.where(u >> 15 != 0, u ^ 0xFFFF, u | 0x8000))
    keys = torch.where(row == float("-inf"), -1, keys)  # not candidates
    nk = row.numel()
    srt = keys[(torch.arange(sample) * nk) // sample].clamp(min=0).sort(descending=True).values
    r = k * sample / nk
    m = z * math.sqrt(r) + 2
    hi_rank, lo_rank = math.floor(r - m), math.ceil(r + m)
    t_hi = 0xFFFF if hi_rank < 0 else int(srt[hi_rank])
    t_lo = 0 if lo_rank >= sample else int(srt[lo_rank])
    shift = 0
    while (t_hi >> shift) - (t_lo >> shift) >= bins - 2:  # two bins count the keys below and above
        shift += 1
    lo, hi = (t_lo >> shift) << shift, (((t_hi >> shift) + 1) << shift) - 1
    take = min(int((keys >= 0).sum()), k)
    above, inside = int((keys > hi).sum()), int(((keys >= lo) & (keys <= hi)).sum())
    return above < take <= above + inside, shift


@pytest.mark.parametrize("kind,Nk,k,masked,always,rnd,sample,path,draw", [
    ("signed", 3000, 400, False, False, 0, 256, "hit", None),
    ("lognormal", 3000, 200, True, True, 3, 256, "hit, refined", "tensor"),
    ("lognormal", 3000, 200, True, True, 30, 256, "hit, refined", "hash"),
    ("ties", 2000, 500, True, True, 2, 64, "hit", "tensor"),
    ("signed", 3000, 400, True, False, 0, 256, "hit", None),  # and a batch with no selectable key
    ("signed", 300, 37, False, False, 0, 16, None, None),
    ("distinct", 40, 45, False, False, 0, 16, "hit", None),  # K >= Nk: every column
    ("adversarial", 3000, 1000, False, False, 0, 256, "miss", None),
])
@pytest.mark.parametrize("sparse,window", [("never", None), ("always", None), ("never", 6), ("always", 2)])
def test_triton_sampled_threshold_is_exact(triton_mode, kind, Nk, k, masked, always, rnd, sample, path, draw, sparse,
                                           window):
    """The sampled-bracket path (16-bit scores) selects exactly what the reference does, whether
    the window holds the K-th largest at once, needs further bits, or misses and starts over
    ("adversarial": only the sampled columns score 100, so the bracket holds them alone and lies
    above the K-th largest)."""
    from chipmunk_compile.kernels import select_columns as sc_mod

    g = torch.Generator().manual_seed(Nk + k)
    B, H, Gc = 2, 1, 2
    gen = "signed" if kind in ("lognormal", "adversarial") else kind
    cs = _scores((B, H, Gc, Nk), torch.float32, gen, g)
    if kind == "lognormal":  # spread over many exponents: the window needs a shift
        cs = (2 * cs).exp()
    if kind == "adversarial":
        cs[..., (torch.arange(sample) * Nk) // sample] = 100.0
    cs = cs.half()
    km = (torch.rand(B, Nk, generator=g) > 0.3) if masked else None
    ak = None
    if always:
        ak = torch.zeros(Nk, dtype=torch.bool)
        ak[[0, 5, Nk - 1]] = True
    elif masked:
        km[-1] = False  # a batch with no selectable key: the sampled path misses, counts 0, indices 0
    draws = _draws(draw, (B, H, Gc, rnd), Nk, g)
    eff = _effective(cs, km, ak, rnd, draws)
    K = min(Nk, k + (3 if always else 0) + rnd)
    if path is not None:
        selectable = (eff.view(-1, Nk) > float("-inf")).any(-1)
        outcomes = [_sampled_bracket_hits(row, K, sample, sc_mod.SAMPLE_Z, 1 << (window or sc_mod.WINDOW_BITS)) if ok
                    else (path.startswith("hit"), 0) for row, ok in zip(eff.view(-1, Nk), selectable)]
        assert all(h == path.startswith("hit") for h, _ in outcomes), outcomes
        if path == "hit, refined":
            assert all(shift > 0 for _, shift in outcomes), outcomes
    passes = torch.zeros(B * H * Gc, dtype=torch.int32)
    idx, cnt = sc_mod.select_columns(cs.clone(), k=k, key_mask=km, always_keep=ak, random_keys=rnd, draws=draws,
                                     sample=sample, passes=passes, sparse_refine=-1 if sparse == "never" else Nk,
                                     window_bits=window)
    if path is not None:  # the window pass, then the bits it left open (6 per pass), or all 16 after a miss
        expect = [1 + (math.ceil(shift / sc_mod.REFINE_BITS) if hit and ok else math.ceil(16 / sc_mod.REFINE_BITS))
                  for (hit, shift), ok in zip(outcomes, selectable)]
        assert passes.tolist() == expect
    ref_idx, ref_cnt = select_columns_ref(cs.clone(), k=k, key_mask=km, always_keep=ak, random_keys=rnd, draws=draws)
    _check_against_ref(eff, idx, cnt, ref_idx, ref_cnt, exact=True)
    if masked and not always:
        assert (cnt[-1] == 0).all() and (idx[-1] == 0).all()
    with pytest.raises(AssertionError, match="power of two"):
        sc_mod.select_columns(cs, k=3, sample=100)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("Nk,frac,masked", [(75600, 0.11, False), (118800, 0.06, True), (4352, 0.165, False)])
@pytest.mark.parametrize("draw", ["tensor", "hash"])
def test_gpu_real_shapes(dtype, Nk, frac, masked, draw):
    from chipmunk_compile.kernels.select_columns import select_columns

    g = torch.Generator(device="cuda").manual_seed(0)
    cs = torch.rand(1, 3, 5, Nk, device="cuda", generator=g).to(dtype)
    km = torch.rand(1, Nk, device="cuda", generator=g) > 0.01 if masked else None
    ak = torch.zeros(Nk, dtype=torch.bool, device="cuda")
    ak[-256:] = True  # text tokens
    k, rnd = round(frac * Nk), round(0.01 * Nk)
    draws = _draws(draw, (1, 3, 5, rnd), Nk, torch.Generator().manual_seed(1), device="cuda")
    assert get_kernel("select_columns", cs) is select_columns
    idx, cnt = select_columns(cs.clone(), k=k, key_mask=km, always_keep=ak, random_keys=rnd, draws=draws)
    ref_idx, ref_cnt = select_columns_ref(cs.clone(), k=k, key_mask=km, always_keep=ak, random_keys=rnd,
                                          draws=draws)
    eff = _effective(cs, km, ak, rnd, draws)
    _check_against_ref(eff.cpu(), idx.cpu(), cnt.cpu(), ref_idx.cpu(), ref_cnt.cpu(), exact=True)


def test_reference_sorts_in_slabs(monkeypatch):
    """Rows sorted a few at a time (bounded memory) select exactly what one sort of all rows does."""
    import importlib

    ref_mod = importlib.import_module("chipmunk_compile.kernels.select_columns_ref")  # the module, not the function

    g = torch.Generator().manual_seed(11)
    cs = _scores((2, 3, 5, 90), torch.float32, "ties", g)
    km = torch.rand(2, 90, generator=g) > 0.3
    whole = select_columns_ref(cs.clone(), k=17, key_mask=km)
    monkeypatch.setattr(ref_mod, "SLAB", 2 * 90 + 1)  # 2 rows per slab, a short last slab
    slabs = select_columns_ref(cs.clone(), k=17, key_mask=km)
    assert torch.equal(whole[0], slabs[0]) and torch.equal(whole[1], slabs[1])


_COMPILE_FOR_HOPPER = """
import sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from chipmunk_compile.kernels.select_columns import _select_columns_kernel as k
sample, count_passes, has_ak, has_km, hashed = (int(a) for a in sys.argv[1:])
types = ["*fp16", "*i8", "*i8", "*i32", "*i32", "*i32", "*i64", "*i32", "i32", "i32", "i32", "i64", "i32", "i32"]
sig = {**dict(zip(k.arg_names, types)), **{n: "constexpr" for n in k.arg_names[len(types):]}}
consts = {"BITS": 16, "RADIX0": 4, "RADIX": 6, "CHUNK": 2048, "SAMPLE": sample, "Z": 4.0, "WBITS": 6, "RBITS": 6,
          "HAS_AK": bool(has_ak), "HAS_KM": bool(has_km), "COUNT_PASSES": bool(count_passes),
          "HASH_DRAWS": bool(hashed), "TOP": 65504.0}
out = triton.compile(ASTSource(fn=k, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                     options={"num_warps": 4})
assert ".entry" in out.asm["ptx"]
"""


@pytest.mark.parametrize("sample,count_passes,has_ak,has_km,hashed", [(2048, 0, 1, 1, 1), (2048, 1, 0, 0, 0),
                                                                      (0, 0, 1, 0, 1)])
def test_compiles_for_hopper_without_a_gpu(sample, count_passes, has_ak, has_km, hashed):
    """The interpreter runs code the GPU compiler may reject (run-time loops over run-time shifts,
    constexpr arithmetic): compile the kernel for sm_90 here, with no GPU, so CI catches that."""
    compile_for_hopper(_COMPILE_FOR_HOPPER, sample, count_passes, has_ak, has_km, hashed)
