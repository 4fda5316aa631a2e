"""Sparse state in host memory (config `offload_state`) against state on the device, per step.

    python benchmarks/bench_offload.py --model hunyuan-video --blocks 3 --text-mask none
    python benchmarks/bench_offload.py --model hunyuan-video --text-mask none --memory-gib 80 --variants offload

Builds the model as bench_e2e.py does (random weights, bf16, published resolution; `--blocks n` for
a reduced depth, else the published one) and compiles it with its preset, once per variant:
`device` (offload_state: false, caches on the GPU), `offload` (true) and `auto` (the default:
branches go to host memory once the device runs short). Each variant
runs the steps that cover the preset's step kinds twice (CFG calls included): the first pass
compiles and warms up, the second is timed per step with CUDA events.

`--memory-gib G` caps what the process may allocate at G GiB (set_per_process_memory_fraction), to
see what a smaller GPU does: a site whose caches do not fit runs dense from then on (counted
`fallback:state_out_of_memory`, reported here as `sites_out_of_memory`).

Per variant: ms per timed step (with its step kind), peak device memory, state bytes (host memory
for `offload`), the offload counters (hits, misses, prefetches) and the largest relative difference
of each timed step's output against the first variant's. A JSON row per run goes to
benchmarks/results/offload.jsonl (and $OUT when set). Not a timed test: numbers to read.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import chipmunk_compile as cc  # noqa: E402
from bench_e2e import (MODELS, StepPin, apply_text_mask, build, coverage, depth_text, inputs,  # noqa: E402
                       resolve_text_mask, run_pass, step_labels, timestep, with_overrides)
from torch._dynamo.utils import counters  # noqa: E402

VARIANTS = ("device", "offload", "auto")


def variant_config(preset, variant: str):
    """The preset (a name, or bench_e2e's override dict) with offload_state false (`device`), true
    (`offload`) or "auto" (`auto`: the default)."""
    value = {"device": False, "offload": True, "auto": "auto"}[variant]
    return {**(preset if isinstance(preset, dict) else {"preset": preset}), "offload_state": value}


def run_variant(variant, model, preset, step_kwargs, seq, cfg_calls) -> dict:
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()
    counters.clear()
    compiled = torch.compile(model, backend="chipmunk", options={"config": variant_config(preset, variant)})
    pin = StepPin(compiled)
    t0 = time.perf_counter()
    run_pass(compiled, step_kwargs, seq, cfg_calls, pin)  # compile, kernel choices, first fills
    warm_s = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    outs: dict = {}
    times = run_pass(compiled, step_kwargs, seq, cfg_calls, pin, outs)
    c = counters["chipmunk"]
    st = cc.stats(compiled)
    sites = [s for sess in cc.sessions_of(compiled) for s in sess.sites]
    oom = sum(1 for s in sites if s.out_of_memory)
    offloaded = sum(1 for s in sites for st in s.states.values() if st.offloaded)
    res = dict(times_ms={str(s): t for s, t in times.items()}, warmup_s=warm_s,
               peak_gib=torch.cuda.max_memory_allocated() / 2**30, state_gib=st["state_bytes"] / 2**30,
               sites=len(st["sites"]), sites_out_of_memory=oom, offloaded_branches=offloaded,
               counters={k: v for k, v in c.items() if k.startswith(("offload", "fallback", "graph_disabled"))})
    cc.clear_step(compiled)
    return res, outs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="hunyuan-video", choices=sorted(MODELS))
    ap.add_argument("--blocks", type=int, default=None, help="reduced depth (a unit as in bench_e2e.py)")
    ap.add_argument("--frames", type=int, default=None)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--variants", default="device,offload", help="comma list of: " + ", ".join(VARIANTS))
    ap.add_argument("--memory-gib", type=float, default=None, help="cap the process's device memory (GiB)")
    ap.add_argument("--text-mask", choices=("ones", "none"), default=None)
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = ap.parse_args()
    variants = args.variants.split(",")
    if not variants or any(v not in VARIANTS for v in variants):
        ap.error(f"--variants: a comma list of {VARIANTS}")
    text_mask = resolve_text_mask(args.model, args.text_mask)
    spec = MODELS[args.model]
    preset = with_overrides(spec["preset"], args.set)
    seq = coverage(preset, args.steps, reps=1)
    labels = step_labels(preset, args.steps)
    total = torch.cuda.get_device_properties(0).total_memory
    if args.memory_gib is not None:
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_gib * 2**30 / total))
    gpu = torch.cuda.get_device_name()
    print(f"# {args.model} ({depth_text(args.model, args.blocks)}) on {gpu} ({total / 2**30:.0f} GiB"
          f"{f', capped at {args.memory_gib:g} GiB' if args.memory_gib else ''}), torch {torch.__version__}, "
          f"preset {preset}, steps {seq} ({', '.join(labels[s] for s in seq)})", flush=True)
    model = build(args.model, args.blocks)
    kw = apply_text_mask(args.model, model, inputs(args.model, model, frames=args.frames), text_mask)
    cfg_calls = spec.get("cfg_calls", 1)

    def step_kwargs(s):
        return dict(kw, timestep=timestep(args.model, s, args.steps, "cuda", torch.bfloat16), return_dict=False)

    results, first = {}, None
    for variant in variants:
        res, outs = run_variant(variant, model, preset, step_kwargs, seq, cfg_calls)
        if first is None:
            first = outs
        res["max_rel_diff_vs_first"] = max(((outs[s] - first[s]).abs().max() / first[s].abs().max()).item()
                                           for s in seq)
        results[variant] = res
        steps = ", ".join(f"{s} {labels[s]} {res['times_ms'][str(s)]:.1f}" for s in seq)
        print(f"{variant:<8} ms/step: {steps} | peak {res['peak_gib']:.1f} GiB, state {res['state_gib']:.1f} GiB, "
              f"{res['sites']} sites ({res['sites_out_of_memory']} out of memory, {res['offloaded_branches']} branches "
              f"offloaded), warm-up {res['warmup_s']:.0f} s, "
              f"rel diff vs {variants[0]} {res['max_rel_diff_vs_first']:.2e}, {res['counters']}", flush=True)
    row = dict(model=args.model, blocks=args.blocks, gpu=gpu, memory_gib=args.memory_gib, torch=torch.__version__,
               preset=preset, steps=seq, labels=[labels[s] for s in seq], text_mask=text_mask, results=results)
    for d in [os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"), os.environ.get("OUT")]:
        if d:
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, "offload.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
