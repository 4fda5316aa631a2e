"""How many queries per group does a refresh need to pick good key columns?

A refresh step ranks key columns per query group by the group's attention mass. The op estimates
that mass from `attn.colsum_queries` = S queries per group, spread evenly over the group, with the
exact lse of the same step (kernel `attn_colsum_sampled`, S/G of a QKᵀ pass). This script measures
what S costs in accuracy, on the trained tiny DiT (examples/tiny_dit, 50 rectified-flow steps, no
guidance) and on a random-weight Flux-like model (benchmarks/grouping_error.py's `flux-medium`).

q/k/v of every matched attention site are captured with chipmunk's own matcher and grouping perm.
Per site, refresh step r and arm, the Chipmunk schedule is replayed with the kernel references:
at r the key columns are picked (top-k per 128-query group), the cache o − attn_S is built, and
steps r+1 .. r+W are sparse (o_cache + attn_S). Error = ‖o_sparse − o_dense‖ / ‖o_dense‖, mean
over the window, sites and refresh steps. Arms:
  S=all     — every query of the group, exact lse (the best ranking this selection rule can make);
  S=<n>     — n sampled queries per group, exact lse (what the op runs);
  S=<n> fp8 — the same with scores from q and k rounded to float8 e4m3 (attn.colsum_fp8);
  stale-lse — every query, normalized with the previous step's lse (last session's one-pass kernel).
`overlap` = |picked ∩ picked(S=all)| / |picked(S=all)|, mean over groups.

    python benchmarks/colsum_sampling.py                 # both models (~2 min on 2 CPU cores)
Writes benchmarks/results/colsum_sampling.{csv,json}.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.grouping_error import _CAPTURE, Capture, make_flux, sigmas  # noqa: E402
from chipmunk_compile.kernels import (attn_colsum_sampled_ref, attn_column_sparse_ref,  # noqa: E402
                                      attn_dense_colsum_ref, select_columns_ref)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
GROUP = 128


def _rel(a, b):
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-30)).item()


def pick(arm, prev, cur, *, scale, perm, top, keep):
    q, k, v = cur
    o, lse, _ = attn_dense_colsum_ref(q, k, v, scale=scale, group=GROUP, perm=perm, want_colsum=False)
    if arm == "stale-lse":
        _, lse_prev, _ = attn_dense_colsum_ref(*prev, scale=scale, group=GROUP, perm=perm, want_colsum=False)
        _, _, cs = attn_dense_colsum_ref(q, k, v, scale=scale, group=GROUP, perm=perm, prev_lse=lse_prev)
    else:
        name, _, fmt = arm.partition(" ")
        S = GROUP if name == "S=all" else int(name[2:])
        cs = attn_colsum_sampled_ref(q, k, lse, scale=scale, group=GROUP, samples=S, perm=perm, qk_fp8=fmt == "fp8")
    idx, cnt = select_columns_ref(cs, k=top, always_keep=keep)
    return o, idx, cnt


def overlap(idx, cnt, ref_idx, ref_cnt) -> float:
    Nk = int(max(idx.max(), ref_idx.max())) + 1
    a = torch.zeros(*idx.shape[:-1], Nk, dtype=torch.bool)
    b = torch.zeros_like(a)
    pos = torch.arange(idx.shape[-1])
    a.scatter_(-1, idx.long(), pos < cnt[..., None])
    b.scatter_(-1, ref_idx.long(), pos < ref_cnt[..., None])
    return ((a & b).sum(-1).float() / b.sum(-1).clamp_min(1)).mean().item()


def replay(seq, site, scale, arms, *, top_keys, refreshes, window):
    q0 = seq[0][0]
    scale = scale if scale is not None else q0.shape[-1] ** -0.5
    top = max(1, round(top_keys * seq[0][1].shape[-2]))
    out = {a: {"err": [], "overlap": []} for a in arms}
    for r in refreshes:
        if r + window >= len(seq):
            continue
        picked = {a: pick(a, seq[r - 1], seq[r], scale=scale, perm=site.perm, top=top, keep=site.always_keep)
                  for a in arms}
        _, ref_idx, ref_cnt = picked["S=all"]
        for a, (o, idx, cnt) in picked.items():
            q, k, v = seq[r]
            cache = attn_column_sparse_ref(q, k, v, idx, cnt, scale=scale, group=GROUP, perm=site.perm, o_base=o,
                                           sign=-1.0)
            for q, k, v in seq[r + 1:r + 1 + window]:
                dense, _, _ = attn_dense_colsum_ref(q, k, v, scale=scale, group=GROUP, want_colsum=False)
                sparse = attn_column_sparse_ref(q, k, v, idx, cnt, scale=scale, group=GROUP, perm=site.perm,
                                                o_base=cache)
                out[a]["err"].append(_rel(sparse, dense))
            out[a]["overlap"].append(overlap(idx, cnt, ref_idx, ref_cnt))
    return out


def capture_tiny(classes, steps):
    from examples.tiny_dit.model import load_pretrained
    from examples.tiny_dit.sampler import sample_classes

    model = load_pretrained(dtype=torch.float32)
    cap = Capture({"attn": {"min_tokens": 64, "first_n_dense_layers": 0}, "mlp": {"enabled": False}})
    torch._dynamo.reset()
    compiled = torch.compile(model.transformer, backend=cap.backend, dynamic=False)
    with torch.no_grad():
        sample_classes(model, classes, transformer=compiled, steps=steps, seed=0)
    return cap, f"trained tiny DiT, classes {classes}, {steps} steps"


def capture_flux(steps):
    gen = torch.Generator().manual_seed(0)
    m, inputs, desc = make_flux(32, 32, 32, 2, 4, 32, gen)
    cap = Capture({"attn": {"min_tokens": 64, "first_n_dense_layers": 0}, "mlp": {"enabled": False}})
    torch._dynamo.reset()
    compiled = torch.compile(m, backend=cap.backend, dynamic=False)
    with torch.no_grad():
        for s in sigmas(steps):
            compiled(**inputs(s))
    return cap, "random-weight " + desc


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", default="64,32,16")
    ap.add_argument("--top-keys", type=float, default=0.15)
    ap.add_argument("--classes", default="1,4,7")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--refreshes", default="10,20,30,40", help="refresh steps (each followed by --window sparse)")
    ap.add_argument("--window", type=int, default=5)
    ap.add_argument("--models", default="tiny-dit,flux-medium")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)
    sampled = [f"S={s}" for s in args.samples.split(",")]
    arms = ["S=all"] + sampled + [f"{a} fp8" for a in sampled if a in ("S=32", "S=16")] + ["stale-lse"]
    refreshes = [int(r) for r in args.refreshes.split(",")]
    rows, t0 = [], time.time()
    for name in args.models.split(","):
        _CAPTURE.clear()
        if name == "tiny-dit":
            cap, desc = capture_tiny([int(c) for c in args.classes.split(",")], args.steps)
        else:
            cap, desc = capture_flux(args.steps)
        print(f"[{time.time() - t0:5.0f}s] {name}: {desc}, {len(cap.sites)} attention sites", flush=True)
        acc = {a: {"err": [], "overlap": []} for a in arms}
        for i, (site, scale) in enumerate(cap.sites):
            res = replay(_CAPTURE.get(i, []), site, scale, arms, top_keys=args.top_keys, refreshes=refreshes,
                         window=args.window)
            for a in arms:
                acc[a]["err"] += res[a]["err"]
                acc[a]["overlap"] += res[a]["overlap"]
        base = sum(acc["S=all"]["err"]) / len(acc["S=all"]["err"])
        for a in arms:
            err = sum(acc[a]["err"]) / len(acc[a]["err"])
            ov = sum(acc[a]["overlap"]) / len(acc[a]["overlap"])
            rows.append(dict(model=name, desc=desc, arm=a, top_keys=args.top_keys, group=GROUP, sparse_err=round(err, 5),
                             err_vs_all=round(err / base, 4), overlap_with_all=round(ov, 4)))
            print(f"  {a:10s} sparse-step error {err:.4f} ({err / base:.3f}x S=all)  top-k overlap {ov:.3f}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "colsum_sampling.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(args.out, "colsum_sampling.json"), "w") as f:
        json.dump({"args": vars(args), "rows": rows, "torch": torch.__version__, "seconds": time.time() - t0}, f,
                  indent=1)
    print(f"wrote {args.out}/colsum_sampling.csv ({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
