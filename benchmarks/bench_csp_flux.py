"""Column-sparse attention at FLUX 1280x768 as the model runs it: every kernel, every epilogue.

    python benchmarks/bench_csp_flux.py        # H100/H200 (the Gluon kernels need sm_90)
    python benchmarks/bench_csp_flux.py --keeps 0.05 0.08   # other key budgets (fractions of N)

Shape 1x24x4352x128, G=128, bf16, the backend's FLUX query order (512 text tokens, the 48x80 image
grid in 8x8 tiles), one sorted key set per (head, group) as bench_kernels draws them (one key in
each of K equal buckets), at 15% / 23% / 30% / 16% of the keys
(23% is what the ``default`` preset attends there: 10% + 1% drawn + the 512 text keys; 15% and 16%
leave a last key tile of 13 and 56 keys). Per key
budget, ms per call replayed from one CUDA graph (``bench_kernels.graph_ms``: no Python launch, as a
recorded step graph runs it) of:
- the Triton kernel, the warp-specialized ping-pong Gluon kernel (2 and 3 stages of 128-key tiles;
  one program per work item, and one per SM running several: ``programs``) and the
  single-warpgroup Gluon kernel, o = o_base + attn;
- a forecasting sparse step, o = o_base + coef * o_slope + attn: Triton and ping-pong with the
  slope term in their epilogue, and ping-pong after a separate ``slope_into_base`` pass (what the
  Gluon path paid before session 28);
- a refresh's cache build, out = the old cache = measure's prev, the slope stored (sign -1);
- the dispatcher ``attn_column_sparse`` with the slope term (its pick is printed: kernel_choice);
and cuDNN dense attention on the same q, k, v. Prints a table and the relative error of ping-pong
against Triton; rows go to benchmarks/results/bench_csp_flux_<chip>.csv and .json (and $OUT).
Results of session 28: benchmarks/results/csp_flux_pingpong_h200_session28.txt.
"""
import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
from benchmarks.bench_kernels import graph_ms, sorted_random_subsets, write_results  # noqa: E402
from chipmunk_compile.grouping import site_perm, tile_order  # noqa: E402
from chipmunk_compile.kernels import attn_column_sparse as dispatch  # noqa: E402
from chipmunk_compile.kernels import attn_column_sparse_pingpong as pingpong  # noqa: E402
from chipmunk_compile.kernels.attn_column_sparse_hopper import attn_column_sparse_hopper  # noqa: E402

KEEPS = (0.15, 0.23, 0.30, 0.16)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keeps", type=float, nargs="+", default=KEEPS, help="key budgets, fractions of the tokens")
    keeps = ap.parse_args().keeps
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        sys.exit("bench_csp_flux.py needs an sm_90 GPU (H100/H200)")
    dev, dt = "cuda", torch.bfloat16
    B, H, N, D, G = 1, 24, 4352, 128, 128
    g = torch.Generator(device=dev).manual_seed(0)

    def bnhd():  # (B, H, N, D) views of (B, N, H, D) buffers, as diffusers hands them over
        return torch.randn(B, N, H, D, device=dev, generator=g).to(dt).transpose(1, 2)

    q, k, v, ob, slope = bnhd(), bnhd(), bnhd(), bnhd(), bnhd()
    coef, inv = torch.tensor(0.5, device=dev), torch.tensor(0.2, device=dev)
    perm = site_perm(N, tile_order((48, 80), (8, 8)), 512, True).to(dev).int()
    n_groups = math.ceil(N / G)
    nsm = torch.cuda.get_device_properties(0).multi_processor_count
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        cudnn = graph_ms(lambda: F.scaled_dot_product_attention(q, k, v))
    gpu = torch.cuda.get_device_name()
    print(f"{gpu}, torch {torch.__version__}: cuDNN dense {cudnn:.4f} ms", flush=True)
    rows = []
    for keep in keeps:
        n_keys = round(keep * N)
        idx = sorted_random_subsets((B, H, n_groups), N, n_keys, dev)
        cnt = torch.full((B, H, n_groups), n_keys, device=dev, dtype=torch.int32)
        args = (q, k, v, idx, cnt)
        kw = dict(scale=D ** -0.5, group=G, perm=perm, sign=1.0)
        fore = dict(kw, o_base=ob, o_slope=slope, slope_coef=coef)
        cache, slope_out = ob.clone(), torch.empty_like(ob)
        build = dict(kw, sign=-1.0, o_base=slope, out=cache, measure=(cache, slope_out, inv))
        runs = {
            "triton": lambda: dispatch._attn_column_sparse_triton(*args, o_base=ob, **kw),
            "ping-pong 2 stages": lambda: pingpong.attn_column_sparse_pingpong(*args, o_base=ob, stages=2, **kw),
            "ping-pong 3 stages": lambda: pingpong.attn_column_sparse_pingpong(*args, o_base=ob, stages=3, **kw),
            # one program per SM, each running every num_SMs-th work item (rings and turns carried over)
            "ping-pong persistent, 2 stages": lambda: pingpong.attn_column_sparse_pingpong(
                *args, o_base=ob, stages=2, programs=nsm, **kw),
            "ping-pong persistent, regs 96/208": lambda: pingpong.attn_column_sparse_pingpong(
                *args, o_base=ob, programs=nsm, producer_regs=96, consumer_regs=208, **kw),
            "ping-pong regs 96/208": lambda: pingpong.attn_column_sparse_pingpong(
                *args, o_base=ob, producer_regs=96, consumer_regs=208, **kw),
            # a ragged last key tile of <= 32 / <= 64 keys takes 32 / 64 rows
            "ping-pong narrow 64": lambda: pingpong.attn_column_sparse_pingpong(*args, o_base=ob, narrow=64, **kw),
            "ping-pong persistent, narrow 64": lambda: pingpong.attn_column_sparse_pingpong(
                *args, o_base=ob, programs=nsm, narrow=64, **kw),
            "ping-pong persistent, narrow 64, regs 96/208": lambda: pingpong.attn_column_sparse_pingpong(
                *args, o_base=ob, programs=nsm, narrow=64, producer_regs=96, consumer_regs=208, **kw),
            "single-warpgroup gluon": lambda: attn_column_sparse_hopper(*args, o_base=ob, **kw),
            "triton +slope": lambda: dispatch._attn_column_sparse_triton(*args, **fore),
            "ping-pong +slope": lambda: pingpong.attn_column_sparse_pingpong(*args, **fore),
            "ping-pong persistent +slope": lambda: pingpong.attn_column_sparse_pingpong(*args, programs=nsm, **fore),
            "ping-pong persistent narrow +slope": lambda: pingpong.attn_column_sparse_pingpong(
                *args, programs=nsm, narrow=64, **fore),
            "ping-pong + slope pass": lambda: pingpong.attn_column_sparse_pingpong(
                *args, o_base=dispatch.slope_into_base(ob, slope, coef), **kw),
            "triton refresh build": lambda: dispatch._attn_column_sparse_triton(*args, **build),
            "ping-pong refresh build": lambda: pingpong.attn_column_sparse_pingpong(*args, **build),
            "ping-pong persistent refresh build": lambda: pingpong.attn_column_sparse_pingpong(
                *args, programs=nsm, **build),
            "dispatched +slope": lambda: dispatch.attn_column_sparse(*args, **fore),
        }
        counters.clear()
        times = {name: graph_ms(fn) for name, fn in runs.items()}
        picked = [c.rsplit(":", 1)[1] for c in counters["chipmunk"] if c.startswith("kernel_choice:")]
        o_t = dispatch._attn_column_sparse_triton(*args, o_base=ob, **kw).float()
        o_p = pingpong.attn_column_sparse_pingpong(*args, o_base=ob, **kw).float()
        err = ((o_p - o_t).norm() / o_t.norm()).item()
        for variant in (dict(programs=nsm), dict(programs=nsm, narrow=64)):  # either grid, narrow last tiles
            o_pp = pingpong.attn_column_sparse_pingpong(*args, o_base=ob, **variant, **kw).float()
            err = max(err, ((o_pp - o_t).norm() / o_t.norm()).item())
        print(f"{n_keys} keys per group ({keep:.0%}); ping-pong vs Triton rel. error {err:.1e}; "
              f"dispatcher picked {'/'.join(picked) or '-'}", flush=True)
        for name, ms in times.items():
            shown = "n/a" if ms is None else f"{ms:8.4f} ms  {cudnn / ms:5.2f}x cuDNN"
            print(f"    {name:26s} {shown}", flush=True)
            rows.append(dict(gpu=gpu, shape=f"{B}x{H}x{N}x{D}", keys=n_keys, kernel=name,
                             graph_ms=None if ms is None else round(ms, 4), cudnn_ms=round(cudnn, 4),
                             speedup=None if ms is None else round(cudnn / ms, 3), rel_err_pingpong=f"{err:.1e}",
                             dispatcher_pick="/".join(picked)))
    write_results(rows, "bench_csp_flux", gpu)


if __name__ == "__main__":
    main()
