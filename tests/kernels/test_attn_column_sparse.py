"""attn_column_sparse: reference vs naive per-group formula and dense SDPA; Triton vs reference; the same
with an additive score bias (SDPA's float attn_mask)."""

import math

import pytest
import torch
import torch.nn.functional as F
from kernel_testutils import DEV, TOL, compile_for_hopper, rel_err

from chipmunk_compile.kernels import attn_column_sparse_ref, get_kernel


def _inputs(B, Hq, Hkv, N, Nk, D, G, dtype, frac, permuted, seed=0, zero_count=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, N, Hq, D, generator=g).transpose(1, 2)
    k = torch.randn(B, Hkv, Nk, D, generator=g)
    v = torch.randn(B, Hkv, Nk, D, generator=g)
    NG = math.ceil(N / G)
    K = max(1, int(frac * Nk))
    idx = torch.zeros(B, Hq, NG, K, dtype=torch.int32)
    cnt = torch.randint(1, K + 1, (B, Hq, NG), generator=g).to(torch.int32)
    cnt.view(-1)[0] = K
    if zero_count:
        cnt.view(-1)[-1] = 0
    for i in range(B * Hq * NG):
        c = int(cnt.view(-1)[i])
        idx.view(-1, K)[i, :c] = torch.randperm(Nk, generator=g)[:c].sort().values.to(torch.int32)
    perm = torch.randperm(N, generator=g).to(torch.int32) if permuted else None
    o_base = torch.randn(B, N, Hq, D, generator=g).transpose(1, 2)
    lse = torch.randn(B, Hq, N, generator=g) + 4.0
    d = dict(device=DEV)
    return (q.to(dtype=dtype, **d), k.to(dtype=dtype, **d), v.to(dtype=dtype, **d), idx.to(**d), cnt.to(**d),
            None if perm is None else perm.to(**d), o_base.to(dtype=dtype, **d), lse.to(**d))


def _naive(q, k, v, idx, cnt, scale, G, perm, o_base, sign, lse, bias=None):
    B, Hq, N, D = q.shape
    rep = Hq // k.shape[1]
    bias = None if bias is None else bias.expand(B, Hq, N, k.shape[2])
    order = torch.arange(N, device=q.device) if perm is None else perm.long()
    out = torch.zeros(B, Hq, N, D, dtype=torch.float64, device=q.device) if o_base is None else o_base.double()
    for b in range(B):
        for h in range(Hq):
            for gi in range(idx.shape[2]):
                rows = order[gi * G:(gi + 1) * G]
                cols = idx[b, h, gi, :cnt[b, h, gi]].long()
                if len(cols) == 0:
                    continue
                s = q[b, h, rows].double() @ k[b, h // rep, cols].double().T * scale
                if bias is not None:
                    s = s + bias[b, h][rows][:, cols].double()
                if lse is None:
                    dead = (s == float("-inf")).all(-1, keepdim=True)  # no finite score: adds 0
                    p = torch.softmax(s.masked_fill(dead, 0.0), -1).masked_fill(dead, 0.0)
                else:
                    p = torch.exp(s - lse[b, h, rows].double()[:, None])
                out[b, h, rows] = out[b, h, rows] + sign * (p @ v[b, h // rep, cols].double())
    return out


@pytest.mark.parametrize("use_lse,use_base,permuted", [(False, False, False), (False, True, True), (True, True, True)])
def test_ref_matches_naive(use_lse, use_base, permuted):
    q, k, v, idx, cnt, perm, ob, lse = _inputs(1, 4, 2, 50, 40, 32, 16, torch.float32, 0.4, permuted,
                                               zero_count=True)
    kw = dict(scale=0.2, group=16, perm=perm, o_base=ob if use_base else None, sign=-1.0 if use_base else 1.0,
              lse=lse if use_lse else None)
    o = attn_column_sparse_ref(q, k, v, idx, cnt, **kw)
    ref = _naive(q, k, v, idx, cnt, 0.2, 16, perm, kw["o_base"], kw["sign"], kw["lse"])
    assert rel_err(o, ref) < 1e-6
    assert o.transpose(1, 2).is_contiguous()


def _full(B, Hq, N, Nk, G):
    NG = math.ceil(N / G)
    idx = torch.arange(Nk, dtype=torch.int32, device=DEV).expand(B, Hq, NG, Nk).contiguous()
    cnt = torch.full((B, Hq, NG), Nk, dtype=torch.int32, device=DEV)
    return idx, cnt


def test_ref_full_set_equals_dense():
    q, k, v, *_ = _inputs(1, 2, 1, 33, 29, 32, 8, torch.float32, 0.5, False)
    idx, cnt = _full(1, 2, 33, 29, 8)
    o = attn_column_sparse_ref(q, k, v, idx, cnt, scale=0.3, group=8)
    dense = F.scaled_dot_product_attention(q, k.expand(-1, 2, -1, -1), v.expand(-1, 2, -1, -1), scale=0.3)
    assert rel_err(o, dense) < 1e-6


CASES = [
    # B, Hq, Hkv, N, Nk, G, frac, permuted, use_lse, use_base
    (1, 2, 2, 64, 100, 32, 0.5, False, False, False),
    (1, 4, 2, 77, 90, 48, 0.45, True, False, True),   # GQA, odd N, G not a tile multiple, o_base/sign
    (2, 2, 1, 50, 61, 64, 0.6, True, True, True),     # exact-normalizer variant
    (1, 2, 2, 130, 70, 16, 0.3, False, False, True),  # G < tile: masked rows in every tile
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_triton_matches_ref(triton_mode, case, dtype):
    B, Hq, Hkv, N, Nk, G, frac, permuted, use_lse, use_base = case
    q, k, v, idx, cnt, perm, ob, lse = _inputs(B, Hq, Hkv, N, Nk, 64, G, dtype, frac, permuted, seed=N,
                                               zero_count=True)
    kw = dict(scale=0.125, group=G, perm=perm, o_base=ob if use_base else None, sign=-1.0 if use_base else 1.0,
              lse=lse if use_lse else None)
    fn = get_kernel("attn_column_sparse", q, k, v)
    assert fn is not attn_column_sparse_ref
    o = fn(q, k, v, idx, cnt, **kw)
    o_r = attn_column_sparse_ref(q, k, v, idx, cnt, **kw)
    assert o.stride() == o_r.stride()
    assert rel_err(o, o_r) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("D", [24, 40, 72, 96, 160, 256])
@pytest.mark.parametrize("use_lse", [False, True])
def test_triton_padded_head_dims(triton_mode, D, dtype, use_lse):
    """Head dims that are not a power of two run in tiles of the next one; the columns past D add
    nothing, and every output element (poisoned with NaN first), the cache and the slope are written."""
    q, k, v, idx, cnt, perm, ob, lse = _inputs(1, 4, 2, 77, 90, D, 48, dtype, 0.45, True, seed=D, zero_count=True)
    kw = dict(scale=D ** -0.5, group=48, perm=perm, o_base=ob, sign=-1.0, lse=lse if use_lse else None)
    out, slope = torch.full_like(q, float("nan")), torch.full_like(q, float("nan"))
    prev = ob * 0.5  # the cache being replaced: o_base's (B, N, H, D) layout, as out's
    assert prev.stride() == out.stride()
    inv = torch.tensor([0.5], device=DEV)
    fn = get_kernel("attn_column_sparse", q, k, v)
    assert fn is not attn_column_sparse_ref
    o_r = attn_column_sparse_ref(q, k, v, idx, cnt, **kw)
    o = fn(q, k, v, idx, cnt, **kw, out=out, measure=(prev, slope, inv))
    assert o.data_ptr() == out.data_ptr() and rel_err(o, o_r) < TOL[dtype]  # rel_err: NaN fails it
    assert rel_err(slope, (o_r.float() - prev.float()) * 0.5) < TOL[dtype]
    naive = _naive(q, k, v, idx, cnt, D ** -0.5, 48, perm, ob, -1.0, lse if use_lse else None)
    assert rel_err(o, naive) < TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("D,use_lse", [(72, False), (88, True), (96, False), (256, False), (256, True)])
def test_gpu_bf16_padded_head_dims(D, use_lse):
    """PixArt's / HunyuanDiT's / Lumina's / AuraFlow's head dims at a 1024px image's 4096 tokens, in bf16."""
    q, k, v, idx, cnt, perm, ob, lse = _inputs(1, 16, 16, 4096, 4096, D, 128, torch.bfloat16, 0.15, True, seed=D)
    kw = dict(scale=D ** -0.5, group=128, perm=perm, o_base=ob, sign=-1.0, lse=lse if use_lse else None)
    fn = get_kernel("attn_column_sparse", q, k, v)
    assert fn is not attn_column_sparse_ref
    assert rel_err(fn(q, k, v, idx, cnt, **kw), attn_column_sparse_ref(q, k, v, idx, cnt, **kw)) < TOL[torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_full_set_equals_dense(triton_mode, dtype):
    q, k, v, *_ = _inputs(1, 4, 2, 70, 53, 64, 32, dtype, 0.5, False)
    idx, cnt = _full(1, 4, 70, 53, 32)
    o = get_kernel("attn_column_sparse", q, k, v)(q, k, v, idx, cnt, scale=0.125, group=32)
    dense = F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(2, 1),
                                           v.float().repeat_interleave(2, 1), scale=0.125)
    assert rel_err(o, dense) < TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("N,G,Hq,Hkv,use_lse", [(4352, 192, 4, 4, False), (4352, 128, 4, 2, True),
                                                (3000, 192, 2, 2, False)])
def test_gpu_bf16_real_shapes(N, G, Hq, Hkv, use_lse):
    q, k, v, idx, cnt, perm, ob, lse = _inputs(1, Hq, Hkv, N, N, 128, G, torch.bfloat16, 0.15, True, seed=2)
    kw = dict(scale=128 ** -0.5, group=G, perm=perm, o_base=ob, sign=-1.0, lse=lse if use_lse else None)
    o = get_kernel("attn_column_sparse", q, k, v)(q, k, v, idx, cnt, **kw)
    o_r = attn_column_sparse_ref(q, k, v, idx, cnt, **kw)
    assert rel_err(o, o_r) < TOL[torch.bfloat16]


@pytest.mark.parametrize("meta", [dict(BLOCK_M=32, BLOCK_N=32, TAIL_N=32, OCC=1, SPLIT=1),   # one masked loop
                                  dict(BLOCK_M=32, BLOCK_N=32, TAIL_N=16, OCC=1, SPLIT=1),   # main + tail loop
                                  dict(BLOCK_M=32, BLOCK_N=64, TAIL_N=16, OCC=1, SPLIT=2)])  # split wave tail
@pytest.mark.parametrize("use_lse", [False, True])
def test_triton_schedule_variants(triton_mode, monkeypatch, meta, use_lse):
    """Every schedule the autotuner may pick (loop form, tail split) computes the same function."""
    from chipmunk_compile.kernels import attn_column_sparse as mod

    monkeypatch.setattr(mod, "_INTERP_META", meta)
    q, k, v, idx, cnt, perm, ob, lse = _inputs(1, 4, 2, 77, 90, 64, 48, torch.float32, 0.45, True, seed=5,
                                               zero_count=True)
    kw = dict(scale=0.125, group=48, perm=perm, o_base=ob, sign=-1.0, lse=lse if use_lse else None)
    o = get_kernel("attn_column_sparse", q, k, v)(q, k, v, idx, cnt, **kw)
    assert rel_err(o, attn_column_sparse_ref(q, k, v, idx, cnt, **kw)) < TOL[torch.float32]


def _slope(q, seed=7):
    """A residual slope in the cache layout ((B, N, Hq, D) storage) and its device coefficient."""
    B, Hq, N, D = q.shape
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, N, Hq, D, generator=g).transpose(1, 2).to(dtype=q.dtype, device=q.device)
    return s, torch.tensor([2.5], device=q.device)


@pytest.mark.parametrize("use_lse", [False, True])
def test_ref_slope_term(use_lse):
    """o = o_base + coef * o_slope + sign * attn_S (the residual forecast's sparse step)."""
    q, k, v, idx, cnt, perm, ob, lse = _inputs(1, 4, 2, 50, 40, 32, 16, torch.float32, 0.4, True)
    slope, coef = _slope(q)
    kw = dict(scale=0.2, group=16, perm=perm, sign=1.0, lse=lse if use_lse else None)
    o = attn_column_sparse_ref(q, k, v, idx, cnt, o_base=ob, o_slope=slope, slope_coef=coef, **kw)
    ref = _naive(q, k, v, idx, cnt, 0.2, 16, perm, ob + 2.5 * slope, 1.0, kw["lse"])
    assert rel_err(o, ref) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("same_strides", [True, False])
def test_triton_slope_matches_ref(triton_mode, dtype, same_strides):
    """The epilogue reads o_slope beside o_base and coef from the device; a slope with other strides
    than o_base is summed into it first (slope_into_base). Both against the reference."""
    q, k, v, idx, cnt, perm, ob, lse = _inputs(1, 4, 2, 77, 90, 64, 48, dtype, 0.45, True, zero_count=True)
    slope, coef = _slope(q)
    if not same_strides:
        slope = slope.contiguous()
    kw = dict(scale=0.125, group=48, perm=perm, o_base=ob, sign=1.0, o_slope=slope, slope_coef=coef)
    o = get_kernel("attn_column_sparse", q, k, v)(q, k, v, idx, cnt, **kw)
    o_r = attn_column_sparse_ref(q, k, v, idx, cnt, **kw)
    assert rel_err(o, o_r) < TOL[dtype]
    without = attn_column_sparse_ref(q, k, v, idx, cnt, **{**kw, "o_slope": None, "slope_coef": None})
    assert rel_err(o, without) > 10 * TOL[dtype]  # the slope term is really there


@pytest.mark.gpu
def test_gpu_bf16_slope_real_shape():
    q, k, v, idx, cnt, perm, ob, lse = _inputs(1, 4, 4, 4352, 4352, 128, 128, torch.bfloat16, 0.15, True, seed=3)
    slope, coef = _slope(q)
    kw = dict(scale=128 ** -0.5, group=128, perm=perm, o_base=ob, sign=1.0, o_slope=slope, slope_coef=coef)
    o = get_kernel("attn_column_sparse", q, k, v)(q, k, v, idx, cnt, **kw)
    assert rel_err(o, attn_column_sparse_ref(q, k, v, idx, cnt, **kw)) < TOL[torch.bfloat16]


def _measure_args(q, seed=5):
    """prev (a poisoned copy target: the old cache), slope_out (poisoned) and inv_dt, all (B, N, Hq, D)-laid."""
    B, Hq, N, D = q.shape
    g = torch.Generator().manual_seed(seed)
    prev = torch.randn(B, N, Hq, D, generator=g).transpose(1, 2).to(dtype=q.dtype, device=q.device)
    slope_out = torch.full((B, N, Hq, D), float("nan"), dtype=q.dtype, device=q.device).transpose(1, 2)
    return prev, slope_out, torch.tensor(0.25, device=q.device)


@pytest.mark.parametrize("use_lse", [False, True])
def test_ref_measure_writes_cache_and_slope(use_lse):
    """out = o_base − attn_S written in place of the old cache, slope = (o − old cache) · inv_dt."""
    q, k, v, idx, cnt, perm, ob, lse = _inputs(1, 4, 2, 50, 40, 32, 16, torch.float32, 0.4, True)
    prev, slope_out, inv = _measure_args(q)
    old = prev.clone()
    kw = dict(scale=0.2, group=16, perm=perm, o_base=ob, sign=-1.0, lse=lse if use_lse else None)
    o = attn_column_sparse_ref(q, k, v, idx, cnt, out=prev, measure=(prev, slope_out, inv), **kw)
    want = _naive(q, k, v, idx, cnt, 0.2, 16, perm, ob, -1.0, kw["lse"])
    assert o.data_ptr() == prev.data_ptr() and rel_err(prev, want) < 1e-6
    assert rel_err(slope_out, (want - old.double()) * 0.25) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("aliased", [True, False])
def test_triton_measure_matches_ref(triton_mode, dtype, aliased):
    """The fused epilogue (prev read, slope and o stored by one program; prev = out as a refresh
    calls it, or out left to a fresh buffer) against the reference on the same indices, with a
    wave-tail split and a zero-count group; poisoned slope_out catches unwritten rows."""
    q, k, v, idx, cnt, perm, ob, lse = _inputs(1, 4, 2, 77, 90, 64, 48, dtype, 0.45, True, zero_count=True)
    kw = dict(scale=0.125, group=48, perm=perm, o_base=ob, sign=-1.0)
    prev, slope_out, inv = _measure_args(q)
    prev_r, slope_r = prev.clone(), slope_out.clone()
    o = get_kernel("attn_column_sparse", q, k, v)(q, k, v, idx, cnt, out=prev if aliased else None,
                                                  measure=(prev, slope_out, inv), **kw)
    o_r = attn_column_sparse_ref(q, k, v, idx, cnt, out=prev_r if aliased else None,
                                 measure=(prev_r, slope_r, inv), **kw)
    assert (o.data_ptr() == prev.data_ptr()) == aliased
    assert rel_err(o, o_r) < TOL[dtype]
    assert not slope_out.isnan().any() and rel_err(slope_out, slope_r) < TOL[dtype]


def test_triton_measure_other_strides_takes_separate_passes(triton_mode):
    """A slope buffer in another layout cannot be stored by the epilogue: write_out runs after the
    kernel, still reading prev before out is overwritten."""
    q, k, v, idx, cnt, perm, ob, lse = _inputs(1, 4, 2, 40, 40, 32, 16, torch.float32, 0.5, True)
    kw = dict(scale=0.2, group=16, perm=perm, o_base=ob, sign=-1.0)
    prev, slope_out, inv = _measure_args(q)
    slope_out = slope_out.contiguous()  # (B, Hq, N, D) storage: other strides than the output's
    old = prev.clone()
    get_kernel("attn_column_sparse", q, k, v)(q, k, v, idx, cnt, out=prev, measure=(prev, slope_out, inv), **kw)
    want = attn_column_sparse_ref(q, k, v, idx, cnt, **kw)
    assert rel_err(prev, want) < TOL[torch.float32]
    assert rel_err(slope_out, (want.float() - old.float()) * 0.25) < TOL[torch.float32]


@pytest.mark.gpu
def test_gpu_bf16_measure_real_shape():
    """The refresh's cache build with the slope, at FLUX's shape, in place of the old cache."""
    q, k, v, idx, cnt, perm, ob, lse = _inputs(1, 4, 4, 4352, 4352, 128, 128, torch.bfloat16, 0.15, True, seed=3)
    kw = dict(scale=128 ** -0.5, group=128, perm=perm, o_base=ob, sign=-1.0)
    prev, slope_out, inv = _measure_args(q)
    prev_r, slope_r = prev.clone(), slope_out.clone()
    get_kernel("attn_column_sparse", q, k, v)(q, k, v, idx, cnt, out=prev, measure=(prev, slope_out, inv), **kw)
    attn_column_sparse_ref(q, k, v, idx, cnt, out=prev_r, measure=(prev_r, slope_r, inv), **kw)
    assert rel_err(prev, prev_r) < TOL[torch.bfloat16]
    assert rel_err(slope_out, slope_r) < TOL[torch.bfloat16]


def test_measure_calls_tune_with_the_output_restored(monkeypatch):
    """On a GPU a new tuning key times every config on the caller's buffers: a measure call (prev = out)
    must tune through the autotuner that restores O after each run, or the slope it keeps would be
    measured against an earlier timing run's output. The other calls keep the plain autotuner."""
    import chipmunk_compile.kernels.attn_column_sparse as csp

    used = []
    monkeypatch.setattr(csp, "launch", lambda kern, tuned, *a, **kw: used.append(tuned))
    q, k, v, idx, cnt, perm, ob, lse = _inputs(1, 2, 2, 40, 40, 32, 16, torch.float32, 0.5, False)
    prev, slope_out, inv = _measure_args(q)
    kw = dict(scale=0.2, group=16, o_base=ob, sign=-1.0)
    csp._attn_column_sparse_triton(q, k, v, idx, cnt, out=prev, measure=(prev, slope_out, inv), **kw)
    csp._attn_column_sparse_triton(q, k, v, idx, cnt, **kw)
    assert used == [csp._tuned_measure, csp._tuned]
    assert list(csp._tuned_measure.restore_value) == ["O"] and not csp._tuned.restore_value


def _bias(kind, B, Hq, N, Nk, dtype, seed=11):
    """An additive score bias: "full" (B, Hq, N, Nk) in dtype; "bcast" (N, Nk) in the other float dtype
    (fp32 beside fp16 and the reverse); "band" (N, Nk) of 0 where |i - j| <= 2, else -inf (most rows
    then have no finite score in most key tiles, and some none over all their group's columns)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "full":
        b = torch.randn(B, Hq, N, Nk, generator=g).to(dtype)
    elif kind == "bcast":
        b = torch.randn(N, Nk, generator=g).to(torch.float32 if dtype == torch.float16 else torch.float16)
    else:
        i, j = torch.arange(N)[:, None], torch.arange(Nk)[None, :]
        b = torch.zeros(N, Nk).masked_fill((i - j).abs() > 2, float("-inf")).to(dtype)
    return b.to(DEV)


def _dead_rows(bias, idx, cnt, perm, G):
    """(B, Hq, N) bool: rows with no finite bias over their group's columns (or an empty group)."""
    B, Hq, NG, _ = idx.shape
    N = perm.numel() if perm is not None else bias.shape[-2]
    bias = bias.expand(B, Hq, N, bias.shape[-1])
    order = torch.arange(N, device=idx.device) if perm is None else perm.long()
    dead = torch.ones(B, Hq, N, dtype=torch.bool, device=idx.device)
    for b in range(B):
        for h in range(Hq):
            for gi in range(NG):
                rows, cols = order[gi * G:(gi + 1) * G], idx[b, h, gi, :cnt[b, h, gi]].long()
                dead[b, h, rows] = ~(bias[b, h][rows][:, cols] > float("-inf")).any(-1)
    return dead


@pytest.mark.parametrize("kind", ["full", "bcast", "band"])
@pytest.mark.parametrize("use_lse,permuted", [(False, False), (True, True)])
def test_ref_bias_matches_naive(kind, use_lse, permuted):
    """The bias is added to the scores of the selected columns at (original row, gathered column)."""
    q, k, v, idx, cnt, perm, ob, lse = _inputs(1, 4, 2, 50, 40, 32, 16, torch.float32, 0.4, permuted,
                                               zero_count=True)
    bias = _bias(kind, 1, 4, 50, 40, torch.float32)
    kw = dict(scale=0.2, group=16, perm=perm, o_base=ob, sign=-1.0, lse=lse if use_lse else None)
    o = attn_column_sparse_ref(q, k, v, idx, cnt, bias=bias, **kw)
    ref = _naive(q, k, v, idx, cnt, 0.2, 16, perm, ob, -1.0, kw["lse"], bias=bias)
    assert rel_err(o, ref) < 1e-6
    assert rel_err(o, attn_column_sparse_ref(q, k, v, idx, cnt, **kw)) > 1e-2  # the bias is really there


def test_ref_bias_full_set_equals_dense():
    q, k, v, *_ = _inputs(2, 2, 1, 33, 29, 32, 8, torch.float32, 0.5, False)
    idx, cnt = _full(2, 2, 33, 29, 8)
    bias = _bias("full", 2, 2, 33, 29, torch.float32)
    bias[..., 1:].masked_fill_(torch.rand(bias[..., 1:].shape, device=DEV) < 0.3, float("-inf"))  # column 0 stays
    o = attn_column_sparse_ref(q, k, v, idx, cnt, scale=0.3, group=8, bias=bias)
    dense = F.scaled_dot_product_attention(q, k.expand(-1, 2, -1, -1), v.expand(-1, 2, -1, -1), attn_mask=bias,
                                           scale=0.3)
    assert rel_err(o, dense) < 1e-6


BIAS_CASES = [
    # B, Hq, Hkv, N, Nk, G, frac, permuted, use_lse, use_base
    (1, 4, 2, 77, 90, 48, 0.45, True, False, True),    # GQA, odd N, permuted, o_base/sign, split wave tail
    (2, 2, 1, 50, 61, 64, 0.6, True, True, True),      # exact-normalizer variant
    (1, 2, 2, 130, 70, 16, 0.3, False, False, False),  # G < tile: rows of several groups in a tile, no o_base
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind", ["full", "bcast", "band"])
@pytest.mark.parametrize("case", BIAS_CASES)
def test_triton_bias_matches_ref(triton_mode, case, kind, dtype):
    """Against the reference, and a banded 0/-inf bias's rows with no finite score over their group's
    columns are exactly o_base (0 without it): no NaN, nothing added."""
    B, Hq, Hkv, N, Nk, G, frac, permuted, use_lse, use_base = case
    q, k, v, idx, cnt, perm, ob, lse = _inputs(B, Hq, Hkv, N, Nk, 64, G, dtype, frac, permuted, seed=N,
                                               zero_count=True)
    bias = _bias(kind, B, Hq, N, Nk, dtype)
    kw = dict(scale=0.125, group=G, perm=perm, o_base=ob if use_base else None, sign=-1.0 if use_base else 1.0,
              lse=lse if use_lse else None)
    fn = get_kernel("attn_column_sparse", q, k, v)
    assert fn is not attn_column_sparse_ref
    o = fn(q, k, v, idx, cnt, bias=bias, **kw)
    o_r = attn_column_sparse_ref(q, k, v, idx, cnt, bias=bias, **kw)
    assert rel_err(o, o_r) < TOL[dtype]
    assert rel_err(o, attn_column_sparse_ref(q, k, v, idx, cnt, **kw)) > 10 * TOL[dtype]
    if kind == "band":
        dead = _dead_rows(bias, idx, cnt, perm, G)
        assert dead.any() and not dead.all()
        assert torch.equal(o[dead], ob[dead] if use_base else torch.zeros_like(o[dead]))


@pytest.mark.parametrize("meta", [dict(BLOCK_M=32, BLOCK_N=32, TAIL_N=32, OCC=1, SPLIT=1),   # one masked loop
                                  dict(BLOCK_M=32, BLOCK_N=32, TAIL_N=16, OCC=1, SPLIT=1),   # main + tail loop
                                  dict(BLOCK_M=32, BLOCK_N=64, TAIL_N=16, OCC=1, SPLIT=2)])  # split wave tail
@pytest.mark.parametrize("kind", ["full", "band"])
def test_triton_bias_schedule_variants(triton_mode, monkeypatch, meta, kind):
    """With a bias every schedule runs the one masked loop; the three bodies of the kernel agree."""
    from chipmunk_compile.kernels import attn_column_sparse as mod

    monkeypatch.setattr(mod, "_INTERP_META", meta)
    q, k, v, idx, cnt, perm, ob, lse = _inputs(1, 4, 2, 77, 90, 64, 48, torch.float32, 0.45, True, seed=5,
                                               zero_count=True)
    kw = dict(scale=0.125, group=48, perm=perm, o_base=ob, sign=-1.0, bias=_bias(kind, 1, 4, 77, 90, torch.float32))
    o = get_kernel("attn_column_sparse", q, k, v)(q, k, v, idx, cnt, **kw)
    assert rel_err(o, attn_column_sparse_ref(q, k, v, idx, cnt, **kw)) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_bias_full_set_equals_dense(triton_mode, dtype):
    """Every key selected: SDPA with the bias as its float attn_mask (here (N, Nk), broadcast)."""
    q, k, v, *_ = _inputs(1, 4, 2, 70, 53, 64, 32, dtype, 0.5, False)
    idx, cnt = _full(1, 4, 70, 53, 32)
    bias = _bias("bcast", 1, 4, 70, 53, dtype)
    bias[:, 1:].masked_fill_(torch.rand(70, 52, device=DEV) < 0.3, float("-inf"))  # column 0 stays finite
    o = get_kernel("attn_column_sparse", q, k, v)(q, k, v, idx, cnt, scale=0.125, group=32, bias=bias)
    dense = F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(2, 1),
                                           v.float().repeat_interleave(2, 1), attn_mask=bias.float(), scale=0.125)
    assert rel_err(o, dense) < TOL[dtype]


def test_biased_calls_never_take_gluon(monkeypatch):
    """The Gluon kernels take no bias: a call that would qualify for them runs the Triton kernel once it
    has a bias (stand-ins for the kernels and the Hopper check: no GPU here)."""
    from chipmunk_compile.kernels import attn_column_sparse as dispatch
    from chipmunk_compile.kernels import attn_column_sparse_hopper as hopper

    monkeypatch.setattr(dispatch, "interpreting", lambda: False)
    monkeypatch.setattr(hopper, "supported", lambda *a, **k: None)
    monkeypatch.setenv("CHIPMUNK_GLUON", "1")
    ran = []
    monkeypatch.setattr(dispatch, "_attn_column_sparse_gluon", lambda *a, **k: ran.append("gluon"))
    monkeypatch.setattr(dispatch, "_attn_column_sparse_triton", lambda *a, **k: ran.append(("triton", k["bias"])))
    x = torch.zeros(1, 1, 4, 128)
    idx, cnt = torch.zeros(1, 1, 1, 4096, dtype=torch.int32), torch.zeros(1, 1, 1, dtype=torch.int32)
    bias = torch.zeros(4, 4)
    assert dispatch.use_hopper_kernel(x, x, x, idx, scale=0.1, group=128)
    assert not dispatch.use_hopper_kernel(x, x, x, idx, scale=0.1, group=128, bias=bias)
    dispatch.attn_column_sparse(x, x, x, idx, cnt, scale=0.1, group=128)
    dispatch.attn_column_sparse(x, x, x, idx, cnt, scale=0.1, group=128, bias=bias)
    assert ran[0] == "gluon" and ran[1][0] == "triton" and ran[1][1] is bias


@pytest.mark.gpu
def test_gpu_bf16_bias_real_shape():
    """FLUX's shape (1x24x4352x128, G=128, 653 keys per group: long enough for the Gluon kernels, which
    take no bias, so the Triton kernel runs it) with an (N, N) fp32 bias of small values, 5% -inf, and
    its first 7 rows all -inf (those rows keep o_base exactly)."""
    N, H, G, K = 4352, 24, 128, 653
    q, k, v, _, _, perm, ob, _ = _inputs(1, H, H, N, N, 128, G, torch.bfloat16, 0.0, True, seed=4)
    g = torch.Generator(device=DEV).manual_seed(4)
    NG = math.ceil(N / G)
    idx = torch.rand(1, H, NG, N, generator=g, device=DEV).argsort(-1)[..., :K].sort(-1).values.to(torch.int32)
    cnt = torch.full((1, H, NG), K, dtype=torch.int32, device=DEV)
    bias = 0.5 * torch.randn(N, N, generator=g, device=DEV)
    bias.masked_fill_(torch.rand(N, N, generator=g, device=DEV) < 0.05, float("-inf"))
    bias[:7] = float("-inf")
    kw = dict(scale=128 ** -0.5, group=G, perm=perm, o_base=ob, sign=-1.0, bias=bias)
    fn = get_kernel("attn_column_sparse", q, k, v)
    assert fn is not attn_column_sparse_ref
    o = fn(q, k, v, idx, cnt, **kw)
    assert rel_err(o, attn_column_sparse_ref(q, k, v, idx, cnt, **kw)) < TOL[torch.bfloat16]
    assert torch.equal(o[:, :, :7], ob[:, :, :7])


# Compiles one configuration for sm_90 with the integer arguments specialized as at run time for FLUX
# (1x24x4352x128, (B, N, H, D) strides, G=128, 704 key columns); prints ptxas' registers and spill bytes.
_SPILLS_ON_HOPPER = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from chipmunk_compile.kernels.attn_column_sparse import _attn_column_sparse_kernel as k
meta, warps, stages = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
slope, measure, bias = (a == "1" for a in sys.argv[4:7])
D = int(sys.argv[7]) if len(sys.argv) > 7 else 128
H, N, NG, KC = 24 * 128 // D, 4352, 34, 704
ptrs = dict(Q="*bf16", K="*bf16", V="*bf16", O="*bf16", OB="*bf16", OS="*bf16", COEF="*fp32", PREV="*bf16", SOUT="*bf16",
            INV="*fp32", IDX="*i32", CNT="*i32", LSE="*fp32", PERM="*i32")
ptrs["BIAS"] = "*fp32" if bias else "*bf16"  # no bias: q passed in its place
st = dict(b=N * H * D, h=D, n=H * D, d=1)
ints = {f"s{t}{a}": v for t in "qkvob" for a, v in st.items()}
ints.update(sib=H * NG * KC, sih=NG * KC, sig=KC, scb=H * NG, sch=NG, N=N, HQ=H, KV_REP=1, NG=NG, NBH=H, NUM_SMS=132)
ints.update(sab=0, sah=0, san=N if bias else 0, sak=1 if bias else 0)  # an (N, N) fp32 bias, or none (q, zero strides)
flags = dict(G=128, HEAD_DIM=D, D_ACT=D, HAS_PERM=True, HAS_OB=True, HAS_SLOPE=slope, HAS_MEASURE=measure, HAS_LSE=False,
             DOT_PREC="tf32", POS_SCALE=True, HAS_BIAS=bias)
names = set(ptrs) | set(ints) | set(flags) | set(meta) | {"qk_scale", "sign"}
assert set(k.arg_names) == names, set(k.arg_names) ^ names
consts = {**flags, **meta, **{n: 1 for n, v in ints.items() if v == 1}}
sig = {n: "constexpr" if n in consts else ptrs.get(n, "fp32" if n in ("qk_scale", "sign") else "i32") for n in k.arg_names}
div16 = [i for i, n in enumerate(k.arg_names) if n in ptrs or (n in ints and ints[n] % 16 == 0 and ints[n] != 1)]
out = triton.compile(ASTSource(fn=k, signature=sig, constexprs=consts, attrs={(i,): [["tt.divisibility", 16]] for i in div16}),
                     target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
print("SPILL_STORES %d REGISTERS %d" % ptxas_resources(out.asm["ptx"]))
"""


@pytest.mark.parametrize("slope,measure,bias", [(True, False, False), (False, True, False), (False, False, True)])
def test_epilogues_compile_for_hopper_without_spills(slope, measure, bias):
    """The forecast's slope read (sparse steps), the measure epilogue (the refresh's cache build
    with the slope) and an (N, N) fp32 bias keep FLUX's tile (64 x 32, 4 warps, 3 programs per SM) in
    registers: no spills, and at most 168 registers per thread, so that three programs of 128 threads
    still fit an SM's 64K. Compiled for sm_90 here, with no GPU."""
    import json

    meta = dict(BLOCK_M=64, BLOCK_N=32, TAIL_N=32, OCC=3, SPLIT=1)
    out = compile_for_hopper(_SPILLS_ON_HOPPER, json.dumps(meta), 4, 4, int(slope), int(measure), int(bias))
    spills, regs = (int(x) for x in out.split()[1::2])
    assert spills == 0 and regs <= 168, out


def _tiles_d256():
    from chipmunk_compile.kernels.attn_column_sparse import _TILES_D256

    return _TILES_D256


@pytest.mark.parametrize("tile", _tiles_d256())
def test_head_dim_256_tiles_compile_for_hopper_without_spills(tile):
    """Every autotune config of 256-wide head-dim tiles (AuraFlow) keeps the sparse step's epilogue, the
    one with the forecast's slope, in registers at 1x12x4352x256 (compiled for sm_90 here, with no GPU)."""
    import json

    bm, bn, tn, w, s, occ, sp = tile
    meta = dict(BLOCK_M=bm, BLOCK_N=bn, TAIL_N=tn, OCC=occ, SPLIT=sp)
    out = compile_for_hopper(_SPILLS_ON_HOPPER, json.dumps(meta), w, s, 1, 0, 0, 256)
    spills, regs = (int(x) for x in out.split()[1::2])
    assert spills == 0 and regs <= 255, out
