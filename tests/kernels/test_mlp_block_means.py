"""mlp_block_means: the one-read Triton kernel against the reference (mean of each block's rows)."""

import pytest
import torch
from kernel_testutils import DEV, compile_kernel_for_hopper, rel_err

from chipmunk_compile.kernels import get_kernel, mlp_block_means_ref


@pytest.mark.parametrize("B,M,C,block,permuted,dtype", [
    (1, 64, 64, 32, False, torch.float32),
    (2, 77, 48, 32, True, torch.float32),  # partial last block (13 rows), perm, batch
    (1, 100, 70, 48, True, torch.float16),  # block not a power of two, C not a tile multiple
    (2, 30, 33, 128, False, torch.float16),  # one block, shorter than the block size
])
def test_triton_matches_reference(triton_mode, B, M, C, block, permuted, dtype):
    from chipmunk_compile.kernels.mlp_block_means import mlp_block_means

    g = torch.Generator().manual_seed(M + C)
    x = (torch.randn(B, M, C, generator=g) + 0.5).to(DEV, dtype)  # on a GPU machine the kernel runs there
    perm = torch.randperm(M, generator=g).int().to(DEV) if permuted else None
    assert get_kernel("mlp_block_means", x) is mlp_block_means
    out = mlp_block_means(x, block=block, perm=perm)
    ref = mlp_block_means_ref(x, block=block, perm=perm)
    assert out.dtype == dtype and out.shape == ref.shape == (B, -(-M // block), C)
    assert not out.isnan().any()  # poisoned output: every element written
    assert rel_err(out.float(), ref.float()) < (1e-6 if dtype == torch.float32 else 2e-3)
    # the last block is the mean of its real rows only
    xp = x if perm is None else x[:, perm.long()]
    last = xp[:, (out.shape[1] - 1) * block:].float().mean(1)
    assert rel_err(out[:, -1].float(), last) < (1e-6 if dtype == torch.float32 else 2e-3)


def test_triton_reads_strided_input(triton_mode):
    """x as a strided view (e.g. a slice of a wider activation): read in place, same means."""
    from chipmunk_compile.kernels.mlp_block_means import mlp_block_means

    g = torch.Generator().manual_seed(5)
    wide = torch.randn(2, 50, 96, generator=g).to(DEV)
    x = wide[:, :, 10:74]
    perm = torch.randperm(50, generator=g).int().to(DEV)
    assert not x.is_contiguous()
    assert rel_err(mlp_block_means(x, block=16, perm=perm), mlp_block_means_ref(x, block=16, perm=perm)) < 1e-6


@pytest.mark.parametrize("has_perm", [False, True])
def test_compiles_for_hopper_without_a_gpu(has_perm):
    """What the interpreter accepts the GPU compiler may reject: compile for sm_90 here (no GPU)."""
    from chipmunk_compile.kernels.mlp_block_means import TILE

    rows, block_c, warps = TILE  # the tile the launcher uses on a GPU
    compile_kernel_for_hopper("chipmunk_compile.kernels.mlp_block_means", "_mlp_block_means_kernel",
                              ["*bf16", "*i32", "*bf16"] + ["i64"] * 6 + ["i32"] * 3,
                              {"BLK": 128, "HAS_PERM": has_perm, "ROWS": rows, "BLOCK_C": block_c}, warps)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("M,permuted", [(4608, True), (4352, False), (75600, True)])
def test_gpu_real_shapes(M, permuted):
    from chipmunk_compile.kernels.mlp_block_means import mlp_block_means

    x = torch.randn(1, M, 3072, device="cuda", dtype=torch.bfloat16)
    perm = torch.randperm(M, device="cuda").int() if permuted else None
    assert get_kernel("mlp_block_means", x) is mlp_block_means
    out = mlp_block_means(x, block=128, perm=perm)
    ref = mlp_block_means_ref(x, block=128, perm=perm)
    assert rel_err(out.float(), ref.float()) < 1e-2
