"""Step tracking across the arch zoo, as a pipeline's loop drives a model: the timestep read from
the model's inputs (step_signal "auto", not the zoo's counted calls), two generations of 4 steps,
two guidance calls per step with the same inputs.

    python benchmarks/zoo_step_tracking.py                   # every zoo model (CPU, ~4 min)
    python benchmarks/zoo_step_tracking.py hidream glm_image # a few

Per model: the (generation, step, branch) every site's session ends at, which must be (1, 3, "1"),
the calls counted with no step signal (`step_signal_none`) and the fallbacks for constant signals.
A model whose calls are all steps of their own ends at (0, 15): its guidance calls are steps and
no generation ever ends. Writes benchmarks/results/zoo_step_tracking.csv.
"""

from __future__ import annotations

import copy
import csv
import os
import sys

import torch
from torch._dynamo.utils import counters

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import arch_zoo  # noqa: E402
from chipmunk_compile.runtime import sessions_of  # noqa: E402

GENERATIONS, STEPS = 2, 4
RESULT = os.path.join(arch_zoo.RESULTS, "zoo_step_tracking.csv")


def track(key: str) -> dict:
    """One model's row: where its sites' sessions end and what was counted."""
    cls_name, make = arch_zoo.MODELS[key]
    row = {"model": key, "class": cls_name, "status": "error", "positions": "", "step_signal_none": "",
           "step_signal_constant": ""}
    counters.clear()
    torch._dynamo.reset()
    config = copy.deepcopy(arch_zoo.SPARSE)
    config.pop("step_signal")
    try:
        case = make()
        with torch._dynamo.config.patch(**case.patches):
            compiled = torch.compile(case.model, backend="chipmunk", options={"config": config, "compiler": "eager"})
            drift = arch_zoo._map(case.kwargs[case.latent],
                                  lambda t: torch.randn(t.shape, generator=torch.Generator().manual_seed(7)))
            with torch.no_grad():
                for _ in range(GENERATIONS):
                    for step in range(STEPS):
                        kw = arch_zoo._step_inputs(case, drift, step)
                        compiled(**kw)
                        compiled(**kw)
        positions = sorted({(p.generation, p.step, p.branch) for p in
                            (s.position() for s in sessions_of(case.model) if s.sites)})
        c = counters["chipmunk"]
        none, const = c.get("step_signal_none", 0), c.get("fallback:step_signal_constant", 0)
        good = bool(positions) and all(p == (GENERATIONS - 1, STEPS - 1, "1") for p in positions) and not const
        row.update(status="ok" if good else "wrong", positions=" ".join(f"{g}/{s}/{b}" for g, s, b in positions),
                   step_signal_none=none, step_signal_constant=const)
    except Exception as e:  # one model's failure never stops the scan
        row["positions"] = " ".join(f"{type(e).__name__}: {e}".split())[:160]
    return row


def main() -> None:
    keys = sys.argv[1:] or list(arch_zoo.MODELS)
    rows = []
    for key in keys:
        row = track(key)
        rows.append(row)
        print(f"{row['status']:5s} {key:28s} {row['positions']:24s} none={row['step_signal_none']} "
              f"constant={row['step_signal_constant']}", flush=True)
    if not sys.argv[1:]:
        with open(RESULT, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {RESULT}")
    print(f"{sum(r['status'] != 'ok' for r in rows)} of {len(rows)} not ok")


if __name__ == "__main__":
    main()
