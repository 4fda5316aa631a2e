"""Where the long-sequence attention kernels spend their time: each timed whole and with one piece of
its work skipped, at the HunyuanVideo and Wan shapes.

    python benchmarks/kernel_ablation.py [--shapes hunyuan-video wan] [--clocks]     # H100/H200

Rows: the column-sparse attention of a sparse step (the Gluon Hopper kernel whole and with each of
``attn_column_sparse_hopper.ABLATIONS`` skipped; the ping-pong and Triton kernels whole beside it), and the sampled
column sums of a refresh as the op runs them (S=32, e4m3 scores; ``attn_colsum_sampled.ABLATIONS``).
An ablated call returns a wrong result; only its time means something. A piece whose removal saves
little is off the critical path (or shares it with another): the saving bounds what making that
piece faster can buy. With --clocks each row also runs 2 s in a loop while nvidia-smi samples the SM
clock and board power, since a kernel held at the power cap runs at lower clocks.
CSV/JSON: benchmarks/results/kernel_ablation_<gpu>.csv / .json.
"""
import argparse
import math
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
from benchmarks.bench_kernels import bench, sorted_random_subsets, write_results  # noqa: E402
from chipmunk_compile.kernels import attn_colsum_sampled as colsum_mod  # noqa: E402
from chipmunk_compile.kernels import attn_column_sparse_hopper as hopper  # noqa: E402
from chipmunk_compile.kernels import attn_column_sparse_pingpong as pingpong  # noqa: E402
from chipmunk_compile.kernels.attn_column_sparse import _attn_column_sparse_triton  # noqa: E402
from chipmunk_compile.ops.exact_attention import exact_attention_lse  # noqa: E402

GROUP = 128  # the presets' query group
# (B, H, N, D), fraction of keys a sparse step attends (HunyuanVideo: the 93% sparsity; Wan: its preset)
SHAPES = {"hunyuan-video": ((1, 24, 118800, 128), 0.07), "wan": ((1, 40, 75600, 128), 0.11)}
COLSUM_SAMPLES = 32


def clocks(fn, seconds=2.0):
    """(median SM clock MHz, median board power W) while fn runs in a loop, or (None, None)."""
    try:
        mon = subprocess.Popen(["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits",
                                "-lms", "100"], stdout=subprocess.PIPE, text=True)
    except OSError:
        return None, None
    t0 = time.time()
    while time.time() - t0 < seconds:
        fn()
        torch.cuda.synchronize()
    mon.terminate()
    rows = [line.split(",") for line in mon.communicate()[0].strip().splitlines()[2:-1]]  # skip ramp-up / tail
    if not rows:
        return None, None
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return med([float(r[0]) for r in rows]), med([float(r[1]) for r in rows])


def cases(name):
    """(kernel, ablation, fn) rows of one shape; the first row of each kernel runs it whole."""
    (B, H, N, D), keep = SHAPES[name]
    g = torch.Generator("cuda").manual_seed(0)
    q, k, v = (torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
               for _ in range(3))
    NG, kc = math.ceil(N / GROUP), round(keep * N)
    idx = sorted_random_subsets((B, H, NG), N, kc, "cuda")
    cnt = torch.full((B, H, NG), kc, dtype=torch.int32, device="cuda")
    ob = torch.randn_like(q)
    perm = torch.randperm(N, device="cuda", generator=g).int()
    kw = dict(scale=D ** -0.5, group=GROUP, o_base=ob, perm=perm)
    out = [(f"column-sparse, Gluon ({kc} keys)", a or "-",
            lambda a=a: hopper.attn_column_sparse_hopper(q, k, v, idx, cnt, ablate=a, **kw))
           for a in hopper.ABLATIONS]
    out.append((f"column-sparse, Gluon ping-pong ({kc} keys)", "-",
                lambda: pingpong.attn_column_sparse_pingpong(q, k, v, idx, cnt, **kw)))
    out.append((f"column-sparse, Triton ({kc} keys)", "-", lambda: _attn_column_sparse_triton(q, k, v, idx, cnt, **kw)))
    _, lse = exact_attention_lse(q, k, v, None, D ** -0.5, GROUP, None)
    ckw = dict(scale=D ** -0.5, group=GROUP, samples=COLSUM_SAMPLES, out_dtype=torch.float16, qk_fp8=True)
    out += [(f"column sums S={COLSUM_SAMPLES}, e4m3 scores", a or "-",
             lambda a=a: colsum_mod.attn_colsum_sampled(q, k, lse, ablate=a, **ckw))
            for a in colsum_mod.ABLATIONS]  # the whole call first: the autotuner picks its config there
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--clocks", action="store_true", help="also sample SM clock and power (nvidia-smi)")
    args = ap.parse_args(argv)
    gpu = torch.cuda.get_device_name()
    rows = []
    for name in args.shapes:
        whole = {}
        for kernel, ablation, fn in cases(name):
            ms = bench(fn)
            whole.setdefault(kernel, ms)
            mhz, watts = clocks(fn) if args.clocks else (None, None)
            saved = 1 - ms / whole[kernel]
            rows.append(dict(gpu=gpu, model=name, kernel=kernel, skipped=ablation, ms=round(ms, 3),
                             saved_pct=round(100 * saved, 1), sm_mhz=mhz, power_w=watts))
            print(f"{name:13s} {kernel:40s} skip {ablation:7s} {ms:8.3f} ms  saves {100 * saved:5.1f}%"
                  + (f"  {mhz:.0f} MHz {watts:.0f} W" if mhz is not None else ""), flush=True)
        torch.cuda.empty_cache()
        write_results(rows, "kernel_ablation", gpu)  # after each shape
    print(f"GPU {gpu}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
