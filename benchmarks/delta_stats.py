"""The statistics behind Chipmunk (issue 4): how concentrated is the cross-step change?

Chipmunk recomputes, on sparse steps, only a few key columns per query group (attention) and a few
hidden neurons per token block (MLP), and carries the rest over from a cache. That pays off when the
change between denoising steps is concentrated: the paper reports that the top 5–25% of values
explain 70–90% of the change. This script measures it on the project's trained tiny DiT
(examples/tiny_dit: diffusers FluxTransformer2DModel, 3 double + 4 single blocks, 1024 image tokens
on a 32×32 grid + 8 class "text" tokens first) sampling `--steps` rectified-flow Euler steps, fp32, CPU.

Capture: the model is run under torch.compile with a capturing backend that uses chipmunk_compile's
own pattern matcher and grouping (`plan_sites` + `assign_grouping`), so the sites and the spatial
`perm` are exactly the ones the backend would use (position-id grid 32×32, 8×8 tiles of 4×4
sub-tiles, text tokens kept whole). At each matched site and step:

Attention: P_t = softmax(q kᵀ · scale) per head (N = 1032, all heads); Δ = P_t − P_{t−1}.
  For each query group of G = 128 queries (one key set per group, as Chipmunk), the key columns are
  ranked by the group's column mass Σ_rows |Δ|, and the top x% of the N key columns are kept; the
  explained fraction is Σ|Δ| over (group rows × kept columns) / Σ|Δ| over the group's rows, pooled
  over groups and heads (i.e. the share of the layer's total |Δ| captured).
MLP: h = gelu_tanh(W1 x + b1) (the activation feeding fc2: `ff.net[0]` in double blocks, `act_mlp`
  in single blocks — the double blocks' 8-token `ff_context` is left out, Chipmunk keeps it dense);
  Δh = h_t − h_{t−1}; per block of 128 tokens the top x% of neurons by block mass Σ_tokens |Δh|.
Arms (same x, same group size):
  raster  — groups of consecutive tokens in the model's order (text first, then image raster rows);
  grouped — groups along the chipmunk_compile.grouping perm (two 8×8 tiles per 128 group; text whole);
  random  — a fixed random token permutation (control: groups without any spatial coherence);
  row     — one query row / one token per group (the per-row upper bound of any grouping);
  *_lag   — (raster/grouped) columns picked from the PREVIOUS step's Δ mass, scored on this step's Δ:
            a realistic selection, since Chipmunk must pick indices before it knows the new Δ.
All non-lag selections are ORACLE selections: columns are ranked by the very |Δ| being explained,
so they are upper bounds for the same budget (Chipmunk ranks attention columns by stale column sums
of P and reuses them for many steps; it ranks MLP neurons by block-mean pre-activation deltas).
A uniform (unstructured) delta gives explained ≈ x; that diagonal is the reference.

Aggregation: per (site, step, image) a fraction; mean over steps 1..steps−1 and images; "all" =
mean over sites (each layer weighted equally).

    python benchmarks/delta_stats.py            # 3 classes, 50 steps, all 7 layers (~6.5 min on 2 CPU cores)
    python benchmarks/delta_stats.py --quick    # 1 class, 25 steps (~2 min)
Writes benchmarks/results/delta_stats.{csv,json,png} (the PNG is drawn with Pillow; matplotlib is not needed).
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
from typing import Optional, Sequence

import torch
import torch.fx as fx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from examples.tiny_dit.model import weights_tag  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
FRACS = (0.05, 0.10, 0.15, 0.25)
GROUP = 128


# ---------------------------------------------------------------------------------------------
# The statistic (pure functions; tests/test_delta_stats.py checks them on synthetic data)
# ---------------------------------------------------------------------------------------------
def kept_counts(n_cols: int, fracs: Sequence[float]) -> list[int]:
    """Columns kept for each fraction: round(x · n_cols), at least 1, at most n_cols."""
    return [max(1, min(n_cols, int(round(f * n_cols)))) for f in fracs]


def group_matrix(n_rows: int, group: int, perm: Optional[torch.Tensor] = None, dtype=torch.float32) -> torch.Tensor:
    """(ceil(n_rows/group), n_rows) 0/1 matrix: M[g, perm[i]] = 1 for i in g·group … g·group+group−1."""
    order = torch.arange(n_rows) if perm is None else perm.to(torch.long).cpu()
    ng = -(-n_rows // group)
    m = torch.zeros(ng, n_rows, dtype=dtype)
    m[torch.arange(n_rows) // group, order] = 1
    return m


def group_mass(a: torch.Tensor, group: int, perm: Optional[torch.Tensor] = None,
               matrix: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Column mass per row group: `a` (..., R, C) ≥ 0 → (..., ceil(R/group), C).

    Group g holds rows perm[g·group : (g+1)·group] (rows in order when perm is None); the last group
    may be partial. `matrix` is a precomputed group_matrix (the sum is one matmul)."""
    if group == 1 and perm is None:
        return a
    m = matrix if matrix is not None else group_matrix(a.shape[-2], group, perm, a.dtype)
    return torch.matmul(m.to(a.device, a.dtype), a)


def row_captured(a: torch.Tensor, fracs: Sequence[float], stride: int = 1):
    """Per-row oracle (group of one row): (captured (..., R', F), total (..., R')) over rows ::stride."""
    s = a[..., ::stride, :] if stride > 1 else a
    C = s.shape[-1]
    ks = kept_counts(C, fracs)
    cum = s.topk(max(ks), dim=-1).values.cumsum(-1)
    idx = torch.tensor([k - 1 for k in ks], device=a.device)
    return cum.index_select(-1, idx), s.sum(-1)


def captured(mass: torch.Tensor, fracs: Sequence[float], order: Optional[torch.Tensor] = None,
             return_order: bool = False):
    """(captured (..., ng, F), total (..., ng)) for the top fracs of columns of `mass` (..., ng, C).

    order=None: oracle, columns ranked by `mass` itself. Else `order` (..., ng, ≥k) is a column
    ranking (e.g. the previous step's top columns) and its first k columns are kept.
    return_order: also return the oracle ranking (top max(k) column indices) for later steps."""
    C = mass.shape[-1]
    ks = kept_counts(C, fracs)
    kmax = max(ks)
    if order is None:
        vals, top = mass.topk(kmax, dim=-1)
    else:
        vals, top = mass.gather(-1, order[..., :kmax]), None
    cum = vals.cumsum(-1)
    idx = torch.tensor([k - 1 for k in ks], device=mass.device)
    out = (cum.index_select(-1, idx), mass.sum(-1))
    return out + (top,) if return_order else out


def explained_fraction(absdelta: torch.Tensor, group: int, fracs: Sequence[float] = FRACS,
                       perm: Optional[torch.Tensor] = None, order: Optional[torch.Tensor] = None,
                       pool_dims: int = 2) -> torch.Tensor:
    """Fraction of Σ|Δ| explained by the top fracs of columns chosen per row group.

    absdelta: (..., R, C) non-negative (|Δ|); rows are grouped `group` at a time along `perm`.
    Returns (...leading dims except the last `pool_dims - 2`..., F): captured / total pooled over the
    groups and over the `pool_dims - 2` dims just before (R, C) (e.g. heads). With a (B, H, R, C)
    input and pool_dims=3 the result is (B, F). The default pool_dims=2 pools only over groups.
    NaN where the delta is exactly zero."""
    mass = group_mass(absdelta, group, perm)
    return _pool(captured(mass, fracs, order), pool_dims)


def ranking(mass: torch.Tensor) -> torch.Tensor:
    """Column ranking (descending mass), e.g. for a lagged selection."""
    return mass.argsort(-1, descending=True)


# ---------------------------------------------------------------------------------------------
# Collection during sampling
# ---------------------------------------------------------------------------------------------
ARMS_GROUPED = ("raster", "grouped", "random")


class Collector:
    """Per-site streaming statistics: keeps only the previous step's P / h and group masses.

    Big (B, H, N, N) buffers are reused across steps and sites (fresh allocations of that size cost
    more than the arithmetic on this CPU)."""

    def __init__(self, fracs=FRACS, group=GROUP, seed=0, row_stride=(8, 4), device="cpu"):
        self.fracs = tuple(fracs)
        self.device = torch.device(device)
        self.group = group
        self.row_stride = {"attention": row_stride[0], "mlp": row_stride[1]}
        self.sites: list[dict] = []  # idx -> {"kind", "path", "layer", "perm", "scale", "grouping"}
        self.state: dict[str, dict] = {}  # path -> prev tensors, step counter
        self.values: dict[tuple, list] = {}  # (kind, path) -> per step: {arm: (B, F) tensor}
        self.gen = torch.Generator().manual_seed(seed)
        self._rand: dict[int, torch.Tensor] = {}
        self._mats: dict[tuple, torch.Tensor] = {}
        self._free: dict[tuple, list] = {}  # shape -> spare buffers
        self.seconds = 0.0

    def buffer(self, shape) -> torch.Tensor:
        lst = self._free.setdefault(tuple(shape), [])
        return lst.pop() if lst else torch.empty(shape, device=self.device)

    def release(self, t: torch.Tensor) -> None:
        self._free.setdefault(tuple(t.shape), []).append(t)

    def random_perm(self, n):
        if n not in self._rand:
            self._rand[n] = torch.randperm(n, generator=self.gen)
        return self._rand[n]

    def matrix(self, path, arms, n, perms):
        """The arms' group matrices stacked along the group axis (cached per site)."""
        key = (path, arms, n)
        if key not in self._mats:
            self._mats[key] = torch.cat([group_matrix(n, self.group, p) for p in perms]).to(self.device)
        return self._mats[key]

    def _measure(self, kind, meta, cur: torch.Tensor, pool_dims: int):
        """`cur` is a buffer from self.buffer(); the site keeps it as its new `prev`."""
        st = self.state.setdefault(meta["path"], {"step": 0})
        prev = st.get("prev")
        if prev is not None and prev.shape == cur.shape:
            a = self.buffer(cur.shape)
            torch.abs(torch.sub(cur, prev, out=a), out=a)
            n = a.shape[-2]
            perms = {"raster": None, "grouped": meta["perm"], "random": self.random_perm(n)}
            arms = [arm for arm, perm in perms.items() if not (arm == "grouped" and perm is None)]
            mats = self.matrix(meta["path"], tuple(arms), n, [perms[x] for x in arms])
            ng = mats.shape[0] // len(arms)
            allmass = torch.matmul(mats, a)  # (..., len(arms)·ng, C): every arm's group masses at once
            cap, tot, top = captured(allmass, self.fracs, return_order=True)  # all arms in one call
            prev_top = st.get("top")
            lag = captured(allmass, self.fracs, prev_top) if prev_top is not None else None
            st["top"] = top
            out = {}
            for i, arm in enumerate(arms):
                sl = slice(i * ng, (i + 1) * ng)
                out[arm] = _pool((cap[..., sl, :], tot[..., sl]), pool_dims)
                if lag is not None and arm != "random":
                    out[arm + "_lag"] = _pool((lag[0][..., sl, :], lag[1][..., sl]), pool_dims)
            out["row"] = _pool(row_captured(a, self.fracs, self.row_stride[kind]), pool_dims)
            self.release(a)
            self.values.setdefault((kind, meta["path"]), []).append({k: v.cpu() for k, v in out.items()})
        if prev is not None:
            self.release(prev)
        st["prev"] = cur
        st["step"] += 1

    def attention(self, idx, q, k):
        t0 = time.perf_counter()
        meta = self.sites[idx]
        if q.dim() == 3:
            q, k = q.unsqueeze(1), k.unsqueeze(1)
        q, k = q.detach().float(), k.detach().float()
        scale = meta["scale"] if meta["scale"] is not None else 1.0 / math.sqrt(q.shape[-1])
        p = self.buffer((*q.shape[:-1], k.shape[-2]))
        torch.matmul(q, k.transpose(-1, -2), out=p)  # in-place softmax: P = softmax(q kᵀ · scale)
        p.mul_(scale)
        p.sub_(p.amax(-1, keepdim=True))
        p.exp_()
        p.div_(p.sum(-1, keepdim=True))
        self._measure("attention", meta, p, pool_dims=3)
        self.seconds += time.perf_counter() - t0

    def mlp(self, idx, h):
        t0 = time.perf_counter()
        meta = self.sites[idx]
        h = h.detach()
        if h.dim() == 2:
            h = h.unsqueeze(0)
        cur = self.buffer(h.shape)
        cur.copy_(h)
        self._measure("mlp", meta, cur, pool_dims=2)
        self.seconds += time.perf_counter() - t0


def _pool(cap_tot, pool_dims):
    """captured / total, summed over the group axis and the `pool_dims - 2` axes before it."""
    cap, tot = cap_tot
    cap, tot = cap.sum(-2), tot.sum(-1)
    for _ in range(pool_dims - 2):
        cap, tot = cap.sum(-2), tot.sum(-1)
    return cap / tot.unsqueeze(-1)


COLLECTOR: Optional[Collector] = None


def _rec_attention(idx, q, k):
    COLLECTOR.attention(idx, q, k)
    return q


def _rec_mlp(idx, h):
    COLLECTOR.mlp(idx, h)
    return h


class CaptureBackend:
    """torch.compile backend: chipmunk's matched sites + grouping, with recording calls inserted."""

    def __init__(self, collector: Collector, min_tokens: int = 64):
        from chipmunk_compile import ChipmunkConfig

        self.col = collector
        self.cfg = ChipmunkConfig.from_any({
            "attn": {"min_tokens": min_tokens, "first_n_dense_layers": 0},
            "mlp": {"min_tokens": min_tokens, "first_n_dense_layers": 0}})

    def __call__(self, gm: fx.GraphModule, example_inputs, **_):
        from chipmunk_compile.grouping import assign_grouping
        from chipmunk_compile.patterns.mlp import activation_of
        from chipmunk_compile.rewrite import plan_sites
        from chipmunk_compile.runtime import Session

        _, pairs = plan_sites(gm, self.cfg, Session(self.cfg, None))
        assign_grouping(gm, example_inputs, pairs, self.cfg, None)
        for m, site in pairs:
            meta = {"kind": site.kind, "path": site.path, "layer": site.layer, "perm": site.perm,
                    "grouping": site.grouping, "scale": getattr(m, "scale", None)}
            idx = len(self.col.sites)
            if site.kind == "attention":
                self.col.sites.append(meta)
                with gm.graph.inserting_before(m.output):
                    gm.graph.call_function(_rec_attention, (idx, m.q, m.k))
            else:
                acts = list(dict.fromkeys(n for n in m.nodes if isinstance(n, fx.Node) and activation_of(n) is not None))
                if len(acts) != 1:
                    print(f"  (skipping MLP site {site.path}: {len(acts)} activation nodes)")
                    continue
                self.col.sites.append(meta)
                with gm.graph.inserting_after(acts[0]):
                    gm.graph.call_function(_rec_mlp, (idx, acts[0]))
        gm.recompile()
        return gm.forward


# ---------------------------------------------------------------------------------------------
# Aggregation and outputs
# ---------------------------------------------------------------------------------------------
def short(path: str) -> str:
    return (path.replace("single_transformer_blocks.", "single.").replace("transformer_blocks.", "double.")
            .replace(".attn", "").replace(".ff.net.2", "").replace(".proj_out", ""))


def aggregate(col: Collector):
    """rows: one per (kind, site, arm, frac) with mean/min/max over steps and images; per_step: mean
    over sites and images per (kind, arm, frac) and step."""
    rows, per_step = [], {}
    order = {m["path"]: i for i, m in enumerate(col.sites)}
    for (kind, path), steps in sorted(col.values.items(), key=lambda kv: order.get(kv[0][1], 0)):
        arms = sorted({a for s in steps for a in s})
        for arm in arms:
            seq = [s[arm] for s in steps if arm in s]
            x = torch.stack(seq)  # (T, B, F)
            for fi, f in enumerate(col.fracs):
                v = x[..., fi]
                rows.append({"kind": kind, "site": path, "layer": short(path), "arm": arm, "kept": f,
                             "explained": float(v.nanmean()), "min_step_mean": float(v.nanmean(1).min()),
                             "max_step_mean": float(v.nanmean(1).max()), "n_steps": int(v.shape[0]),
                             "n_images": int(v.shape[1])})
                ps = per_step.setdefault((kind, arm, f), [])
                ps.append(v.nanmean(1))
    per_step_out = {}
    for (kind, arm, f), lst in per_step.items():
        n = min(t.numel() for t in lst)
        per_step_out[f"{kind}|{arm}|{f}"] = torch.stack([t[-n:] for t in lst]).nanmean(0).tolist()
    for kind in ("attention", "mlp"):
        sub = [r for r in rows if r["kind"] == kind]
        for arm in sorted({r["arm"] for r in sub}):
            for f in col.fracs:
                vals = [r["explained"] for r in sub if r["arm"] == arm and r["kept"] == f]
                if vals:
                    rows.append({"kind": kind, "site": "all", "layer": "all", "arm": arm, "kept": f,
                                 "explained": sum(vals) / len(vals), "min_step_mean": None,
                                 "max_step_mean": None, "n_steps": None, "n_images": None})
    return rows, per_step_out


def lookup(rows, kind, layer, arm, f):
    for r in rows:
        if r["kind"] == kind and r["layer"] == layer and r["arm"] == arm and abs(r["kept"] - f) < 1e-9:
            return r["explained"]
    return None


def print_table(rows, fracs):
    arms_by_kind = {"attention": ("raster", "grouped", "random", "row", "raster_lag", "grouped_lag"),
                    "mlp": ("raster", "grouped", "random", "row", "raster_lag", "grouped_lag")}
    fr = "/".join(f"{int(round(f * 100))}" for f in fracs)
    for kind, arms in arms_by_kind.items():
        layers = []
        for r in rows:
            if r["kind"] == kind and r["layer"] not in layers:
                layers.append(r["layer"])
        layers = [l for l in layers if l != "all"] + ["all"]
        unit = "key columns per 128-query group" if kind == "attention" else "neurons per 128-token block"
        print(f"\n{kind.upper()}: % of Σ|Δ| explained by the top {fr}% {unit} "
              f"(mean over steps and images; 'row' = per {'query row' if kind == 'attention' else 'token'}; "
              f"*_lag = picked from the previous step's Δ)")
        print(f"{'layer':<10}" + "".join(f"{a:>21}" for a in arms))
        for layer in layers:
            cells = []
            for a in arms:
                v = [lookup(rows, kind, layer, a, f) for f in fracs]
                cells.append("/".join("  - " if x is None else f"{100 * x:4.1f}"[-4:] if x < 1 else " 100"
                                      for x in v))
            print(f"{layer:<10}" + "".join(f"{c:>21}" for c in cells))
        print(f"{'uniform':<10}" + f"{'/'.join(f'{100 * f:4.1f}' for f in fracs):>21}")


# ---------------------------------------------------------------------------------------------
# PNG (Pillow only)
# ---------------------------------------------------------------------------------------------
COLORS = {"raster": (31, 119, 180), "grouped": (214, 39, 40), "random": (127, 127, 127), "row": (44, 160, 44),
          "raster_lag": (31, 119, 180), "grouped_lag": (214, 39, 40), "uniform": (170, 170, 170)}


def _font(size):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _dashed(draw, p0, p1, color, width=2, dash=8):
    (x0, y0), (x1, y1) = p0, p1
    L = math.hypot(x1 - x0, y1 - y0)
    n = max(1, int(L // dash))
    for i in range(0, n, 2):
        a, b = i / n, min(1.0, (i + 1) / n)
        draw.line([(x0 + a * (x1 - x0), y0 + a * (y1 - y0)), (x0 + b * (x1 - x0), y0 + b * (y1 - y0))],
                  fill=color, width=width)


def _panel(draw, box, title, xlabel, xs_range, series, font, small, xticks, yticks=(0, .25, .5, .75, 1.0)):
    """series: list of (name, xs, ys, color, dashed)."""
    x0, y0, x1, y1 = box
    left, bottom, right, top = x0 + 60, y1 - 50, x1 - 15, y0 + 35
    draw.text((x0 + 60, y0 + 5), title, fill=(0, 0, 0), font=font)
    draw.rectangle([left, top, right, bottom], outline=(0, 0, 0), width=1)
    xa, xb = xs_range

    def X(v):
        return left + (v - xa) / (xb - xa) * (right - left)

    def Y(v):
        return bottom - v * (bottom - top)

    for t in yticks:
        draw.line([(left, Y(t)), (right, Y(t))], fill=(230, 230, 230))
        draw.text((left - 45, Y(t) - 8), f"{int(t * 100)}%", fill=(0, 0, 0), font=small)
    for t in xticks:
        draw.line([(X(t), bottom), (X(t), bottom + 5)], fill=(0, 0, 0))
        lab = f"{int(round(t * 100))}%" if xb <= 1.0 else f"{int(t)}"
        draw.text((X(t) - 12, bottom + 8), lab, fill=(0, 0, 0), font=small)
    draw.text(((left + right) / 2 - 60, bottom + 28), xlabel, fill=(0, 0, 0), font=small)
    for name, xs, ys, color, dashed in series:
        pts = [(X(x), Y(y)) for x, y in zip(xs, ys) if y is not None and not math.isnan(y)]
        for p, q in zip(pts, pts[1:]):
            (_dashed(draw, p, q, color) if dashed else draw.line([p, q], fill=color, width=3))
        for p in pts:
            draw.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=color)
    # legend
    ly = top + 8
    for name, xs, ys, color, dashed in series:
        lx = right - 170
        (_dashed(draw, (lx, ly + 7), (lx + 28, ly + 7), color) if dashed else
         draw.line([(lx, ly + 7), (lx + 28, ly + 7)], fill=color, width=3))
        draw.text((lx + 34, ly), name, fill=(0, 0, 0), font=small)
        ly += 18


def draw_png(rows, per_step, fracs, path, title):
    from PIL import Image, ImageDraw

    W, H = 1500, 560
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font, small = _font(17), _font(13)
    d.text((20, 8), title, fill=(0, 0, 0), font=font)
    xs = [0.0] + list(fracs)
    pw = W // 3
    for i, kind in enumerate(("attention", "mlp")):
        series = [("uniform (x)", [0, max(fracs)], [0, max(fracs)], COLORS["uniform"], True)]
        for arm, label in (("row", "per row (bound)" if kind == "attention" else "per token (bound)"),
                           ("random", "random perm (oracle)"), ("raster_lag", "raster, prev-step pick"),
                           ("grouped_lag", "grouped, prev-step pick"), ("raster", "raster (oracle)"),
                           ("grouped", "grouped (oracle)")):  # grouped drawn last (on top)
            ys = [lookup(rows, kind, "all", arm, f) for f in fracs]
            if any(y is not None for y in ys):
                series.append((label, xs, [0.0] + ys, COLORS[arm], arm.endswith("_lag")))
        unit = "key columns kept per 128-query group" if kind == "attention" else "neurons kept per 128-token block"
        _panel(d, (i * pw, 30, (i + 1) * pw, H), f"{kind}: share of sum|delta| explained (mean of layers)", unit,
               (0.0, max(fracs) + 0.01), series, font, small, xticks=list(fracs))
    # per-step panel at 10 %
    f10 = min(fracs, key=lambda f: abs(f - 0.10))
    series = []
    for kind, arm, color, dashed in (("attention", "raster", (31, 119, 180), False),
                                     ("attention", "grouped", (214, 39, 40), False),
                                     ("mlp", "raster", (31, 119, 180), True), ("mlp", "grouped", (214, 39, 40), True)):
        ys = per_step.get(f"{kind}|{arm}|{f10}")
        if ys:
            series.append((f"{'attn' if kind == 'attention' else 'mlp'} {arm}", list(range(1, len(ys) + 1)), ys,
                           color, dashed))
    n = max((len(s[1]) for s in series), default=1)
    ticks = [t for t in range(0, n + 1, 10)] or [0]
    _panel(d, (2 * pw, 30, W, H), f"top {int(round(f10 * 100))}% (oracle) vs step",
           "denoising step (delta from t-1 to t)", (0, n + 1), series, font, small, xticks=ticks)
    img.save(path)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def _title(meta):
    return (f"Chipmunk delta concentration, trained tiny DiT ({meta.get('n_img', 1024)} img + 8 txt tokens), "
            f"groups of {meta['group']}, "
            f"{meta['steps']} RF steps, classes {meta['classes']}; oracle = top columns of the same delta")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 class, 25 steps (~2 min; bigger steps than the default)")
    ap.add_argument("--classes", default="1,4,7", help="class labels sampled (one image each)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--group", type=int, default=GROUP)
    ap.add_argument("--fracs", default=",".join(str(f) for f in FRACS))
    ap.add_argument("--row-stride", default="8,4",
                    help="the per-row/per-token bound is computed on every n-th row (attention,mlp)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--weights", default=None,
                    help="tiny DiT weights (.safetensors beside its .json; default: the shipped 64x64 model)")
    ap.add_argument("--device", default="cpu", help="cpu (fp32) or cuda (fp32 too: same statistic, faster)")
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--replot", action="store_true", help="only redraw the PNG from an existing delta_stats.json")
    args = ap.parse_args(argv)
    if args.replot:
        base = os.path.join(args.out, "delta_stats" + weights_tag(args.weights))
        with open(base + ".json") as f:
            d = json.load(f)
        m = d["meta"]
        draw_png(d["rows"], d["per_step_mean_over_sites"], tuple(m["fracs"]), base + ".png", _title(m))
        print_table(d["rows"], tuple(m["fracs"]))
        print(f"wrote {base}.png")
        return d["rows"]
    if args.quick:
        args.classes, args.steps = "3", 25
    if args.threads:
        torch.set_num_threads(args.threads)
    classes = [int(c) for c in args.classes.split(",")]
    fracs = tuple(float(f) for f in args.fracs.split(","))

    global COLLECTOR
    from examples.tiny_dit.model import WEIGHTS_PATH, load_pretrained
    from examples.tiny_dit.sampler import sample_classes

    t0 = time.time()
    model = load_pretrained(args.device, torch.float32, args.weights or WEIGHTS_PATH)
    COLLECTOR = col = Collector(fracs, args.group, seed=args.seed,
                                row_stride=tuple(int(x) for x in args.row_stride.split(",")), device=args.device)
    torch._dynamo.reset()
    compiled = torch.compile(model.transformer, backend=CaptureBackend(col), dynamic=False)
    print(f"trained tiny DiT, classes {classes}, {args.steps} steps, seed {args.seed}, G={args.group}, "
          f"kept {fracs}; torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)

    def progress(i, t, x):
        if i % 10 == 0 or i == args.steps - 1:
            print(f"  [{time.time() - t0:6.1f}s] step {i + 1}/{args.steps} (stats {col.seconds:.1f}s)", flush=True)

    with torch.no_grad():
        images = sample_classes(model, classes, transformer=compiled, steps=args.steps, seed=args.seed,
                                callback=progress)
    for m in col.sites:
        print(f"  site {m['path']:<36} {m['kind']:<9} perm={'yes' if m['perm'] is not None else 'no '} "
              f"grouping: {m['grouping']}")
    rows, per_step = aggregate(col)
    print_table(rows, fracs)
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, "delta_stats" + weights_tag(args.weights))
    with open(base + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    n_img = model.config.num_image_tokens
    meta = {"model": f"examples/tiny_dit (trained, FluxTransformer2DModel 3 double + 4 single blocks, "
                     f"{n_img} image tokens)", "weights": os.path.basename(args.weights or WEIGHTS_PATH),
            "n_img": n_img, "device": args.device,
            "classes": classes, "steps": args.steps, "seed": args.seed, "group": args.group, "fracs": fracs,
            "row_stride": args.row_stride,
            "sites": [{k: v for k, v in m.items() if k != "perm"} for m in col.sites],
            "selection": "oracle (ranked by the |delta| being explained) except *_lag arms (ranked by the "
                         "previous step's |delta| group mass)",
            "torch": torch.__version__, "platform": platform.platform(), "seconds": time.time() - t0,
            "stats_seconds": col.seconds, "image_range": [float(images.min()), float(images.max())]}
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows, "per_step_mean_over_sites": per_step}, f, indent=1)
    try:
        draw_png(rows, per_step, fracs, base + ".png", _title(meta))
        png = base + ".png"
    except ImportError as e:
        png = f"(no PNG: {e})"
    print(f"\nwrote {base}.csv, {base}.json, {png}  [{time.time() - t0:.0f}s total, stats {col.seconds:.0f}s]")
    return rows


if __name__ == "__main__":
    main()
