"""Models of one class built, compiled, run and freed one after another in one process (a notebook,
a server that reloads weights): does each run the first one's schedule, and does memory stay flat?

    python benchmarks/freed_models.py                      # GPU: Inductor, bf16, step graphs on
    python benchmarks/freed_models.py --compiler eager     # CPU: fp32, the ops' PyTorch references

Dynamo serves every new model with the graph it compiled for the first, and that graph tells models
apart by `id()` and a weight's address, both reused once freed (session 52's fix: ops/sites.py
`GraphInstances`). Each model gets the same weights and inputs, so every model's outputs must equal
the first model's bit for bit. Prints per model: the step its generations reached, the largest
difference from model 0's outputs, the step graphs held, replays and `instances_freed` so far,
kernel fallbacks, and the memory allocated after it ran (CUDA) or the bytes of its caches (CPU).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

import torch
from torch._dynamo.utils import counters

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import chipmunk_compile  # noqa: E402
from chipmunk_compile import graphs  # noqa: E402
from test_two_models_one_graph import TimedBlocks  # noqa: E402

CONFIG = {"schedule_steps": None,  # the periods as written (3): sparse steps within 12 steps
          "attn": {"min_tokens": 0, "first_n_dense_layers": 1, "top_keys": 0.3, "full_step_every": 3},
          "mlp": {"min_tokens": 0, "first_n_dense_layers": 1, "full_step_every": 3}}


def timed_blocks() -> torch.nn.Module:
    """Three pre-norm blocks (head dim 64: the Triton kernels' size) after a timestep embedding."""
    return TimedBlocks(width=128, heads=2, mult=4, blocks=3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=int, default=5)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--compiler", choices=["inductor", "eager"], default=None,
                    help="inner compiler (default: inductor on a GPU, eager on the CPU)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    dev, dt = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    options = {"config": CONFIG, "compiler": args.compiler or ("inductor" if cuda else "eager")}
    torch.manual_seed(0)
    state = timed_blocks().to(dev, dt).eval().state_dict()
    x, drift = (torch.randn(2, 1000, 128, device=dev, dtype=dt) for _ in range(2))
    first = None
    print(f"# {torch.cuda.get_device_name() if cuda else 'CPU'}, torch {torch.__version__}, {options['compiler']}, "
          f"{args.models} models x 3 generations x {args.steps} steps")
    for n in range(args.models):
        model = timed_blocks().to(dev, dt).eval()
        model.load_state_dict(state)
        compiled = torch.compile(model, backend="chipmunk", options=options)
        with torch.no_grad():
            for _ in range(3):  # the third generation replays step graphs (GPU)
                chipmunk_compile.reset(compiled)
                outs = [compiled(x + 0.05 * i * drift, torch.full((2,), 1.0 - i / args.steps, device=dev, dtype=dt))
                        .float() for i in range(args.steps)]
        first = first or outs
        diff = max((a - b).abs().max().item() for a, b in zip(outs, first))
        (session,) = chipmunk_compile.sessions_of(compiled)
        held = sum(len(r.graphs) for r in list(graphs._RUNNERS) if r.session is session)
        c = counters["chipmunk"]
        memory = (f"allocated {torch.cuda.memory_allocated() / 2**20:.1f} MiB" if cuda else
                  f"cache bytes {sum(st.nbytes for s in session.sites for st in s.states.values())}")
        print(f"model {n}: step {session.position().step}, max|out - model 0's| {diff:.3g}, step graphs {held}, "
              f"replays {c['graph_replays']}, freed {c['instances_freed']}, kernel fallbacks "
              f"{sum(v for k, v in c.items() if k.startswith('kernel_fallback'))}, {memory}", flush=True)
        del model, compiled, session, outs
        gc.collect()


if __name__ == "__main__":
    main()
