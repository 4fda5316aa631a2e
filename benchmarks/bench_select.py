"""Microbenchmark: ways to pick, per token block, the K largest of a (B, nb, F) fp32 "change" score.

    python benchmarks/bench_select.py                       # GPU: table + benchmarks/results/bench_select.csv
    python benchmarks/bench_select.py --sizes 1,34,12288 2,256,12288
    python benchmarks/bench_select.py --check               # CPU (or GPU): all variants agree, small sizes
    python benchmarks/bench_select.py --warps 8 16 32       # also the fused kernel at each num_warps

Every variant returns the indices of the K largest entries of each row, sorted ascending (the order
the sparse MLP kernels want), shape (B, nb, K), int32 by default:
  a_topk_sort      change.topk(K, sorted=False).indices.sort().values        (what ops/mlp.py does now)
  b_full_sort      change.sort(descending).indices[..., :K].sort().values
  c_rank_compact   stable argsort -> rank of every column (scatter of arange) -> mask = rank < K ->
                   compaction: position = cumsum(mask) - 1, unmasked columns go to a dummy slot K
  d_kth_threshold  kthvalue(-change, K) -> mask = change >= K-th largest -> the same compaction,
                   clipped to K slots (ties past the K-th are dropped). Exact without ties; with a
                   tied K-th value the clip keeps the first K of the mask in column order, which
                   can drop a larger entry further right (--check shows it)
  d2_kth_exact     d with exact ties: entries above the K-th largest, plus tied ones in column order
                   up to K (two more reductions; extra variant)
  e_topk_mask      topk(sorted=False) -> boolean mask (scatter) -> the same compaction (extra variant)
Compaction writes columns in increasing order, so c/d/e need no final sort.

"full_select_fused" times what ops/mlp.py::_select_neurons runs now: the one-launch Triton kernel
kernels/mlp_select_neurons.py (checked equal to the others on tie-free inputs).
"full_select_<v>" times the earlier torch neuron selection of ops/mlp.py::_select_neurons (non-gated MLP,
FLUX) with variant a and with the fastest alternative (the fastest exact with ties, and the fastest
of all when that is d_kth_threshold): change = |basis - bm_cache|, +inf at
`random_keys`*F random columns per block (torch.randint), the selection, the copy into the int32
index buffer, and bm_cache.scatter_(2, idx, basis.gather(2, idx)). bm_cache is restored from a
pristine copy before every timed run (outside the timing), so each run sees the same scores.

K = round(top_keys*F) + round(random_keys*F) as in _select_neurons (0.3 + 0.05 -> 4300 of 12288).
Timing: CUDA events around one call, synchronized before each call (so the eager number includes
the launch overhead of an idle GPU), median of `--iters` (50) after `--warmup` (10) calls; then the
same with the call captured once in a torch.cuda.CUDAGraph and replayed (pure GPU time). Timed
inputs are uniform random scores with +inf at the random draws; before timing, every variant is
checked equal to a_topk_sort on tie-free inputs of the same sizes on the GPU. Writes
benchmarks/results/bench_select.csv and $OUT/bench_select.csv (when OUT is set).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics

import torch

TOP_KEYS, RANDOM_KEYS = 0.3, 0.05  # the FLUX preset's MLP settings
DEVICE = "cuda"  # the timed runs' device (a module global so the CPU tests can swap it)
DEFAULT_SIZES = [(1, 34, 12288), (1, 128, 12288)]  # FLUX 1280x768: 4352 tokens / 128 = 34 blocks; larger nb


# -- selection variants: (change (B, nb, F) fp32, K) -> (B, nb, K) indices, ascending per row -----
def a_topk_sort(change, K, dtype=torch.int32):
    return change.topk(K, dim=-1, sorted=False).indices.sort(dim=-1).values.to(dtype)


def b_full_sort(change, K, dtype=torch.int32):
    return change.sort(dim=-1, descending=True).indices[..., :K].sort(dim=-1).values.to(dtype)


def _columns(change, dtype):
    B, nb, F = change.shape
    return torch.arange(F, device=change.device, dtype=dtype).expand(B, nb, F)


def compact(mask, K, dtype=torch.int32, clip=False):
    """Column numbers of the True entries of each row, ascending, in K slots (K+1 wide buffer: every
    unkept column is written to the dummy slot K, sliced off). `clip`: keep only the first K."""
    B, nb, F = mask.shape
    pos = mask.cumsum(-1) - 1
    keep = mask & (pos < K) if clip else mask
    pos = torch.where(keep, pos, K)
    out = torch.empty(B, nb, K + 1, device=mask.device, dtype=dtype)
    out.scatter_(-1, pos, _columns(mask, dtype))
    return out[..., :K]


def c_rank_compact(change, K, dtype=torch.int32):
    order = torch.argsort(change, dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, _columns(change, order.dtype))
    return compact(rank < K, K, dtype)


def d_kth_threshold(change, K, dtype=torch.int32):
    kth = -torch.kthvalue(-change, K, dim=-1, keepdim=True).values  # the K-th largest per row
    return compact(change >= kth, K, dtype, clip=True)


def d2_kth_exact(change, K, dtype=torch.int32):
    """d with exact ties: everything above the K-th largest, then entries equal to it in column
    order until K are taken (the same set as a top-K when the K-th value is tied)."""
    kth = -torch.kthvalue(-change, K, dim=-1, keepdim=True).values
    above, tied = change > kth, change == kth
    need = K - above.sum(-1, keepdim=True)
    return compact(above | (tied & (tied.cumsum(-1) <= need)), K, dtype)


def e_topk_mask(change, K, dtype=torch.int32):
    top = change.topk(K, dim=-1, sorted=False).indices
    mask = torch.zeros_like(change, dtype=torch.bool).scatter_(-1, top, True)
    return compact(mask, K, dtype)


VARIANTS = {f.__name__: f for f in (a_topk_sort, b_full_sort, c_rank_compact, d_kth_threshold, d2_kth_exact,
                                    e_topk_mask)}
CURRENT = "a_topk_sort"
TIE_INEXACT = {"d_kth_threshold"}  # with a tied K-th value it may drop larger entries later in the row


# -- the whole selection of ops/mlp.py::_select_neurons ---------------------------------------------
def k_of(F: int, top: float = TOP_KEYS, rnd: float = RANDOM_KEYS) -> tuple[int, int]:
    """(K, random draws) exactly as _select_neurons computes them."""
    n_top, n_rnd = max(1, round(top * F)), round(rnd * F)
    return min(F, n_top + n_rnd), n_rnd


def full_select(basis, bm_cache, idx_buf, K: int, rnd: int, select) -> None:
    """_select_neurons for a non-gated MLP: basis/bm_cache (B, nb, F) fp32, idx_buf (B, nb, K) int32."""
    change = (basis - bm_cache).abs_()
    B, nb, F = change.shape
    if rnd:
        pick = torch.randint(0, F, (B, nb, rnd), device=change.device)
        change.scatter_(2, pick, float("inf"))
    idx = select(change, K, torch.int64)  # int64: gather/scatter indices
    idx_buf.copy_(idx)
    bm_cache.scatter_(2, idx, basis.gather(2, idx))


def fused_select(basis, bm_cache, idx_buf, K: int, rnd: int) -> None:
    """The selection ops/mlp.py runs now: one `mlp_select_neurons` launch (score, random draws,
    radix select, compaction and the bm_cache refresh; Triton on CUDA, else the reference)."""
    from chipmunk_compile.kernels import get_kernel

    B, nb, F = basis.shape
    draws = torch.randint(0, F, (B, nb, rnd), device=basis.device) if rnd else None
    get_kernel("mlp_select_neurons", basis)(basis, bm_cache, idx_buf, draws=draws)


# -- inputs ----------------------------------------------------------------------------------------
def tie_free(B, nb, F, device, seed=0):
    """Random scores with no ties in any row: a random permutation of 0..F-1 per row, scaled."""
    g = torch.Generator(device).manual_seed(seed)
    return torch.rand(B, nb, F, device=device, generator=g).argsort(dim=-1).float() / F


def with_random_inf(change, rnd, seed=1):
    """+inf at `rnd` random columns per row (what the random draws do; ties only among +inf, all kept)."""
    if rnd:
        g = torch.Generator(change.device).manual_seed(seed)
        B, nb, F = change.shape
        change = change.clone().scatter_(2, torch.randint(0, F, (B, nb, rnd), device=change.device, generator=g),
                                         float("inf"))
    return change


def select_inputs(B, nb, F, device, seed=0):
    """basis and bm_cache for full_select: |basis - bm_cache| has no ties."""
    g = torch.Generator(device).manual_seed(seed + 7)
    bm = torch.randn(B, nb, F, device=device, generator=g)
    return bm + tie_free(B, nb, F, device, seed) + 0.5, bm


# -- correctness -----------------------------------------------------------------------------------
def check(sizes, device) -> None:
    for B, nb, F in sizes:
        K, rnd = k_of(F)
        change = with_random_inf(tie_free(B, nb, F, device), rnd)
        ref = a_topk_sort(change, K)
        assert ref.shape == (B, nb, K) and ref.dtype == torch.int32
        assert bool((ref[..., 1:] > ref[..., :-1]).all()), "reference not strictly ascending"
        for name, fn in VARIANTS.items():
            out = fn(change, K)
            assert out.shape == ref.shape and out.dtype == torch.int32, (name, out.shape, out.dtype)
            assert torch.equal(out, ref), f"{name} differs from {CURRENT} at {(B, nb, F)}"
            assert torch.equal(fn(change, K, torch.int64), ref.long()), f"{name} int64 output differs"
        check_full_select(B, nb, F, K, rnd, device)
        check_ties(B, nb, F, K, device)
        print(f"check OK  B={B} nb={nb} F={F} K={K}: {', '.join(VARIANTS)} and full_select agree", flush=True)


def check_full_select(B, nb, F, K, rnd, device) -> None:
    results = {}
    for name, fn in VARIANTS.items():
        basis, bm = select_inputs(B, nb, F, device)
        idx = torch.empty(B, nb, K, dtype=torch.int32, device=device)
        torch.manual_seed(123)  # the same random draws for every variant
        full_select(basis, bm, idx, K, rnd, fn)
        results[name] = (idx, bm)
    basis, bm = select_inputs(B, nb, F, device)
    idx = torch.empty(B, nb, K, dtype=torch.int32, device=device)
    torch.manual_seed(123)
    fused_select(basis, bm, idx, K, rnd)
    results["fused"] = (idx, bm)
    ref_idx, ref_bm = results[CURRENT]
    basis, bm0 = select_inputs(B, nb, F, device)
    picked = torch.zeros_like(bm0, dtype=torch.bool).scatter_(2, ref_idx.long(), True)
    assert torch.equal(ref_bm, torch.where(picked, basis, bm0)), "full_select: bm_cache not refreshed at the picks"
    for name, (idx, bm) in results.items():
        assert torch.equal(idx, ref_idx) and torch.equal(bm, ref_bm), f"full_select with {name} differs"


def check_ties(B, nb, F, K, device) -> None:
    """With ties the chosen set may differ, but every variant returns K distinct ascending columns
    holding values >= the K-th largest; all but TIE_INEXACT hold a top-K set (same value sum)."""
    change = (tie_free(B, nb, F, device) * 16).floor()  # integers 0..15: many ties
    top = change.topk(K, dim=-1).values
    for name, fn in VARIANTS.items():
        out = fn(change, K).long()
        assert bool((out[..., 1:] > out[..., :-1]).all()), f"{name}: not strictly ascending with ties"
        vals = change.gather(-1, out)
        assert bool((vals >= top[..., -1:]).all()), f"{name}: picked a value below the K-th largest"
        exact = torch.equal(vals.sum(-1), top.sum(-1))
        if name in TIE_INEXACT:
            if not exact:
                print(f"  note: with ties {name} kept a non-top-K set at {(B, change.shape[1], F)} (as documented)")
        else:
            assert exact, f"{name}: not a top-K set with ties"


# -- timing ----------------------------------------------------------------------------------------
def time_eager(fn, setup, iters, warmup) -> float:
    """Median ms of fn() between CUDA events; the GPU is idle (synchronized) before each call."""
    for _ in range(warmup):
        setup()
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        setup()
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def capture(fn, warmup=3) -> torch.cuda.CUDAGraph:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph


def time_graph(fn, setup, iters, warmup) -> float | None:
    """The same with fn captured in a CUDA graph and replayed; None if it cannot be captured."""
    try:
        graph = capture(fn)
    except Exception as e:  # a variant that syncs or is not capturable: report, don't abort
        print(f"    (CUDA graph capture failed: {type(e).__name__}: {str(e).splitlines()[0][:120]})", flush=True)
        torch.cuda.synchronize()
        return None
    return time_eager(graph.replay, setup, iters, warmup)


def bench_variants(B, nb, F, iters, warmup) -> list[dict]:
    K, rnd = k_of(F)
    change = with_random_inf(torch.rand(B, nb, F, device=DEVICE), rnd)
    rows = []
    for name, fn in VARIANTS.items():
        call = lambda fn=fn: fn(change, K)
        eager, graph = time_eager(call, _noop, iters, warmup), time_graph(call, _noop, iters, warmup)
        rows.append(row(B, nb, F, K, name, eager, graph))
    return rows


def bench_full_select(B, nb, F, names, iters, warmup) -> list[dict]:
    K, rnd = k_of(F)
    basis, bm0 = select_inputs(B, nb, F, DEVICE)
    bm = bm0.clone()
    idx = torch.empty(B, nb, K, dtype=torch.int32, device=DEVICE)
    setup = lambda: bm.copy_(bm0)  # every run starts from the same bm_cache (outside the timing)
    rows = []
    for name in names:
        call = lambda fn=VARIANTS[name]: full_select(basis, bm, idx, K, rnd, fn)
        rows.append(row(B, nb, F, K, f"full_select_{name}", time_eager(call, setup, iters, warmup),
                        time_graph(call, setup, iters, warmup)))
    call = lambda: fused_select(basis, bm, idx, K, rnd)
    rows.append(row(B, nb, F, K, "full_select_fused", time_eager(call, setup, iters, warmup),
                    time_graph(call, setup, iters, warmup)))
    return rows


def bench_fused_warps(B, nb, F, warps, iters, warmup) -> list[dict]:
    """full_select_fused at each num_warps in `warps` (the kernel's `_force_warps` hook; by default
    it takes the row width / 1024, 16 at FLUX's 12288 neurons)."""
    import importlib

    kernel_module = importlib.import_module("chipmunk_compile.kernels.mlp_select_neurons")
    K, rnd = k_of(F)
    basis, bm0 = select_inputs(B, nb, F, DEVICE)
    bm = bm0.clone()
    idx = torch.empty(B, nb, K, dtype=torch.int32, device=DEVICE)
    setup = lambda: bm.copy_(bm0)
    call = lambda: fused_select(basis, bm, idx, K, rnd)
    rows = []
    try:
        for w in warps:
            kernel_module._force_warps = w
            rows.append(row(B, nb, F, K, f"full_select_fused_w{w}", time_eager(call, setup, iters, warmup),
                            time_graph(call, setup, iters, warmup)))
    finally:
        kernel_module._force_warps = None
    return rows


def _noop():
    pass


def row(B, nb, F, K, name, eager_ms, graph_ms) -> dict:
    return dict(B=B, nb=nb, F=F, K=K, name=name, eager_ms=eager_ms, graph_ms=graph_ms)


def fastest_alternatives(rows: list[dict]) -> list[str]:
    """The fastest alternative to CURRENT that is exact with ties, and the fastest of all if other."""
    key = lambda r: r["graph_ms"] if r["graph_ms"] is not None else r["eager_ms"]
    alt = [r for r in rows if r["name"] != CURRENT]
    best_exact = min((r for r in alt if r["name"] not in TIE_INEXACT), key=key)["name"]
    best = min(alt, key=key)["name"]
    return [best_exact] + ([best] if best != best_exact else [])


# -- output ----------------------------------------------------------------------------------------
def print_table(rows: list[dict]) -> None:
    base = {}
    print(f"{'B':>3}{'nb':>5}{'F':>7}{'K':>6}  {'variant':<30}{'eager ms':>10}{'graph ms':>10}{'vs a (graph)':>14}")
    for r in rows:
        key = (r["B"], r["nb"], r["F"], r["name"].startswith("full_select"))
        if r["name"].endswith(CURRENT):
            base[key] = r["graph_ms"]
        ref, g = base.get(key), r["graph_ms"]
        rel = f"{ref / g:>13.2f}x" if ref and g else f"{'-':>14}"
        gtxt = f"{g:>10.4f}" if g is not None else f"{'n/a':>10}"
        print(f"{r['B']:>3}{r['nb']:>5}{r['F']:>7}{r['K']:>6}  {r['name']:<30}{r['eager_ms']:>10.4f}{gtxt}{rel}")


def write_csv(rows: list[dict], gpu: str) -> None:
    for d in [os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"), os.environ.get("OUT")]:
        if d:
            os.makedirs(d, exist_ok=True)
            path = os.path.join(d, "bench_select.csv")
            with open(path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=["gpu", "torch", *rows[0]])
                w.writeheader()
                for r in rows:
                    w.writerow({"gpu": gpu, "torch": torch.__version__, **r})
            print(f"wrote {path}")


def parse_size(text: str) -> tuple[int, int, int]:
    B, nb, F = (int(x) for x in text.split(","))
    return B, nb, F


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true", help="correctness only, small sizes (CPU unless CUDA is there)")
    ap.add_argument("--sizes", nargs="+", type=parse_size, default=DEFAULT_SIZES, help="B,nb,F triples")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--warps", type=int, nargs="*", default=[],
                    help="also time the fused select kernel at these num_warps (e.g. 8 16 32)")
    args = ap.parse_args()
    if args.check:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        check([(1, 3, 40), (2, 5, 1000), (1, 4, 12288)], device)
        return
    gpu = torch.cuda.get_device_name()
    print(f"# bench_select on {gpu}, torch {torch.__version__}; median of {args.iters} after {args.warmup} warm-ups",
          flush=True)
    check(args.sizes, DEVICE)
    rows = []
    for B, nb, F in args.sizes:
        vr = bench_variants(B, nb, F, args.iters, args.warmup)
        rows += vr + bench_full_select(B, nb, F, [CURRENT, *fastest_alternatives(vr)], args.iters, args.warmup)
        rows += bench_fused_warps(B, nb, F, args.warps, args.iters, args.warmup)
    print()
    print_table(rows)
    print(f"GPU {gpu}, torch {torch.__version__}; eager = launch overhead included, graph = CUDA-graph replay")
    write_csv(rows, gpu)


if __name__ == "__main__":
    main()
