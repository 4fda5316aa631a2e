"""transpose_copy: the tiled Triton copy against torch's copy_, between memory orders."""

import pytest
import torch
from kernel_testutils import DEV, compile_kernel_for_hopper

from chipmunk_compile.kernels import get_kernel, transpose_copy_ref


def _column_major(R, C, dtype):
    return torch.empty_strided((R, C), (1, R), dtype=dtype, device=DEV).fill_(float("nan"))


@pytest.mark.parametrize("R,C,dtype", [(48, 80, torch.float32), (37, 101, torch.float16), (5, 3, torch.float32)])
def test_row_major_into_column_major(triton_mode, R, C, dtype):
    from chipmunk_compile.kernels.transpose_copy import transpose_copy

    src = torch.randn(R, C, generator=torch.Generator().manual_seed(R * C)).to(DEV, dtype)
    dst = _column_major(R, C, dtype)
    assert get_kernel("transpose_copy", dst, src) is transpose_copy
    assert transpose_copy(dst, src) is dst
    assert dst.stride() == (1, R) and torch.equal(dst, src)  # NaN-filled first: every element written


def test_any_strides_both_ways(triton_mode):
    """A strided slice into a row-major buffer, and a column-major tensor back into a row-major one."""
    from chipmunk_compile.kernels.transpose_copy import transpose_copy

    wide = torch.randn(30, 70).to(DEV)
    src = wide[:, 7:52]
    dst = torch.full((30, 45), float("nan"), device=DEV)
    assert torch.equal(transpose_copy(dst, src), src)
    col = _column_major(30, 45, torch.float32)
    transpose_copy(col, src)
    back = torch.full((30, 45), float("nan"), device=DEV)
    assert torch.equal(transpose_copy(back, col), src)


def test_shape_or_dtype_mismatch_is_an_error(triton_mode):
    from chipmunk_compile.kernels.transpose_copy import transpose_copy

    with pytest.raises(ValueError, match="one shape and dtype"):
        transpose_copy(torch.empty(4, 5, device=DEV), torch.empty(5, 4, device=DEV))
    with pytest.raises(ValueError, match="one shape and dtype"):
        transpose_copy_ref(torch.empty(4, 5), torch.empty(4, 5, dtype=torch.float16))


def test_compiles_for_hopper_without_a_gpu():
    from chipmunk_compile.kernels.transpose_copy import TILE

    block_r, block_c, warps = TILE
    compile_kernel_for_hopper("chipmunk_compile.kernels.transpose_copy", "_transpose_copy_kernel",
                              ["*bf16", "*bf16", "i32", "i32"] + ["i64"] * 4, {"BLOCK_R": block_r, "BLOCK_C": block_c},
                              warps)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_flux_w2_bf16():
    from chipmunk_compile.kernels.transpose_copy import transpose_copy

    w = torch.randn(3072, 12288, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_strided(w.shape, (1, 3072), dtype=w.dtype, device="cuda")
    transpose_copy(dst, w)
    assert torch.equal(dst, w)
