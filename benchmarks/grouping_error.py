"""Attention approximation error with and without spatial grouping, at equal sparsity.

For each model, a denoising-like sequence of inputs is run densely (x_s = (1-σ_s)·data + σ_s·noise
with a spatially smooth `data` field and σ going 1 → 0), and the q/k/v of every matched attention
site is captured at every step through the chipmunk pattern matcher (the same sites and the same
`perm` the backend would use). Then, per site, the Chipmunk attention schedule is replayed with the
kernel references: step 0 dense (lse), step 1 refresh (column sums with the stale lse, top-k keys
per query group, o_cache = o − attn_S), steps 2.. sparse (o_cache + attn_S(q_s, k_s, v_s)). The error
is ‖o_sparse − o_dense‖ / ‖o_dense‖ per site and step, averaged over sites and sparse steps.

Arms (same group size, same keys per group, same always-kept text keys → equal sparsity):
  raster  — no perm: group g = queries g·G … g·G+G−1 (the model's token order);
  grouped — the perm from chipmunk_compile.grouping (tiles / voxels; text last);
  random  — a random permutation (control: groups with no spatial coherence);
  stale   — o_dense(refresh step) reused as is (how much the output moves between steps).

Inputs of every site are exact (no error propagates through layers): this isolates the effect of
the query grouping on the attention delta. Random-weight models have little learned spatial
structure (locality comes only from positional embeddings/RoPE and the smooth input), so their
numbers understate what grouping does on trained models; the script says so in its output.

    python benchmarks/grouping_error.py                 # random-weight tiny/medium models
    python benchmarks/grouping_error.py --weights       # + the trained examples/tiny_dit (if present)
Writes benchmarks/results/grouping_error.{csv,json}.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import sys
import time

import torch
import torch.fx as fx
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from chipmunk_compile import ChipmunkConfig  # noqa: E402
from chipmunk_compile.grouping import assign_grouping  # noqa: E402
from chipmunk_compile.kernels import attn_column_sparse_ref, attn_dense_colsum_ref, select_columns_ref  # noqa: E402
from chipmunk_compile.rewrite import plan_sites  # noqa: E402
from chipmunk_compile.runtime import Session  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
_CAPTURE: dict = {}


# ---------------------------------------------------------------------------------------------
# Capture q/k/v at the matched attention sites
# ---------------------------------------------------------------------------------------------
def _record(idx, q, k, v, mask):
    if q.dim() == 3:
        q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
    _CAPTURE.setdefault(idx, []).append(tuple(t.detach().float().clone() for t in (q, k, v)))
    return q


class Capture:
    def __init__(self, config):
        self.cfg = ChipmunkConfig.from_any(config)
        self.sites = []  # (site, scale)

    def backend(self, gm: fx.GraphModule, example_inputs, **_):
        plan, pairs = plan_sites(gm, self.cfg, Session(self.cfg, None))
        assign_grouping(gm, example_inputs, pairs, self.cfg, None)
        for m, site in pairs:
            if site.kind != "attention":
                continue
            idx = len(self.sites)
            self.sites.append((site, m.scale))
            with gm.graph.inserting_before(m.output):
                gm.graph.call_function(_record, (idx, m.q, m.k, m.v, m.mask_node))
        gm.recompile()
        return gm.forward


# ---------------------------------------------------------------------------------------------
# Models and input sequences (random weights unless --weights)
# ---------------------------------------------------------------------------------------------
def smooth_field(shape, scale, gen):
    """A spatially smooth random field of `shape` (B, C, *spatial): upsampled coarse noise."""
    B, C, *sp = shape
    coarse = [max(2, s // scale) for s in sp]
    x = torch.randn(B, C, *coarse, generator=gen)
    mode = "bilinear" if len(sp) == 2 else "trilinear"
    x = F.interpolate(x, size=tuple(sp), mode=mode, align_corners=False)
    return x / x.std()


def sigmas(steps):
    return [1.0 - i / steps for i in range(steps)]


def make_dit(size, layers, heads, dim, gen):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    m = DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=dim, in_channels=4, num_layers=layers,
                              sample_size=size, patch_size=2, num_embeds_ada_norm=10).eval()
    data, noise = smooth_field((1, 4, size, size), 8, gen), torch.randn(1, 4, size, size, generator=gen)

    def inputs(s):
        return dict(hidden_states=(1 - s) * data + s * noise, timestep=torch.tensor([int(s * 999)]),
                    class_labels=torch.tensor([1]))
    return m, inputs, f"DiT {size // 2}×{size // 2} tokens, {layers} layers"


def make_flux(h, w, n_txt, layers, heads, dim, gen):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    m = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=layers, num_single_layers=layers,
                               attention_head_dim=dim, num_attention_heads=heads, joint_attention_dim=64,
                               pooled_projection_dim=32, axes_dims_rope=(dim // 4, 3 * dim // 8, 3 * dim // 8)).eval()
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None]
    data = smooth_field((1, 16, h, w), 4, gen).flatten(2).transpose(1, 2)
    noise = torch.randn(data.shape, generator=gen)
    txt = torch.randn(1, n_txt, 64, generator=gen)

    def inputs(s):
        return dict(hidden_states=(1 - s) * data + s * noise, encoder_hidden_states=txt,
                    pooled_projections=torch.zeros(1, 32), timestep=torch.tensor([s]),
                    img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(n_txt, 3))
    return m, inputs, f"Flux {h}×{w} image + {n_txt} text tokens, {layers}+{layers} layers"


def make_wan(t, size, layers, heads, dim, gen):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    m = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=dim, in_channels=4,
                              out_channels=4, text_dim=32, freq_dim=32, ffn_dim=4 * heads * dim, num_layers=layers,
                              rope_max_seq_len=256).eval()
    shape = (1, 4, t, size, size)
    data, noise = smooth_field(shape, 6, gen), torch.randn(shape, generator=gen)
    txt = torch.randn(1, 8, 32, generator=gen)

    def inputs(s):
        return dict(hidden_states=(1 - s) * data + s * noise, timestep=torch.tensor([int(s * 999)]),
                    encoder_hidden_states=txt)
    return m, inputs, f"Wan {t}×{size // 2}×{size // 2} tokens, {layers} layers"


def make_trained_tiny_dit(gen):
    """The project's trained tiny DiT (examples/tiny_dit: a FluxTransformer2DModel on 2x2-packed
    64x64 pixels, class tokens in place of text), on a real training image of class 1 along the
    rectified-flow path x_t = (1 - t) x_0 + t noise (its own convention: t in [0, 1])."""
    try:
        from examples.tiny_dit.data import generate_batch
        from examples.tiny_dit.model import load_pretrained
        m = load_pretrained().eval().float()
    except Exception as e:  # weights missing or the example changed
        return None, f"examples.tiny_dit unavailable ({type(e).__name__}: {e})"
    images, labels = generate_batch(1, seed=0, labels=torch.tensor([1]))
    data = m.patchify(images)
    noise = torch.randn(data.shape, generator=gen)
    cond, ids = m.class_condition(labels), m.position_ids()

    def inputs(s):
        x = (1 - s) * data + s * noise
        return dict(hidden_states=x, timestep=torch.tensor([float(s)]), **cond, **ids, return_dict=False)
    return (m.transformer, inputs, f"trained tiny DiT (FLUX layout, {data.shape[1]} image tokens, class 1)"), ""


# ---------------------------------------------------------------------------------------------
# Replay of the Chipmunk attention schedule
# ---------------------------------------------------------------------------------------------
def _rel(a, b):
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-30)).item()


def replay(steps_qkv, *, scale, group, top_keys, perm, keep, refresh=1):
    """Per-step relative errors of the sparse steps after one refresh at `refresh`."""
    q0, k0, v0 = steps_qkv[refresh - 1]
    D = q0.shape[-1]
    scale = scale if scale is not None else 1.0 / math.sqrt(D)
    _, lse_prev, _ = attn_dense_colsum_ref(q0, k0, v0, scale=scale, group=group, perm=perm, want_colsum=False)
    q, k, v = steps_qkv[refresh]
    o, _, colsum = attn_dense_colsum_ref(q, k, v, scale=scale, group=group, perm=perm, prev_lse=lse_prev)
    Nk = k.shape[-2]
    idx, cnt = select_columns_ref(colsum, k=max(1, round(top_keys * Nk)), always_keep=keep, random_keys=0)
    o_cache = attn_column_sparse_ref(q, k, v, idx, cnt, scale=scale, group=group, perm=perm, o_base=o, sign=-1.0)
    errs, stale = [], []
    for q, k, v in steps_qkv[refresh + 1:]:
        dense, _, _ = attn_dense_colsum_ref(q, k, v, scale=scale, group=group, want_colsum=False)
        sparse = attn_column_sparse_ref(q, k, v, idx, cnt, scale=scale, group=group, perm=perm, o_base=o_cache)
        errs.append(_rel(sparse, dense))
        stale.append(_rel(o, dense))
    density = (cnt.float().mean() / Nk).item()
    return errs, stale, density


def measure(name, model, inputs, desc, *, steps, groups, top_keys_list, seed=0):
    _CAPTURE.clear()
    cap = Capture({"attn": {"min_tokens": 1, "first_n_dense_layers": 0}, "mlp": {"enabled": False}})
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=cap.backend, dynamic=False)
    with torch.no_grad():
        for s in sigmas(steps):
            compiled(**inputs(s))
    rows = []
    gen = torch.Generator().manual_seed(seed)
    for idx, (site, scale) in enumerate(cap.sites):
        seq = _CAPTURE.get(idx, [])
        if len(seq) < 3:
            continue
        N = seq[0][0].shape[-2]
        rand_perm = torch.randperm(N, generator=gen).to(torch.int32)
        for G in groups:
            for tk in top_keys_list:
                arms = {"raster": None, "grouped": site.perm, "random": rand_perm}
                res = {}
                for arm, perm in arms.items():
                    if arm == "grouped" and perm is None:
                        continue
                    errs, stale, density = replay(seq, scale=scale, group=G, top_keys=tk, perm=perm,
                                                  keep=site.always_keep)
                    res[arm] = errs
                rows.append({
                    "model": name, "desc": desc, "site": site.path, "layer": site.layer, "tokens": N,
                    "group": G, "top_keys": tk, "density": round(density, 4), "grouping": site.grouping,
                    "err_raster": _mean(res["raster"]), "err_grouped": _mean(res.get("grouped")),
                    "err_random": _mean(res["random"]), "err_stale": _mean(stale),
                    "per_step_raster": res["raster"], "per_step_grouped": res.get("grouped"),
                    "per_step_random": res["random"],
                })
    return rows


def _mean(xs):
    return None if not xs else sum(xs) / len(xs)


def summarize(rows):
    """Mean over sites (grouped sites only) per (model, group, top_keys)."""
    out = {}
    for r in rows:
        if r["err_grouped"] is None:
            continue
        key = (r["model"], r["group"], r["top_keys"])
        acc = out.setdefault(key, {"n": 0, "raster": 0.0, "grouped": 0.0, "random": 0.0, "stale": 0.0,
                                   "density": 0.0, "desc": r["desc"], "grouping": r["grouping"], "wins": 0})
        acc["n"] += 1
        for a in ("raster", "grouped", "random", "stale"):
            acc[a] += r[f"err_{a}"]
        acc["density"] += r["density"]
        acc["wins"] += r["err_grouped"] < r["err_raster"]
    table = []
    for (model, G, tk), a in out.items():
        n = a["n"]
        table.append({"model": model, "desc": a["desc"], "grouping": a["grouping"], "group": G, "top_keys": tk,
                      "density": a["density"] / n, "sites": n,
                      "err_raster": a["raster"] / n, "err_grouped": a["grouped"] / n, "err_random": a["random"] / n,
                      "err_stale": a["stale"] / n, "grouped_wins": f"{a['wins']}/{n}",
                      "ratio_grouped_over_raster": (a["grouped"] / a["raster"]) if a["raster"] else None})
    return table


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", action="store_true", help="also measure the trained examples/tiny_dit")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--groups", default="64,192")
    ap.add_argument("--top-keys", default="0.05,0.15")
    ap.add_argument("--models", default="dit-tiny,dit-medium,flux-medium,wan-medium")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args()
    groups = [int(g) for g in args.groups.split(",")]
    tks = [float(t) for t in args.top_keys.split(",")]
    gen = torch.Generator().manual_seed(0)
    builders = {
        "dit-tiny": lambda: make_dit(32, 2, 2, 32, gen),
        "dit-medium": lambda: make_dit(64, 4, 4, 32, gen),
        "flux-medium": lambda: make_flux(32, 32, 32, 2, 4, 32, gen),
        "wan-medium": lambda: make_wan(8, 32, 2, 4, 32, gen),
    }
    notes = ["Random-weight models: attention locality comes only from positional embeddings / RoPE and the "
             "smooth input field, not from training, so these numbers are a weak, honest lower bound on what "
             "spatial grouping buys on trained models."]
    rows = []
    t0 = time.time()
    for name in args.models.split(","):
        m, inputs, desc = builders[name]()
        print(f"[{time.time() - t0:6.1f}s] {name}: {desc}", flush=True)
        rows += measure(name, m, inputs, desc, steps=args.steps, groups=groups, top_keys_list=tks)
    if args.weights:
        built, why = make_trained_tiny_dit(gen)
        if built is None:
            notes.append(f"--weights: trained tiny DiT not measured: {why}")
            print(f"--weights: skipped: {why}")
        else:
            m, inputs, desc = built
            print(f"[{time.time() - t0:6.1f}s] tiny-dit-trained: {desc}", flush=True)
            rows += measure("tiny-dit-trained", m, inputs, desc, steps=args.steps, groups=groups, top_keys_list=tks)
    table = summarize(rows)
    hdr = ["model", "G", "top_keys", "density", "sites", "raster", "grouped", "random", "stale", "grp/ras", "wins"]
    print()
    print("relative L2 error of sparse-step attention outputs vs dense (mean over grouped sites and sparse steps)")
    print("  ".join(f"{h:>12}" if i else f"{h:<18}" for i, h in enumerate(hdr)))
    for r in table:
        vals = [r["model"], r["group"], r["top_keys"], f"{r['density']:.3f}", r["sites"],
                f"{r['err_raster']:.4f}", f"{r['err_grouped']:.4f}", f"{r['err_random']:.4f}",
                f"{r['err_stale']:.4f}", f"{r['ratio_grouped_over_raster']:.3f}", r["grouped_wins"]]
        print("  ".join(f"{str(v):>12}" if i else f"{str(v):<18}" for i, v in enumerate(vals)))
    print()
    for r in {r["model"]: r for r in table}.values():
        print(f"  {r['model']}: {r['desc']}; grouping: {r['grouping']}")
    for n in notes:
        print("NOTE:", n)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "grouping_error.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0].keys()) if table else ["model"])
        w.writeheader()
        w.writerows(table)
    meta = {"torch": torch.__version__, "device": "cpu", "machine": platform.machine(), "steps": args.steps,
            "schedule": "step 0 dense, step 1 refresh, steps 2.. sparse", "notes": notes, "elapsed_s": time.time() - t0}
    with open(os.path.join(args.out, "grouping_error.json"), "w") as f:
        json.dump({"meta": meta, "summary": table, "per_site": rows}, f, indent=1)
    print(f"wrote {args.out}/grouping_error.csv and .json ({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
