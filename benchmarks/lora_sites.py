"""MLP sites found with peft LoRA adapters on every linear of the blocks, against the plain model,
on the tiny random-weight diffusers models of the test suite (CPU, seconds per model).

    pip install peft          # not a dependency of chipmunk_compile
    python benchmarks/lora_sites.py

Per model: MLP sites of the plain model, MLP sites with unfused adapters (rank 2, gaussian init,
as `load_lora_weights` leaves them before `fuse_lora`), and the largest relative error of three
full-key steps (every key and neuron recomputed) of the compiled adapted model against it in eager:
the adapters are folded into the weights, so only fp32 rounding separates them.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

import chipmunk_compile  # noqa: E402
import helpers  # noqa: E402
from helpers import FULL_KEYS, cfg, chip, max_rel  # noqa: E402

MODELS = ("flux", "wan", "hunyuan", "sd3", "cogvideox", "mochi")


def main():
    from peft import LoraConfig

    print(f"{'model':<10}{'plain':>7}{'LoRA':>6}{'adapted linears':>17}{'full-key err':>14}")
    for name in MODELS:
        model, inputs = getattr(helpers, name)(), getattr(helpers, name + "_inputs")
        plain = chipmunk_compile.inspect(model, **inputs(500.0), config=cfg()).count("mlp")
        names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "blocks" in n]
        model.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=names, init_lora_weights="gaussian"))
        torch._dynamo.reset()
        adapted = chipmunk_compile.inspect(model, **inputs(500.0), config=cfg()).count("mlp")
        torch._dynamo.reset()
        compiled = chip(model, cfg(attn=dict(FULL_KEYS), mlp=dict(FULL_KEYS)), fullgraph=False)
        with torch.no_grad():
            err = max(max_rel(compiled(**inputs(t))[0], model(**inputs(t))[0]) for t in (900.0, 800.0, 700.0))
        print(f"{name:<10}{plain:>7}{adapted:>6}{len(names):>17}{err:>14.1e}", flush=True)


if __name__ == "__main__":
    main()
