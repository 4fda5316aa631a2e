"""Host time of a replayed step graph, on the CPU: what a call costs before its CUDA graph would start.

    python benchmarks/profile_host_cpu.py                      # FLUX.1's depth: 19 double + 38 single blocks
    python benchmarks/profile_host_cpu.py --double 2 --single 4 --calls 10

A tiny FluxTransformer2DModel (random weights, FLUX.1's block counts by default, so the same number of
sites and parameters the graph runner walks) is compiled with backend="chipmunk" and an eager inner
compiler, its step graphs emulated on the CPU (`graphs.EMULATE`). After three generations of
`--steps` steps (compiled, recorded), the emulated replay is stubbed out (a real graph launch costs the
host a constant, and the emulation would re-run every op), so a call's time is the host path alone:
Dynamo's guards, the model's own wrappers, the step tracker, the graph runner's site signatures,
parameter-address check and input copies. Pinned with `set_step`, as `bench_e2e.py` pins its steps.

Prints the call's median, the runner's pieces timed alone, and the site and parameter counts. A step
timed alone on the GPU (bench_e2e.py's per-step medians) starts its graph only after this host path,
where back-to-back generations hide it behind the previous step. Needs diffusers; no GPU."""

from __future__ import annotations

import argparse
import statistics
import time
import timeit

import torch

from torch._dynamo.utils import counters

import chipmunk_compile as cc
from chipmunk_compile import graphs
from profile_host import marked
from zoo_common import _build, _flux_inputs, _r


def build(double: int, single: int) -> torch.nn.Module:
    return _build("FluxTransformer2DModel", patch_size=1, in_channels=4, num_layers=double, num_single_layers=single,
                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                  axes_dims_rope=(4, 4, 8))


def inputs(t: float, side: int = 16) -> dict:
    return {**_flux_inputs(side, side, pooled_projections=_r(1, 32, seed=3)), "timestep": torch.full((1,), t)}


def measure(double: int = 19, single: int = 38, steps: int = 24, calls: int = 20, config="flux-fast") -> dict:
    """ms per call of the host path at step `steps - 1` (median of `calls`), and the runner's pieces."""
    cfg = {"preset": config, "attn": {"min_tokens": 0}, "mlp": {"min_tokens": 0}} if isinstance(config, str) else config
    saved = graphs.EMULATE, graphs._EmulatedGraph.replay
    graphs.EMULATE = True
    try:
        torch._dynamo.reset()
        model = torch.compile(build(double, single), backend="chipmunk", options={"config": cfg, "compiler": "eager"})
        ins = [inputs(1 - s / 50) for s in range(steps)]
        seen: dict = {}  # profile_host's marks: the graph runner and its last call's arguments

        def call(s):
            cc.set_step(model, s, branch="0")
            with torch.no_grad():
                return model(**ins[s])

        with marked(seen):  # compile, record, replay
            for _ in range(3):
                for s in range(steps):
                    call(s)
        replays = counters["chipmunk"]["graph_replays"]  # before the stub: real (emulated) replays
        graphs._EmulatedGraph.replay = lambda self: None  # the host path alone from here on
        last, times = steps - 1, []
        for _ in range(calls):
            for s in range(last):
                call(s)
            t0 = time.perf_counter()
            call(last)
            times.append(1e3 * (time.perf_counter() - t0))
        runner, args = seen["_runner"], seen["_args"]
        key = runner._signature(args)
        rec = runner.graphs.get(key)
        if rec is None:
            raise RuntimeError(f"step {last} did not replay a recorded graph: nothing to time")
        per = lambda fn, n=200: timeit.timeit(fn, number=n) / n * 1e3  # noqa: E731
        return dict(call_ms=statistics.median(times), call_min_ms=min(times),
                    signature_ms=per(lambda: runner._signature(args)),
                    address_check_ms=per(lambda: rec.static_inputs_in_place(args)),
                    sites=len(runner.sites), parameters=len(rec.static_idx), inputs=len(args), replays=replays)
    finally:
        graphs.EMULATE, graphs._EmulatedGraph.replay = saved
        torch._dynamo.reset()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--double", type=int, default=19)
    ap.add_argument("--single", type=int, default=38)
    ap.add_argument("--steps", type=int, default=24, help="steps per generation; the last is timed")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--config", default="flux-fast")
    a = ap.parse_args()
    torch.set_num_threads(1)
    r = measure(a.double, a.single, a.steps, a.calls, a.config)
    print(f"# tiny FLUX {a.double} double + {a.single} single blocks, preset {a.config}, torch {torch.__version__}, CPU, "
          f"replay stubbed: {r['sites']} sites, {r['parameters']} parameters of {r['inputs']} graph inputs, "
          f"{r['replays']} emulated replays before the stub")
    print(f"host path of a pinned call at step {a.steps - 1}: median {r['call_ms']:.3f} ms, min {r['call_min_ms']:.3f} ms")
    print(f"  graph runner's signature (every site's decision): {r['signature_ms']:.3f} ms")
    print(f"  graph runner's parameter-address check:           {r['address_check_ms']:.3f} ms")


if __name__ == "__main__":
    main()
