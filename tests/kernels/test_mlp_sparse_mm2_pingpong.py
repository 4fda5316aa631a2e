"""mlp_sparse_mm2_pingpong (Gluon, sm_90, warp-specialized; not dispatched, see its module): compiled for
Hopper on the CPU; on a GPU, against the reference."""

import math

import pytest
import torch
from kernel_testutils import TOL, compile_for_hopper, rel_err

from chipmunk_compile.kernels import mlp_sparse_mm2_pingpong as pingpong
from chipmunk_compile.kernels.mlp_sparse_mm2_ref import mlp_sparse_mm2_ref


def _sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


_COMPILE_FOR_HOPPER = """
import re, sys, triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from triton.experimental.gluon import language as gl
from chipmunk_compile.kernels import mlp_sparse_mm2_pingpong as m
stages, epi, has_perm, has_slope = (int(a) for a in sys.argv[1:])
fn = m._mm2_pingpong_kernel
ptrs = dict(DP="*bf16", W2T="*bf16", IDX="*i32", CNT="*i32", YC="*bf16", OUT="*bf16", PERM="*i32", SLOPE="*bf16",
            COEF="*fp32")
const = dict(BLK=128, TPB=1, BLOCK_M=m.BLOCK_M, BLOCK_N=m.BLOCK_N, BLOCK_K=m.BLOCK_K, STAGES=stages, EPI=epi,
             HAS_PERM=bool(has_perm), HAS_SLOPE=bool(has_slope),
             a_smem_layout=gl.NVMMASharedLayout.get_default_for([m.BLOCK_M, m.BLOCK_K], gl.bfloat16),
             b_smem_layout=gl.NVMMASharedLayout.get_default_for([m.BLOCK_K, m.BLOCK_N], gl.bfloat16),
             PRODUCER_REGS=m.PRODUCER_REGS, CONSUMER_REGS=m.CONSUMER_REGS)
sig = {n: ptrs.get(n, "constexpr" if n in const else "i32") for n in fn.arg_names}
# as Triton specializes FLUX's MLP at run time: pointers and row pitches divisible by 16
aligned = set(ptrs) | {"sdb", "sdm", "swf", "syb", "sym", "sob", "som", "sib", "sim"}
attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n in aligned}
out = triton.compile(GluonASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                     target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
ptx = out.asm["ptx"]
assert "wgmma.mma_async" in ptx, "no warpgroup MMA"
assert "setmaxnreg" in ptx, "no warp-specialized partitions"
assert ptx.count("cp.async.mbarrier.arrive.noinc") == 2, "the producer signals each ring's tiles through mbarriers"
sizes = set(re.findall(r"cp\\.async\\.c[ag]\\S* \\[[^\\]]*\\], \\[[^\\]]*\\], (0x[0-9a-f]+)", ptx))
assert sizes == {"0x10"}, f"cp.async copies of {sizes} bytes, not 16"
assert out.metadata.shared <= 232448, f"shared memory {out.metadata.shared} over the sm_90 limit"
spills, _ = ptxas_resources(ptx)
print("SPILL_STORES", spills)
"""


@pytest.mark.skipif(not pingpong.HAVE_WS, reason="this Triton has no Gluon warp_specialize (never dispatched here)")
@pytest.mark.parametrize("stages,epi,has_perm,has_slope", [(3, 4, 1, 0), (2, 4, 0, 1), (3, 2, 1, 1)])
def test_compiles_for_hopper_without_a_gpu(stages, epi, has_perm, has_slope):
    """Gluon has no interpreter: CI proves the kernel builds for sm_90 with the installed Triton, with
    its partitions, 16-byte cp.async copies and an mbarrier per ring tile; the default epilogue (4
    column slices) keeps its spills to a few bytes (one piece spilled ~5 KB per thread)."""
    out = compile_for_hopper(_COMPILE_FOR_HOPPER, stages, epi, has_perm, has_slope)
    spills = int(out.split("SPILL_STORES")[1].split()[0])
    if epi == 4:
        assert spills <= 128, out


def test_supported_gives_reasons():
    x = torch.zeros(1, 300, 64)
    w = torch.zeros(64, 256)
    assert pingpong.supported(x, w, torch.zeros(1, 300, 256)) in ("no gluon warp_specialize", "not an sm_90 device")
    # a view of a wider buffer (mm1's packed delta) holds its last row's final 16-byte vector; a
    # tensor whose last row ends its storage mid-vector does not
    assert pingpong._vectors_in_storage(torch.zeros(2, 5, 64)[..., :61])
    assert not pingpong._vectors_in_storage(torch.zeros(2, 5, 61))
    assert pingpong._vectors_in_storage(torch.zeros(2, 5, 64))
    assert not pingpong._int32_rows(torch.empty_strided((1, 2 ** 20, 4096), (0, 4096, 1), device="meta"))
    assert pingpong._int32_rows(torch.empty_strided((4, 2 ** 10, 4096), (2 ** 22, 4096, 1), device="meta"))
    if not _sm90():
        return
    g = torch.zeros(1, 300, 64, device="cuda", dtype=torch.bfloat16)
    wg = torch.zeros(64, 256, device="cuda", dtype=torch.bfloat16)
    assert pingpong.supported(g, wg, torch.zeros(1, 300, 256, device="cuda", dtype=torch.bfloat16)) is None
    assert pingpong.supported(g, wg, torch.zeros(1, 300, 192, device="cuda", dtype=torch.bfloat16)) \
        == "output width not a multiple of 128"
    assert pingpong.supported(g[..., :61].contiguous(), wg, torch.zeros(1, 300, 256, device="cuda",
                                                                          dtype=torch.bfloat16)) is not None


def _inputs(B, M, NOUT, Fh, keep, dtype, block, seed, vary=True, perm=True):
    g = torch.Generator().manual_seed(seed)
    NB = math.ceil(M / block)
    K = max(1, round(keep * Fh))
    idx = torch.rand(B, NB, Fh, generator=g).topk(K, dim=-1).indices.sort(-1).values.int().cuda()
    cnt = (torch.randint(0, K + 1, (B, NB), generator=g) if vary else torch.full((B, NB), K)).int().cuda()
    if vary:
        cnt[0, 0] = 0  # an empty block: its output is the cache exactly
        cnt[-1, -1] = K
    dp = torch.randn(B, M, -(-K // 64) * 64, generator=g).to("cuda", dtype)
    pos_cnt = cnt.repeat_interleave(block, 1)[:, :M, None]
    dp = (dp * (torch.arange(dp.shape[-1], device="cuda") < pos_cnt))[..., :K]  # mm1's zeros past the count
    w2 = (torch.randn(NOUT, Fh, generator=g) / math.sqrt(Fh)).to("cuda", dtype)
    yc = torch.randn(B, M, NOUT, generator=g).to("cuda", dtype)
    pm = torch.randperm(M, generator=g).int().cuda() if perm else None
    return dp, w2, idx, cnt, yc, pm


@pytest.mark.gpu
@pytest.mark.skipif(not _sm90(), reason="needs an sm_90 GPU (H100/H200)")
@pytest.mark.parametrize("B,M,NOUT,Fh,keep,dtype,block,slope", [
    (1, 4352, 3072, 12288, 0.3, torch.bfloat16, 128, False),  # FLUX's MLP
    (1, 4352, 3072, 12288, 0.15, torch.bfloat16, 128, True),  # with the error forecast
    (2, 4300, 1536, 6144, 0.21, torch.float16, 128, False),   # batch 2, a partial last block
    (1, 1000, 1024, 4096, 0.1, torch.bfloat16, 256, True),    # two row tiles per token block
    (2, 777, 512, 2048, 0.33, torch.bfloat16, 64, False),     # half-empty row tiles
])
@pytest.mark.parametrize("stages,epi,programs,block_m,block_n", [(3, 4, None, 128, 128), (2, 2, 7, 128, 128),
                                                                (2, 4, None, 64, 256), (4, 4, 5, 64, 128)])
def test_gpu_matches_reference(B, M, NOUT, Fh, keep, dtype, block, slope, stages, epi, programs, block_m, block_n):
    """Random counts per block (an empty one among them, none a multiple of the tile); programs=7:
    each program runs many items, its ring carried across them and both consumers' turns."""
    dp, w2, idx, cnt, yc, pm = _inputs(B, M, NOUT, Fh, keep, dtype, block, seed=M)
    sl = (torch.randn_like(yc), torch.tensor(0.37, device="cuda")) if slope else (None, None)
    yc_r = yc.clone()
    out = torch.full_like(yc, float("nan"))  # poisoned: every element must be written
    w2t = w2.t().contiguous()
    pingpong.mlp_sparse_mm2_pingpong(dp, w2t, idx, cnt, yc, out, block=block, perm=pm, slope=sl[0],
                                     slope_coef=sl[1], stages=stages, epi=epi, programs=programs, block_m=block_m,
                                     block_n=block_n)
    o_r = mlp_sparse_mm2_ref(dp, w2, idx, cnt, yc_r, block=block, perm=pm, slope=sl[0], slope_coef=sl[1])
    assert rel_err(out, o_r) < TOL[dtype] and rel_err(yc, yc_r) < TOL[dtype]
