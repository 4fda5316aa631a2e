"""Refresh-step attention cost: dense + column sums vs cuDNN SDPA, both column-sum implementations.

    python benchmarks/bench_refresh.py            # FLUX 1x24x4352x128 and Wan 1x40x75600x128, bf16

A refresh step computes the exact output, its lse and per-(head, query group) column sums of the
attention probabilities (normalized with the previous step's lse). The target (issue 3) is
<= 1.25x the cuDNN dense time. Rows: cuDNN SDPA, our dense kernel without column sums, and dense +
column sums with the row-reduction ("rowsum") and tensor-core ("mma") column sums
(CHIPMUNK_COLSUM_MMA). Medians from triton.testing.do_bench; CSV/JSON to benchmarks/results/
(and $OUT) named after the GPU.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
from bench_kernels import bench  # noqa: E402

from chipmunk_compile.kernels.attn_dense_colsum import attn_dense_colsum  # noqa: E402

SHAPES = {"flux": (1, 24, 4352, 128), "wan": (1, 40, 75600, 128)}


def main():
    gpu = torch.cuda.get_device_name()
    rows = []
    for name, (B, H, N, D) in SHAPES.items():
        g = torch.Generator("cuda").manual_seed(0)
        q, k, v = (torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
                   for _ in range(3))
        scale = D ** -0.5
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            cudnn = bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale))
        _, prev, _ = attn_dense_colsum(q, k, v, scale=scale, group=128, want_colsum=False)
        results = {"cudnn_sdpa": cudnn,
                   "triton_dense": bench(lambda: attn_dense_colsum(q, k, v, scale=scale, group=128, want_colsum=False))}
        for mma in ("0", "1"):
            os.environ["CHIPMUNK_COLSUM_MMA"] = mma
            label = "dense+colsum " + ("mma" if mma == "1" else "rowsum")
            results[label] = bench(lambda: attn_dense_colsum(q, k, v, scale=scale, group=128, prev_lse=prev))
            _, _, cs = attn_dense_colsum(q, k, v, scale=scale, group=128, prev_lse=prev)
            results.setdefault("_colsums", []).append(cs)
        a, b = results.pop("_colsums")
        agree = ((a - b).norm() / b.norm()).item()
        del a, b
        for label, ms in results.items():
            rows.append(dict(gpu=gpu, shape=f"{name} {B}x{H}x{N}x{D}", kernel=label, ms=round(ms, 4),
                             x_cudnn=round(ms / cudnn, 3)))
            print(f"{name:5s} {label:24s} {ms:10.4f} ms  {ms / cudnn:6.3f}x cuDNN", flush=True)
        print(f"{name:5s} rowsum vs mma column sums: relative difference {agree:.2e}")
        del q, k, v
        torch.cuda.empty_cache()
        _write(rows, gpu)  # after each shape: a time limit still leaves the finished ones
    os.environ.pop("CHIPMUNK_COLSUM_MMA", None)
    print(f"GPU {gpu}, torch {torch.__version__}")


def _write(rows, gpu):
    tag = gpu.split()[-1].lower()
    for d in [os.path.join(os.path.dirname(__file__), "results"), os.environ.get("OUT")]:
        if d:
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, f"bench_refresh_{tag}.json"), "w") as f:
                json.dump(rows, f, indent=1)
            with open(os.path.join(d, f"bench_refresh_{tag}.csv"), "w") as f:
                f.write(",".join(rows[0]) + "\n")
                f.writelines(",".join(str(r[c]) for c in rows[0]) + "\n" for r in rows)


if __name__ == "__main__":
    main()
