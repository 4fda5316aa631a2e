"""Token grouping at new resolutions, zoo-wide: each arch-zoo model whose latent is a channels-first
(B, C, H, W) or (B, C, T, H, W) tensor runs at its zoo size, then at a shorter height, then at a
narrower width (Dynamo's automatic dynamic shapes: the second size recompiles with symbolic sizes,
the third may again). Two calls per size through backend="chipmunk" (inner compiler eager).

Per size it records how many of the calls' sites ran ungrouped (`grouping_ungrouped_count`, counted
once per site and token count), how many sites of the graphs compiled for it have no grid at all
(`no_grid`, of the sites compiled; "-": no graph compiled), and whether the outputs stayed finite. A model whose other inputs
are tied to the latent's size (position ids, rotary tables, token counts) may fail at another size;
that is recorded as its status, not hidden (and whether the uncompiled model fails there too). `grids` lists the grid sources of the sites of the last
graph compiled for a new size.

    python benchmarks/zoo_resolutions.py [NAME ...]     # CPU, ~7 min for all; writes zoo_resolutions.csv
"""

from __future__ import annotations

import os
import sys
import time

import torch
from torch._dynamo.utils import counters

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import chipmunk_compile  # noqa: E402

from arch_zoo import MODELS, RESULTS, SPARSE, _first_tensor, _short  # noqa: E402
from csv_rows import write_rows  # noqa: E402


def _smaller(n: int) -> int:
    """About three quarters of a side, a multiple of 4 (patch sizes 1, 2 and 4 divide it) and at least
    4 shorter."""
    return max(4, min(n - 4, (3 * n // 4) // 4 * 4))


def sizes_of(latent: torch.Tensor) -> list[tuple]:
    h, w = latent.shape[-2:]
    return [(h, w), (_smaller(h), w), (h, _smaller(w))]


def measure(key: str) -> dict:
    cls_name, make = MODELS[key]
    row = {"model": cls_name, "key": key, "status": "", "sizes": "", "ungrouped": "", "no_grid": "", "grids": "", "seconds": ""}
    t0 = time.perf_counter()
    torch._dynamo.reset()
    case = make()
    latent = case.kwargs.get(case.latent)
    if not isinstance(latent, torch.Tensor) or latent.dim() not in (4, 5) or min(latent.shape[-2:]) < 8:
        row["status"] = "skipped: latent not a channels-first image or video tensor"
        return row
    sizes = sizes_of(latent)
    row["sizes"] = " ".join("×".join(map(str, s)) for s in sizes)
    ungrouped, no_grid = [], []
    try:
        with torch._dynamo.config.patch(**case.patches):
            compiled = torch.compile(case.model, backend="chipmunk", options={"config": SPARSE, "compiler": "eager"})
            t = case.kwargs[case.timestep]
            for size in sizes:
                counters["chipmunk"].clear()
                before = sum(len(s.sites) for s in chipmunk_compile.runtime.sessions_of(compiled))
                x = torch.randn(*latent.shape[:-2], *size, generator=torch.Generator().manual_seed(3))
                with torch.no_grad():
                    for step in range(2):
                        kw = dict(case.kwargs, **{case.latent: x + 0.02 * step})
                        kw[case.timestep] = (t.double() * (1 - 0.05 * step)).to(t.dtype)
                        out = _first_tensor(compiled(**kw))
                        if not torch.isfinite(out).all():
                            raise RuntimeError(f"non-finite output at {size}")
                ungrouped.append(counters["chipmunk"]["grouping_ungrouped_count"])
                new = [s for ses in chipmunk_compile.runtime.sessions_of(compiled) for s in ses.sites][before:]
                no_grid.append(f"{sum(s.grouping.startswith('none') for s in new)}/{len(new)}" if new else "-")
                if new and size != sizes[0]:  # the grid sources of the last recompile's sites
                    row["grids"] = "; ".join(dict.fromkeys(_short(s.grouping, 72) for s in new))
        row["status"] = "ok"
    except Exception as e:  # one model's failure never stops the sweep
        size = sizes[len(ungrouped)]
        row["status"] = f"error at {'×'.join(map(str, size))}: " + _short(" ".join(f"{type(e).__name__}: {e}".split()), 120)
        try:  # the model itself, uncompiled, at that size
            with torch.no_grad():
                case.model(**dict(case.kwargs, **{case.latent: torch.randn(*latent.shape[:-2], *size)}))
        except Exception:  # noqa: BLE001 — its other inputs are tied to the zoo size
            row["status"] = f"eager fails at {'×'.join(map(str, size))} too (other inputs tied to the zoo size)"
    row["ungrouped"], row["no_grid"] = " ".join(map(str, ungrouped)), " ".join(no_grid)
    row["seconds"] = f"{time.perf_counter() - t0:.1f}"
    return row


def main():
    keys = sys.argv[1:] or list(MODELS)
    rows = []
    for key in keys:
        rows.append(measure(key))
        print(" | ".join(str(v) for v in rows[-1].values()), flush=True)
    ok = [r for r in rows if r["status"] == "ok"]
    clean = [r for r in ok if all(u == "0" for u in r["ungrouped"].split())]
    print(f"{len(ok)} of {len(rows)} models ran at all three sizes; {len(clean)} of them with no site ungrouped")
    if len(keys) == len(MODELS):
        write_rows(os.path.join(RESULTS, "zoo_resolutions.csv"), rows)


if __name__ == "__main__":
    main()
