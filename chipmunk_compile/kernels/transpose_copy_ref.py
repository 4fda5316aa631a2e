"""A 2-D copy between different memory orders (pure PyTorch: ``dst.copy_(src)``).

Contract: ``transpose_copy_ref(dst, src) -> dst``: dst and src are 2-D tensors of one shape and
dtype with any strides; dst's values become src's. The case it exists for is a row-major weight
copied into its column-major copy (``ops.sites.Site.column_major``: the sparse mm2 gathers rows of
w2ᵀ), which torch runs as a strided elementwise copy: 282 µs for FLUX.1's 3072 x 12288 bf16 w2 on
an H100 (0.53 TB/s), once per site and generation.
"""

from __future__ import annotations


def check_pair(dst, src) -> None:
    """The contract's shapes and dtypes (the Triton launcher checks the same)."""
    if dst.shape != src.shape or dst.dim() != 2 or dst.dtype != src.dtype:
        raise ValueError(f"transpose_copy takes two 2-D tensors of one shape and dtype, got {tuple(dst.shape)} "
                         f"{dst.dtype} and {tuple(src.shape)} {src.dtype}")


def transpose_copy_ref(dst, src):
    check_pair(dst, src)
    return dst.copy_(src)
