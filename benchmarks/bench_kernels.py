"""Kernel benchmark: chipmunk Triton kernels vs dense baselines, one process, same random inputs.

Baselines: F.scaled_dot_product_attention under cuDNN and FLASH; dense MLP (linear -> gelu tanh ->
linear, torch.compiled). Timings are medians of triton.testing.do_bench (CUDA events). Prints the
GPU name and a table, writes CSV + JSON to $OUT (when set) or benchmarks/results/.

  python3 benchmarks/bench_kernels.py [--group 64 128 192] [--skip-long] [--quick]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from chipmunk_compile import kernels as K  # noqa: E402

ROWS: list[dict] = []


def bench(fn, ms_budget=200):
    import triton

    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    one = (time.perf_counter() - t0) * 1e3
    rep = max(ms_budget, 3 * one)
    return triton.testing.do_bench(fn, warmup=max(25, one), rep=rep, return_mode="median")


def record(section, name, shape, ms, *, baseline_ms=None, target=None, flops=None, note=""):
    row = dict(section=section, name=name, shape=shape, ms=round(ms, 4))
    if flops:
        row["tflops"] = round(flops / ms / 1e9, 1)
    if baseline_ms:
        row["speedup_vs_baseline"] = round(baseline_ms / ms, 2)
    if target is not None:
        row["target"] = target
    row["note"] = note
    ROWS.append(row)
    sp = f"{row.get('speedup_vs_baseline', ''):>7}"
    print(f"{section:10s} {name:42s} {shape:24s} {ms:9.4f} ms {row.get('tflops', ''):>7} TF/s  x{sp} {target or ''} "
          f"{note}", flush=True)


def sorted_random_subsets(lead_shape, n, k, device):
    """Sorted, unique, random column ids: one id in each of k equal buckets of [0, n)."""
    r = torch.rand(*lead_shape, k, device=device)
    idx = ((torch.arange(k, device=device) + r) * (n / k)).floor().clamp_(max=n - 1).to(torch.int32)
    return idx


def attn_section(B, H, N, D, keeps, groups, dt, dev, *, with_dense_colsum=True, label=""):
    shape = f"{B}x{H}x{N}x{D}"
    q, k, v = (torch.randn(B, N, H, D, device=dev, dtype=dt).transpose(1, 2) for _ in range(3))
    scale = D ** -0.5
    from torch.nn.attention import SDPBackend, sdpa_kernel

    flops = 4.0 * B * H * N * N * D
    res = {}
    for name, be in [("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_flash", SDPBackend.FLASH_ATTENTION)]:
        try:
            with sdpa_kernel([be]):
                ms = bench(lambda: F.scaled_dot_product_attention(q, k, v, scale=scale))
            res[name] = ms
            record("attn" + label, name, shape, ms, flops=flops)
        except Exception as e:  # noqa: BLE001
            print(f"{name} failed: {e}")
    base = res.get("sdpa_cudnn") or res.get("sdpa_flash")
    G0 = groups[0]
    from chipmunk_compile.kernels.attn_column_sparse import attn_column_sparse
    from chipmunk_compile.kernels.attn_dense_colsum import attn_dense_colsum

    if with_dense_colsum:
        ms = bench(lambda: attn_dense_colsum(q, k, v, scale=scale, group=G0, want_colsum=False))
        record("attn" + label, "triton_dense (no colsum)", shape, ms, baseline_ms=base, flops=flops)
        o, lse, _ = attn_dense_colsum(q, k, v, scale=scale, group=G0, want_colsum=False)
        prev = lse + 0.1 * torch.randn_like(lse)
        for G in groups:
            ms = bench(lambda: attn_dense_colsum(q, k, v, scale=scale, group=G, prev_lse=prev))
            record("attn" + label, f"dense+colsum prev_lse G={G}", shape, ms, baseline_ms=base, flops=flops,
                   target="<=1.25x cudnn", note=f"ratio {ms / base:.2f}x")
        ms = bench(lambda: attn_dense_colsum(q, k, v, scale=scale, group=G0))
        record("attn" + label, f"dense+colsum cur_lse(2pass) G={G0}", shape, ms, baseline_ms=base, flops=flops,
               note=f"ratio {ms / base:.2f}x")
    o_base = torch.randn_like(q)
    best = {}
    for keep in keeps:
        Kc = max(1, round(keep * N))
        for G in groups:
            NG = math.ceil(N / G)
            idx = sorted_random_subsets((B, H, NG), N, Kc, dev)
            cnt = torch.full((B, H, NG), Kc, dtype=torch.int32, device=dev)
            ms = bench(lambda: attn_column_sparse(q, k, v, idx, cnt, scale=scale, group=G, o_base=o_base))
            sf = 4.0 * B * H * N * Kc * D
            tgt = {0.15: ">=5x cudnn", 0.07: ">=11x cudnn"}.get(keep)
            record("attn" + label, f"csp keep={keep:.2f} G={G}", shape, ms, baseline_ms=base, flops=sf, target=tgt,
                   note=f"1/d={1 / keep:.1f}x")
            best.setdefault(keep, []).append((ms, G))
            del idx, cnt
    for keep, lst in best.items():
        ms, G = min(lst)
        print(f"  best group for keep={keep:.2f} at {shape}: G={G} ({ms:.4f} ms)")
    return best


def mlp_section(M, C, Fh, keeps, dt, dev, block=128):
    shape = f"{M}x{C}->{Fh}->{C}"
    x = torch.randn(1, M, C, device=dev, dtype=dt)
    w1 = torch.randn(Fh, C, device=dev, dtype=dt) / math.sqrt(C)
    b1 = torch.randn(Fh, device=dev, dtype=dt)
    w2 = torch.randn(C, Fh, device=dev, dtype=dt) / math.sqrt(Fh)
    b2 = torch.randn(C, device=dev, dtype=dt)
    flops = 4.0 * M * C * Fh

    def dense(x):
        return F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2)

    cd = torch.compile(dense)
    base = bench(lambda: cd(x))
    record("mlp", "dense compiled", shape, base, flops=flops)
    record("mlp", "dense eager", shape, bench(lambda: dense(x)), baseline_ms=base, flops=flops)
    from chipmunk_compile.kernels.mlp_sparse_mm1 import mlp_sparse_mm1
    from chipmunk_compile.kernels.mlp_sparse_mm2 import mlp_sparse_mm2

    w2v = w2.t().contiguous().t()  # the fast (F, Cout)-rows layout, prepared once per weight
    NB = math.ceil(M / block)
    hc = K.mlp_alloc_h_cache(1, M, Fh, dt, dev)
    hc.normal_()
    yc = torch.randn(1, M, C, device=dev, dtype=dt)
    for keep in keeps:
        Kc = max(1, round(keep * Fh))
        idx = sorted_random_subsets((1, NB), Fh, Kc, dev)
        cnt = torch.full((1, NB), Kc, dtype=torch.int32, device=dev)
        dp = torch.randn(1, M, math.ceil(Kc / 64) * 64, device=dev, dtype=dt)[..., :Kc]  # as mm1 returns it
        t1 = bench(lambda: mlp_sparse_mm1(x, w1, b1, None, None, idx, cnt, hc, act="gelu_tanh", block=block))
        t2 = bench(lambda: mlp_sparse_mm2(dp, w2v, idx, cnt, yc, block=block))
        sf = 2.0 * M * C * Kc
        tag = f"keep={keep:.2f}"
        record("mlp", f"mm1 {tag}", shape, t1, flops=sf)
        record("mlp", f"mm2 {tag}", shape, t2, flops=sf)

        def both():
            d = mlp_sparse_mm1(x, w1, b1, None, None, idx, cnt, hc, act="gelu_tanh", block=block)
            mlp_sparse_mm2(d, w2v, idx, cnt, yc, block=block)

        tb = bench(both)
        record("mlp", f"mm1+mm2 {tag}", shape, tb, baseline_ms=base, flops=2 * sf,
               target=">=2.8x dense" if abs(keep - 0.3) < 1e-6 else None, note=f"1/d={1 / keep:.1f}x")
    # select / means helpers (PyTorch) for reference
    bm = bench(lambda: K.mlp_block_means(x, block=block))
    record("mlp", "block_means (torch)", shape, bm)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--group", type=int, nargs="+", default=[192])
    ap.add_argument("--skip-long", action="store_true", help="skip the 118800-token attention shape")
    ap.add_argument("--quick", action="store_true", help="no sparsity sweeps")
    ap.add_argument("--only", choices=["attn", "mlp", "all"], default="all")
    a = ap.parse_args()
    dev, dt = "cuda", torch.bfloat16
    import triton

    gpu = torch.cuda.get_device_name()
    print(f"GPU: {gpu}  torch {torch.__version__}  triton {triton.__version__}", flush=True)
    torch.manual_seed(0)
    sweep = [0.5, 0.3, 0.15, 0.1, 0.05] if not a.quick else []
    if a.only in ("attn", "all"):
        keeps = sorted(set([0.15] + sweep), reverse=True)
        attn_section(1, 24, 4352, 128, keeps, a.group, dt, dev)
        if not a.skip_long:
            attn_section(1, 24, 118800, 128, [0.07], a.group, dt, dev, with_dense_colsum=False, label="-long")
    if a.only in ("mlp", "all"):
        keeps = sorted(set([0.3] + sweep), reverse=True)
        mlp_section(4352, 3072, 12288, keeps, dt, dev)
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, "bench_kernels")
    keys = sorted({k for r in ROWS for k in r})
    with open(stem + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["gpu"] + keys)
        w.writeheader()
        for r in ROWS:
            w.writerow({"gpu": gpu, **r})
    with open(stem + ".json", "w") as f:
        json.dump(dict(gpu=gpu, torch=torch.__version__, triton=triton.__version__, rows=ROWS), f, indent=1)
    print(f"wrote {stem}.csv/.json")


if __name__ == "__main__":
    main()
