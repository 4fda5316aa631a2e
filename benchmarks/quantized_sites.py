"""What chipmunk does with torchao-quantized linears, on the tiny random-weight FLUX (CPU).

    pip install torchao        # not a dependency of chipmunk_compile
    python benchmarks/quantized_sites.py

int8 weight-only quantization (`Int8WeightOnlyConfig`) of every block linear: the MLP candidates
are reported as rejected (their weights are tensor subclasses the kernels cannot gather rows of),
the attention sites stay sparse, and full-key steps of the compiled model match the quantized
model in eager. Before session 21 the MLPs were rewritten and the subclass raised
NotImplementedError on `chipmunk::mlp` at the first call.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

import chipmunk_compile  # noqa: E402
from helpers import FULL_KEYS, cfg, chip, flux, flux_inputs, max_rel  # noqa: E402


def main():
    warnings.filterwarnings("ignore")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = flux()
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and "blocks" in fqn)
    print(chipmunk_compile.inspect(model, **flux_inputs(1.0), config=cfg()))
    torch._dynamo.reset()
    compiled = chip(model, cfg(attn=dict(FULL_KEYS), mlp=dict(FULL_KEYS)), fullgraph=False)
    with torch.no_grad():
        errs = [max_rel(compiled(**flux_inputs(t))[0], model(**flux_inputs(t))[0]) for t in (1.0, 0.8, 0.6)]
    print("full-key relative error per step:", " ".join(f"{e:.1e}" for e in errs))
    print("steps per site kind:", {k: v for k, v in torch._dynamo.utils.counters["chipmunk"].items()
                                   if k.startswith(("attention_", "mlp_"))})


if __name__ == "__main__":
    main()
