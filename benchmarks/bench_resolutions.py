"""Whole generations that alternate between resolutions, as a server taking requests of several
sizes runs them: Inductor + cuDNN SDPA against chipmunk, one process, same inputs.

After the second resolution Dynamo serves every size from one graph with symbolic shapes, so each
switch meets the other size's caches. With `state_shapes` >= 2 (the default) every site keeps both
sizes' caches and recorded step graphs; `--variants ... chipmunk-shapes1` also times the old
behaviour (one shape kept: every switch allocates the caches again and runs each step signature
eagerly once, then records it again).

Each generation is one timed span (CUDA events, one synchronize at its end) of a diffusers
FlowMatchEulerDiscreteScheduler loop, chipmunk following the scheduler (`follow_scheduler`). Warm-up
rounds (one generation per size) run until a round records no step graph and runs no call eagerly
(at most `--warmup` rounds); then `--rounds` rounds are timed. Prints a table per variant and a
JSON row (appended to benchmarks/results/resolutions.jsonl).

    python benchmarks/bench_resolutions.py --blocks 4 --sizes 768x1280,1024x1024 --steps 28
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import chipmunk_compile as cc  # noqa: E402
from bench_e2e import (BASELINE, CHIPMUNK, build, depth_text, free_gpu, inputs, run_generation,  # noqa: E402
                       sdpa_context, time_step, timestep_inputs)

SHAPES1 = "chipmunk-shapes1"  # chipmunk keeping one shape's caches per site (state_shapes: 1)
VARIANTS = (BASELINE, CHIPMUNK, SHAPES1)
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "resolutions.jsonl")


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'768x1280,1024x1024' -> [(768, 1280), (1024, 1024)]: (height, width) in pixels, multiples of 16."""
    sizes = []
    for item in text.split(","):
        h, sep, w = item.strip().lower().partition("x")
        if not (sep and h.isdigit() and w.isdigit()) or int(h) % 16 or int(w) % 16:
            raise SystemExit(f"--sizes {item!r}: expected HEIGHTxWIDTH in pixels, multiples of 16")
        sizes.append((int(h), int(w)))
    if len(sizes) < 2:
        raise SystemExit("--sizes: give at least two resolutions to alternate between")
    return sizes


def config_of(variant: str, preset: str):
    if variant == BASELINE:
        return None
    return preset if variant == CHIPMUNK else {"preset": preset, "state_shapes": 1}


def graph_work() -> int:
    from torch._dynamo.utils import counters

    c = counters["chipmunk"]
    return c["graph_recorded"] + c["graph_eager_calls"]


def run_variant(variant: str, model, sizes, steps: int, rounds: int, warmup: int, preset: str) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler
    from torch._dynamo.utils import counters

    free_gpu()
    config = config_of(variant, preset)
    compiled = torch.compile(model, **({} if config is None else dict(backend="chipmunk", options={"config": config})))
    kws = {}
    for size in sizes:
        base = inputs("flux", model, size=size)
        kws[size] = [dict(base, **timestep_inputs("flux", base, s, steps), return_dict=False) for s in range(steps)]
    sched = FlowMatchEulerDiscreteScheduler()

    def generation(size):
        run_generation(compiled, kws[size], scheduler=sched)

    before = dict(counters["chipmunk"])
    res: dict = {"warmup_rounds": 0, "generation_ms": {f"{h}x{w}": [] for h, w in sizes}}
    with sdpa_context(variant), torch.no_grad():
        t0 = time.perf_counter()
        generation(sizes[0])
        if config is not None:
            cc.follow_scheduler(compiled, sched)  # the session exists after the first call
        for size in sizes[1:]:
            generation(size)
        torch.cuda.synchronize()
        res["first_round_s"] = time.perf_counter() - t0  # compiles, tuning, first recordings
        for _ in range(warmup):
            mark = graph_work()
            for size in sizes:
                generation(size)
            res["warmup_rounds"] += 1
            if graph_work() == mark:
                break
        torch.cuda.reset_peak_memory_stats()
        mark = graph_work()
        for _ in range(rounds):
            for h, w in sizes:
                res["generation_ms"][f"{h}x{w}"].append(time_step(lambda: generation((h, w))))
        res["timed_graph_work"] = graph_work() - mark  # step graphs recorded or calls run eagerly while timed
    res["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    res["median_ms"] = {k: statistics.median(v) for k, v in res["generation_ms"].items()}
    if config is not None:
        now = counters["chipmunk"]
        res["counters"] = {k: now[k] - before.get(k, 0) for k in ("realloc", "state_shape_reused", "state_shape_evicted",
                                                                  "state_followed_module", "graph_recorded", "graph_replays", "graph_eager_calls")}
        st = cc.stats(compiled)
        res["state_gib"], res["idle_state_gib"] = st["state_bytes"] / 2**30, st["idle_state_bytes"] / 2**30
        cc.follow_scheduler(compiled, None)
        cc.release(compiled)
    del compiled
    return res


def print_variant(variant: str, res: dict) -> None:
    med = res["median_ms"]
    print(f"## {variant}: first round {res['first_round_s']:.1f} s, warm-up rounds {res['warmup_rounds']}, "
          f"peak {res['peak_gb']:.1f} GiB, step graphs recorded / calls eager while timed: {res['timed_graph_work']}")
    for size, times in res["generation_ms"].items():
        print(f"  {size}: median {med[size]:.0f} ms per generation  ({', '.join(f'{t:.0f}' for t in times)})")
    if "counters" in res:
        print(f"  counters over the run: {res['counters']}; state {res['state_gib']:.2f} GiB "
              f"(of it kept for the other size now: {res['idle_state_gib']:.2f})")
    sys.stdout.flush()


def gpu_name() -> str:
    if not torch.cuda.is_available():
        raise SystemExit("bench_resolutions.py times CUDA generations: no GPU here")
    return torch.cuda.get_device_name()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=None, help="FLUX units: n double + 2n single blocks (default: 19 + 38)")
    ap.add_argument("--sizes", default="768x1280,1024x1024", help="HEIGHTxWIDTH,... in pixels, alternated")
    ap.add_argument("--steps", type=int, default=28, help="steps per generation (FluxPipeline's default: 28)")
    ap.add_argument("--rounds", type=int, default=2, help="timed rounds (one generation per size each)")
    ap.add_argument("--warmup", type=int, default=3, help="at most this many untimed rounds after the first")
    ap.add_argument("--config", default="default", help="chipmunk preset")
    ap.add_argument("--variants", default=",".join(VARIANTS[:2]), help=f"comma-separated, of {', '.join(VARIANTS)}")
    args = ap.parse_args()
    sizes = parse_sizes(args.sizes)
    variants = args.variants.split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"--variants: unknown {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    gpu = gpu_name()
    model = build("flux", args.blocks)
    print(f"# FLUX.1-dev, {depth_text('flux', args.blocks)}, random weights, bf16, {gpu}, "
          f"torch {torch.__version__}; sizes {args.sizes} alternated, {args.steps} steps, preset {args.config}")
    results = {}
    for v in variants:
        results[v] = run_variant(v, model, sizes, args.steps, args.rounds, args.warmup, args.config)
        print_variant(v, results[v])
    if BASELINE in results:
        base = results[BASELINE]["median_ms"]
        for v in variants:
            if v != BASELINE:
                sp = {k: base[k] / results[v]["median_ms"][k] for k in base}
                results[v]["speedup"] = sp
                print(f"{v} against {BASELINE}: " + ", ".join(f"{k} {x:.3f}x" for k, x in sp.items()))
    row = dict(model="flux", gpu=gpu, torch=torch.__version__, blocks=args.blocks, sizes=args.sizes, steps=args.steps,
               preset=args.config, results=results)
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
