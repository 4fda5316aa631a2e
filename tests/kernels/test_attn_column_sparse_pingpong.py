"""attn_column_sparse_pingpong (Gluon, sm_90, warp-specialized): compiled for Hopper on the CPU; on a
GPU, against the reference, through the dispatcher and in a CUDA graph."""

import functools

import pytest
import torch
from kernel_testutils import TOL, compile_for_hopper, rel_err
from test_attn_column_sparse_hopper import (_inputs, _sm90, check_fused_epilogue, check_matches_reference,
                                            check_records_in_a_cuda_graph)

from chipmunk_compile.kernels import attn_column_sparse as dispatch
from chipmunk_compile.kernels import attn_column_sparse_pingpong as pingpong
from chipmunk_compile.kernels import attn_column_sparse_ref

_COMPILE_FOR_HOPPER = """
import re, sys, triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from triton.experimental.gluon import language as gl
from chipmunk_compile.kernels import attn_column_sparse_pingpong as m
D, STAGES, has_perm, has_ob, epi, narrow = (int(a) for a in sys.argv[1:])
fn = m._csp_pingpong_kernel
ptrs = dict(Q="*bf16", K="*bf16", V="*bf16", O="*bf16", OB="*bf16", OS="*bf16", COEF="*fp32", PREV="*bf16",
            SOUT="*bf16", INV="*fp32", IDX="*i32", CNT="*i32", PERM="*i32")
q_l = gl.NVMMASharedLayout.get_default_for([64, D], gl.bfloat16)
kv_l = gl.NVMMASharedLayout.get_default_for([m.BLOCK_N, D], gl.bfloat16)
const = dict(G=128, HEAD_DIM=D, BLOCK_N=m.BLOCK_N, STAGES=STAGES, HAS_PERM=bool(has_perm), HAS_OB=bool(has_ob),
             HAS_SLOPE=bool(epi and has_ob), HAS_MEASURE=bool(epi), NARROW=narrow,
             q_smem_layout=q_l, kv_smem_layout=kv_l, PRODUCER_REGS=m.PRODUCER_REGS, CONSUMER_REGS=m.CONSUMER_REGS)
sig = {n: ptrs.get(n, "constexpr" if n in const else ("fp32" if n in ("qk_scale", "sign") else "i32"))
       for n in fn.arg_names}
aligned = {n for n in fn.arg_names if n in ptrs or (n.startswith("s") and n != "sign")}
attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n in aligned}
out = triton.compile(GluonASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                     target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
ptx = out.asm["ptx"]
assert "wgmma.mma_async" in ptx, "no warpgroup MMA"
# each width of the last tile (narrow // 2, narrow, full) has its own QKᵀ and P·V instructions
widths = {int(n) for n in re.findall(r"wgmma\\.mma_async\\.sync\\.aligned\\.m64n(\\d+)k16", ptx)}
assert widths == ({D, 128} | ({narrow, narrow // 2} if narrow else set())), widths
assert ptx.count("cp.async.mbarrier.arrive.noinc") == 2, "the producer signals K and V through mbarriers"
assert "setmaxnreg" in ptx, "no warp-specialized partitions"
turns = re.findall(r"bar\\.(sync|arrive) %r\\d+, 256;", ptx)
assert "sync" in turns and "arrive" in turns, "no ping-pong turns between the consumer warpgroups"
assert not re.search(r"bar\\.sync\\s+0;", ptx), "a CTA-wide barrier would put both consumers in lockstep"
own = {int(i) for i in re.findall(r"bar(?:rier)?\\.(?:sync|arrive)(?:\\.aligned)?\\s+(\\d+)", ptx)}
assert not own & {m.TURN.value, m.TURN.value + 1}, f"Triton's own barriers {own} collide with the turn barriers"
assert out.metadata.shared <= 232448, f"shared memory {out.metadata.shared} over the sm_90 limit"
"""


@pytest.mark.skipif(not pingpong.HAVE_WS, reason="this Triton has no Gluon warp_specialize (never dispatched here)")
@pytest.mark.parametrize("D,STAGES,has_perm,has_ob,epi,narrow", [
    (128, 2, 1, 1, 0, 0), (64, 3, 0, 0, 0, 64), (128, 2, 1, 1, 1, 64)])
def test_compiles_for_hopper_without_a_gpu(D, STAGES, has_perm, has_ob, epi, narrow):
    """Gluon has no interpreter: CI proves the kernel builds for sm_90 with the installed Triton,
    with its producer, partitions and turn barriers (and the narrow last tiles' extra MMAs)."""
    compile_for_hopper(_COMPILE_FOR_HOPPER, D, STAGES, has_perm, has_ob, epi, narrow)


def test_supported_gives_reasons():
    x = torch.zeros(1, 2, 300, 128)
    assert pingpong.supported(x, x, x, group=128, scale=0.1) in ("not sm_90", "no gluon",
                                                                 "no gluon warp_specialize")
    if pingpong.HAVE_WS:
        assert pingpong.beyond_hopper(256) is None
        assert pingpong.beyond_hopper(192) == "group not a multiple of 128"
    if not _sm90():
        return
    g = torch.zeros(1, 2, 300, 128, device="cuda", dtype=torch.bfloat16)
    assert pingpong.supported(g, g, g, group=256, scale=0.1) is None
    assert pingpong.supported(g, g, g, group=192, scale=0.1) == "group not a multiple of 128"
    assert pingpong.supported(g, g, g, group=128, scale=0.1, lse=torch.zeros(1)) == "exact-normalizer delta"


@pytest.mark.gpu
@pytest.mark.skipif(not _sm90(), reason="needs an sm_90 GPU (H100/H200)")
@pytest.mark.parametrize("B,Hq,Hkv,N,D,G,keep,dtype", [
    (1, 2, 2, 1000, 128, 128, 0.3, torch.bfloat16),
    (2, 4, 2, 777, 128, 128, 0.4, torch.bfloat16),   # GQA, batch 2, ragged N
    (1, 3, 3, 1500, 64, 128, 0.25, torch.float16),   # head dim 64
    (1, 2, 1, 2048, 128, 256, 0.11, torch.float16),  # two row tiles per group
    (1, 2, 2, 300, 128, 128, 1.0, torch.bfloat16),   # every key
    (1, 2, 2, 3000, 128, 128, 0.6, torch.bfloat16),  # 15 key tiles: both rings wrap several times
])
@pytest.mark.parametrize("stages,programs,narrow", [(2, None, 0), (3, None, 0), (2, 3, 64), (3, None, 64),
                                                     (2, 5, 32)])
def test_gpu_matches_reference(B, Hq, Hkv, N, D, G, keep, dtype, stages, programs, narrow):
    """programs=3 / 5: each program runs several work items of random key counts (empty ones among
    them) back to back, its rings and turns carried across them; narrow: ragged last tiles of
    16 / 32 / 64 rows."""
    check_matches_reference(pingpong.attn_column_sparse_pingpong, B, Hq, Hkv, N, D, G, keep, dtype, stages=stages,
                            programs=programs, narrow=narrow)


@pytest.mark.gpu
@pytest.mark.skipif(not _sm90(), reason="needs an sm_90 GPU (H100/H200)")
@pytest.mark.parametrize("narrow", [32, 64])
def test_gpu_narrow_last_tiles_at_every_boundary(narrow):
    """Key counts on both sides of each last-tile width (1, 16, 17, 32, 33, 64, 65, 128, 129, 200)
    give the reference's output, one program running them all."""
    counts = [1, 16, 17, 32, 33, 64, 65, 128, 129, 200]
    q, k, v, idx, cnt, perm, ob = _inputs(1, 2, 2, 128 * len(counts), 128, 128, 0.2, torch.bfloat16, seed=4)
    cnt.copy_(torch.tensor(counts, dtype=torch.int32, device="cuda").expand_as(cnt))
    kw = dict(scale=128 ** -0.5, group=128, perm=perm, o_base=ob, sign=-1.0)
    for programs in (1, None):
        o = pingpong.attn_column_sparse_pingpong(q, k, v, idx, cnt, programs=programs, narrow=narrow, **kw)
        assert rel_err(o, attn_column_sparse_ref(q, k, v, idx, cnt, **kw)) < TOL[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.skipif(not _sm90(), reason="needs an sm_90 GPU (H100/H200)")
def test_gpu_dispatcher_prefers_it_for_groups_of_128(monkeypatch):
    """CHIPMUNK_GLUON=1 sends groups of 128 here (counted); unset, the first call of the shape times
    it with the other two kernels, and the pick gives the reference's result."""
    from torch._dynamo.utils import counters

    from chipmunk_compile.kernels import _common

    q, k, v, idx, cnt, perm, ob = _inputs(1, 2, 2, 9000, 128, 128, 0.25, torch.bfloat16, seed=3)
    kw = dict(scale=128 ** -0.5, group=128, perm=perm, o_base=ob, sign=-1.0)
    calls = []
    real = pingpong.attn_column_sparse_pingpong
    monkeypatch.setattr(pingpong, "attn_column_sparse_pingpong", lambda *a, **k_: calls.append(1) or real(*a, **k_))
    monkeypatch.setenv("CHIPMUNK_GLUON", "1")
    before = counters["chipmunk"]["kernel_pingpong:attn_column_sparse"]
    o = dispatch.attn_column_sparse(q, k, v, idx, cnt, **kw)
    assert calls == [1] and counters["chipmunk"]["kernel_pingpong:attn_column_sparse"] == before + 1
    assert rel_err(o, attn_column_sparse_ref(q, k, v, idx, cnt, **kw)) < TOL[torch.bfloat16]
    monkeypatch.delenv("CHIPMUNK_GLUON")
    monkeypatch.setattr(_common, "_CHOICES", {})
    counters.clear()
    o_auto = dispatch.attn_column_sparse(q, k, v, idx, cnt, **kw)
    (choice,) = [c for c in counters["chipmunk"] if c.startswith("kernel_choice:attn_column_sparse:")]
    assert choice.rsplit(":", 1)[1] in ("pingpong", "pingpong_persistent", "gluon", "triton")
    assert rel_err(o_auto, o) < TOL[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.skipif(not _sm90(), reason="needs an sm_90 GPU (H100/H200)")
@pytest.mark.parametrize("programs", [None, 5])
def test_gpu_records_in_a_cuda_graph(programs):
    """Step graphs record this kernel (its mbarriers re-initialized by every launch)."""
    check_records_in_a_cuda_graph(functools.partial(pingpong.attn_column_sparse_pingpong, programs=programs))


@pytest.mark.gpu
@pytest.mark.skipif(not _sm90(), reason="needs an sm_90 GPU (H100/H200)")
@pytest.mark.parametrize("programs", [None, 7])
def test_gpu_fused_epilogue_matches_reference(programs):
    """The forecast's slope term and a refresh's cache build with its slope, in the epilogue."""
    check_fused_epilogue(pingpong.attn_column_sparse_pingpong, 128, programs=programs)


@pytest.mark.gpu
@pytest.mark.skipif(not _sm90(), reason="needs an sm_90 GPU (H100/H200)")
def test_gpu_one_program_per_sm_matches_one_per_item():
    """At FLUX's shape (816 work items) the persistent grid gives the per-item grid's output bit for bit."""
    q, k, v, idx, cnt, perm, ob = _inputs(1, 24, 24, 4352, 128, 128, 0.15, torch.bfloat16, seed=5)
    kw = dict(scale=128 ** -0.5, group=128, perm=perm, o_base=ob, sign=1.0)
    per_item = pingpong.attn_column_sparse_pingpong(q, k, v, idx, cnt, programs=10 ** 9, **kw)
    per_sm = pingpong.attn_column_sparse_pingpong(q, k, v, idx, cnt, programs=torch.cuda.get_device_properties(
        0).multi_processor_count, **kw)
    assert torch.equal(per_item, per_sm)
