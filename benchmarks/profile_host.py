"""Host time of a replayed step under backend="chipmunk": what runs on the CPU before the GPU starts
the step's CUDA graph.

    python benchmarks/profile_host.py --model flux --blocks 19 --config default --at 11 13
    python benchmarks/profile_host.py --model flux --blocks 19 --config default --cprofile host.prof.txt

A recorded step graph replays with no Python op code, but the call around it still runs on the host:
`set_step` (bench_e2e.py pins every step with it), Dynamo's guards and the model's own wrappers, the
step tracker, the graph runner's signature, parameter-address check and input copies, and the graph
launch itself. bench_e2e.py synchronizes after every step, so all of it adds to the step's time. A
pipeline that does not synchronize hides it behind the previous step, except after a host read:
automatic step tracking reads the timestep, which waits for the GPU, and what runs after the read
(tracker, runner, launch) is then GPU idle time.

Runs steps 0..max(at) for three generations (compiles, tunes, records the step graphs), then for each
step in --at one more generation up to it, synchronized, and prints the marks of the step's call in
ms from its start, pinned as bench_e2e.py pins it. Then the runner's pieces, each timed alone.
Needs a GPU (CUDA graphs)."""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import pstats
import time
import timeit

import torch

import chipmunk_compile as cc
from chipmunk_compile import graphs, runtime
from bench_e2e import StepPin, build, inputs, sdpa_context, timestep

MARKS = ("begin_call", "runner", "launch", "launched")


@contextlib.contextmanager
def marked(marks: dict):
    """Patches the runtime so that a call writes perf_counter marks into `marks` (first one wins):
    the step tracker's begin_call, the graph runner's entry, the graph launch and its return."""
    pc = time.perf_counter
    begin, call, replay = runtime.Session.begin_call, graphs.GraphRunner.__call__, graphs._CudaGraph.replay

    # the patched methods pass through whatever the runtime passes (begin_call grew keywords since)
    def begin_call(self, *args, **kwargs):
        marks.setdefault("begin_call", pc())
        return begin(self, *args, **kwargs)

    def runner_call(self, *args, **kwargs):
        marks.setdefault("runner", pc())
        marks["_runner"], marks["_args"] = self, args
        return call(self, *args, **kwargs)

    def graph_replay(self):
        marks.setdefault("launch", pc())
        replay(self)
        marks.setdefault("launched", pc())

    runtime.Session.begin_call, graphs.GraphRunner.__call__, graphs._CudaGraph.replay = begin_call, runner_call, graph_replay
    try:
        yield marks
    finally:
        runtime.Session.begin_call, graphs.GraphRunner.__call__, graphs._CudaGraph.replay = begin, call, replay


def host_split(step: int, t0: float, t_call: float, t_returned: float, t_synced: float, marks: dict) -> str:
    """One line: set_step's time, then each mark, the call's return and the synchronized end in ms
    from the call's start (a mark the call never reached prints as 'none': e.g. no graph launch on an
    eager call)."""
    def at(t):
        return f"{1e3 * (t - t_call):.2f}" if t is not None else "none"

    parts = ", ".join(f"{name} {at(marks.get(name))}" for name in MARKS)
    return (f"step {step}: set_step {1e3 * (t_call - t0):.2f} ms | from the call's start: {parts},"
            f" returned {at(t_returned)}, GPU done {at(t_synced)} ms")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="flux")
    ap.add_argument("--blocks", default=None, help="reduced depth (as bench_e2e.py); default: published")
    ap.add_argument("--config", default=None, help="chipmunk preset (default: the model's, as bench_e2e.py)")
    ap.add_argument("--at", type=int, nargs="+", default=[11, 13])
    ap.add_argument("--cprofile", default=None, metavar="FILE", help="write a cProfile of 3 calls of the last --at step")
    args = ap.parse_args()
    at = sorted(args.at)
    model = build(args.model, int(args.blocks) if args.blocks else None)
    kw = inputs(args.model, model)
    preset = args.config or args.model
    compiled = torch.compile(model, backend="chipmunk", options={"config": preset})
    pin = StepPin(compiled)
    ts = {s: timestep(args.model, s, 50, "cuda", torch.bfloat16) for s in range(at[-1] + 1)}

    def call(s):
        with torch.no_grad():
            return compiled(**kw, timestep=ts[s], return_dict=False)

    def step(s):
        pin(s, 0)
        return call(s)

    pc = time.perf_counter
    marks: dict = {}
    print(f"# {args.model}, blocks {args.blocks or 'published'}, preset {preset}, {torch.cuda.get_device_name()}")
    with sdpa_context("chipmunk"), marked(marks):
        for _ in range(3):
            for s in range(at[-1] + 1):
                step(s)
        torch.cuda.synchronize()
        for s in at:
            for q in range(s):  # a new generation up to s
                step(q)
            torch.cuda.synchronize()
            marks.clear()
            t0 = pc()
            pin(s, 0)
            t_call = pc()
            call(s)
            t_returned = pc()
            torch.cuda.synchronize()
            print(host_split(s, t0, t_call, t_returned, pc(), marks))
        runner, a = marks.get("_runner"), marks.get("_args")
        if runner is not None:
            per = lambda fn, n=30: timeit.timeit(fn, number=n) / n * 1e3  # noqa: E731
            rec = runner.graphs.get(runner._signature(a))
            print(f"set_step alone            {per(lambda: cc.set_step(compiled, at[-1], branch='0')):.3f} ms")
            print(f"runner signature          {per(lambda: runner._signature(a)):.3f} ms ({len(runner.sites)} sites)")
            if rec is not None:
                print(f"parameter-address check   {per(lambda: rec.static_inputs_in_place(a)):.3f} ms "
                      f"({len(rec.static_idx)} parameters)")
        if args.cprofile:
            prof = cProfile.Profile()
            for _ in range(3):
                torch.cuda.synchronize()
                prof.enable()
                step(at[-1])
                prof.disable()
            with open(args.cprofile, "w") as f:
                stats = pstats.Stats(prof, stream=f)
                stats.sort_stats("cumulative").print_stats(45)
                stats.sort_stats("tottime").print_stats(45)
            print(f"cProfile: {args.cprofile}")


if __name__ == "__main__":
    main()
