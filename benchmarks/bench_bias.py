"""Attention with an additive score bias (SDPA's float attn_mask: OmniGen's mask, pair biases): what
the bias costs each kernel of a chipmunk step, against SDPA with the same bias. One process, same
random inputs, bf16, medians of triton.testing.do_bench (CUDA events); the GPU is named in the output.

    python benchmarks/bench_bias.py [--keep 0.15]    # a table; bench_bias.csv (session 37: *_h200_session37.{csv,txt})

Per shape and bias (none; one (N, N) bias shared by the heads, in q's dtype; a (1, H, N, N) bias in
q's dtype): dense SDPA with the bias (cuDNN first: the baseline a user has), the exact output + lse
of a refresh (`ops.exact_attention.exact_attention_lse`: the library that takes the bias), the sampled
column sums (S = 32), and the column-sparse attention at `--keep` of the keys (query groups of 128,
a sparse step: o_base − attn_S, as the cache build; biased calls run the Triton kernel, unbiased
ones the dispatcher's pick). Half the bias entries of each row outside a band are -inf.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from chipmunk_compile import kernels as K  # noqa: E402
from chipmunk_compile.ops.exact_attention import exact_attention_lse  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_head_dims import G, _inputs, keep_args  # noqa: E402
from csv_rows import write_rows  # noqa: E402

# name, heads, tokens, head dim (OmniGen: 1024 px = 4096 image tokens + its prompt, 32 heads of 96)
SHAPES = [("flux 1280x768", 24, 4352, 128), ("omnigen 1024px", 32, 4352, 96)]


def _bias(kind, h, n, g):
    """None, or 0.5·randn of (N, N) / (1, H, N, N) in bf16 with half the entries past |i − j| > N/2 at -inf."""
    if kind == "none":
        return None
    shape = (n, n) if kind == "NxN" else (1, h, n, n)
    b = 0.5 * torch.randn(*shape, generator=g, device="cuda")
    i = torch.arange(n, device="cuda")
    far = (i[:, None] - i[None, :]).abs() > n // 2
    return b.masked_fill(far & (torch.rand(n, n, generator=g, device="cuda") < 0.5), float("-inf")).bfloat16()


def main():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench

    keep, gpu = keep_args(__doc__)
    rows = []
    for name, h, n, d in SHAPES:
        q, k, v, idx, cnt = _inputs(h, n, d, keep)
        g = torch.Generator("cuda").manual_seed(1)
        ob = torch.randn(1, n, h, d, generator=g, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        scale = d ** -0.5
        csp = K.get_kernel("attn_column_sparse", q, k, v, head_dim=d)
        cs = K.get_kernel("attn_colsum_sampled", q, k, head_dim=d)
        for kind in ("none", "NxN", "HxNxN"):
            bias = _bias(kind, h, n, g)
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
                dense = do_bench(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale))
            _, lse = exact_attention_lse(q, k, v, None, scale, G, None, bias)
            o = csp(q, k, v, idx, cnt, scale=scale, group=G, o_base=ob, sign=-1.0, bias=bias)
            ref = K.attn_column_sparse_ref(q, k, v, idx, cnt, scale=scale, group=G, o_base=ob, sign=-1.0, bias=bias)
            err = ((o.float() - ref.float()).norm() / ref.float().norm()).item()
            t = {
                "dense_sdpa": dense,
                "exact_lse": do_bench(lambda: exact_attention_lse(q, k, v, None, scale, G, None, bias)),
                "colsum_s32": do_bench(lambda: cs(q, k, lse, scale=scale, group=G, samples=32, bias=bias)),
                "column_sparse": do_bench(lambda: csp(q, k, v, idx, cnt, scale=scale, group=G, o_base=ob, sign=-1.0,
                                                      bias=bias)),
            }
            print(f"\n## {name}: 1x{h}x{n}x{d}, bias {kind} (column-sparse vs reference rel err {err:.1e})")
            for kernel, ms in t.items():
                rows.append(dict(gpu=gpu, shape=f"1x{h}x{n}x{d}", model=name, bias=kind, keep=keep,
                                 kernel=kernel, ms=round(ms, 4), x_dense=round(dense / ms, 3), rel_err=f"{err:.1e}"))
                print(f"  {kernel:<16} {ms:8.3f} ms   {dense / ms:6.2f}x dense SDPA with the same bias")
    from torch._dynamo.utils import counters

    picks = {k: v for k, v in counters["chipmunk"].items() if k.startswith("kernel_choice")}
    print(f"\nkernel choices of the unbiased calls (timed on each shape's first call): {picks}")
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    print(f"\nwrote {write_rows(os.path.join(out_dir, 'bench_bias.csv'), rows)}")


if __name__ == "__main__":
    main()
