"""cache-dit's DBCache stacked with backend="chipmunk", as a user switching from cache-dit would try
it: `cache_dit.enable_cache(transformer, ...)` first, then `torch.compile(transformer,
backend="chipmunk")`, on a tiny random-weight FLUX (1024 image tokens, 2 double + 4 single blocks),
in a 20-step Euler loop (transformer-only mode: `cache_dit.refresh_context` before each generation).

    pip download --no-deps cache-dit   # then put its wheel's folder on PYTHONPATH (not a dependency)
    python benchmarks/compose_cache_dit.py

cache-dit's decision code runs under `torch.compiler.disable`, so Dynamo skips the model's forward
and compiles its blocks as frames of their own (runtime.py: those follow the time embedding's
steps, and are numbered in model order). Per setting, four generations of seeds 1, 2, 1, 2:
relative error of the final latents against dense, chipmunk alone against dense, stacked against
cache-dit alone, whether a seed run again gives the same result, the steps cache-dit skipped, the
sessions' end positions, the sites' FLOPs over dense for the calls that ran, the refreshes and dense
MLP steps caught up (`catch_up`: a block that cache-dit skipped over its refresh refreshes at its next
call once its caches are that many periods old; an attention call that far from its previous one
runs plain dense) and chipmunk's fallbacks. Writes benchmarks/results/compose_cache_dit.csv.
"""

from __future__ import annotations

import copy
import os
import sys

import torch
from torch._dynamo.utils import counters

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from csv_rows import write_rows  # noqa: E402

import chipmunk_compile  # noqa: E402
from chipmunk_compile.flops import sites_flops_ratio  # noqa: E402
from chipmunk_compile.runtime import sessions_of  # noqa: E402

RESULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "compose_cache_dit.csv")
STEPS, SIDE, SEEDS = 20, 32, (1, 2, 1, 2)
SPARSE = {"top_keys": 0.3, "random_keys": 0.0, "min_tokens": 0}
SETTINGS = [  # (name, first_n_dense_layers, DBCache threshold, TaylorSeer calibrator, catch_up)
    ("dbcache-0.5", 1, 0.5, False, 2.0),
    ("dbcache-0.5-catch-up-1", 1, 0.5, False, 1.0),
    ("dbcache-0.5-catch-up-0", 1, 0.5, False, 0.0),
    ("dbcache-0.5-taylorseer", 1, 0.5, True, 2.0),
    ("dbcache-0.5-fn0", 0, 0.5, False, 2.0),
    ("dbcache-1.0", 1, 1.0, False, 2.0),
]


def flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=4,
                                  attention_head_dim=32, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(8, 12, 12)).eval()


def generate(model, seed, hooked=None):
    import cache_dit

    if hooked is not None:  # transformer-only mode; its implicit refresh does not reproduce a seed
        cache_dit.refresh_context(hooked, num_inference_steps=STEPS)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, SIDE * SIDE, 16, generator=g)
    txt, pooled = torch.randn(1, 8, 32, generator=g), torch.randn(1, 32, generator=g)
    ids = torch.zeros(SIDE, SIDE, 3)
    ids[..., 1], ids[..., 2] = torch.arange(SIDE)[:, None], torch.arange(SIDE)[None]
    ts = torch.linspace(1, 0, STEPS + 1)
    with torch.no_grad():
        for i in range(STEPS):
            v = model(hidden_states=x, encoder_hidden_states=txt, pooled_projections=pooled,
                      timestep=ts[i].expand(1), img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(8, 3),
                      guidance=torch.full((1,), 3.5), return_dict=False)[0]
            x = x + (ts[i + 1] - ts[i]) * v
    return x


def with_cache_dit(model, threshold, taylorseer):
    import cache_dit

    kw = {}
    if taylorseer:
        kw["calibrator_config"] = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=1)
    cache_dit.enable_cache(model, cache_config=cache_dit.DBCacheConfig(
        num_inference_steps=STEPS, Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=threshold,
        max_warmup_steps=3), **kw)
    return model


def chipmunk(model, first_dense, catch_up=2.0):
    # `steps`: a loop of one's own gives chipmunk no step count (a pipeline on the stack would)
    config = {"attn": {**SPARSE, "group": 64, "first_n_dense_layers": first_dense, "catch_up": catch_up},
              "mlp": {**SPARSE, "block": 64, "first_n_dense_layers": first_dense, "catch_up": catch_up},
              "steps": STEPS}
    return torch.compile(model, backend="chipmunk", options={"config": copy.deepcopy(config)}, fullgraph=False)


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def errors(outs, refs) -> str:
    return " ".join(f"{rel(o, r):.4f}" for o, r in zip(outs, refs))


def setting_row(name, first_dense, threshold, taylorseer, catch_up, dense) -> dict:
    import cache_dit

    torch._dynamo.reset()
    compiled = chipmunk(flux(), first_dense)  # one model for the four generations
    alone = [generate(compiled, s) for s in SEEDS]
    hooked = with_cache_dit(flux(), threshold, taylorseer)
    ref = [generate(hooked, s, hooked) for s in SEEDS]
    skipped_alone = list(cache_dit.summary(hooked)[0].cached_steps)
    torch._dynamo.reset()
    counters.clear()
    model = with_cache_dit(flux(), threshold, taylorseer)
    compiled = chipmunk(model, first_dense, catch_up)
    outs = [generate(compiled, s, model) for s in SEEDS]
    sessions = [s for s in sessions_of(model) if s.sites]
    stats = chipmunk_compile.stats(model)
    return {
        "setting": name, "first_n_dense_layers": first_dense, "threshold": threshold, "taylorseer": taylorseer,
        "catch_up": catch_up,
        "chipmunk_vs_dense": errors(alone, dense), "cache_dit_vs_dense": errors(ref, dense),
        "stacked_vs_cache_dit": errors(outs, ref), "stacked_vs_dense": errors(outs, dense),
        "seed_again_equal": f"{torch.equal(outs[2], outs[0])} {torch.equal(outs[3], outs[1])}",
        "skipped_alone": " ".join(map(str, skipped_alone)),
        "skipped_stacked": " ".join(map(str, cache_dit.summary(model)[0].cached_steps)),
        "positions": " ".join(sorted({f"{p.generation}/{p.step}" for p in (s.position() for s in sessions)})),
        "sparse_sites": sum(bool(site["steps"].get("sparse")) for site in stats["sites"]),
        # the sites' FLOPs over dense for the calls that ran (cache-dit's skipped blocks ran none)
        "sites_flops": f"{sites_flops_ratio([site for s in sessions for site in s.sites]):.3f}",
        "caught_up": " ".join(f"{k}={counters['chipmunk'][k]}" for k in (
            "attention_refresh_caught_up", "attention_dense_caught_up", "mlp_dense_caught_up")),
        "fallbacks": " ".join(f"{k.split(':', 1)[1]}={v}" for k, v in sorted(counters["chipmunk"].items())
                              if k.startswith("fallback:")),
    }


def main() -> None:
    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")  # read when cache_dit is first imported
    dense = [generate(flux(), s) for s in SEEDS]
    rows = []
    for setting in SETTINGS:
        row = setting_row(*setting, dense)
        print(" | ".join(f"{k} {v}" for k, v in row.items()), flush=True)
        rows.append(row)
    print("wrote", write_rows(RESULT, rows))


if __name__ == "__main__":
    main()
