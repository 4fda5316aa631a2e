"""Kernel benchmark: chipmunk Triton kernels vs dense baselines, one process, same random inputs.

Baselines: F.scaled_dot_product_attention under cuDNN and FLASH; dense MLP (linear -> gelu tanh ->
linear, torch.compiled). Timings are medians of triton.testing.do_bench (CUDA events). Prints the
GPU name and a table, writes CSV + JSON to $OUT (when set) or benchmarks/results/.

  python3 benchmarks/bench_kernels.py [--group 64 128 192] [--skip-long] [--quick]
  python3 benchmarks/bench_kernels.py --sweep [--baseline-dir out/baseline]   # variant table

--sweep times explicit kernel configs (each module's ``_force_config`` hook; the Config kwargs
include the tail split SPLIT / occupancy OCC / TAIL_N knobs) on the FLUX shapes (attention keep
0.15, G=128; MLP keep 0.3) and, with --baseline-dir, the autotuned kernels of an older copy of the
kernel files (e.g. the previous commit's, for a before/after on one machine). --workers N first
compiles every variant in N parallel processes (shared Triton cache), then times them serially.
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


class Timing(float):
    """A do_bench median (ms) that also carries ``graph``: the same call replayed from a CUDA graph
    (ms per call, None where capture failed). do_bench launches from Python and flushes L2 before
    every call, so a call whose host-side launch takes longer than its kernels is timed at the host's
    pace; the model replays recorded graphs, which the graph column measures."""

    graph: float | None = None


def graph_ms(fn, calls=10, reps=20):
    """Median ms per call of ``calls`` back-to-back ``fn()`` captured in one CUDA graph (no host
    launch cost, no L2 flush between calls); None when fn cannot be captured."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(calls):
                fn()
        g.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / calls)
        del g
        return sorted(times)[len(times) // 2]
    except Exception as e:  # noqa: BLE001
        print(f"  (no graph timing: {type(e).__name__}: {str(e)[:120]})")
        torch.cuda.synchronize()
        return None


def bench(fn, ms_budget=200):
    import triton

    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    one = (time.perf_counter() - t0) * 1e3
    rep = max(ms_budget, 3 * one)
    t = Timing(triton.testing.do_bench(fn, warmup=max(25, one), rep=rep, return_mode="median"))
    t.graph = graph_ms(fn)
    return t


def record(section, name, shape, ms, *, baseline_ms=None, target=None, flops=None, note=""):
    row = dict(section=section, name=name, shape=shape, ms=round(ms, 4))
    if flops:
        row["tflops"] = round(flops / ms / 1e9, 1)
    if baseline_ms:
        row["speedup_vs_baseline"] = round(baseline_ms / ms, 2)
    gms, gbase = getattr(ms, "graph", None), getattr(baseline_ms, "graph", None)
    if gms:
        row["graph_ms"] = round(gms, 4)
        if gbase:
            row["graph_speedup"] = round(gbase / gms, 2)
    if target is not None:
        row["target"] = target
    row["note"] = note
    ROWS.append(row)
    sp = f"{row.get('speedup_vs_baseline', ''):>7}"
    gr = f"graph {row['graph_ms']:.4f} ms x{row.get('graph_speedup', '')}" if "graph_ms" in row else ""
    print(f"{section:10s} {name:42s} {shape:24s} {ms:9.4f} ms {row.get('tflops', ''):>7} TF/s  x{sp} {gr} "
          f"{target or ''} {note}", flush=True)


def write_results(rows: list[dict], stem: str, gpu: str) -> None:
    """rows as benchmarks/results/<stem>_<chip>.json and .csv (and into $OUT when set), the chip from
    the GPU name: "NVIDIA H100 80GB HBM3" -> h100, "NVIDIA H200" -> h200 (the first word naming one)."""
    tag = next((w for w in gpu.split() if w[:1].isalpha() and any(c.isdigit() for c in w)), gpu.split()[-1]).lower()
    for d in [os.path.join(os.path.dirname(__file__), "results"), os.environ.get("OUT")]:
        if d:
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, f"{stem}_{tag}.json"), "w") as f:
                json.dump(rows, f, indent=1)
            with open(os.path.join(d, f"{stem}_{tag}.csv"), "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")  # quotes labels with commas
                writer.writeheader()
                writer.writerows(rows)


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
            if keep == 0.15 and G == groups[0]:  # the forecast epilogue (attn.extrapolate): + coef * o_slope
                o_slope, coef = torch.randn_like(q), torch.full((1,), 0.5, device=dev)
                ms_s = bench(lambda: attn_column_sparse(q, k, v, idx, cnt, scale=scale, group=G, o_base=o_base,
                                                        o_slope=o_slope, slope_coef=coef))
                record("attn" + label, f"csp keep={keep:.2f} G={G} +slope", shape, ms_s, baseline_ms=base, flops=sf,
                       note=f"forecast epilogue: {ms_s / ms:.3f}x the row above")
                del o_slope
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
        sf = 2.0 * M * C * Kc
        tag = f"keep={keep:.2f}" + (f" block={block}" if block != 128 else "")
        flux_keep = abs(keep - 0.3) < 1e-6
        orders = [("", None, f"1/d={1 / keep:.1f}x")]
        if flux_keep and M == 4352:
            # As the backend runs FLUX 1280x768: 512 text tokens first, the 48x80 image grid in
            # 8x8 tiles of 4x4 sub-tiles (x rows and y_cache rows gathered through the permutation).
            from chipmunk_compile.grouping import site_perm, tile_order

            orders.append((" grouped", site_perm(M, tile_order((48, 80), (8, 8)), 512, True).to(dev),
                           "FLUX 8x8 tile permutation"))
        for suffix, perm, note in orders:
            def mm1():
                return mlp_sparse_mm1(x, w1, b1, None, None, idx, cnt, hc, act="gelu_tanh", block=block, perm=perm)

            def mm2(d):
                return mlp_sparse_mm2(d, w2v, idx, cnt, yc, block=block, perm=perm)

            record("mlp", f"mm1 {tag}{suffix}", shape, bench(mm1), flops=sf)
            m2 = bench(lambda: mm2(dp))
            record("mlp", f"mm2 {tag}{suffix}", shape, m2, flops=sf)
            _mm2_gluon_row(tag + suffix, shape, dp, w2v, idx, cnt, yc, block, perm, sf, m2)
            record("mlp", f"mm1+mm2 {tag}{suffix}", shape, bench(lambda: mm2(mm1())), baseline_ms=base,
                   flops=2 * sf, target=">=2.8x dense" if flux_keep else None, note=note)
            if not suffix and keep in (0.3, 0.15):  # the MLP's error forecast (mlp.extrapolate): + coef * slope
                slope, coef = torch.randn_like(yc), torch.tensor(0.5, device=dev)  # 0-dim on the device, as the op passes it
                apart = bench(lambda: torch.addcmul(mm2(dp), slope, coef))  # as the op's pass was, no cast per call
                record("mlp", f"mm2 {tag} then addcmul", shape, apart, flops=sf, note="the forecast as a pass of its own")
                record("mlp", f"mm2 {tag} +slope", shape,
                       bench(lambda: mlp_sparse_mm2(dp, w2v, idx, cnt, yc, block=block, slope=slope, slope_coef=coef)),
                       baseline_ms=apart, flops=sf, note="the forecast in mm2's epilogue, against the row above")
                del slope
    # the selection's block means: the Triton kernel against the torch chain it replaced
    from chipmunk_compile.kernels.mlp_block_means import mlp_block_means

    for suffix, perm, _ in orders:
        ref_ms = bench(lambda: K.mlp_block_means_ref(x, block=block, perm=perm))
        record("mlp", f"block_means (torch){suffix}", shape, ref_ms)
        record("mlp", f"block_means (triton){suffix}", shape, bench(lambda: mlp_block_means(x, block=block, perm=perm)),
               baseline_ms=ref_ms)


def _mm2_gluon_row(tag, shape, dp, w2v, idx, cnt, yc, block, perm, flops, triton_ms):
    """On sm_90: the Gluon ping-pong mm2 (not dispatched: slower, see its module) on mm2's operands,
    against the row above (the Triton kernel that mm2 runs)."""
    from chipmunk_compile.kernels import mlp_sparse_mm2_pingpong as pp

    w2t = w2v.t()
    if pp.supported(dp, w2t, yc) is not None:
        return
    kw = dict(block=block, perm=None if perm is None else perm.to(torch.int32), slope=None, slope_coef=None)
    out = torch.empty_like(yc)
    ms = bench(lambda: pp.mlp_sparse_mm2_pingpong(dp, w2t, idx.to(torch.int32), cnt.to(torch.int32), yc, out, **kw))
    record("mlp", f"mm2 {tag} gluon ping-pong", shape, ms, baseline_ms=triton_ms, flops=flops,
           note="against the row above (Triton)")


# ----------------------------------------------------------------------------------------------
# Variant sweep: explicit configs, one table.


def _cfg(w, s, **kw):
    import triton

    return triton.Config(kw, num_warps=w, num_stages=s)


def sweep_variants():
    """(section, label, module name, Config|None) — None: the module's autotuned launcher."""
    # 128-row tiles of BLOCK_N neurons / channels, K step 64, one program per SM; EPI_SUB 2: the
    # epilogue in two column halves (fewer live registers; see the modules)
    def mm(warps, stages, bn, sp=2, es=1, gm=64, bm=128, tma=None, occ=1):
        extra = {} if tma is None else {"A_TMA": tma}
        return _cfg(warps, stages, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=64, GROUP_M=gm, OCC=occ, SPLIT=sp, EPI_SUB=es,
                    **extra)

    mm1 = [("B 256x64 s3 epi2", mm(8, 3, 256, es=2)), ("C 256x64 s4 epi2", mm(8, 4, 256, es=2)),
           ("D 256x64 s4 epi1", mm(8, 4, 256)), ("E 128x64 s5 epi2", mm(8, 5, 128, es=2)),
           ("F 128x64 s5 epi1", mm(8, 5, 128)), ("G 256x64 s4 epi2 gm16", mm(8, 4, 256, es=2, gm=16)),
           ("H 128x64 w4 s4 epi2", mm(4, 4, 128, es=2)),
           # 256-row tiles: only with --sweep-mlp-block >= 256 (a tile never spans two token blocks)
           ("I m256 128x64 s4 epi2", mm(8, 4, 128, es=2, bm=256)), ("J m256 128x64 s3 epi2", mm(8, 3, 128, es=2, bm=256)),
           ("K m256 64x64 s5 epi1", mm(8, 5, 64, bm=256)),
           # two programs per SM (96 KB of shared memory, <= 128 / 255 registers on 8 / 4 warps for
           # sm_90): one program's epilogue runs beside the other's K loop
           ("L 128x64 w8 s3 occ2", mm(8, 3, 128, occ=2)), ("M 128x64 w8 s3 occ2 epi2", mm(8, 3, 128, es=2, occ=2)),
           ("N 128x64 w4 s3 occ2 epi2", mm(4, 3, 128, es=2, occ=2)), ("O 128x64 w4 s2 occ2 epi2", mm(4, 2, 128, es=2, occ=2)),
           ("P 128x64 w8 s3 occ2 gm8", mm(8, 3, 128, gm=8, occ=2))]
    mm2 = [("A 128x64 w4 s5 epi1", mm(4, 5, 128)), ("B 128x64 w4 s5 epi2", mm(4, 5, 128, es=2)),
           ("C 256x64 s4 sp4 epi2", mm(8, 4, 256, sp=4, es=2)), ("D 256x64 s3 sp4 epi2", mm(8, 3, 256, sp=4, es=2)),
           ("E 256x64 s4 sp4 epi1", mm(8, 4, 256, sp=4)), ("F 128x64 w4 s6 epi1", mm(4, 6, 128)),
           ("G 256x64 s4 sp2 epi2", mm(8, 4, 256, es=2)),
           # delta tiles through a TMA descriptor (A_TMA)
           ("H 128x64 w4 s5 tma", mm(4, 5, 128, tma=True)), ("I 128x64 w4 s6 tma", mm(4, 6, 128, tma=True)),
           ("J 128x64 w4 s4 tma", mm(4, 4, 128, tma=True)), ("K 128x64 w8 s5 tma", mm(8, 5, 128, tma=True)),
           ("L 256x64 s4 sp4 epi2 tma", mm(8, 4, 256, sp=4, es=2, tma=True)),
           ("M 256x64 s3 sp4 epi2 tma", mm(8, 3, 256, sp=4, es=2, tma=True)),
           ("N 128x64 w4 s5 tma occ2", mm(4, 5, 128, tma=True, occ=2)), ("O 128x64 w8 s3 tma occ2", mm(8, 3, 128, tma=True, occ=2))]
    att = [("A m128 n64 t16 s3 sp2", _cfg(8, 3, BLOCK_M=128, BLOCK_N=64, TAIL_N=16, OCC=1, SPLIT=2)),
           ("B m128 n128 t16 s3 sp2", _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, TAIL_N=16, OCC=1, SPLIT=2)),
           ("C m128 n64 t16 s4 sp2", _cfg(8, 4, BLOCK_M=128, BLOCK_N=64, TAIL_N=16, OCC=1, SPLIT=2)),
           ("D m128 n128 t32 s2 sp2", _cfg(8, 2, BLOCK_M=128, BLOCK_N=128, TAIL_N=32, OCC=1, SPLIT=2)),
           ("E m64 n64 t16 w4 s3 occ2", _cfg(4, 3, BLOCK_M=64, BLOCK_N=64, TAIL_N=16, OCC=2, SPLIT=1)),
           ("F m128 n64 t64 s3 nosplit(~old)", _cfg(8, 3, BLOCK_M=128, BLOCK_N=64, TAIL_N=64, OCC=1, SPLIT=1)),
           ("G m128 n64 t16 s3 nosplit", _cfg(8, 3, BLOCK_M=128, BLOCK_N=64, TAIL_N=16, OCC=1, SPLIT=1)),
           ("H m128 n64 t16 s3 sp4", _cfg(8, 3, BLOCK_M=128, BLOCK_N=64, TAIL_N=16, OCC=1, SPLIT=4)),
           ("I m128 n128 t16 s3 sp4", _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, TAIL_N=16, OCC=1, SPLIT=4)),
           ("J m128 n64 t32 s3 sp2", _cfg(8, 3, BLOCK_M=128, BLOCK_N=64, TAIL_N=32, OCC=1, SPLIT=2))]
    out = [("mm1", "autotuned", "mlp_sparse_mm1", None)] + [("mm1", n, "mlp_sparse_mm1", c) for n, c in mm1]
    out += [("mm2", "autotuned", "mlp_sparse_mm2", None)] + [("mm2", n, "mlp_sparse_mm2", c) for n, c in mm2]
    out += [("attn", "autotuned", "attn_column_sparse", None)] + [("attn", n, "attn_column_sparse", c) for n, c in att]
    return out


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _sweep_inputs(dev, dt, tiny=False, keep=0.3, block=128):
    torch.manual_seed(0)
    M, C, Fh = (4352, 3072, 12288) if not tiny else (300, 128, 512)
    NB = math.ceil(M / block)
    Kc = round(keep * Fh)
    m = dict(x=torch.randn(1, M, C, device=dev, dtype=dt), w1=torch.randn(Fh, C, device=dev, dtype=dt) / math.sqrt(C),
             b1=torch.randn(Fh, device=dev, dtype=dt), w2v=(torch.randn(C, Fh, device=dev, dtype=dt)
                                                          / math.sqrt(Fh)).t().contiguous().t(),
             hc=K.mlp_alloc_h_cache(1, M, Fh, dt, dev).normal_(), yc=torch.randn(1, M, C, device=dev, dtype=dt),
             idx=sorted_random_subsets((1, NB), Fh, Kc, dev),
             cnt=torch.full((1, NB), Kc, dtype=torch.int32, device=dev),
             dp=torch.randn(1, M, math.ceil(Kc / 64) * 64, device=dev, dtype=dt)[..., :Kc], flops=2.0 * M * C * Kc,
             block=block)
    B, H, N, D, G, keepa = (1, 24, 4352, 128, 128, 0.15) if not tiny else (1, 2, 300, 64, 128, 0.3)
    q, k, v = (torch.randn(B, N, H, D, device=dev, dtype=dt).transpose(1, 2) for _ in range(3))
    NG = math.ceil(N / G)
    Ka = round(keepa * N)
    a = dict(q=q, k=k, v=v, ob=torch.randn_like(q), idx=sorted_random_subsets((B, H, NG), N, Ka, dev),
             cnt=torch.full((B, H, NG), Ka, dtype=torch.int32, device=dev), G=G, scale=D ** -0.5,
             flops=4.0 * B * H * N * Ka * D)
    return m, a


def _sweep_call(mod, sec, m, a):
    if sec == "mm1":
        return lambda: mod.mlp_sparse_mm1(m["x"], m["w1"], m["b1"], None, None, m["idx"], m["cnt"], m["hc"],
                                          act="gelu_tanh", block=m["block"])
    if sec == "mm2":
        return lambda: mod.mlp_sparse_mm2(m["dp"], m["w2v"], m["idx"], m["cnt"], m["yc"], block=m["block"])
    return lambda: mod.attn_column_sparse(a["q"], a["k"], a["v"], a["idx"], a["cnt"], scale=a["scale"],
                                          group=a["G"], o_base=a["ob"])


def _sweep_modules(baseline_dir):
    import importlib
    import importlib.util

    mods = {}
    for name in ("mlp_sparse_mm1", "mlp_sparse_mm2", "attn_column_sparse"):
        mods[("new", name)] = importlib.import_module(f"chipmunk_compile.kernels.{name}")
        if baseline_dir:
            spec = importlib.util.spec_from_file_location(f"_baseline_{name}", os.path.join(baseline_dir, name + ".py"))
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            mods[("old", name)] = mod
    return mods


def run_sweep(a, worker=None):
    dev, dt = ("cpu", torch.float32) if a.dry else ("cuda", torch.bfloat16)
    from chipmunk_compile.kernels._tiles import prune_row_tiles  # the autotuner's rule: no tile taller than a block

    m, at = _sweep_inputs(dev, dt, tiny=a.dry, keep=a.sweep_mlp_keep, block=a.sweep_mlp_block)
    mods = _sweep_modules(a.baseline_dir)
    jobs = [(ver, sec, lab, mn, cfg) for (sec, lab, mn, cfg) in sweep_variants() for ver in ("new",)
            if (cfg is None or a.sweep_set == "all") and sec in a.sweep_sections
            and (cfg is None or sec == "attn" or prune_row_tiles([cfg], {}, BLK=a.sweep_mlp_block))]
    if a.baseline_dir:
        jobs = [("old", sec, "autotuned", mn, None) for sec, mn in
                (("mm1", "mlp_sparse_mm1"), ("mm2", "mlp_sparse_mm2"), ("attn", "attn_column_sparse"))] + jobs
    ref = {}
    table = []
    for i, (ver, sec, lab, mn, cfg) in enumerate(jobs):
        if worker is not None and i % worker[1] != worker[0]:
            continue
        mod = mods[(ver, mn)]
        if hasattr(mod, "_force_config"):
            mod._force_config = cfg
        fn = _sweep_call(mod, sec, m, at)
        try:
            if worker is not None:
                fn()
                _sync()
                continue
            # correctness vs the first variant of the section: same inputs (y_cache reset for mm2; for
            # mm1 the updated h_cache, which every variant must leave at the same h_new)
            if sec == "mm2":
                yc0 = m["yc"].clone()
            out = fn()
            _sync()
            chk = (m["hc"] if sec == "mm1" else out).float()
            if sec == "mm2":
                m["yc"].copy_(yc0)
            err = 0.0 if sec not in ref else ((chk - ref[sec]).norm() / ref[sec].norm()).item()
            ref.setdefault(sec, chk.clone())
            ms = bench(fn, ms_budget=a.sweep_ms) if not a.dry else 1.0
            if sec == "mm2":
                m["yc"].copy_(yc0)
            tf = (m["flops"] if sec != "attn" else at["flops"]) / ms / 1e9
            shape = f"flux keep={a.sweep_mlp_keep}" if sec != "attn" else "flux"
            if sec != "attn" and a.sweep_mlp_block != 128:
                shape += f" block={a.sweep_mlp_block}"
            row = dict(section="sweep-" + sec, name=f"{ver} {lab}", shape=shape, ms=round(ms, 4),
                       tflops=round(tf, 1), note=f"rel_err_vs_first={err:.1e}")
            if cfg is None and hasattr(mod, "_tuned") and getattr(mod._tuned, "best_config", None) is not None:
                row["note"] += f" best={mod._tuned.best_config}"
            ROWS.append(row)
            table.append(row)
            print(f"{sec:5s} {ver} {lab:34s} {ms:8.4f} ms {tf:6.1f} TF/s  {row['note']}", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"{sec} {ver} {lab} FAILED: {type(e).__name__}: {str(e)[:300]}", flush=True)
        finally:
            if hasattr(mod, "_force_config"):
                mod._force_config = None
    if worker is None:
        print("\n==== sweep summary (ms) ====")
        for r in table:
            print(f"{r['section']:12s} {r['name']:40s} {r['ms']:8.4f} {r['tflops']:7.1f}")


def _precompile(a):
    import subprocess

    procs = []
    for i in range(a.workers):
        cmd = [sys.executable, __file__, "--sweep", "--worker", f"{i}/{a.workers}", "--sweep-set", a.sweep_set,
               "--sweep-mlp-keep", str(a.sweep_mlp_keep), "--sweep-mlp-block", str(a.sweep_mlp_block),
               "--sweep-sections", *a.sweep_sections]
        cmd += ["--dry"] if a.dry else []
        if a.baseline_dir:
            cmd += ["--baseline-dir", a.baseline_dir]
        procs.append(subprocess.Popen(cmd))
    for p in procs:
        p.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--group", type=int, nargs="+", default=[192])
    ap.add_argument("--skip-long", action="store_true", help="skip the 118800-token attention shape")
    ap.add_argument("--quick", action="store_true", help="no sparsity sweeps")
    ap.add_argument("--only", choices=["attn", "mlp", "all", "none"], default="all")
    ap.add_argument("--sweep", action="store_true", help="time explicit kernel variants (see module doc)")
    ap.add_argument("--sweep-ms", type=float, default=80.0)
    ap.add_argument("--baseline-dir", default=None, help="older kernel files to time beside the current ones")
    ap.add_argument("--workers", type=int, default=0, help="compile sweep variants in N processes first")
    ap.add_argument("--sweep-set", choices=["all", "auto"], default="all", help="auto: autotuned rows only")
    ap.add_argument("--sweep-sections", nargs="+", choices=["mm1", "mm2", "attn"], default=["mm1", "mm2", "attn"])
    ap.add_argument("--sweep-mlp-keep", type=float, default=0.3, help="kept neuron fraction of the mm1/mm2 sweep")
    ap.add_argument("--sweep-mlp-block", type=int, default=128,
                    help="tokens per MLP block in the mm1/mm2 sweep (256-row variants run only from 256)")
    ap.add_argument("--attn-keeps", type=float, nargs="+", default=None)
    ap.add_argument("--mlp-keeps", type=float, nargs="+", default=None)
    ap.add_argument("--mlp-block", type=int, default=128,
                    help="tokens per MLP block (mlp.block; rows other than 128 say block=N in their name)")
    ap.add_argument("--no-dense-colsum", action="store_true")
    ap.add_argument("--precompile-only", action="store_true", help="with --workers: compile, then exit")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dry", action="store_true", help=argparse.SUPPRESS)  # CPU interpreter smoke test
    a = ap.parse_args()
    if a.worker:
        i, n = (int(t) for t in a.worker.split("/"))
        run_sweep(a, worker=(i, n))
        return
    dev, dt = "cuda", torch.bfloat16
    import triton

    gpu = torch.cuda.get_device_name() if not a.dry else "cpu-interpreter"
    print(f"GPU: {gpu}  torch {torch.__version__}  triton {triton.__version__}", flush=True)
    torch.manual_seed(0)
    if a.sweep:
        if a.workers:
            t0 = time.time()
            _precompile(a)
            print(f"precompiled in {time.time() - t0:.0f} s", flush=True)
            if a.precompile_only:
                return
        run_sweep(a)
    sweep = [0.5, 0.3, 0.15, 0.1, 0.05] if not a.quick else []
    if a.only in ("attn", "all"):
        keeps = sorted(set([0.15] + sweep), reverse=True) if a.attn_keeps is None else a.attn_keeps
        attn_section(1, 24, 4352, 128, keeps, a.group, dt, dev, with_dense_colsum=not a.no_dense_colsum)
        if not a.skip_long:
            attn_section(1, 24, 118800, 128, [0.07], a.group, dt, dev, with_dense_colsum=False, label="-long")
    if a.only in ("mlp", "all"):
        keeps = sorted(set([0.3] + sweep), reverse=True) if a.mlp_keeps is None else a.mlp_keeps
        mlp_section(4352, 3072, 12288, keeps, dt, dev, block=a.mlp_block)
    if a.only == "none" and not a.sweep:
        return
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, "bench_kernels" + ("_sweep" if a.sweep and a.only == "none" else ""))
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
