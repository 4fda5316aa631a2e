"""FLOP accounting for chipmunk sites from `chipmunk_compile.stats`-style step counts.

Invariants: counts multiply-adds as 2 FLOPs; attention = QKᵀ + PV over the kept keys; a refresh
step costs a dense pass plus its cache-building sparse pass plus the column-sum pass (≈ QKᵀ); an MLP
sparse step costs its kept fraction of the dense GEMMs; the forecasts' extra sparse passes (the
old indices' residual at an attention refresh, the sparse path at an MLP dense step) are counted
per site as they ran (`Site.extra_sparse_passes`); selection, block means and elementwise work
are ignored (small). Used to report the FLOPs ratio of a generation against dense.
"""

from __future__ import annotations

import math


def _prod(xs) -> int:
    return math.prod(int(x) for x in xs)


def site_dense_flops(site) -> float:
    sh = site.shapes
    if site.kind == "attention":
        B, H, N, D = (int(v) for v in sh["q"])
        Nk = int(sh["k"][-2])
        return 4.0 * B * H * N * Nk * D
    x, w_act, w2 = sh["x"], sh["w_act"], sh["w2"]
    tokens = _prod(x[:-1])
    F, C = int(w_act[0]), int(w_act[1])
    gated = getattr(site, "pattern", "") == "mlp-gated"
    return 2.0 * tokens * (C * F * (2 if gated else 1) + F * int(w2[0]))


def site_step_flops(site, kind: str) -> float:
    dense = site_dense_flops(site)
    cfg = site.cfg
    if site.kind == "attention":
        keep = min(1.0, cfg.top_keys + cfg.random_keys)
        return {"dense": dense, "refresh": dense * (1.5 + keep), "sparse": dense * keep}[kind]
    keep = min(1.0, cfg.top_keys + cfg.random_keys)
    return dense if kind == "dense" else dense * keep


def site_ran_flops(site) -> float:
    """FLOPs a site ran over its calls: its step kinds plus the forecasts' extra sparse passes."""
    extra = getattr(site, "extra_sparse_passes", 0) * site_step_flops(site, "sparse")
    return sum(n * site_step_flops(site, k) for k, n in site.steps.items()) + extra


def sites_flops_ratio(sites) -> float:
    """(FLOPs the sites ran) / (FLOPs of the same calls all dense)."""
    ran = total = 0.0
    for s in sites:
        ran += site_ran_flops(s)
        total += sum(s.steps.values()) * site_dense_flops(s)
    return ran / total if total else 1.0
