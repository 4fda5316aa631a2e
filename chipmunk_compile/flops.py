"""FLOP accounting for chipmunk sites from `chipmunk_compile.stats`-style step counts.

Invariants: counts multiply-adds as 2 FLOPs; attention = QKᵀ + PV over the kept keys; a refresh
step costs a dense pass plus its cache-building sparse pass plus the column-sum pass (≈ QKᵀ); an MLP
sparse step costs its kept fraction of the dense GEMMs; the forecasts' extra sparse passes (the
old indices' residual at an attention refresh, the sparse path at an MLP dense step) are counted
per site as they ran (`Site.extra_sparse_passes`); selection, block means and elementwise work
are ignored (small). Used to report the FLOPs ratio of a generation against dense.

`model_flops_ratio` puts the sites' work beside the rest of the model: the dense generation's FLOPs
as torch counts them (`count_flops`), less the sites' dense FLOPs, is the work no site rewrites; it
runs on every computed call, and a call that step caching skipped runs nothing.
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


def count_flops(fn, module=None) -> float:
    """FLOPs of `fn()` as torch's FlopCounterMode counts them, with SDPA's CPU flash kernel counted
    as the GPU ones are (torch has no formula for it: attention counted 0 on the CPU). With
    `module`, only what runs inside its calls (a pipeline's transformer, not its text encoders or
    VAE)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, flop_registry

    mapping = {}
    cpu_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_flash is not None:
        gpu_formula = flop_registry[torch.ops.aten._scaled_dot_product_flash_attention]  # takes the op's args

        def cpu_formula(*args, **kwargs):
            return gpu_formula(*args, **kwargs)

        cpu_formula._get_raw = True  # already wrapped: the counter must not wrap it again
        mapping[cpu_flash] = cpu_formula
    if module is None:
        with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
            fn()
        return float(counter.get_total_flops())
    total, active = [0.0], []

    def enter(mod, args):
        active.append(FlopCounterMode(display=False, custom_mapping=mapping).__enter__())

    def leave(mod, args, out):
        counter = active.pop()
        counter.__exit__(None, None, None)
        total[0] += counter.get_total_flops()

    hooks = (module.register_forward_pre_hook(enter), module.register_forward_hook(leave))
    try:
        fn()
    finally:
        for h in hooks:
            h.remove()
        while active:  # a call that raised
            active.pop().__exit__(None, None, None)
    return total[0]


def model_flops_ratio(sites, dense_total: float, computed: int, skipped: int) -> float:
    """The whole model's FLOPs over a generation against `dense_total` (the same generation dense):
    the sites' work as they ran, plus the rest of the model on the `computed` calls of all
    `computed + skipped` (step caching)."""
    share = computed / (computed + skipped) if skipped else 1.0
    sites_dense = sum(sum(s.steps.values()) * site_dense_flops(s) for s in sites) / share  # all calls
    rest = max(dense_total - sites_dense, 0.0) * share
    return (rest + sum(site_ran_flops(s) for s in sites)) / dense_total
