"""The architecture zoo under diffusers' context parallelism (Ulysses): what each model's sites get.

    python benchmarks/context_parallel_zoo.py [--world 2] [--rank 1] [names...]

One process, torch's fake process group as rank `--rank` of `--world` (the collectives return
garbage, which is fine: only the compiled sites and their grouping are read). Every zoo model whose
class has a `_cp_plan` gets `enable_parallelism(ContextParallelConfig(ulysses_degree=world))`, is
compiled with backend="chipmunk" (inner compiler "eager") and called once; per model and site kind
the grouping reports are counted. Models whose context-parallel forward fails without chipmunk too
(diffusers' hooks on the tiny configs) are listed as such. Writes
benchmarks/results/context_parallel_zoo.txt.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
CONFIG = {"attn": {"min_tokens": 0, "first_n_dense_layers": 0}, "mlp": {"min_tokens": 0, "first_n_dense_layers": 0},
          "step_signal": "calls"}


def _run(model, case, backend, options=None):
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, options=options) if options else torch.compile(model, backend=backend)
    with torch._dynamo.config.patch(**case.patches), torch.no_grad():
        compiled(**case.kwargs)
    return compiled


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("names", nargs="*")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--rank", type=int, default=1)
    args = ap.parse_args()
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", rank=args.rank, world_size=args.world, store=FakeStore())
    if torch.accelerator.device_count() == 0:
        torch.accelerator.device_count = lambda: 1  # diffusers' mesh setup divides by it
    import chipmunk_compile
    from arch_zoo import MODELS
    from diffusers import ContextParallelConfig

    lines = [f"# Ulysses degree {args.world}, this process rank {args.rank} (fake process group), torch {torch.__version__}"]
    for name, (_, build) in MODELS.items():
        if args.names and name not in args.names:
            continue
        case = build()
        if getattr(type(case.model), "_cp_plan", None) is None:
            continue
        try:
            case.model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=args.world))
            compiled = _run(case.model, case, "chipmunk", {"config": CONFIG, "compiler": "eager"})
        except Exception as e:  # noqa: BLE001 - reported per model
            try:
                _run(case.model, case, "eager")
                lines.append(f"{name}: FAILED with chipmunk only: {type(e).__name__}: {str(e)[:160]}")
            except Exception:  # noqa: BLE001
                lines.append(f"{name}: its context-parallel forward fails without chipmunk too ({type(e).__name__})")
            continue
        kinds = collections.Counter((s["kind"], s["grouping"]) for s in chipmunk_compile.stats(compiled)["sites"])
        for (kind, grouping), n in kinds.items():
            lines.append(f"{name}: {n} × {kind}: {grouping}")
    print("\n".join(lines))
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "context_parallel_zoo.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
