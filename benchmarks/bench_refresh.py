"""Refresh-step attention cost against cuDNN SDPA, piece by piece and as the op runs it.

    python benchmarks/bench_refresh.py                       # FLUX, HunyuanVideo and Wan shapes, bf16
    python benchmarks/bench_refresh.py --shapes flux --old   # also the one-pass dense+colsum kernel

A refresh step computes the exact output and its lse, per-(head, query group) column sums of the
attention probabilities, top-k key columns from them, and the cache `o - attn_S(q, k, v)`. The
target (issue 3) is <= 1.25x the cuDNN dense time. Rows:
- cudnn_sdpa: F.scaled_dot_product_attention under the cuDNN backend (the baseline);
- exact_lse: the op's exact attention with lse (`ops.exact_attention`: cuDNN with its lse);
- colsum S=...: column sums from S sampled queries per 128-query group (`attn_colsum_sampled`,
  autotuned over both reductions; "sum only" / "mma only" pin one, for the first S); "fp8 scores":
  from e4m3-rounded q/k, as the op runs them at >= 16384 keys (attn.colsum_fp8);
- select: top-k selection at the model preset's key fraction (the Triton kernel: sampled threshold
  at >= 16384 keys, else radix select; beside it its plain radix select, two other digit schedules,
  the reference and the unsorted torch.topk + sort used before), on the column sums of the random
  q/k (flat: the radix select's worst case) and on skewed stand-in sums (like a trained model's);
  cache_build: the column-sparse pass;
- refresh S=...: all four as the op runs them (fp8 scores included, random draws hashed inside the
  select kernel; the number to hold against the target); "draws as a tensor": the same with the
  draws hashed by torch ops and boosted by a scatter, as the op ran until session 18;
- with --old: last session's path, our one-pass dense + column-sum kernel (stale lse) + select + cache.
Medians from triton.testing.do_bench; CSV/JSON to benchmarks/results/ (and $OUT) named after the GPU,
written after each shape.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
from bench_kernels import bench, write_results  # noqa: E402

from chipmunk_compile.config import AttnConfig  # noqa: E402
from chipmunk_compile.kernels import select_columns_ref  # noqa: E402
from chipmunk_compile.kernels.attn_colsum_sampled import attn_colsum_sampled  # noqa: E402
from chipmunk_compile.kernels.attn_column_sparse import attn_column_sparse  # noqa: E402
from chipmunk_compile.kernels.attn_dense_colsum import attn_dense_colsum  # noqa: E402
from chipmunk_compile.kernels.random_draws_ref import HashDraws  # noqa: E402
from chipmunk_compile.kernels.select_columns import select_columns  # noqa: E402
from chipmunk_compile.ops.attention import colsum_fp8  # noqa: E402
from chipmunk_compile.ops.exact_attention import _choice, exact_attention_lse  # noqa: E402

# shape, (top, random) key fractions of the model's preset
SHAPES = {"flux": ((1, 24, 4352, 128), (0.165, 0.0)), "hunyuan-video": ((1, 24, 118800, 128), (0.05, 0.01)),
          "wan": ((1, 40, 75600, 128), (0.10, 0.01))}
GROUP = 128
STEP = torch.tensor([7])  # the device step the random draws hash
SUMS = torch.float16  # the op's column-sum dtype (until session 11 this benchmark timed fp32 sums)
# select variants timed: the module's default (sampled threshold from 512 columns at >= 16384, a
# 4-bit window pass, refine passes over few candidates counted by atomics), two other sample sizes,
# two other window widths, refines by tl.histogram only, session 17's kernel (6-bit window, histogram
# refines), its plain radix select (first digit, later digits), two other schedules
SELECTS = {"": {}, " sample 256": {"sample": 256}, " sample 512": {"sample": 512}, " window 3 bits": {"window_bits": 3},
           " window 6 bits": {"window_bits": 6}, " histogram refines": {"sparse_refine": -1},
           " window 6 bits, histogram refines (session 17)": {"window_bits": 6, "sparse_refine": -1},
           " radix only 4+6n": {"sample": 0}, " radix 8+8n": {"radix": (8, 8)}, " radix 6+5n": {"radix": (6, 5)}}


def mean_passes(scores, top):
    """Mean histogram passes per row of the sampled path (0 where it is off), on a copy."""
    passes = torch.zeros(scores.shape[:-1].numel(), dtype=torch.int32, device=scores.device)
    select_columns(scores.clone(), k=top, passes=passes)
    return passes.float().mean().item()


def refresh_pieces(q, k, v, scale, top, rnd, samples, qk_fp8=None, draws="hash"):
    """The op's refresh (ops/attention.py): cuDNN output + lse, fp16 sampled column sums (e4m3
    scores where the op takes them, or as qk_fp8 says), top-k with random draws (hashed in the
    select kernel as the op does; draws="tensor": the hash made in torch and boosted by scatter,
    as the op did until session 18), cache = o - attn_S."""
    o, lse = exact_attention_lse(q, k, v, None, scale, GROUP, None)
    cs = attn_colsum_sampled(q, k, lse, scale=scale, group=GROUP, samples=samples, out_dtype=SUMS,
                             qk_fp8=colsum_fp8(AttnConfig(), k) if qk_fp8 is None else qk_fp8)
    hashed = HashDraws(STEP.to(q.device), 5)
    picks = hashed if draws == "hash" else hashed.ints((*cs.shape[:-1], rnd), cs.shape[-1])
    idx, cnt = select_columns(cs, k=top, random_keys=rnd, draws=picks, inplace=True)
    del cs
    return attn_column_sparse(q, k, v, idx, cnt, scale=scale, group=GROUP, o_base=o, sign=-1.0)


def topk_sorted(scores, top):
    """The selection the op used before the radix select: unsorted torch.topk + an int32 sort."""
    return scores.topk(top, dim=-1, sorted=False)[1].to(torch.int32).sort(dim=-1)[0]


def old_refresh(q, k, v, scale, top, prev):
    o, _, cs = attn_dense_colsum(q, k, v, scale=scale, group=GROUP, prev_lse=prev)
    idx, cnt = select_columns(cs, k=top, inplace=True)
    del cs
    return attn_column_sparse(q, k, v, idx, cnt, scale=scale, group=GROUP, o_base=o, sign=-1.0)


def inputs(name):
    """q, k, v (bf16, diffusers' strided layout), scale, top and random key counts, a generator,
    and the cuDNN SDPA time of the shape."""
    (B, H, N, D), (frac, rfrac) = SHAPES[name]
    g = torch.Generator("cuda").manual_seed(0)
    q, k, v = (torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
               for _ in range(3))
    scale = D ** -0.5
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        dense = bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale))
    return q, k, v, scale, round(frac * N), round(rfrac * N), g, dense


def measure(name, samples_list, old):
    q, k, v, scale, top, rnd, g, dense = inputs(name)
    (B, H, N, D), _ = SHAPES[name]
    res = {"cudnn_sdpa": dense}
    o, lse = exact_attention_lse(q, k, v, None, scale, GROUP, None)
    res["exact_lse"] = bench(lambda: exact_attention_lse(q, k, v, None, scale, GROUP, None))
    library = next((c for key, c in _choice.items() if key[0] == tuple(q.shape)), "kernel")
    fp8 = colsum_fp8(AttnConfig(), k)
    for S in samples_list:
        res[f"colsum S={S}"] = bench(lambda: attn_colsum_sampled(q, k, lse, scale=scale, group=GROUP, samples=S,
                                                                  out_dtype=SUMS))
        if fp8:  # what the op runs at this key count (attn.colsum_fp8), the e4m3 copy of k included
            res[f"colsum S={S} fp8 scores"] = bench(lambda: attn_colsum_sampled(
                q, k, lse, scale=scale, group=GROUP, samples=S, out_dtype=SUMS, qk_fp8=True))
    for pin in ("sum", "mma"):  # each reduction alone (the op autotunes over both)
        os.environ["CHIPMUNK_COLSUM_REDUCE"] = pin
        S = samples_list[0]
        res[f"colsum S={S} {pin} only"] = bench(lambda: attn_colsum_sampled(q, k, lse, scale=scale, group=GROUP,
                                                                            samples=S, out_dtype=SUMS))
    os.environ.pop("CHIPMUNK_COLSUM_REDUCE")
    cs = attn_colsum_sampled(q, k, lse, scale=scale, group=GROUP, samples=samples_list[0], out_dtype=SUMS)
    top += rnd  # the select rows time the top-k alone, at the preset's total width
    for label, kw in SELECTS.items():  # scores in place, as the op does
        res["select" + label] = bench(lambda: select_columns(cs, k=top, inplace=True, **kw))
    res["select reference (stable sort)"] = bench(lambda: select_columns_ref(cs, k=top, inplace=True))
    res["select torch.topk (before the kernel)"] = bench(lambda: topk_sorted(cs, top))
    ref_idx, ref_cnt = select_columns_ref(cs, k=top)
    for label, kw in SELECTS.items():
        idx, cnt = select_columns(cs, k=top, **kw)
        same = torch.equal(cnt, ref_cnt) and torch.equal(idx, ref_idx)
        print(f"{name}: select{label or ' (default)'} == reference: {same}", flush=True)
    del ref_idx, ref_cnt
    # Random q/k give flat column sums (p90/p50 ~1.4), the radix select's worst case; a trained
    # model's are skewed (tiny DiT: p90/p50 2-12). rand**4 (p90/p50 ~10) stands in for those.
    skewed = (torch.rand(cs.shape, device=cs.device, generator=g) ** 4 * 3).half()
    for label, kw in SELECTS.items():
        res["select, skewed sums" + label] = bench(lambda: select_columns(skewed, k=top, inplace=True, **kw))
    res["select torch.topk, skewed sums"] = bench(lambda: topk_sorted(skewed, top))
    print(f"{name}: sampled select, mean histogram passes per row: flat sums {mean_passes(cs, top):.2f}, "
          f"skewed sums {mean_passes(skewed, top):.2f} (then one compaction pass)", flush=True)
    del skewed
    del cs
    res["cache_build"] = bench(lambda: attn_column_sparse(q, k, v, idx, cnt, scale=scale, group=GROUP, o_base=o,
                                                          sign=-1.0))
    del idx, cnt
    for S in samples_list:
        res[f"refresh S={S}"] = bench(lambda: refresh_pieces(q, k, v, scale, top - rnd, rnd, S))
    S = samples_list[0]  # the draws as the op made them until session 18: hashed in torch, scattered
    res[f"refresh S={S}, draws as a tensor"] = bench(lambda: refresh_pieces(q, k, v, scale, top - rnd, rnd, S,
                                                                            draws="tensor"))
    if old:
        res["old refresh (dense+colsum kernel)"] = bench(lambda: old_refresh(q, k, v, scale, top, lse))
    del q, k, v, o, lse
    torch.cuda.empty_cache()
    return res, library, f"{B}x{H}x{N}x{D}", top


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--samples", type=int, nargs="*", default=[32, 16, 64, 128])
    ap.add_argument("--old", action="store_true")
    args = ap.parse_args(argv)
    gpu = torch.cuda.get_device_name()
    rows = []
    for name in args.shapes:
        res, library, shape, top = measure(name, args.samples, args.old)
        base = res["cudnn_sdpa"]
        for label, ms in res.items():
            rows.append(dict(gpu=gpu, model=name, shape=shape, top_k=top, kernel=label, ms=round(ms, 4),
                             x_cudnn=round(ms / base, 3), exact_lse_library=library))
            print(f"{name:13s} {label:36s} {ms:10.4f} ms  {ms / base:6.3f}x cuDNN", flush=True)
        write_results(rows, "bench_refresh", gpu)  # after each shape: a time limit still leaves the finished ones
    print(f"GPU {gpu}, torch {torch.__version__}; exact lse from: {library}")


if __name__ == "__main__":
    main()
