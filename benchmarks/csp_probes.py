"""Two probes of the column-sparse attention kernel at FLUX 1280x768 (1x24x4352x128, G=128), H100/H200.

    python benchmarks/csp_probes.py slope    # every config with and without the forecast's slope epilogue
    python benchmarks/csp_probes.py split    # the 64x32 configs against SPLIT=2 twins, replayed from CUDA graphs

slope (session 26's open question, answered in session 27): bench_kernels' `+slope` row took 1.65x the
plain row while the model paid ~9%. Each config is forced (`_force_config`) and timed with do_bench, with
o_base / o_slope laid out (B,H,N,D) and (B,N,H,D), then the dispatched call ("tuned"). Every forced config
took 1.04-1.19x with the slope; the dispatched calls took 230-245 us against 126-171 us forced: do_bench
launches each call from Python, and the dispatched path's launch took longer than its kernel, so those rows
timed the host. Results: results/csp_slope_probe_h200_session27.txt.

split (session 27): the 64x32 winner's 1632 programs fill 396 slots 4.12 times at G=128. Its SPLIT=2
twins (the last short wave's tiles as two programs of 32 rows each; not in `_configs()`) are timed
against it, replayed from a CUDA graph (bench_kernels.graph_ms), at 15% and at the default preset's ~23%
keys, with each output compared to the first config's. Result: the twins were 5-6% slower (the gathered
K/V rows cost a 32-row program nearly what they cost a 64-row one), so they were not kept.
Results: results/csp_tail_split_probe_h200_session27.txt.
"""

from __future__ import annotations

import math
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_kernels import graph_ms, sorted_random_subsets  # noqa: E402
from chipmunk_compile.kernels import attn_column_sparse as csp  # noqa: E402

B, H, N, D, G = 1, 24, 4352, 128, 128


def _inputs(keep, dev="cuda"):
    q, k, v = (torch.randn(B, N, H, D, device=dev, dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
    NG, Kc = math.ceil(N / G), round(keep * N)
    idx = sorted_random_subsets((B, H, NG), N, Kc, dev)
    cnt = torch.full((B, H, NG), Kc, dtype=torch.int32, device=dev)
    return q, k, v, idx, cnt


def slope():
    q, k, v, idx, cnt = _inputs(0.15)
    q, k, v = (t.contiguous() for t in (q, k, v))  # (B, H, N, D) contiguous, as the session-26 probe had them
    coef = torch.full((1,), 0.5, device="cuda")
    layouts = {"bhnd": lambda: torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16),
               "bnhd": lambda: torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)}
    for lay, make in layouts.items():
        ob, osl = make(), make()

        def plain():
            return csp.attn_column_sparse(q, k, v, idx, cnt, scale=D ** -0.5, group=G, o_base=ob)

        def with_slope():
            return csp.attn_column_sparse(q, k, v, idx, cnt, scale=D ** -0.5, group=G, o_base=ob, o_slope=osl,
                                          slope_coef=coef)

        for cfg in csp._configs():
            csp._force_config = cfg
            t0, t1 = triton.testing.do_bench(plain), triton.testing.do_bench(with_slope)
            print(f"{lay} {cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages}: {t0 * 1e3:.1f} / {t1 * 1e3:.1f} us "
                  f"({t1 / t0:.2f}x)", flush=True)
        csp._force_config = None
        for name, fn in (("tuned", plain), ("tuned +slope", with_slope)):
            print(f"{lay} {name}: {triton.testing.do_bench(fn) * 1e3:.1f} us", flush=True)


def _split_twins():
    out = []
    for cfg in csp._configs():
        kw = cfg.kwargs
        if kw["BLOCK_M"] == 64 and kw["BLOCK_N"] == 32:
            out.append(cfg)
            if kw["SPLIT"] == 1 and cfg.num_stages == 4:
                out.append(triton.Config({**kw, "SPLIT": 2}, num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    return out


def split():
    for keep in (0.15, 0.23):
        q, k, v, idx, cnt = _inputs(keep)
        ob = torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)

        def call():
            return csp.attn_column_sparse(q, k, v, idx, cnt, scale=D ** -0.5, group=G, o_base=ob)

        ref = None
        for cfg in _split_twins():
            csp._force_config = cfg
            o = call().float()
            ref = o if ref is None else ref
            print(f"keep {keep} {cfg.kwargs} s{cfg.num_stages}: {graph_ms(call) * 1e3:.1f} us, "
                  f"max |o - first config's o| {(o - ref).abs().max().item():.2e}", flush=True)
        csp._force_config = None
        call()
        print(f"keep {keep} autotuned: {graph_ms(call) * 1e3:.1f} us (pick {csp._tuned.best_config})", flush=True)


if __name__ == "__main__":
    {"slope": slope, "split": split}[sys.argv[1] if len(sys.argv) > 1 else "split"]()
