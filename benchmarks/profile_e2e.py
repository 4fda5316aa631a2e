"""Profile a few sparse steps of a reduced-depth diffusers DiT under backend="chipmunk".

    python benchmarks/profile_e2e.py --model flux --blocks 4
    python benchmarks/profile_e2e.py --model flux --blocks 2 --at 5 7 10   # chosen steps, one by one
    python benchmarks/profile_e2e.py --model flux --blocks 19 --config default --at 1 5 7 10

Prints the top CUDA kernels and CPU ops by time for the baseline (Inductor) and for chipmunk,
and the wall time per step; explains where a step's time goes. With --at, one whole generation of
steps 0..max(at) runs first (compiles, tunes, records), then in a second generation each listed
step is profiled alone (e.g. a refresh step against a sparse one) and printed by kernel kind, with
its wall time split into host time before the first kernel, the GPU span (kernels and the idle time
between them) and the time after the last kernel: a replayed step graph that takes longer than its
summed kernels shows there where the rest goes. The chipmunk config makes every layer sparse
(first_n_dense_layers 0) unless --preset-as-is keeps the preset's dense first layers, as bench_e2e.py
runs it. --pin pins chipmunk's steps with set_step, as bench_e2e.py does; without it chipmunk reads
each call's timestep, a device→host copy that waits for the GPU, so the host time after that read
shows as GPU idle inside the step. --regional compiles both variants as bench_e2e.py --regional does
(diffusers' compile_repeated_blocks: one graph per block class, one step graph replay per block)."""

from __future__ import annotations

import argparse
import re
import time

import torch

from chipmunk_compile.config import list_presets
from bench_e2e import (StepPin, apply_text_mask, build, compile_variant, inputs, resolve_text_mask, text_mask_text,
                       timestep, uncompile_blocks, with_overrides)


def steps(compiled, name, kw, n, start=0, total=50, pin=None):
    """Steps start..start+n-1; `pin` (bench_e2e.StepPin) pins each call's step as bench_e2e.py does,
    else chipmunk tracks the step from the timestep (a device→host read per call)."""
    with torch.no_grad():
        for i in range(start, start + n):
            if pin is not None:
                pin(i, 0)
            compiled(**kw, timestep=timestep(name, i, total, "cuda", torch.bfloat16), return_dict=False)


KERNEL_KINDS = (  # first match wins; names as CUPTI reports them
    ("chipmunk triton/gluon", re.compile(r"^_(attn|mlp|select|csp)")),
    ("cuBLAS gemm", re.compile(r"nvjet|gemm|xmma|cutlass", re.I)),
    ("cuDNN/flash sdpa", re.compile(r"cudnn|flash|fmha", re.I)),
    ("inductor triton", re.compile(r"^triton_")),
    ("aten elementwise/copy", re.compile(r"elementwise|copy|fill|Memcpy|Memset", re.I)),
    ("aten reduce/scan/topk/gather", re.compile(r"reduce|scan|topk|gather|sort|radix", re.I)),
)


def gpu_kernels(prof) -> list:
    """The profile's GPU kernel and memcpy events. A record_function range also shows on the GPU as a
    user annotation covering its kernels: counting it would read as a kernel running the whole span."""
    return [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
            and not getattr(e, "is_user_annotation", False)]


def kernel_split(prof, n_steps: int) -> str:
    """GPU time per step by kernel kind: where a step's time goes, summed over kernels."""
    totals: dict[str, float] = {}
    for evt in gpu_kernels(prof):
        kind = next((k for k, rx in KERNEL_KINDS if rx.search(evt.name)), "other")
        totals[kind] = totals.get(kind, 0.0) + evt.device_time_total / 1e3 / n_steps
    lines = [f"{k:32s} {v:8.2f} ms/step" for k, v in sorted(totals.items(), key=lambda kv: -kv[1])]
    return "\n".join(["### GPU time per step by kernel kind", *lines, f"{'total':32s} {sum(totals.values()):8.2f} ms/step"])


def cuda_spans(prof) -> list[tuple[float, float]]:
    """(start, end) in us of every GPU kernel of the profile."""
    return [(e.time_range.start, e.time_range.end) for e in gpu_kernels(prof)]


def short_kernel_name(name: str) -> str:
    """A kernel name without what varies per graph: Inductor's fused-op list and index, cuBLAS tiles."""
    if name.startswith("triton_"):
        return "_".join(name.split("_")[:2])  # triton_poi / triton_red / triton_per
    if name.startswith("nvjet") or "gemm" in name:
        return "cuBLAS gemm"
    return name[:48]


def _gaps(kernels: list[tuple[str, float, float]]) -> tuple[float, float, list[tuple[str, str, float]]]:
    """Kernels (name, start us, end us), non-empty: (first start, last end, every stretch no kernel
    covers as (the kernel that ended last before it, the kernel after it, its length in us))."""
    kernels = sorted(kernels, key=lambda k: k[1])
    gaps = []
    prev, hi = kernels[0][0], kernels[0][2]
    for name, start, end in kernels[1:]:
        if start > hi:
            gaps.append((prev, name, start - hi))
        if end >= hi:
            prev, hi = name, end
    return kernels[0][1], hi, gaps


def idle_by_neighbours(kernels: list[tuple[str, float, float]], top: int = 12) -> str:
    """Idle GPU time between consecutive kernels ((name, start us, end us)), summed per (kernel before,
    kernel after) pair and per gap size: says whether idle is many launch-sized gaps spread over every
    kernel boundary or a few long ones after particular kernels."""
    if len(kernels) < 2:
        return "fewer than two kernels"
    pairs: dict[tuple[str, str], list[float]] = {}
    sizes = {"<2 us": [0, 0.0], "2-5 us": [0, 0.0], "5-20 us": [0, 0.0], ">=20 us": [0, 0.0]}
    for prev, name, gap in _gaps(kernels)[2]:
        acc = pairs.setdefault((short_kernel_name(prev), short_kernel_name(name)), [0, 0.0])
        acc[0] += 1
        acc[1] += gap
        bucket = "<2 us" if gap < 2 else "2-5 us" if gap < 5 else "5-20 us" if gap < 20 else ">=20 us"
        sizes[bucket][0] += 1
        sizes[bucket][1] += gap
    lines = [f"### idle between kernels: {len(kernels)} kernels"]
    lines += [f"gaps {k:8s} {n:6d} gaps {t / 1e3:8.3f} ms" for k, (n, t) in sizes.items()]
    ranked = sorted(pairs.items(), key=lambda kv: -kv[1][1])[:top]
    lines += [f"{t / 1e3:8.3f} ms in {n:5d} gaps  {a} -> {b}" for (a, b), (n, t) in ranked]
    return "\n".join(lines)


def gpu_idle(spans: list[tuple[float, float]], n_steps: int) -> str:
    """From the first kernel's start to the last kernel's end (us intervals): how much of it no kernel
    ran. A step graph's kernels run back to back; idle time there is what the summed kernel times miss."""
    if not spans:
        return "no GPU activity"
    first, last, idle = _extent_and_idle(spans)
    return (f"{'GPU span, first to last kernel':32s} {(last - first) / 1e3 / n_steps:8.2f} ms/step, "
            f"idle in it {idle / 1e3 / n_steps:.2f} ms/step")


def _extent_and_idle(spans: list[tuple[float, float]]) -> tuple[float, float, float]:
    """(first start, last end, time between them that no interval covers)."""
    first, last, gaps = _gaps([("", start, end) for start, end in spans])
    return first, last, sum(gap for _, _, gap in gaps)


def step_timeline(step_start: float, step_end: float, spans: list[tuple[float, float]]) -> str:
    """One profiled step's wall time split (us timestamps of one clock): host time before its first
    kernel, the GPU span with the idle time inside it, and the rest up to the step's synchronized end.
    A replayed step graph whose wall time exceeds its summed kernels shows here where the excess sits."""
    if not spans:
        return "no GPU activity"
    first, last, idle = _extent_and_idle(spans)
    span = last - first
    return (f"step wall {(step_end - step_start) / 1e3:.2f} ms"
            f" = host before the first kernel {(first - step_start) / 1e3:.2f}"
            f" + GPU span {span / 1e3:.2f} (kernels {(span - idle) / 1e3:.2f}, idle {idle / 1e3:.2f})"
            f" + after the last kernel {(step_end - last) / 1e3:.2f}")


def step_windows(at: list[int], window: int) -> list[int]:
    """The first steps of the profiled windows, ascending: each window (`window` steps from a listed
    step) must end before the next begins, since the steps of one generation only go forward."""
    if window < 1:
        raise ValueError(f"--window must be >= 1, got {window}")
    starts = sorted(set(at))
    for a, b in zip(starts, starts[1:]):
        if a + window > b:
            raise ValueError(f"the window of {window} steps from step {a} overlaps step {b}")
    return starts


def profile_steps(compiled, name, kw, label, at, warm_gens=2, pin=None, window=1):
    """Steps 0..max(at) `warm_gens` times (compiles, tunes, records: a step signature that occurs
    once per generation records its CUDA graph in the second), then once more with each step in
    `at` profiled alone, or with `window` > 1 the steps at..at+window-1 back to back under one
    synchronize, as a generation runs them (the host may then run ahead of the GPU, so only what
    stalls it shows as idle). Prints whether a graph replayed (counter `graph_replays`)."""
    from torch._dynamo.utils import counters

    for _ in range(warm_gens):
        steps(compiled, name, kw, at[-1] + window, pin=pin)
    torch.cuda.synchronize()
    done = 0
    for s in at:
        steps(compiled, name, kw, s - done, start=done, pin=pin)  # a new generation starts when the timestep goes back up
        torch.cuda.synchronize()
        replays = counters["chipmunk"]["graph_replays"]
        t0 = time.perf_counter()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            with torch.profiler.record_function("profiled_step"):
                steps(compiled, name, kw, window, start=s, pin=pin)
                torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) * 1e3
        n_replays = counters["chipmunk"]["graph_replays"] - replays
        # step-graph replays: one per model call, or one per block under regional compilation
        replayed = f"; {n_replays} step-graph replays in {window} model calls" if label == "chipmunk" else ""
        what = f"step {s}" if window == 1 else f"steps {s}..{s + window - 1} back to back"
        print(f"## {label}, {what}: {wall:.1f} ms wall (under the profiler{replayed})")
        print(kernel_split(prof, n_steps=window))
        syncs = [e for e in gpu_kernels(prof) if "DtoH" in e.name]
        print(f"device-to-host copies (the host waits for each): {len(syncs)} in {window} step(s)")
        mark = next(e for e in prof.events() if e.name == "profiled_step")
        print(step_timeline(mark.time_range.start, mark.time_range.end, cuda_spans(prof)))
        print(idle_by_neighbours([(e.name, e.time_range.start, e.time_range.end) for e in gpu_kernels(prof)]))
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=60))
        done = s + window


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="flux")
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--rows", type=int, default=22)
    ap.add_argument("--no-baseline", action="store_true", help="profile chipmunk only (not the Inductor baseline)")
    ap.add_argument("--at", type=int, nargs="*", default=None, help="profile these steps one by one (see above)")
    ap.add_argument("--config", default=None, help="chipmunk preset (default: the model's, as bench_e2e.py)")
    ap.add_argument("--warm-gens", type=int, default=2,
                    help="with --at: generations of steps 0..max(at) before the profiled one (2: once-per-generation "
                         "steps replay their recorded graph)")
    ap.add_argument("--preset-as-is", action="store_true",
                    help="keep the preset's dense first layers (as bench_e2e.py) instead of making every layer sparse")
    ap.add_argument("--pin", action="store_true",
                    help="with --at: pin chipmunk's steps with set_step, as bench_e2e.py (no timestep read per call)")
    ap.add_argument("--window", type=int, default=1,
                    help="with --at: profile this many steps from each listed one back to back, one synchronize "
                         "at the end (as a generation runs; the times are per step)")
    ap.add_argument("--text-mask", choices=("ones", "none"), default=None,
                    help="hunyuan-video/mochi: as in bench_e2e.py ('none': attention with attn_mask=None)")
    ap.add_argument("--regional", action="store_true",
                    help="regional compilation for both variants, as bench_e2e.py --regional")
    ap.add_argument("--set", action="append", default=[], metavar="[SECTION.]KEY=VALUE",
                    help="override a preset key, as bench_e2e.py --set (e.g. attn.top_keys=0.05)")
    args = ap.parse_args()
    try:
        args.text_mask = resolve_text_mask(args.model, args.text_mask)
    except ValueError as e:
        ap.error(str(e))
    try:
        starts = step_windows(args.at or [], args.window)
    except ValueError as e:
        ap.error(str(e))
    print(f"# {args.model}, {args.blocks} blocks, preset {args.config or 'of the model'}{' ' + str(args.set) if args.set else ''}, "
          f"{text_mask_text(args.model, args.text_mask)}{'; regional compilation' if args.regional else ''}")
    model = build(args.model, args.blocks)
    kw = apply_text_mask(args.model, model, inputs(args.model, model), args.text_mask)
    preset = args.config or (args.model if args.model in list_presets() else "default")  # as bench_e2e.py
    every_layer = [] if args.preset_as_is else ["attn.first_n_dense_layers=0", "mlp.first_n_dense_layers=0"]
    cfg = with_overrides(preset, [*every_layer, *args.set])
    for label in ("chipmunk",) if args.no_baseline else ("inductor", "chipmunk"):
        torch._dynamo.reset()
        uncompile_blocks(model)
        c = compile_variant(label, model, cfg, args.regional)
        if args.at:
            pin = StepPin(c) if args.pin and label == "chipmunk" else None
            profile_steps(c, args.model, kw, label, starts, args.warm_gens, pin, args.window)
            continue
        steps(c, args.model, kw, 4)  # compile, dense, refresh, first sparse (autotune)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        steps(c, args.model, kw, 3, start=4)
        torch.cuda.synchronize()
        print(f"## {label}: {(time.perf_counter() - t0) / 3 * 1e3:.1f} ms per sparse step (wall, {args.blocks}+{args.blocks} blocks)")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
            steps(c, args.model, kw, 2, start=7)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60))
        print(kernel_split(prof, n_steps=2))
        print(gpu_idle(cuda_spans(prof), n_steps=2))
        if label == "chipmunk":
            print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
