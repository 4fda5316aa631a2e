"""Run one chipmunk kernel at a real shape, twice, for Nsight Compute (the second launch is profiled).

    K=_attn_column_sparse_kernel; ncu --clock-control none --section SpeedOfLight --section Occupancy \\
        --section WarpStateStats --section LaunchStats --section MemoryWorkloadAnalysis \\
        --section ComputeWorkloadAnalysis -k regex:$K --launch-skip 1 --launch-count 1 \\
        python3 benchmarks/ncu_kernels.py csp      # csp | csp_flux | mm1 | mm2 | select

Shapes and configs: csp = column-sparse attention at the Wan shape (1x40x75600x128, 11% keys,
G=128, with the query permutation), pinned to the config autotuning picks there (128x128, 8 warps,
3 stages, split tail); mm1 = sparse MLP first matmul at FLUX size (4352x3072 -> 12288, 35% of the
neurons, block 128), pinned to its autotuned 128x256x64 / 8 warps / 4 stages; mm2 = the second matmul
at the same size and neurons (delta rows padded as mm1 writes them), pinned to the best config of the
session-5 sweep (128x128x64 / 4 warps / 5 stages); csp_flux = column-sparse attention at FLUX
1280x768 (1x24x4352x128, 85%: 653 keys, G=128), pinned to 64x32 / 4 warps / 4 stages / TAIL_N 32,
three programs per SM (the autotuner picks its TAIL_N 16 twin there: 126 against 131 us, session 27);
select = the radix select at the HunyuanVideo refresh (24 x 929 rows x 118800 skewed fp16 sums,
k = 6%). Pinning keeps autotuning's trial launches out of the profile. Reports (H200):
benchmarks/results/ncu_h200_{csp,mm1,mm2,csp_flux,select}.txt (csp and select from a first copy of
this script; mm1, mm2 and csp_flux from this one, session 27).
"""

from __future__ import annotations

import os
import sys

import torch
import triton

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
from bench_kernels import sorted_random_subsets  # noqa: E402


def _csp(g, H, N, keep, config, with_perm):
    """The column-sparse attention call at (1, H, N, 128), G=128, `keep` of the keys, pinned to `config`."""
    import chipmunk_compile.kernels.attn_column_sparse as M

    K = round(keep * N)
    q, k, v = (torch.randn(1, N, H, 128, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
               for _ in range(3))
    NG = -(-N // 128)
    idx = sorted_random_subsets((1, H, NG), N, K, "cuda")
    cnt = torch.full((1, H, NG), K, dtype=torch.int32, device="cuda")
    perm = torch.randperm(N, device="cuda", generator=g).to(torch.int32) if with_perm else None
    M._force_config = config
    return lambda: M.attn_column_sparse(q, k, v, idx, cnt, scale=0.088, group=128, perm=perm, o_base=q)


def csp(g):
    return _csp(g, 40, 75600, 0.11, triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "TAIL_N": 16, "OCC": 1, "SPLIT": 2},
                                                  num_warps=8, num_stages=3), with_perm=True)


def mm1(g):
    import chipmunk_compile.kernels.mlp_sparse_mm1 as M
    from chipmunk_compile.kernels import mlp_alloc_h_cache

    T, C, F, blk = 4352, 3072, 12288, 128
    x = torch.randn(1, T, C, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.randn(F, C, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
    b = torch.zeros(F, device="cuda", dtype=torch.bfloat16)
    nb, K = -(-T // blk), round(0.35 * F)
    idx = sorted_random_subsets((1, nb), F, K, "cuda")
    cnt = torch.full((1, nb), K, dtype=torch.int32, device="cuda")
    h = mlp_alloc_h_cache(1, T, F, torch.bfloat16, "cuda")
    M._force_config = triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 64, "OCC": 1,
                                     "SPLIT": 2, "EPI_SUB": 2}, num_warps=8, num_stages=4)
    return lambda: M.mlp_sparse_mm1(x, w, b, None, None, idx, cnt, h, act="gelu_tanh", block=blk)


def csp_flux(g):
    return _csp(g, 24, 4352, 0.15, triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "TAIL_N": 32, "OCC": 3, "SPLIT": 1},
                                                 num_warps=4, num_stages=4), with_perm=False)


def mm2(g):
    import chipmunk_compile.kernels.mlp_sparse_mm2 as M

    T, C, F, blk = 4352, 3072, 12288, 128
    nb, K = -(-T // blk), round(0.35 * F)
    kp = -(-K // 64) * 64  # rows padded to 64 elements, as mlp_sparse_mm1 returns delta
    delta = torch.randn(1, T, kp, device="cuda", dtype=torch.bfloat16, generator=g)[..., :K]
    w2 = (torch.randn(F, C, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02).t()  # rows of w2ᵀ contiguous
    idx = sorted_random_subsets((1, nb), F, K, "cuda")
    cnt = torch.full((1, nb), K, dtype=torch.int32, device="cuda")
    y = torch.zeros(1, T, C, device="cuda", dtype=torch.bfloat16)
    M._force_config = triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 64, "OCC": 1,
                                     "SPLIT": 2, "EPI_SUB": 1}, num_warps=4, num_stages=5)
    return lambda: M.mlp_sparse_mm2(delta, w2, idx, cnt, y, block=blk)


def select(g):
    from chipmunk_compile.kernels.select_columns import select_columns

    N = 118800
    sums = (torch.rand(1, 24, -(-N // 128), N, device="cuda", generator=g) ** 4 * 3).half()
    return lambda: select_columns(sums, k=round(0.06 * N))


if __name__ == "__main__":
    kernels = {"csp": csp, "csp_flux": csp_flux, "mm1": mm1, "mm2": mm2, "select": select}
    fn = kernels[sys.argv[1]](torch.Generator("cuda").manual_seed(0))
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    print(sys.argv[1], "ran twice")
