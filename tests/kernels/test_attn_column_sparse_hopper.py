"""attn_column_sparse_hopper (Gluon, sm_90): compiled for Hopper on the CPU; on a GPU, against the
reference and through the dispatcher."""

import math

import pytest
import torch
from kernel_testutils import TOL, compile_for_hopper, rel_err

from chipmunk_compile.kernels import attn_column_sparse as dispatch
from chipmunk_compile.kernels import attn_column_sparse_hopper as hopper
from chipmunk_compile.kernels import attn_column_sparse_ref

_COMPILE_FOR_HOPPER = """
import sys, triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from triton.experimental.gluon import language as gl
from chipmunk_compile.kernels import attn_column_sparse_hopper as m
D, BM, STAGES, has_perm, has_ob, ablate, epi = (int(a) for a in sys.argv[1:])
fn = m._csp_hopper_kernel
ptrs = dict(Q="*bf16", K="*bf16", V="*bf16", O="*bf16", OB="*bf16", OS="*bf16", COEF="*fp32", PREV="*bf16",
            SOUT="*bf16", INV="*fp32", IDX="*i32", CNT="*i32", PERM="*i32")
q_l = gl.NVMMASharedLayout.get_default_for([BM, D], gl.bfloat16)
kv_l = gl.NVMMASharedLayout.get_default_for([128, D], gl.bfloat16)
const = dict(G=128, HEAD_DIM=D, BLOCK_M=BM, BLOCK_N=128, STAGES=STAGES, HAS_PERM=bool(has_perm),
             HAS_OB=bool(has_ob), HAS_SLOPE=bool(epi and has_ob), HAS_MEASURE=bool(epi), q_smem_layout=q_l,
             kv_smem_layout=kv_l, ABLATE=ablate)
sig = {n: ptrs.get(n, "constexpr" if n in const else ("fp32" if n in ("qk_scale", "sign") else "i32"))
       for n in fn.arg_names}
aligned = {n for n in fn.arg_names if n in ptrs or (n.startswith("s") and n != "sign")}
attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n in aligned}
out = triton.compile(GluonASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                     target=GPUTarget("cuda", 90, 32), options={"num_warps": BM // 16})
ptx = out.asm["ptx"]
assert ptx.count("wgmma.mma_async") > 0, "no warpgroup MMA"
n_exp = ptx.count("ex2.approx")  # one per probability; ablated, only the per-row rescale factors stay
assert (n_exp < 16) if ablate == 1 else (n_exp >= 64), f"{n_exp} exponentials"
assert "cp.async" in ptx, "no asynchronous row gathers"
assert out.metadata.shared <= 232448, f"shared memory {out.metadata.shared} over the sm_90 limit"
"""


@pytest.mark.skipif(not hopper.HAVE_GLUON, reason="this Triton has no Gluon (the dispatcher never routes here)")
@pytest.mark.parametrize("D,BM,STAGES,has_perm,has_ob,ablate,epi", [
    (128, 128, 2, 1, 1, 0, 0), (128, 128, 3, 0, 0, 0, 0), (64, 64, 2, 1, 0, 0, 0), (128, 128, 2, 1, 1, 1, 0),
    (128, 128, 2, 1, 1, 0, 1),  # the forecast's slope term and a refresh's measure in the epilogue
])
def test_compiles_for_hopper_without_a_gpu(D, BM, STAGES, has_perm, has_ob, ablate, epi):
    """Gluon has no interpreter: CI proves the kernel builds for sm_90 with the installed Triton (also
    with an ablation of benchmarks/kernel_ablation.py, which drops the exponentials)."""
    compile_for_hopper(_COMPILE_FOR_HOPPER, D, BM, STAGES, has_perm, has_ob, ablate, epi)


def test_supported_gives_reasons_and_cpu_calls_stay_on_triton(monkeypatch):
    x = torch.zeros(1, 2, 300, 128)
    assert hopper.supported(x, x, x, group=128, scale=0.1) in ("not sm_90", "no gluon")
    idx = torch.zeros(1, 2, 3, 4096, dtype=torch.int32)
    assert not dispatch.use_hopper_kernel(x, x, x, idx, scale=0.1, group=128)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        return
    g = torch.zeros(1, 2, 300, 128, device="cuda", dtype=torch.bfloat16)
    assert hopper.supported(g, g, g, group=128, scale=0.1) is None
    assert hopper.supported(g, g, g, group=96, scale=0.1) == "group not a multiple of 64"
    assert hopper.supported(g, g, g, group=128, scale=0.1, lse=torch.zeros(1)) == "exact-normalizer delta"
    assert hopper.supported(g[..., :32], g[..., :32], g[..., :32], group=128, scale=0.1) == "head dim"
    assert hopper.supported(g.float(), g.float(), g.float(), group=128, scale=0.1) == "dtype"
    gi = idx.cuda()
    assert dispatch.use_hopper_kernel(g, g, g, gi, scale=0.1, group=128)
    assert not dispatch.use_hopper_kernel(g, g, g, gi[..., :256], scale=0.1, group=128)  # short lists: Triton
    monkeypatch.setenv("CHIPMUNK_GLUON", "0")
    assert not dispatch.use_hopper_kernel(g, g, g, gi, scale=0.1, group=128)


def test_layout_reason_catches_what_cp_async_cannot_copy():
    buf = torch.zeros(1, 300, 2, 130, dtype=torch.float16)
    assert hopper.layout_reason(buf[..., :128].transpose(1, 2)) == "rows not 16-byte aligned"  # row stride 130
    assert hopper.layout_reason(buf.view(-1)[1:1 + 300 * 256].view(1, 300, 2, 128)) == "rows not 16-byte aligned"
    assert hopper.layout_reason(buf.transpose(-1, -2)) == "head dim not contiguous"
    ok = torch.zeros(1, 300, 2, 128, dtype=torch.float16)
    assert hopper.layout_reason(ok.transpose(1, 2), None) is None


def _sm90():
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


def _inputs(B, Hq, Hkv, N, D, G, keep, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, N, Hq, D, device="cuda", generator=g).to(dtype).transpose(1, 2)
    k = torch.randn(B, N, Hkv, D, device="cuda", generator=g).to(dtype).transpose(1, 2)
    v = torch.randn(B, N, Hkv, D, device="cuda", generator=g).to(dtype).transpose(1, 2)
    NG, K = math.ceil(N / G), max(1, round(keep * N))
    idx = torch.rand(B, Hq, NG, N, device="cuda", generator=g).argsort(-1)[..., :K].sort(-1).values.int()
    cnt = torch.randint(0, K + 1, (B, Hq, NG), device="cuda", generator=g, dtype=torch.int32)
    cnt.view(-1)[0], cnt.view(-1)[-1] = 0, K  # an empty group and a full one
    perm = torch.randperm(N, device="cuda", generator=g).int()
    o_base = torch.randn(B, N, Hq, D, device="cuda", generator=g).to(dtype).transpose(1, 2)
    return q, k, v, idx, cnt, perm, o_base


@pytest.mark.gpu
@pytest.mark.skipif(not _sm90(), reason="needs an sm_90 GPU (H100/H200)")
@pytest.mark.parametrize("B,Hq,Hkv,N,D,G,keep,dtype", [
    (1, 2, 2, 1000, 128, 128, 0.3, torch.bfloat16),
    (2, 4, 2, 777, 128, 128, 0.4, torch.bfloat16),   # GQA, batch 2, ragged N
    (1, 3, 3, 1500, 64, 128, 0.25, torch.float16),
    (1, 2, 1, 2048, 128, 256, 0.11, torch.float16),  # two row tiles per group
    (1, 2, 2, 1000, 128, 192, 0.2, torch.bfloat16),  # 64-row tiles (the published group of 192)
    (1, 2, 2, 300, 64, 128, 1.0, torch.bfloat16),    # every key
])
@pytest.mark.parametrize("stages", [2, 3])
def test_gpu_matches_reference(B, Hq, Hkv, N, D, G, keep, dtype, stages):
    check_matches_reference(hopper.attn_column_sparse_hopper, B, Hq, Hkv, N, D, G, keep, dtype, stages=stages)


def check_matches_reference(kernel, B, Hq, Hkv, N, D, G, keep, dtype, **kernel_kw):
    """kernel against the reference with and without permutation / o_base / sign, on ragged counts
    (an empty group, whose attention is exactly 0, and a full one)."""
    q, k, v, idx, cnt, perm, ob = _inputs(B, Hq, Hkv, N, D, G, keep, dtype, seed=N + D)
    for kw in (dict(perm=perm, o_base=ob, sign=-1.0), dict()):
        o = kernel(q, k, v, idx, cnt, scale=D ** -0.5, group=G, **kernel_kw, **kw)
        ref = attn_column_sparse_ref(q, k, v, idx, cnt, scale=D ** -0.5, group=G, **kw)
        assert o.stride() == ref.stride()
        assert rel_err(o, ref) < TOL[dtype]
        if not kw:
            assert o[0, 0, :G].abs().max().item() == 0.0


@pytest.mark.gpu
@pytest.mark.skipif(not _sm90(), reason="needs an sm_90 GPU (H100/H200)")
def test_gpu_dispatcher_routes_long_key_lists_here(monkeypatch):
    """attn_column_sparse sends long index lists to this kernel where the ping-pong one does not
    qualify (groups of 192: 64-row tiles) (CHIPMUNK_GLUON=1: always; unset: when it timed faster on
    the first call of the shape) and gives the Triton kernel's result."""
    from chipmunk_compile.kernels import _common

    q, k, v, idx, cnt, perm, ob = _inputs(1, 2, 2, 9000, 128, 192, 0.25, torch.bfloat16, seed=3)
    assert idx.shape[-1] >= dispatch.HOPPER_MIN_KEYS
    monkeypatch.setenv("CHIPMUNK_GLUON", "1")
    calls = []
    real = hopper.attn_column_sparse_hopper
    monkeypatch.setattr(hopper, "attn_column_sparse_hopper", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    kw = dict(scale=128 ** -0.5, group=192, perm=perm, o_base=ob, sign=-1.0)
    from torch._dynamo.utils import counters

    before = counters["chipmunk"]["kernel_gluon:attn_column_sparse"]
    o = dispatch.attn_column_sparse(q, k, v, idx, cnt, **kw)
    assert calls == [1]
    assert counters["chipmunk"]["kernel_gluon:attn_column_sparse"] == before + 1
    monkeypatch.setenv("CHIPMUNK_GLUON", "0")
    o_triton = dispatch.attn_column_sparse(q, k, v, idx, cnt, **kw)
    assert calls == [1]
    assert rel_err(o, o_triton) < TOL[torch.bfloat16]
    assert rel_err(o, attn_column_sparse_ref(q, k, v, idx, cnt, **kw)) < TOL[torch.bfloat16]
    monkeypatch.delenv("CHIPMUNK_GLUON")
    monkeypatch.setattr(_common, "_CHOICES", {})
    counters.clear()
    o_auto = dispatch.attn_column_sparse(q, k, v, idx, cnt, **kw)  # times both, then runs the faster
    (choice,) = [key for key in counters["chipmunk"] if key.startswith("kernel_choice:attn_column_sparse:")]
    assert len(_common._CHOICES) == 1 and choice.endswith(next(iter(_common._CHOICES.values())))
    assert rel_err(o_auto, o_triton) < TOL[torch.bfloat16]
    dispatch.attn_column_sparse(q, k, v, idx, cnt, **kw)
    assert sum(counters["chipmunk"][c] for c in counters["chipmunk"] if c.startswith("kernel_choice")) == 1


def check_fused_epilogue(kernel, group, **kernel_kw):
    """The forecast's slope term (a sparse step) and a refresh's cache build (out = the old cache,
    measure's prev) in the kernel's epilogue, against the reference on copies of the same tensors."""
    q, k, v, idx, cnt, perm, ob = _inputs(1, 3, 3, 1500, 128, group, 0.4, torch.bfloat16, seed=11)  # 600 keys
    slope = torch.randn_like(ob)  # o_base's strides
    coef = torch.tensor(0.75, device="cuda")
    kw = dict(scale=128 ** -0.5, group=group, perm=perm, sign=1.0)
    o = kernel(q, k, v, idx, cnt, o_base=ob, o_slope=slope, slope_coef=coef, **kernel_kw, **kw)
    ref = attn_column_sparse_ref(q, k, v, idx, cnt, o_base=ob, o_slope=slope, slope_coef=coef, **kw)
    without = attn_column_sparse_ref(q, k, v, idx, cnt, o_base=ob, **kw)
    assert rel_err(o, ref) < TOL[torch.bfloat16] and rel_err(o, without) > 10 * TOL[torch.bfloat16]
    cache = torch.randn(1, 1500, 3, 128, device="cuda").to(torch.bfloat16).transpose(1, 2)  # the old cache
    slope_out = torch.full_like(cache, float("nan"))
    cache_r, slope_r = cache.clone(), slope_out.clone()
    inv = torch.tensor(0.25, device="cuda")
    kw["sign"] = -1.0
    got = kernel(q, k, v, idx, cnt, o_base=ob, out=cache, measure=(cache, slope_out, inv), **kernel_kw, **kw)
    attn_column_sparse_ref(q, k, v, idx, cnt, o_base=ob, out=cache_r, measure=(cache_r, slope_r, inv), **kw)
    assert got.data_ptr() == cache.data_ptr()
    assert rel_err(cache, cache_r) < TOL[torch.bfloat16] and rel_err(slope_out, slope_r) < TOL[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.skipif(not _sm90(), reason="needs an sm_90 GPU (H100/H200)")
@pytest.mark.parametrize("group", [128, 192])
def test_gpu_fused_epilogue_matches_reference(group):
    check_fused_epilogue(hopper.attn_column_sparse_hopper, group)


@pytest.mark.gpu
@pytest.mark.skipif(not _sm90(), reason="needs an sm_90 GPU (H100/H200)")
def test_gpu_dispatcher_fuses_the_epilogue_on_every_pick(monkeypatch):
    """Through attn_column_sparse, each kernel it may pick (forced in turn) gives the reference's
    sparse-step output and refresh cache and slope."""
    from chipmunk_compile.kernels import _common

    for pick in ("pingpong", "pingpong_persistent", "gluon", "triton"):
        monkeypatch.setattr(_common, "_CHOICES", {})
        monkeypatch.setattr(dispatch, "faster_choice", lambda key, runs, default, p=pick: p)
        check_fused_epilogue(dispatch.attn_column_sparse, 128)


def check_records_in_a_cuda_graph(kernel):
    """kernel(q, k, v, indices, counts, **kw) records in a CUDA graph: no host read, and the replay
    equals the eager call on new inputs."""
    q, k, v, idx, cnt, perm, ob = _inputs(1, 2, 2, 3000, 128, 128, 0.8, torch.bfloat16, seed=9)
    kw = dict(scale=128 ** -0.5, group=128, perm=perm, o_base=ob, sign=-1.0)
    kernel(q, k, v, idx, cnt, **kw)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kernel(q, k, v, idx, cnt, **kw)
    q2, k2, v2, idx2, cnt2, _, ob2 = _inputs(1, 2, 2, 3000, 128, 128, 0.8, torch.bfloat16, seed=10)
    for dst, src in ((q, q2), (k, k2), (v, v2), (idx, idx2), (cnt, cnt2), (ob, ob2)):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, kernel(q, k, v, idx, cnt, **kw))


@pytest.mark.gpu
@pytest.mark.skipif(not _sm90(), reason="needs an sm_90 GPU (H100/H200)")
def test_gpu_records_in_a_cuda_graph():
    """Step graphs record this kernel."""
    check_records_in_a_cuda_graph(hopper.attn_column_sparse_hopper)
