"""Does chipmunk make a model recompile? Every arch-zoo model, 7 calls as `arch_zoo.py` makes them
(latent drifting, timestep going down), under backend="eager" and under backend="chipmunk" (inner
compiler eager): the count of unique graphs Dynamo compiled after each call. Equal lists = chipmunk
adds no graph and no recompile to what Dynamo itself does with the model.

    python benchmarks/zoo_recompiles.py [NAME ...]     # CPU, ~15 min for all; writes zoo_recompiles.csv
"""

from __future__ import annotations

import os
import sys

import torch
from torch._dynamo.utils import counters

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from arch_zoo import CALLS, MODELS, RESULTS, SPARSE, _map, _step_inputs  # noqa: E402
from csv_rows import write_rows  # noqa: E402


def graphs_per_call(key: str, backend: str) -> list[int]:
    torch._dynamo.reset()
    counters.clear()
    case = MODELS[key][1]()
    with torch._dynamo.config.patch(**case.patches):
        opts = {"options": {"config": SPARSE, "compiler": "eager"}} if backend == "chipmunk" else {}
        compiled = torch.compile(case.model, backend=backend, **opts)
        base = case.kwargs[case.latent]
        drift = _map(base, lambda t: torch.randn(t.shape, generator=torch.Generator().manual_seed(7)))
        out = []
        with torch.no_grad():
            for step in range(CALLS):
                compiled(**_step_inputs(case, drift, step))
                out.append(counters["stats"]["unique_graphs"])
    return out


def main():
    keys = sys.argv[1:] or list(MODELS)
    rows = []
    for key in keys:
        row = dict(model=MODELS[key][0], eager="", chipmunk="", same="", error="")
        try:
            e, c = graphs_per_call(key, "eager"), graphs_per_call(key, "chipmunk")
            row.update(eager=" ".join(map(str, e)), chipmunk=" ".join(map(str, c)), same=e == c)
        except Exception as ex:  # one model's failure never stops the sweep
            row["error"] = f"{type(ex).__name__}: {ex}"[:200]
        rows.append(row)
        print(f"{row['model']:<52} eager [{row['eager']}]  chipmunk [{row['chipmunk']}]"
              f"{'' if row['same'] is True else '  <-- ' + (row['error'] or 'DIFFERENT')}", flush=True)
    path = write_rows(os.path.join(RESULTS, "zoo_recompiles.csv"), rows)
    print(f"{sum(r['same'] is True for r in rows)} of {len(rows)} models: the same graphs; wrote {path}")


if __name__ == "__main__":
    main()
