"""Attention kernels at head dims that are not a power of two (PixArt 72, HunyuanDiT 88, Lumina 96) or
above 128 (AuraFlow 256, since session 39):
the Triton kernels, which run them in tiles of the next power of two, against the PyTorch references
those sites ran before (session 35) and against cuDNN SDPA. One process, same random inputs, bf16,
medians of triton.testing.do_bench (CUDA events); the GPU is named in the output.

    python benchmarks/bench_head_dims.py    # a table; bench_head_dims.csv (session 35: *_h200_session35.{csv,txt})

Rows per shape: dense SDPA (cuDNN first); the column-sparse attention at `--keep` of the keys (query
groups of 128, a sparse step) by the Triton kernel and by the reference; the refresh's exact output
+ lse with column sums from the previous lse (attn_dense_colsum) and the sampled column sums (S=32,
attn_colsum_sampled), Triton and reference. Head dim 128 (FLUX's shape) is the control.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from chipmunk_compile import kernels as K  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from csv_rows import write_rows  # noqa: E402

# name, heads, tokens, head dim
SHAPES = [("pixart-sigma 1024px", 16, 4096, 72), ("hunyuan-dit 1024px", 16, 4096, 88),
          ("lumina2 1024px", 24, 4096, 96), ("auraflow 1024px", 12, 4352, 256),
          ("flux 1280x768 (control)", 24, 4352, 128)]
G = 128


def _inputs(h, n, d, keep, seed=0):
    g = torch.Generator("cuda").manual_seed(seed)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    q, k, v = (torch.randn(1, n, h, d, generator=g, **bf).transpose(1, 2) for _ in range(3))
    ng, kk = math.ceil(n / G), max(1, int(keep * n))
    idx = torch.rand(1, h, ng, n, generator=g, device="cuda").topk(kk, -1).indices.sort(-1).values.int()
    cnt = torch.full((1, h, ng), kk, dtype=torch.int32, device="cuda")
    return q, k, v, idx, cnt


def keep_args(doc: str):
    """(--keep, GPU name) of an attention kernel benchmark whose module docstring is `doc`; prints the header."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--keep", type=float, default=0.15)
    keep = ap.parse_args().keep
    gpu = torch.cuda.get_device_name()
    print(f"# {gpu}, torch {torch.__version__}; keep {keep}, query groups of {G}, bf16")
    return keep, gpu


def main():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench

    keep, gpu = keep_args(__doc__)
    rows = []
    for name, h, n, d in SHAPES:
        q, k, v, idx, cnt = _inputs(h, n, d, keep)
        scale = d ** -0.5
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            dense = do_bench(lambda: F.scaled_dot_product_attention(q, k, v, scale=scale))
        _, lse, _ = K.attn_dense_colsum_ref(q, k, v, scale=scale, group=G, want_colsum=False)
        csp = K.get_kernel("attn_column_sparse", q, k, v)
        dcs = K.get_kernel("attn_dense_colsum", q, k, v)
        cs = K.get_kernel("attn_colsum_sampled", q, k)
        assert csp is not K.attn_column_sparse_ref, "head dim not on the Triton kernels"
        err = ((csp(q, k, v, idx, cnt, scale=scale, group=G).float()
                - K.attn_column_sparse_ref(q, k, v, idx, cnt, scale=scale, group=G).float()).norm()
               / K.attn_column_sparse_ref(q, k, v, idx, cnt, scale=scale, group=G).float().norm()).item()
        t = {
            "dense_sdpa": dense,
            "csp_triton": do_bench(lambda: csp(q, k, v, idx, cnt, scale=scale, group=G)),
            "csp_reference": do_bench(lambda: K.attn_column_sparse_ref(q, k, v, idx, cnt, scale=scale, group=G)),
            "dense_colsum_triton": do_bench(lambda: dcs(q, k, v, scale=scale, group=G, prev_lse=lse)),
            "dense_colsum_reference": do_bench(lambda: K.attn_dense_colsum_ref(q, k, v, scale=scale, group=G,
                                                                               prev_lse=lse)),
            "colsum_s32_triton": do_bench(lambda: cs(q, k, lse, scale=scale, group=G, samples=32)),
            "colsum_s32_reference": do_bench(lambda: K.attn_colsum_sampled_ref(q, k, lse, scale=scale, group=G,
                                                                               samples=32)),
        }
        for kernel, ms in t.items():
            rows.append(dict(gpu=gpu, shape=f"1x{h}x{n}x{d}", model=name, keep=keep, kernel=kernel,
                             ms=round(ms, 4), x_dense=round(dense / ms, 3)))
        print(f"\n## {name}: 1x{h}x{n}x{d} (Triton vs reference rel err {err:.1e})")
        for kernel, ms in t.items():
            print(f"  {kernel:<24} {ms:8.3f} ms   {dense / ms:6.2f}x dense SDPA")
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    print(f"\nwrote {write_rows(os.path.join(out_dir, 'bench_head_dims.csv'), rows)}")


if __name__ == "__main__":
    main()
