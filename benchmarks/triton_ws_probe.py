"""Does Triton warp-specialize (producer/consumer warp groups) a gathered-row dot loop on sm_90?

    python benchmarks/triton_ws_probe.py        # compile-only: needs Triton, no GPU

Two loops of the same GEMM shape, compiled for sm_90 with and without `tl.range(...,
warp_specialize=True)`: `gathered` loads B's rows by an index vector with pointer loads (how the
column-sparse attention and sparse MLP kernels gather K/V rows and weight rows; Hopper's TMA has
no row gather), `tensor_descriptor` loads contiguous tiles through TMA descriptors. Prints, per
variant, whether the compiled TTGIR holds a `ttg.warp_specialize` region, whether the PTX
re-balances registers (`setmaxnreg`), and the async copies (cp.async) / TMA loads of the loop.
Results: benchmarks/results/triton_ws_probe.txt.
"""
import re, sys, triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

@triton.jit
def gathered(A, B, C, IDX, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, WS: tl.constexpr):
    om = tl.arange(0, BM); on = tl.arange(0, BN); ok = tl.arange(0, BK)
    acc = tl.zeros([BM, BN], tl.float32)
    for k in tl.range(0, K, BK, warp_specialize=WS):
        a = tl.load(A + om[:, None] * K + (k + ok)[None, :])
        j = tl.load(IDX + k + ok)
        b = tl.load(B + j[:, None] * BN + on[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(C + om[:, None] * BN + on[None, :], acc)

@triton.jit
def described(A, B, C, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, WS: tl.constexpr):
    da = tl.make_tensor_descriptor(A, shape=[BM, K], strides=[K, 1], block_shape=[BM, BK])
    db = tl.make_tensor_descriptor(B, shape=[K, BN], strides=[BN, 1], block_shape=[BK, BN])
    acc = tl.zeros([BM, BN], tl.float32)
    for k in tl.range(0, K, BK, warp_specialize=WS):
        acc = tl.dot(da.load([0, k]), db.load([k, 0]), acc)
    om = tl.arange(0, BM); on = tl.arange(0, BN)
    tl.store(C + om[:, None] * BN + on[None, :], acc)

print("triton", triton.__version__)
for name, fn, sig in (("gathered", gathered, {"A": "*bf16", "B": "*bf16", "C": "*fp32", "IDX": "*i32", "K": "i32"}),
                      ("tensor_descriptor", described, {"A": "*bf16", "B": "*bf16", "C": "*fp32", "K": "i32"})):
    for ws in (False, True):
        s = {**sig, **{n: "constexpr" for n in ("BM", "BN", "BK", "WS")}}
        try:
            out = triton.compile(ASTSource(fn=fn, signature=s, constexprs=dict(BM=128, BN=128, BK=64, WS=ws),
                                           attrs={(i,): [["tt.divisibility", 16]] for i in range(len(sig))}),
                                 target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})
            g = out.asm["ttgir"]
            print(f"{name:18s} WS={ws!s:5s} warp_specialize op: {'ttg.warp_specialize' in g}  "
                  f"setmaxnreg: {'setmaxnreg' in out.asm['ptx']}  async copies: {g.count('async_copy_global_to_local')}  "
                  f"tma: {g.count('async_tma_copy')}")
        except Exception as e:
            print(f"{name:18s} WS={ws!s:5s} failed: {type(e).__name__}: {str(e)[:200]}")
