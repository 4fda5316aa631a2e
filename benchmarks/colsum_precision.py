"""Column sums from fp8 (e4m3) scores against bf16 ones (attn.colsum_fp8).

    python benchmarks/colsum_precision.py                     # FLUX, HunyuanVideo and Wan shapes, bf16
    python benchmarks/colsum_precision.py --shapes flux

The column sums of a refresh step only rank key columns (a top-k per query group), so they need
no bf16 products. Per shape and variant (`attn_colsum_sampled`'s `qk_fp8`) this prints and records:
- the column-sum time and the whole refresh as the op runs it (bench_refresh.refresh_pieces), both
  against cuDNN SDPA;
- the ranking: the share of the exact (bf16 products, fp32 sums) column mass that the variant's
  top-k captures, relative to the exact top-k's share (1.0 = same ranking quality), on random q/k
  with sharpened scores (`--temp`, softmax over q·k·scale·temp) on the first rows.
Medians from triton.testing.do_bench; CSV to benchmarks/results/colsum_precision_<gpu>.csv (the
committed one also has rows of half-precision exponentials, ex2.approx.f16x2, tried in session 13
and removed: no faster).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import bench  # noqa: E402
from bench_refresh import GROUP, SHAPES, SUMS, inputs, refresh_pieces  # noqa: E402

from chipmunk_compile.kernels import attn_colsum_sampled as colsum_mod  # noqa: E402
from chipmunk_compile.kernels.attn_colsum_sampled import attn_colsum_sampled  # noqa: E402
from chipmunk_compile.ops.exact_attention import exact_attention_lse  # noqa: E402

VARIANTS = {"bf16": {}, "fp8": {"qk_fp8": True}}


def captured(truth, approx, top, rows=256):
    """Mean over the first `rows` (b, h, g) rows of mass(truth at approx's top-k) / mass(truth's top-k)."""
    t = truth.reshape(-1, truth.shape[-1])[:rows].float()
    a = approx.reshape(-1, approx.shape[-1])[:rows].float()
    best = t.topk(top, dim=-1).values.sum(-1)
    got = t.gather(-1, a.topk(top, dim=-1).indices).sum(-1)
    return (got / best).mean().item()


def measure(name, samples, temp):
    q, k, v, scale, top, rnd, _, dense = inputs(name)
    _, lse = exact_attention_lse(q, k, v, None, scale, GROUP, None)
    rows = []
    for vname, flags in VARIANTS.items():
        cs_ms = bench(lambda: attn_colsum_sampled(q, k, lse, scale=scale, group=GROUP, samples=samples,
                                                  out_dtype=SUMS, **flags))
        ref_ms = bench(lambda: refresh_pieces(q, k, v, scale, top, rnd, samples, qk_fp8=bool(flags)))
        best = getattr(colsum_mod._tuned(os.environ.get("CHIPMUNK_COLSUM_REDUCE", "")), "best_config", None)
        rows.append(dict(shape=name, variant=vname, samples=samples, colsum_ms=round(cs_ms, 3),
                         colsum_x_cudnn=round(cs_ms / dense, 4), refresh_ms=round(ref_ms, 3),
                         refresh_x_cudnn=round(ref_ms / dense, 4), cudnn_ms=round(dense, 3),
                         config=str(best).replace(",", ";")))
    # ranking quality on sharpened scores (temp scales the logits), first rows only
    qs = (q.float() * temp).to(q.dtype)
    _, lse_s = exact_attention_lse(qs, k, v, None, scale, GROUP, None)
    truth = attn_colsum_sampled(qs, k, lse_s, scale=scale, group=GROUP, samples=samples, out_dtype=torch.float32)
    for row, flags in zip(rows, VARIANTS.values()):
        approx = attn_colsum_sampled(qs, k, lse_s, scale=scale, group=GROUP, samples=samples, out_dtype=SUMS,
                                     **flags)
        row["captured_vs_exact"] = round(captured(truth, approx, top), 4)
        rel = ((approx.float() - truth).norm() / truth.norm()).item()
        row["sums_rel_err"] = round(rel, 4)
        del approx
        print(" ".join(f"{kk}={vv}" for kk, vv in row.items()), flush=True)
    del truth, q, k, v, qs
    torch.cuda.empty_cache()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--samples", type=int, nargs="*", default=[32, 16])
    ap.add_argument("--temp", type=float, default=3.0)
    args = ap.parse_args(argv)
    gpu = torch.cuda.get_device_name().replace("NVIDIA ", "").split()[0].lower()
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    rows = []
    for name in args.shapes:
        for samples in args.samples:
            rows += measure(name, samples, args.temp)
    for out_dir in filter(None, [os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                                 os.environ.get("OUT")]):
        with open(os.path.join(out_dir, f"colsum_precision_{gpu}.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
