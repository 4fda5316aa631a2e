"""Column-sparse attention, every autotune config timed on its own at real shapes (H100/H200).

    python benchmarks/csp_configs.py [--shapes flux,hunyuan,wan] [--out results/csp_configs_<gpu>.csv]

Per shape: cuDNN SDPA (dense baseline), the autotuned kernel, then each candidate of
`attn_column_sparse._configs()` forced through the `_force_config` hook, on the same inputs
(random q/k/v, sorted random key subsets per query group, o_base given as in the backend). Prints
a table (ms, speedup over cuDNN, effective TFLOP/s on the kept keys) and writes CSV. The output of
every config is checked against the autotuned one (max relative error), so a fast wrong config
shows. results/csp_configs_h200_lazy_rescale.csv also holds "lazy" rows: a variant (since removed)
that rescaled the accumulator only when a row max grew by more than 2^8, one branch per key tile;
it was 10-30% slower on all three shapes (the branch breaks Triton's wgmma pipelining). Shapes: FLUX 1280x768 (1x24x4352x128, 16.5% keys), HunyuanVideo 720p (1x24x118800x128,
6%), Wan2.1-14B 720p 81 frames (1x40x75600x128, 11%); query group 128 as in the presets.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_kernels import bench, sorted_random_subsets  # noqa: E402
from chipmunk_compile.kernels import attn_column_sparse as csp  # noqa: E402

SHAPES = {"flux": (24, 4352, 0.165), "hunyuan": (24, 118800, 0.06), "wan": (40, 75600, 0.11)}


def _label(cfg) -> str:
    k = cfg.kwargs
    return (f"{k['BLOCK_M']}x{k['BLOCK_N']} t{k['TAIL_N']} w{cfg.num_warps} s{cfg.num_stages} occ{k['OCC']} "
            f"sp{k['SPLIT']}{' lazy' if k.get('LAZY') else ''}")


def run_shape(name, G, rows):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    H, N, keep = SHAPES[name]
    D, dev, dt = 128, "cuda", torch.bfloat16
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, N, H, D, device=dev, dtype=dt).transpose(1, 2) for _ in range(3))
    ob = torch.randn_like(q)
    Kc = round(keep * N)
    NG = math.ceil(N / G)
    idx = sorted_random_subsets((1, H, NG), N, Kc, dev)
    cnt = torch.full((1, H, NG), Kc, dtype=torch.int32, device=dev)
    flops = 4.0 * H * N * Kc * D
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        base = bench(lambda: F.scaled_dot_product_attention(q, k, v))

    def call():
        return csp.attn_column_sparse(q, k, v, idx, cnt, scale=D ** -0.5, group=G, o_base=ob)

    def add(label, ms, err=0.0):
        row = dict(gpu=torch.cuda.get_device_name(), shape=f"{name} 1x{H}x{N}x{D} keep={keep} G={G}",
                   config=label, ms=round(ms, 4), speedup_vs_cudnn=round(base / ms, 3),
                   tflops=round(flops / ms / 1e9, 1), max_rel_err=f"{err:.1e}")
        rows.append(row)
        print(f"  {label:42s} {ms:9.4f} ms  {base / ms:6.2f}x cudnn  {flops / ms / 1e9:6.1f} TF/s  err {err:.1e}",
              flush=True)

    print(f"== {name} 1x{H}x{N}x{D} keep={keep} G={G}: cudnn {base:.4f} ms", flush=True)
    add("cudnn sdpa (dense)", base)
    csp._force_config = None
    ref = call().float()
    add("autotuned", bench(call))
    for cfg in csp._configs():
        csp._force_config = cfg
        try:
            out = call().float()
            err = ((out - ref).abs().max() / ref.abs().max()).item()
            add(_label(cfg), bench(call), err)
        except Exception as e:  # e.g. out of shared memory on this GPU
            print(f"  {_label(cfg):42s} failed: {type(e).__name__}: {str(e)[:80]}")
    csp._force_config = None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="flux,hunyuan,wan")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    rows = []
    for name in a.shapes.split(","):
        run_shape(name, a.group, rows)
        torch.cuda.empty_cache()
    gpu = torch.cuda.get_device_name().split()[-1].lower()
    out = a.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"csp_configs_{gpu}.csv")
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print("wrote", out)


if __name__ == "__main__":
    main()
