"""A dense MLP step of chipmunk (`ops.mlp._dense_into_cache`: fc1 transposed straight into the
neuron-major activation cache, fc2 read from it) against the plain eager MLP, at token counts that
are and are not a multiple of 8. One process, same random inputs, bf16, SwiGLU at OmniGen's size
(width 3072, 8192 neurons per half), medians of triton.testing.do_bench; the GPU is named.

    python benchmarks/bench_dense_mlp_step.py    # a table; bench_dense_mlp_step.csv (session 38: *_h200_session38.*)

Rows: the cache as `mlp_alloc_h_cache` lays it out (each neuron's tokens padded to 64), the same
step on an unpadded (B, F, M) cache (the layout before session 38), and F.linear + silu + F.linear.
In the transposed GEMMs the token count is the contiguous dimension: at an odd count (OmniGen's 64
text + 1 time + 4096 image tokens = 4161) cuBLAS left its tensor-core kernels for sm75 ones.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from chipmunk_compile.kernels import mlp_alloc_h_cache  # noqa: E402
from chipmunk_compile.ops.mlp import _dense_into_cache  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from csv_rows import write_rows  # noqa: E402


def step_inputs(m, c, f, device, dtype, seed=0):
    """x (1, m, c), SwiGLU weights (gate, up, down) scaled to unit outputs, a random grouping permutation."""
    g = torch.Generator(device).manual_seed(seed)
    kw = dict(generator=g, device=device, dtype=dtype)
    x = torch.randn(1, m, c, **kw)
    wa, wl = torch.randn(f, c, **kw) * c ** -0.5, torch.randn(f, c, **kw) * c ** -0.5
    w2 = torch.randn(c, f, **kw) * f ** -0.5
    perm = torch.randperm(m, generator=g, device=device).int()
    return x, wa, wl, w2, perm


def runs(m, c, f, device, dtype):
    """{name: callable} of the three rows, and the relative error of the padded step against eager."""
    x, wa, wl, w2, perm = step_inputs(m, c, f, device, dtype)
    padded = mlp_alloc_h_cache(1, m, f, dtype, device)
    unpadded = torch.empty(1, f, m, device=device, dtype=dtype).transpose(1, 2)
    eager = lambda: F.linear(F.silu(F.linear(x, wa)) * F.linear(x, wl), w2)  # noqa: E731
    y = _dense_into_cache(x, wa, None, wl, None, w2, None, "silu", perm, padded)
    ref = eager()
    err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
    return {
        "padded_cache": lambda: _dense_into_cache(x, wa, None, wl, None, w2, None, "silu", perm, padded),
        "unpadded_cache": lambda: _dense_into_cache(x, wa, None, wl, None, w2, None, "silu", perm, unpadded),
        "eager_mlp": eager,
    }, err


def main():
    from triton.testing import do_bench

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, nargs="*", default=[4161, 4352])
    args = ap.parse_args()
    gpu = torch.cuda.get_device_name()
    print(f"# {gpu}, torch {torch.__version__}; SwiGLU 3072 -> 2x8192 -> 3072, bf16")
    rows = []
    for m in args.tokens:
        fns, err = runs(m, 3072, 8192, "cuda", torch.bfloat16)
        t = {name: do_bench(fn) for name, fn in fns.items()}
        print(f"\n## {m} tokens (padded step vs eager rel err {err:.1e})")
        for name, ms in t.items():
            rows.append(dict(gpu=gpu, tokens=m, variant=name, ms=round(ms, 4), x_eager=round(t["eager_mlp"] / ms, 3)))
            print(f"  {name:<15} {ms:7.3f} ms   {t['eager_mlp'] / ms:5.2f}x the eager MLP")
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    print(f"\nwrote {write_rows(os.path.join(out_dir, 'bench_dense_mlp_step.csv'), rows)}")


if __name__ == "__main__":
    main()
