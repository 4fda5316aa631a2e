"""End-to-end speed of diffusers DiTs: Inductor (cuDNN SDPA) vs backend="chipmunk".

    python benchmarks/bench_e2e.py --model flux                 # FLUX.1-dev size, 1280x768, 50 steps
    python benchmarks/bench_e2e.py --model wan --blocks 4 --steps 12

Random weights built directly on the GPU in bf16 (no downloads). Each variant is compiled, run
once as a warm-up generation, then a timed generation: every transformer call is timed with CUDA
events and labelled with its step kind. Video models may be built with fewer blocks than the
published model (`--blocks`); then the per-block cost is measured from two block counts and the
published depth is extrapolated — the output says so. Timesteps decrease like a sampler's, so the
chipmunk schedule follows the pipeline signal exactly as in real use.
Results append to benchmarks/results/e2e.jsonl (and $OUT when set).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

import chipmunk_compile as cc
from chipmunk_compile.config import ChipmunkConfig
from chipmunk_compile.schedule import attn_step_kind, mlp_step_kind

# published sizes (diffusers configs) and resolutions
MODELS = {
    "flux": dict(cls="FluxTransformer2DModel", layers=("num_layers", 19), extra_layers=("num_single_layers", 38),
                 config=dict(guidance_embeds=True), preset="flux"),
    "wan": dict(cls="WanTransformer3DModel", layers=("num_layers", 40), config=dict(
        patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=13824, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=1e-6, rope_max_seq_len=1024), preset="wan", cfg_calls=2),
    "hunyuan-video": dict(cls="HunyuanVideoTransformer3DModel", layers=("num_layers", 20),
                          extra_layers=("num_single_layers", 40), config=dict(), preset="hunyuan-video"),
    "mochi": dict(cls="MochiTransformer3DModel", layers=("num_layers", 48), config=dict(), preset="mochi", cfg_calls=2),
}


def build(name: str, blocks: int | None, device="cuda", dtype=torch.bfloat16):
    import diffusers

    spec = MODELS[name]
    cfg = dict(spec["config"])
    if blocks is not None:
        cfg[spec["layers"][0]] = blocks
        if "extra_layers" in spec:
            cfg[spec["extra_layers"][0]] = blocks
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = getattr(diffusers, spec["cls"])(**cfg).eval()
    torch.set_default_dtype(torch.float32)
    return model.to(dtype)


def inputs(name: str, model, device="cuda", dtype=torch.bfloat16, frames=None):
    g = torch.Generator(device).manual_seed(0)
    r = lambda *s: torch.randn(*s, device=device, dtype=dtype, generator=g)
    if name == "flux":
        h, w = 768 // 16, 1280 // 16
        img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(h).float(), torch.arange(w).float(), indexing="ij"), -1)
        return dict(hidden_states=r(1, h * w, 64), encoder_hidden_states=r(1, 512, 4096), pooled_projections=r(1, 768),
                    img_ids=img_ids.reshape(-1, 3).to(device, dtype), txt_ids=torch.zeros(512, 3, device=device, dtype=dtype),
                    guidance=torch.full((1,), 3.5, device=device, dtype=dtype))
    if name == "wan":
        f = frames or 21
        return dict(hidden_states=r(1, 16, f, 90, 160), encoder_hidden_states=r(1, 512, 4096))
    if name == "hunyuan-video":
        f = frames or 33
        return dict(hidden_states=r(1, 16, f, 90, 160), encoder_hidden_states=r(1, 256, 4096),
                    encoder_attention_mask=torch.ones(1, 256, device=device, dtype=torch.bool), pooled_projections=r(1, 768),
                    guidance=torch.full((1,), 6.0, device=device, dtype=dtype) * 1000)
    if name == "mochi":
        f = frames or 28
        return dict(hidden_states=r(1, 12, f, 60, 106), encoder_hidden_states=r(1, 256, 4096),
                    encoder_attention_mask=torch.ones(1, 256, device=device, dtype=torch.bool))
    raise ValueError(name)


def timestep(name, i, steps, device, dtype):
    t = 1.0 - i / steps
    scale = 1.0 if name == "flux" else 1000.0
    return torch.full((1,), t * scale, device=device, dtype=dtype)


def generation(model, name, kw, steps, cfg_calls, device, dtype):
    times = []
    with torch.no_grad():
        for i in range(steps):
            t = timestep(name, i, steps, device, dtype)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for c in range(cfg_calls):
                model(**kw, timestep=t, return_dict=False)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    return times


def run_variant(name, model, kw, steps, cfg_calls, backend, options):
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, options=options) if backend else model
    t0 = time.perf_counter()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(order, set_priority=True):  # cuDNN first: the best dense baseline
        generation(compiled, name, kw, 2, cfg_calls, "cuda", torch.bfloat16)  # compile + warm-up
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - t0
        if backend == "chipmunk":
            cc.reset(compiled)
        torch.cuda.reset_peak_memory_stats()
        times = generation(compiled, name, kw, steps, cfg_calls, "cuda", torch.bfloat16)
    return dict(times_ms=times, compile_s=compile_s, peak_gb=torch.cuda.max_memory_allocated() / 2**30)


def kinds(preset: str, steps: int, layer: int = 10):
    cfg = ChipmunkConfig.from_any(preset)
    return [f"attn:{attn_step_kind(cfg.attn, s, layer)}/mlp:{mlp_step_kind(cfg.mlp, s, layer)}" for s in range(steps)]


def summarize(label, times, k):
    by = {}
    for t, kind in zip(times, k):
        by.setdefault(kind, []).append(t)
    med = {kind: sorted(v)[len(v) // 2] for kind, v in by.items()}
    return {"label": label, "total_ms": sum(times), "per_kind_median_ms": med}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="flux", choices=sorted(MODELS))
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--blocks", type=int, default=None, help="build this many blocks (video models)")
    ap.add_argument("--frames", type=int, default=None, help="latent frames (video models)")
    ap.add_argument("--config", default=None, help="chipmunk preset/yaml (default: the model's preset)")
    args = ap.parse_args()
    spec = MODELS[args.model]
    preset = args.config or spec["preset"]
    cfg_calls = spec.get("cfg_calls", 1)
    model = build(args.model, args.blocks)
    kw = inputs(args.model, model, frames=args.frames)
    gpu = torch.cuda.get_device_name()
    print(f"# {args.model} on {gpu}, torch {torch.__version__}, blocks={args.blocks or 'published'}, "
          f"steps={args.steps}, calls/step={cfg_calls}, preset={preset}", flush=True)
    results = {}
    results["inductor+cudnn"] = run_variant(args.model, model, kw, args.steps, cfg_calls, "inductor", None)
    print("baseline done", flush=True)
    results["chipmunk"] = run_variant(args.model, model, kw, args.steps, cfg_calls, "chipmunk", {"config": preset})
    k = kinds(preset, args.steps)
    base, chip = results["inductor+cudnn"], results["chipmunk"]
    sb, sc = summarize("inductor+cudnn", base["times_ms"], k), summarize("chipmunk", chip["times_ms"], k)
    print(f"{'variant':<16}{'total ms':>10}{'compile s':>11}{'peak GiB':>10}  per-step-kind median ms")
    for s, r in ((sb, base), (sc, chip)):
        kinds_txt = ", ".join(f"{kk}={v:.1f}" for kk, v in s["per_kind_median_ms"].items())
        print(f"{s['label']:<16}{s['total_ms']:>10.1f}{r['compile_s']:>11.1f}{r['peak_gb']:>10.1f}  {kinds_txt}")
    speedup = sb["total_ms"] / sc["total_ms"]
    print(f"speedup {speedup:.3f}x over {args.steps} steps ({args.model}, {gpu})")
    row = dict(model=args.model, gpu=gpu, torch=torch.__version__, blocks=args.blocks, steps=args.steps, preset=preset,
               baseline=sb, chipmunk=sc, speedup=speedup, compile_s={k_: r["compile_s"] for k_, r in results.items()},
               peak_gb={k_: r["peak_gb"] for k_, r in results.items()}, stats=None)
    for d in [os.path.join(os.path.dirname(__file__), "results"), os.environ.get("OUT")]:
        if d:
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, "e2e.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
