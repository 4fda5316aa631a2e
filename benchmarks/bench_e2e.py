"""End-to-end speed of diffusers DiTs: Inductor (cuDNN SDPA) vs backend="chipmunk".

    python benchmarks/bench_e2e.py --model flux                         # FLUX.1-dev size, 1280x768
    python benchmarks/bench_e2e.py --model flux-kontext --steps 28      # an edit: 1024x1024 + a reference image
    python benchmarks/bench_e2e.py --model hunyuan-video --blocks 2,3   # extrapolated to 20 + 40 blocks
    python benchmarks/bench_e2e.py --model wan --blocks 2,4 --default-sdpa
    python benchmarks/bench_e2e.py --model hunyuan-video-1.5 --blocks 3,5   # baseline: hunyuan15_baseline.py
    python benchmarks/bench_e2e.py --model cosmos3 --blocks 4           # a packed (tokens, C) sequence
    python benchmarks/bench_e2e.py --model sd3 --blocks 2,4             # also omnigen, qwen-image: odd-length sequences
    python benchmarks/bench_e2e.py --model auraflow --blocks 1,2        # head dim 256

What is measured, and how:
- Random weights built directly on the GPU in bf16 (no downloads), inputs at the published
  resolution; the timestep of step s is that of an `--steps`-step sampler (decreasing; `--shift`
  spaces them as a flow-matching sampler of that shift does). Refreshes written as noise levels
  (attn.full_step_levels) are resolved to the steps that sampler gives them, printed, and run as a
  step schedule (pinned steps carry no timestep; the kinds of the steps are what is timed).
- Step kinds: every step s has a label, the attention and MLP step kinds of the chipmunk schedule
  at layer 10 (a representative sparse layer), plus "+fore" on steps that run a forecast
  (attn.extrapolate, mlp.extrapolate), and "+sel" / "+reuse" on sparse MLP steps that pick
  new neuron indices / reuse the last ones. Steps of one kind cost the same, so not all `--steps`
  steps are timed: the coverage sequence is the real step indices s = 0, 1, ... kept while their
  label has been kept fewer than `--reps` times (default 2), plus the steps that make each kept
  MLP step select or reuse neurons as in a whole generation (`index_state_steps`; until session 58
  a "+reuse" step run right after a dense one was timed while it selected).
- Variants: "inductor+cudnn" = torch.compile(model) with SDPA priority cuDNN > Flash > efficient >
  math; "chipmunk" = torch.compile(model, backend="chipmunk", options={"config": preset}) under the
  same SDPA priority; with --default-sdpa also "inductor+default-sdpa" = plain torch.compile(model)
  with PyTorch's own SDPA choice. `--regional`: every variant compiles with diffusers'
  compile_repeated_blocks instead (one graph per block class; steps pinned as below, and no
  automatic-tracking generations: a block sees no timestep). Each: torch._dynamo.reset(), compile, then the coverage sequence
  three times in a row: pass 1 compiles and warms up (its wall time is "compile s"), pass 2 warms up
  again (lets the backend record CUDA graphs per step kind), then for chipmunk up to 3 more warm-up
  passes while a pass still recorded a graph or ran a call eagerly (a kind met once per pass, such
  as step 0, records one pass later than the others; its recording would otherwise be timed), and
  the last pass is timed: each step, all its CFG calls, between CUDA events, synchronized per step.
  "peak GiB" = max_memory_allocated in the timed pass.
  For chipmunk every call pins its step and CFG branch with chipmunk_compile.set_step(s, branch=c),
  so the schedule runs exactly the coverage step indices; each pass starts again at step 0, which
  the backend takes as a new generation (as chipmunk_compile.reset would make it).
- Totals: the `--steps` total of a variant = sum over s in 0..steps-1 of its timed-pass median for
  label(s). Speedup = inductor+cudnn total / chipmunk total.
- Whole generations (`--generations N`): per variant, after the timed pass, N generations of all
  `--steps` steps back to back (after untimed ones, until one records no CUDA graph), each one
  CUDA-event span with a single synchronize at its end: what a pipeline's loop sees, the host's
  per-call work overlapping the GPU. The per-step timing above synchronizes after every step, so
  there the host time before a step's first kernel adds in full (Dynamo's guards, the graph runner,
  the graph launch: ~3 ms per chipmunk step at FLUX's depth, benchmarks/profile_host.py). chipmunk
  runs them pinned (set_step, as above), then with automatic step tracking, whose timestep read
  waits for the GPU once per call; then every variant in a loop that steps a diffusers scheduler
  (chipmunk following it), and chipmunk once more with that loop inside a pipeline-shaped call
  (no follow_scheduler: the backend finds the pipeline's scheduler itself). Printed per measured
  depth, never extrapolated; JSON: generation_ms, generation_sched_ms (and chipmunk's
  generation_auto_ms, generation_pipe_ms) per variant under "measured", and generation_speedups.
- Depth: `--blocks n` builds n layers, or for FLUX / HunyuanVideo n double + 2n single blocks (the
  published 1:2 ratio of 19/38 and 20/40); the result is the reduced model's, as measured.
  `--blocks n1,n2` measures both depths and extrapolates each label's median linearly to the
  published depth (a unit = one layer, or one double + two single blocks): per_unit = (T(n2) -
  T(n1)) / (n2 - n1), full = T(n1) + (N_pub - n1) * per_unit; the output says so and also prints
  the measured numbers. Take n1 >= first_n_dense_layers (2 in the presets) so both depths hold the
  same dense-only layers and the added units are sparse ones.
- Text mask (`--text-mask`, hunyuan-video and mochi; every one of the 256 text tokens is valid):
  "ones" (default) passes encoder_attention_mask=ones(1, 256, bool). HunyuanVideo's forward turns it
  into a (B, 1, 1, N) boolean attn_mask that reaches SDPA in every block (all true, but SDPA cannot
  know that, so it leaves the unmasked kernels); the token refiner gets a (B, 1, 256, 256) one.
  "none" (hunyuan-video only): the forward requires encoder_attention_mask and always builds that
  attn_mask, so the inputs keep the all-ones mask and every attention processor is wrapped to drop
  it: SDPA gets attn_mask=None. Exact because an all-true mask changes nothing (checked on the
  inputs). Mochi's joint attention already calls SDPA without a mask (it gathers the valid text
  tokens with torch.nonzero) and its forward fails on encoder_attention_mask=None, so "none" is
  refused there. The choice is printed and stored in the JSON row ("text_mask"; null for others).
One JSON row per run appends to benchmarks/results/e2e.jsonl (and $OUT/e2e.jsonl when OUT is set).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import time
from collections import Counter, defaultdict

import torch

import chipmunk_compile as cc
from chipmunk_compile.config import ChipmunkConfig
from chipmunk_compile.schedule import (DENSE, REFRESH, SPARSE, attn_step_kind, mlp_recompute_indices, mlp_step_kind,
                                        period, refresh_steps, step_scale)

# published sizes (diffusers configs) and resolutions
MODELS = {
    "flux": dict(cls="FluxTransformer2DModel", layers=("num_layers", 19), extra_layers=("num_single_layers", 38),
                 config=dict(guidance_embeds=True), preset="flux"),
    # FLUX.1 Kontext [dev] (FLUX.1-dev's transformer) editing at 1024x1024: 64 x 64 generated tokens, then the
    # reference image's tokens at the Kontext resolution its pipeline resizes it to (880x1184: 55 x 74), whose
    # ids carry frame index 1; 512 text tokens first. 8678 tokens in one joint attention. No preset: default.
    "flux-kontext": dict(cls="FluxTransformer2DModel", layers=("num_layers", 19), extra_layers=("num_single_layers", 38),
                         config=dict(guidance_embeds=True), preset="default"),
    "wan": dict(cls="WanTransformer3DModel", layers=("num_layers", 40), config=dict(
        patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=13824, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=1e-6, rope_max_seq_len=1024), preset="wan", cfg_calls=2),
    "hunyuan-video": dict(cls="HunyuanVideoTransformer3DModel", layers=("num_layers", 20),
                          extra_layers=("num_single_layers", 40), config=dict(), preset="hunyuan-video"),
    "mochi": dict(cls="MochiTransformer3DModel", layers=("num_layers", 48), config=dict(), preset="mochi", cfg_calls=2),
    # HunyuanVideo 1.5 text-to-video (diffusers' defaults: 54 layers, 16 heads of 128, 65 input channels),
    # 720p 121 frames = a 31 x 45 x 80 latent. No preset of its own: HunyuanVideo's. Its baseline
    # attends over the valid key prefix (benchmarks/hunyuan15_baseline.py); chipmunk runs the stock model.
    "hunyuan-video-1.5": dict(cls="HunyuanVideo15Transformer3DModel", layers=("num_layers", 54),
                              config=dict(task_type="t2v"), preset="hunyuan-video"),
    # FLUX.2-dev (diffusers' defaults: 8 double + 48 single blocks, 48 heads of 128, SwiGLU MLPs; the
    # single blocks project q/k/v and the MLP input with one fused linear). No preset of its own yet:
    # FLUX.1's, whose sparsity levels were chosen on a FLUX.1-like model.
    "flux2": dict(cls="Flux2Transformer2DModel", layers=("num_layers", 8), extra_layers=("num_single_layers", 48),
                  config=dict(), preset="flux"),
    # Cosmos3 Omni (diffusers' defaults: 36 layers of width 4096, 32 query / 8 key-value heads of 128, SwiGLU 12288)
    # on one packed (tokens, C) sequence: a 512-token text prefix (causal, own weights) and the vision tokens,
    # which attend to cat(text keys, vision keys). 704x1280, 93 frames: a 24 x 44 x 80 latent of 48 channels,
    # patches of 2: 24 x 22 x 40 = 21120 vision tokens; a timestep per vision token. No preset of its own: default.
    "cosmos3": dict(cls="Cosmos3OmniTransformer", layers=("num_hidden_layers", 36), config=dict(), preset="default"),
    # OmniGen (diffusers' defaults: Phi-3's 32 layers of width 3072, 32 heads of 96, SwiGLU 8192) at 1024x1024:
    # OMNIGEN_TEXT prompt tokens, a time token and 64 x 64 image tokens in one sequence, under the pipeline's
    # (B, N, N) mask (causal, the time and image tokens bidirectional among themselves), which the model turns
    # into an additive bias: every attention a biased site. One guidance branch per call (the pipeline
    # batches its branches). No preset of its own: default.
    "omnigen": dict(cls="OmniGenTransformer2DModel", layers=("num_layers", 32), config=dict(
        rope_scaling={"long_factor": [1.0] * 48, "short_factor": [1.0] * 48}), preset="default"),
    # Stable Diffusion 3.5 Large (its transformer config: 38 layers of 38 heads of 64, width 2432, RMS q/k norm)
    # at 1024x1024: 64 x 64 image tokens and the 77 CLIP + 256 T5 text tokens, 4429 in all (not a multiple
    # of 8). The pipeline batches its two guidance branches: batch 2 per call. No preset of its own: default.
    "sd3": dict(cls="SD3Transformer2DModel", layers=("num_layers", 38), config=dict(
        sample_size=128, patch_size=2, in_channels=16, attention_head_dim=64, num_attention_heads=38,
        joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048, out_channels=16,
        pos_embed_max_size=192, qk_norm="rms_norm"), preset="default"),
    # Qwen-Image (diffusers' defaults: 60 layers, 24 heads of 128, MLLM text of width 3584) at its default
    # 1024x1024: 64 x 64 image tokens after QWEN_TEXT prompt tokens. The pipeline drops its template's tokens
    # and, for one prompt, passes no text mask and pads nothing: the count is the prompt's. One call per step
    # (true CFG only with a negative prompt). No preset of its own: default.
    "qwen-image": dict(cls="QwenImageTransformer2DModel", layers=("num_layers", 60), config=dict(), preset="default"),
    # AuraFlow v0.3 (diffusers' defaults: 4 MMDiT + 32 single DiT layers, 12 heads of 256, width 3072, SwiGLU;
    # the published config's 9216 positional embeddings, 1024x1024 needs 4096) at 1024x1024: 64 x 64 image
    # tokens after 256 Pile-T5 text tokens and 8 register tokens (4360 in all). The pipeline batches its two
    # guidance branches: batch 2 per call. Head dim 256: the attention kernels' widest tile (session 39).
    # No preset of its own: default.
    "auraflow": dict(cls="AuraFlowTransformer2DModel", layers=("num_mmdit_layers", 4),
                     extra_layers=("num_single_dit_layers", 32), config=dict(pos_embed_max_size=9216),
                     preset="default"),
}
OMNIGEN_TEXT = 64
SD3_TEXT = 77 + 256
QWEN_TEXT = 77
AURAFLOW_TEXT = 256  # Pile-T5 tokens; the model appends its 8 register tokens to them
COSMOS3_TEXT, COSMOS3_GRID = 512, (24, 22, 40)
# models that take the timestep in [0, 1] (the others: [0, 1000])
KONTEXT_REFERENCE = (55, 74)  # token grid of the reference image (880x1184 pixels)
FLOW_TIME = ("flux", "flux-kontext", "flux2", "omnigen", "qwen-image", "auraflow")
TEXT_MASK_MODELS = ("hunyuan-video", "mochi")  # the models whose forward takes encoder_attention_mask
HV15_VALID = (200, 32)  # valid MLLM and byT5 tokens of hunyuan-video-1.5's padded prompts
BASELINE, CHIPMUNK, DEFAULT_SDPA = "inductor+cudnn", "chipmunk", "inductor+default-sdpa"
LAYER = 10  # the representative sparse layer whose step kinds label a step


# -- models ---------------------------------------------------------------------------------------
def build(name: str, blocks: int | None, device="cuda", dtype=torch.bfloat16):
    """The model at published size, or with `blocks` units (n layers; n double + 2n single)."""
    import diffusers

    spec = MODELS[name]
    if name == "mochi":  # its attention keeps the valid text tokens with nonzero(): one graph needs this
        torch._dynamo.config.capture_dynamic_output_shape_ops = True
    cfg = dict(spec["config"])
    if blocks is not None:
        cfg[spec["layers"][0]] = blocks
        if "extra_layers" in spec:
            cfg[spec["extra_layers"][0]] = extra_ratio(name) * blocks  # the published ratio (19/38, 20/40, 8/48)
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = getattr(diffusers, spec["cls"])(**cfg).eval()
    torch.set_default_dtype(torch.float32)
    return model.to(dtype)


def inputs(name: str, model, device="cuda", dtype=torch.bfloat16, frames=None, size=None):
    """The model's call at its published resolution; for flux `size` = (height, width) in pixels
    gives another (bench_resolutions.py)."""
    g = torch.Generator(device).manual_seed(0)
    r = lambda *s: torch.randn(*s, device=device, dtype=dtype, generator=g)
    if name in ("flux", "flux-kontext"):
        h, w = (x // 16 for x in size or ((1024, 1024) if name == "flux-kontext" else (768, 1280)))
        grids = [(0, h, w)] + ([(1, *KONTEXT_REFERENCE)] if name == "flux-kontext" else [])
        img_ids = torch.cat([torch.cartesian_prod(torch.full((1,), float(t)), torch.arange(gh).float(),
                                                  torch.arange(gw).float()) for t, gh, gw in grids])
        return dict(hidden_states=r(1, img_ids.shape[0], 64), encoder_hidden_states=r(1, 512, 4096),
                    pooled_projections=r(1, 768), img_ids=img_ids.to(device, dtype),
                    txt_ids=torch.zeros(512, 3, device=device, dtype=dtype),
                    guidance=torch.full((1,), 3.5 if name == "flux" else 2.5, device=device, dtype=dtype))
    if name == "flux2":  # 1024x1024: 64x64 tokens of 128 channels, 512 text tokens; ids (t, h, w, l)
        h = w = 1024 // 16
        img_ids = torch.cartesian_prod(torch.zeros(1), torch.arange(h).float(), torch.arange(w).float(), torch.zeros(1))
        txt_ids = torch.cartesian_prod(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.arange(512).float())
        return dict(hidden_states=r(1, h * w, 128), encoder_hidden_states=r(1, 512, 15360),
                    img_ids=img_ids[None].to(device, dtype), txt_ids=txt_ids[None].to(device, dtype),
                    guidance=torch.full((1,), 4.0, device=device, dtype=dtype))
    if name == "wan":
        f = frames or 21
        return dict(hidden_states=r(1, 16, f, 90, 160), encoder_hidden_states=r(1, 512, 4096))
    if name == "hunyuan-video":
        f = frames or 33
        return dict(hidden_states=r(1, 16, f, 90, 160), encoder_hidden_states=r(1, 256, 4096),
                    encoder_attention_mask=torch.ones(1, 256, device=device, dtype=torch.bool), pooled_projections=r(1, 768),
                    guidance=torch.full((1,), 6.0, device=device, dtype=dtype) * 1000)
    if name == "hunyuan-video-1.5":  # padded prompts: HV15_VALID of the 1000 MLLM / 256 byT5 tokens valid
        f = frames or 31
        text, byt5 = (torch.zeros(1, n, device=device, dtype=torch.long) for n in (1000, 256))
        text[:, :HV15_VALID[0]], byt5[:, :HV15_VALID[1]] = 1, 1
        return dict(hidden_states=r(1, 65, f, 45, 80), encoder_hidden_states=r(1, 1000, 3584), encoder_attention_mask=text,
                    encoder_hidden_states_2=r(1, 256, 1472), encoder_attention_mask_2=byt5,
                    image_embeds=torch.zeros(1, 729, 1152, device=device, dtype=dtype))
    if name == "cosmos3":
        f, h, w = (frames or COSMOS3_GRID[0]), *COSMOS3_GRID[1:]
        n_txt, n_vis = COSMOS3_TEXT, f * h * w
        d = dict(device=device)
        ids = torch.randint(0, model.config.vocab_size, (n_txt,), generator=g, **d)
        pos = torch.cat([torch.arange(n_txt, **d)[None].expand(3, -1),  # text (i, i, i); vision (t, h, w)
                         torch.cartesian_prod(torch.arange(f, **d) + n_txt + 15000, torch.arange(h, **d),
                                              torch.arange(w, **d)).T], 1)
        vis = torch.arange(n_txt, n_txt + n_vis, **d)
        return dict(input_ids=ids, text_indexes=torch.arange(n_txt, **d), position_ids=pos, und_len=n_txt,
                    sequence_length=n_txt + n_vis, vision_tokens=[r(1, 48, f, 2 * h, 2 * w)],
                    vision_token_shapes=[(f, h, w)], vision_sequence_indexes=vis, vision_mse_loss_indexes=vis,
                    vision_noisy_frame_indexes=[torch.arange(f, **d)])
    if name == "omnigen":  # 1024x1024: a 128 x 128 latent of 4 channels, patches of 2
        n_img = (1024 // 16) ** 2
        n = OMNIGEN_TEXT + 1 + n_img
        mask = torch.ones(n, n, device=device).tril()
        mask[OMNIGEN_TEXT:, OMNIGEN_TEXT:] = 1  # the time and image tokens see each other
        ids = torch.randint(1, model.config.vocab_size, (1, OMNIGEN_TEXT), generator=g, device=device)
        return dict(hidden_states=r(1, 4, 128, 128), input_ids=ids, input_img_latents=[], input_image_sizes={},
                    attention_mask=mask[None].to(dtype), position_ids=torch.arange(n, device=device)[None])
    if name == "sd3":  # 1024x1024: a 128 x 128 latent of 16 channels (patches of 2 in the model); CFG batched
        return dict(hidden_states=r(2, 16, 128, 128), encoder_hidden_states=r(2, SD3_TEXT, 4096),
                    pooled_projections=r(2, 2048))
    if name == "auraflow":  # 1024x1024: a 128 x 128 latent of 4 channels (patches of 2 in the model); CFG batched
        return dict(hidden_states=r(2, 4, 128, 128), encoder_hidden_states=r(2, AURAFLOW_TEXT, 2048))
    if name == "qwen-image":  # 1024x1024: 64 x 64 packed latent tokens of 64 channels
        return dict(hidden_states=r(1, 64 * 64, 64), encoder_hidden_states=r(1, QWEN_TEXT, 3584),
                    img_shapes=[[(1, 64, 64)]])
    if name == "mochi":
        f = frames or 28
        return dict(hidden_states=r(1, 12, f, 60, 106), encoder_hidden_states=r(1, 256, 4096),
                    encoder_attention_mask=torch.ones(1, 256, device=device, dtype=torch.bool))
    raise ValueError(name)


MOCHI_NO_NONE = (
    "--text-mask none is not possible for mochi through MochiTransformer3DModel.forward: encoder_attention_mask is "
    "required (the caption pooler and MochiAttnProcessor2_0 index it, None raises), and there is no mask to drop: "
    "the joint attention gathers the valid text tokens with torch.nonzero and calls SDPA with attn_mask=None "
    "(only the one-query caption pooler passes a boolean mask)")


def resolve_text_mask(name: str, choice: str | None) -> str | None:
    """The --text-mask setting of a run: "ones" (default) or "none" for models that take a text mask,
    None for the others (where setting it is an error)."""
    if name not in TEXT_MASK_MODELS:
        if choice is not None:
            raise ValueError(f"--text-mask applies to {' and '.join(TEXT_MASK_MODELS)} only; {name} takes no text mask")
        return None
    choice = choice or "ones"
    if choice not in ("ones", "none"):
        raise ValueError(f"--text-mask is 'ones' or 'none', got {choice!r}")
    if choice == "none" and name == "mochi":
        raise ValueError(MOCHI_NO_NONE)
    return choice


def text_mask_text(name: str, text_mask: str | None) -> str:
    if text_mask is None:
        return "text mask: n/a"
    if text_mask == "ones":
        what = ("all-true boolean attn_mask reaches SDPA" if name == "hunyuan-video"
                else "SDPA gets no attn_mask in the joint attention")
        return f"text mask: ones (encoder_attention_mask all ones; {what})"
    return "text mask: none (encoder_attention_mask all ones, attention processors drop the mask: SDPA attn_mask=None)"


class MaskFreeAttnProcessor:
    """An attention processor of HunyuanVideo (HunyuanVideoAttnProcessor2_0 in the blocks,
    AttnProcessor2_0 in the token refiner) called with attention_mask=None. The explicit signature
    matters: diffusers' Attention.forward passes on only the keyword arguments __call__ names."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        extra = {} if image_rotary_emb is None else {"image_rotary_emb": image_rotary_emb}
        return self.inner(attn, hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=None, **extra)


MASK_FREE_OK = ("HunyuanVideoAttnProcessor2_0", "AttnProcessor2_0", "MaskFreeAttnProcessor")


def apply_text_mask(name: str, model, kw: dict, text_mask: str | None) -> dict:
    """Makes `model` (in place) and its inputs `kw` follow --text-mask; returns `kw`. "ones" and None
    change nothing. "none" (hunyuan-video): HunyuanVideoTransformer3DModel.forward requires
    encoder_attention_mask (it calls .sum() on it) and always builds a boolean (B, 1, 1, N) attn_mask
    from it (and a (B, 1, L, L) one for the token refiner), so the inputs keep the all-ones mask and
    every attention processor drops the mask."""
    if text_mask in (None, "ones"):
        return kw
    if name != "hunyuan-video":
        raise ValueError(MOCHI_NO_NONE if name == "mochi" else f"--text-mask none: {name} takes no text mask")
    mask = kw["encoder_attention_mask"]
    if not bool(mask.bool().all()):
        raise ValueError("--text-mask none drops the attention mask, which is exact only when every text token "
                         "is valid; encoder_attention_mask has padding")
    procs = model.attn_processors
    wrong = {k: type(p).__name__ for k, p in procs.items()
             if type(p).__name__ not in MASK_FREE_OK}
    if wrong:
        raise ValueError(f"--text-mask none knows the processors {MASK_FREE_OK[:2]} only, got {wrong}")
    model.set_attn_processor({k: p if isinstance(p, MaskFreeAttnProcessor) else MaskFreeAttnProcessor(p)
                              for k, p in procs.items()})
    return kw


def flow_level(i: int, steps: int, shift: float = 1.0) -> float:
    """Step i's noise level under a flow-matching sampler of `steps` steps and flow `shift` (1: equal steps)."""
    s = 1.0 - i / steps
    return shift * s / (1 + (shift - 1) * s)


def timestep(name, i, steps, device, dtype, shift: float = 1.0):
    scale = 1.0 if name in FLOW_TIME else 1000.0
    return torch.full((1,), flow_level(i, steps, shift) * scale, device=device, dtype=dtype)


def levels_as_steps(preset, steps: int, shift: float):
    """(preset, resolved): a config whose attention refreshes are written as noise levels
    (attn.full_step_levels) with them resolved to the steps this sampler (`steps`, `shift`) gives
    them, as the backend resolves them from the timesteps, and those steps; else (preset, None).
    Step kinds are what the timing depends on: pinned steps (set_step) carry no timestep, so the
    pinned and tracked generations run this step schedule alike. The resolved steps are this
    generation's own, so the returned config runs them unscaled (`schedule_steps: null`) with the
    MLP period already scaled to `steps` (the backend scales a schedule in steps by steps /
    schedule_steps, which would move steps that levels and `max_refresh_gap` already placed)."""
    cfg = ChipmunkConfig.from_any(preset)
    if cfg.attn.full_step_levels is None:
        return preset, None
    scale = step_scale(steps, cfg.schedule_steps)
    levels = tuple(flow_level(i, steps, shift) for i in range(steps))
    resolved = sorted(refresh_steps(cfg.attn, scale, levels))
    spec = dict(preset) if isinstance(preset, dict) else {"preset": preset}
    spec["attn"] = {**spec.get("attn", {}), "full_step_levels": None, "max_refresh_gap": None,
                    "full_step_schedule": resolved}
    if scale is not None:
        if cfg.overrides:
            raise SystemExit("bench_e2e: refreshes written as noise levels at --steps other than schedule_steps "
                             "with per-layer overrides: resolve them by hand (--steps 50, or a full_step_schedule)")
        spec["mlp"] = {**spec.get("mlp", {}), "full_step_every": period(cfg.mlp.full_step_every, scale)}
        spec["schedule_steps"] = None
    return spec, resolved


def timestep_inputs(name: str, kw: dict, i: int, steps: int, device="cuda", dtype=torch.bfloat16,
                    shift: float = 1.0) -> dict:
    """The step's timestep input: `timestep`, or for cosmos3 `vision_timesteps`, one per vision token."""
    t = timestep(name, i, steps, device, dtype, shift)
    if name == "cosmos3":
        return dict(vision_timesteps=t.float().expand(kw["vision_sequence_indexes"].numel()).contiguous())
    return dict(timestep=t)


def published_units(name: str) -> int:
    """The published depth in `--blocks` units (layers, or double blocks each with two singles)."""
    return MODELS[name]["layers"][1]


def extra_ratio(name: str) -> int:
    """Single blocks per double block at the published depth (2 for FLUX.1 and HunyuanVideo, 6 for
    FLUX.2): one `--blocks` unit is one double block and this many single blocks."""
    spec = MODELS[name]
    return spec["extra_layers"][1] // spec["layers"][1] if "extra_layers" in spec else 0


def depth_text(name: str, blocks: int | None) -> str:
    """'2 double + 4 single blocks', 'published depth, 40 layers', ..."""
    n = published_units(name) if blocks is None else blocks
    what = (f"{n} double + {extra_ratio(name) * n} single blocks" if "extra_layers" in MODELS[name]
            else f"{n} layer{'s' * (n != 1)}")
    return f"published depth, {what}" if blocks is None else what


def parse_blocks(text: str | None, published: int | None = None) -> list[int] | None:
    """'2' -> [2]; '1,2' -> [1, 2] (two distinct counts, ascending); None -> None (published depth).
    One count equal to `published` is the published depth itself: None, so that the output and the
    row say so (AuraFlow's `--blocks 4` was labelled a reduced model)."""
    if text is None:
        return None
    counts = sorted(int(x) for x in text.split(",") if x.strip())
    if len(counts) not in (1, 2) or len(set(counts)) != len(counts) or counts[0] < 1:
        raise ValueError(f"--blocks takes one count or two distinct counts, got {text!r}")
    return None if counts == [published] else counts


# -- schedule: labels, coverage, totals, extrapolation (pure) ------------------------------------
def _forecasts(step_kind, op_cfg, step: int, layer: int, measuring: str, scale=None) -> bool:
    """Whether an op's forecast (`extrapolate`) runs at `step`: a measuring step (attention refresh,
    MLP dense step) after the generation's first one, or a sparse step after its second."""
    if op_cfg.extrapolate <= 0 or not op_cfg.enabled or layer < op_cfg.first_n_dense_layers:
        return False
    kind = step_kind(op_cfg, step, layer, scale)
    if kind not in (SPARSE, measuring):
        return False
    earlier = sum(step_kind(op_cfg, s, layer, scale) == measuring for s in range(step))
    return earlier >= (2 if kind == SPARSE else 1)


def step_label(cfg: ChipmunkConfig, step: int, layer: int = LAYER) -> str:
    """The step's kinds as the backend runs them: with the config's `steps` (which main() sets to
    --steps, so that pinned, tracked and followed generations all scale alike) its periods scaled."""
    scale = step_scale(cfg.steps, cfg.schedule_steps)
    mlp = mlp_step_kind(cfg.mlp, step, layer, scale)
    label = f"attn:{attn_step_kind(cfg.attn, step, layer, scale)}"
    label += "+fore" if _forecasts(attn_step_kind, cfg.attn, step, layer, REFRESH, scale) else ""
    label += f"/mlp:{mlp}" + ("+fore" if _forecasts(mlp_step_kind, cfg.mlp, step, layer, DENSE, scale) else "")
    if mlp == SPARSE:
        label += "+sel" if selects_neurons(cfg, step, layer, scale) else "+reuse"
    return label


def selects_neurons(cfg: ChipmunkConfig, step: int, layer: int = LAYER, scale=None) -> bool:
    """Whether a sparse MLP step of a whole generation picks new neuron indices: where the schedule
    says so, and at the first sparse step after a dense one, whose reference means the dense step
    moved (the backend drops the indices there: ops/mlp.py `commit`). Until session 58 the labels
    missed the second rule: FLUX's "+reuse" steps were timed at step 11, which selects."""
    if mlp_recompute_indices(cfg.mlp, step, scale):
        return True
    return step > 0 and mlp_step_kind(cfg.mlp, step - 1, layer, scale) == DENSE


def step_labels(preset, steps: int, layer: int = LAYER) -> list[str]:
    cfg = ChipmunkConfig.from_any(preset)
    return [step_label(cfg, s, layer) for s in range(steps)]


def coverage(preset, steps: int, reps: int = 2) -> list[int]:
    """Step indices, in order, each kept while its label has been kept fewer than `reps` times;
    then each kept step's neuron-index state made the whole generation's (`index_state_steps`)."""
    kept, seq = Counter(), []
    for s, label in enumerate(step_labels(preset, steps)):
        if kept[label] < reps:
            kept[label] += 1
            seq.append(s)
    return index_state_steps(ChipmunkConfig.from_any(preset), seq)


def index_state_steps(cfg: ChipmunkConfig, seq: list[int], layer: int = LAYER) -> list[int]:
    """`seq` plus the steps that make each of its sparse MLP steps select or reuse neurons as in a
    whole generation, when only these steps run (pinned). The backend drops the indices at a dense
    MLP step, so a step that selects because its step before is dense gets that step, and a step
    that reuses gets a sparse step between it and the last dense one run before it (the first after
    that dense one: it selects, as in a whole generation)."""
    scale = step_scale(cfg.steps, cfg.schedule_steps)

    def kind(t):
        return mlp_step_kind(cfg.mlp, t, layer, scale)

    out = set(seq)
    while True:
        needed = set()
        for s in sorted(out):
            if kind(s) != SPARSE or mlp_recompute_indices(cfg.mlp, s, scale):
                continue
            if selects_neurons(cfg, s, layer, scale):
                needed.add(s - 1)
                continue
            dense = max(t for t in out | {0} if t < s and kind(t) == DENSE)
            if not any(dense < t < s and kind(t) == SPARSE for t in out):
                needed.add(dense + 1)
        if needed <= out:
            return sorted(out)
        out |= needed


def medians_by_label(times: dict[int, float], labels: list[str]) -> dict[str, float]:
    by = defaultdict(list)
    for s, ms in sorted(times.items()):
        by[labels[s]].append(ms)
    return {label: statistics.median(v) for label, v in by.items()}


def total_from_medians(medians: dict[str, float], labels: list[str]) -> float:
    return sum(medians[label] for label in labels)


def extrapolate(m1: dict[str, float], n1: int, m2: dict[str, float], n2: int, n_pub: int) -> dict[str, float]:
    """Per label, linear in depth through (n1, m1) and (n2, m2), evaluated at n_pub."""
    out = {}
    for label in m1:
        per_unit = (m2[label] - m1[label]) / (n2 - n1)
        fixed = m1[label] - n1 * per_unit
        out[label] = fixed + n_pub * per_unit
    return out


def min_dense_layers(preset) -> int:
    cfg = ChipmunkConfig.from_any(preset)
    return max(cfg.attn.first_n_dense_layers if cfg.attn.enabled else 0,
               cfg.mlp.first_n_dense_layers if cfg.mlp.enabled else 0)


# -- running ---------------------------------------------------------------------------------------
class StepPin:
    """Pins chipmunk's step and CFG branch before every call (also the first call of a fresh
    compile: its sessions take the pin)."""

    def __init__(self, compiled):
        self.compiled = compiled

    def __call__(self, step: int, call: int) -> None:
        cc.set_step(self.compiled, step, branch=str(call))


def time_step(fn) -> float:
    """Milliseconds of `fn()` on the GPU between CUDA events, synchronized."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def run_pass(model, step_kwargs, seq, cfg_calls, pin=None, outs: dict | None = None) -> dict[int, float]:
    """One pass over the step indices `seq`; ms per step (all its CFG calls). `outs`, when given,
    receives each step's last output (its first element, fp32 on the host), read after the timing."""
    times = {}
    with torch.no_grad():
        for s in seq:
            kw = step_kwargs(s)
            last = []

            def one_step():
                for c in range(cfg_calls):
                    if pin is not None:
                        pin(s, c)
                    last[:] = [model(**kw)]

            times[s] = time_step(one_step)
            if outs is not None:
                outs[s] = first_tensor(last[0]).float().cpu()
    return times


def first_tensor(out) -> torch.Tensor:
    """A model call's first output tensor (cosmos3 returns lists of per-modality predictions)."""
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out


class PipelineShaped:
    """What a diffusers pipeline is to the backend: an object holding the model and a scheduler whose
    `__call__` runs the loop (`chipmunk_compile.pipeline_loop`), without the text encoders and VAE that
    a real pipeline would need weights for."""

    def __init__(self, transformer, scheduler):
        self.transformer, self.scheduler = transformer, scheduler

    def __call__(self, kws: list, cfg_calls: int) -> None:
        run_generation(self.transformer, kws, cfg_calls, None, self.scheduler)


def run_generations(model, step_kwargs, steps: int, cfg_calls: int, n: int, pin=None, timer=None,
                    scheduler=None, pipeline: bool = False) -> list[float]:
    """`n` whole generations of `steps` steps back to back, each timed as one span (CUDA events, one
    synchronize at its end): the wall time a pipeline sees, the host's work overlapping the GPU's
    except where a call waits for the GPU itself (chipmunk's automatic step tracking reads the
    timestep). Untimed generations first (`warm_up`). The step inputs are built before any of them.
    With a diffusers `scheduler`, each generation calls its set_timesteps and, after each step's
    calls, its step() on the prediction, as a pipeline's loop does (the model inputs stay fixed);
    with `pipeline`, that loop runs inside a `PipelineShaped` call holding the model and the scheduler."""
    timer = timer or time_step
    kws = [step_kwargs(s) for s in range(steps)]

    def generation():
        if pipeline:
            PipelineShaped(model, scheduler)(kws, cfg_calls)
        else:
            run_generation(model, kws, cfg_calls, pin, scheduler)

    with torch.no_grad():
        warm_up(generation)
        return [timer(generation) for _ in range(n)]


def run_generation(model, kws: list, cfg_calls: int = 1, pin=None, scheduler=None) -> None:
    """One generation: for each step's inputs in `kws`, its `cfg_calls` model calls (each pinned by
    `pin(step, call)` when given) and, with a diffusers `scheduler` (set_timesteps first), its step()
    on the prediction, as a pipeline's loop does (the model inputs stay fixed)."""
    if scheduler is not None:
        scheduler.set_timesteps(len(kws))
    sample = None
    for s, kw in enumerate(kws):
        for c in range(cfg_calls):
            if pin is not None:
                pin(s, c)
            out = model(**kw)
        if scheduler is not None:
            pred = first_tensor(out)
            sample = scheduler.step(pred, scheduler.timesteps[s], pred if sample is None else sample,
                                    return_dict=False)[0]


def generation_runs(compiled, step_kwargs, steps: int, cfg_calls: int, n: int, pin=None, timer=None,
                    auto: bool = True, chipmunk: bool = False) -> dict:
    """Median ms of `n` whole generations: as timed per step (chipmunk pinned by `pin`), and unless
    `auto` is False (regional compilation: a block sees no timestep) as a diffusers pipeline's loop
    runs them ("generation_sched_ms": each step ends with a FlowMatchEulerDiscreteScheduler step,
    for every variant; chipmunk follows that scheduler, `follow_scheduler`) and for chipmunk with
    automatic step tracking (no pin, nothing followed, no pipeline on the stack: the backend reads each
    call's timestep), and once more for chipmunk with that scheduler's loop inside a pipeline's call
    ("generation_pipe_ms", `PipelineShaped`; nothing followed: the backend finds the pipeline's
    scheduler, as under a diffusers pipeline)."""
    median = statistics.median
    out = {"generation_ms": median(run_generations(compiled, step_kwargs, steps, cfg_calls, n, pin, timer))}
    if not auto:
        return out
    if pin is not None:
        cc.clear_step(pin.compiled)
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler()
    if chipmunk:
        cc.follow_scheduler(compiled, sched)
    try:
        out["generation_sched_ms"] = median(run_generations(compiled, step_kwargs, steps, cfg_calls, n, None, timer,
                                                            scheduler=sched))
    finally:
        if chipmunk:
            cc.follow_scheduler(compiled, None)
    if pin is not None:
        out["generation_auto_ms"] = median(run_generations(compiled, step_kwargs, steps, cfg_calls, n, None, timer))
    if chipmunk:  # the same loop inside a pipeline's call, nothing followed: its scheduler gives the steps
        out["generation_pipe_ms"] = median(run_generations(compiled, step_kwargs, steps, cfg_calls, n, None, timer,
                                                           scheduler=FlowMatchEulerDiscreteScheduler(), pipeline=True))
    return out


def with_overrides(preset, items: list[str]):
    """The preset itself, or {"preset": preset, section: {key: value}, key: value} with every [SECTION.]KEY=VALUE
    of `items` laid over it (validated here, before any model is built)."""
    if not items:
        return preset
    import yaml

    cfg: dict = {"preset": preset}
    for item in items:
        key, sep, value = item.partition("=")
        path = key.split(".")  # [KEY] (a top-level key) or [SECTION, KEY]
        if not (sep and value and all(path) and len(path) <= 2):
            raise SystemExit(f"--set {item!r}: expected [SECTION.]KEY=VALUE, e.g. attn.full_step_every=5 "
                             "or cuda_graphs_max_gib=8")
        target = cfg if len(path) == 1 else cfg.setdefault(path[0], {})
        target[path[-1]] = yaml.safe_load(value)
    ChipmunkConfig.from_any(cfg)
    return cfg


def compile_variant(variant: str, model, preset, regional: bool = False):
    """The compiled model; with `regional`, diffusers' compile_repeated_blocks (one graph per block
    class) on the model itself, which `uncompile_blocks` undoes."""
    kw = dict(backend="chipmunk", options={"config": preset}) if variant == CHIPMUNK else {}
    if regional:
        model.compile_repeated_blocks(**kw)
        return model
    return torch.compile(model, **kw)


def uncompile_blocks(model) -> None:
    for m in model.modules():
        m._compiled_call_impl = None


def sdpa_context(variant: str):
    if variant == DEFAULT_SDPA:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel(order, set_priority=True)  # cuDNN first: the best dense baseline


def chipmunk_counters(before: dict) -> dict:
    from torch._dynamo.utils import counters

    now = counters["chipmunk"]
    return {k: v - before.get(k, 0) for k, v in now.items() if v != before.get(k, 0)}


def stats_summary(compiled) -> dict:
    """cc.stats folded to per-site-kind step counts (over all three passes)."""
    try:
        st = cc.stats(compiled)
    except Exception as e:  # never lose the timings to a reporting helper
        return {"error": repr(e)}
    steps: dict = {}
    for site in st["sites"]:
        d = steps.setdefault(site["kind"], {})
        for k, v in site["steps"].items():
            d[k] = d.get(k, 0) + v
    return dict(calls=st.get("calls"), generation=st.get("generation"), sites=len(st["sites"]),
                state_gib=st["state_bytes"] / 2**30, site_steps=steps)


def _graph_work(counters, before: dict) -> bool:
    """Whether the chipmunk runner recorded a CUDA graph or ran eagerly since `before`."""
    now = counters["chipmunk"]
    return any(now.get(k, 0) != before.get(k, 0) for k in ("graph_recorded", "graph_eager_calls"))


def warm_up(run, limit: int = 4) -> int:
    """`run()` (one pass or generation) again while the last one recorded a CUDA graph or ran a call
    eagerly, at most `limit` times: a kind met once per pass (step 0) can still be recording in the
    second, and would otherwise be timed. Returns the number of runs (1 when nothing is recorded,
    as for the Inductor baseline)."""
    from torch._dynamo.utils import counters

    for runs in range(1, limit + 1):
        mark = dict(counters["chipmunk"])
        run()
        if not _graph_work(counters, mark):
            break
    return runs


def run_variant(variant, model, step_kwargs, seq, labels, cfg_calls, preset, steps=50, generations=0,
                regional=False) -> dict:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    compiled = compile_variant(variant, model, preset, regional)
    pin = StepPin(compiled) if variant == CHIPMUNK else None
    before = dict(counters["chipmunk"])
    with sdpa_context(variant):
        t0 = time.perf_counter()
        run_pass(compiled, step_kwargs, seq, cfg_calls, pin)  # pass 1: compile + warm-up
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - t0
        # pass 2 (CUDA graphs per kind), and up to 3 more until a whole pass replays
        extra = warm_up(lambda: run_pass(compiled, step_kwargs, seq, cfg_calls, pin)) - 1
        torch.cuda.reset_peak_memory_stats()
        times = run_pass(compiled, step_kwargs, seq, cfg_calls, pin)  # the timed pass
    medians = medians_by_label(times, labels)
    res = dict(medians_ms=medians, total_ms=total_from_medians(medians, labels), compile_s=compile_s,
               peak_gb=torch.cuda.max_memory_allocated() / 2**30, times_ms={str(s): t for s, t in times.items()},
               extra_warmup_passes=extra)
    if variant == CHIPMUNK:
        res.update(counters=chipmunk_counters(before), stats=stats_summary(compiled))
    if generations:
        with sdpa_context(variant):
            res.update(generation_runs(compiled, step_kwargs, steps, cfg_calls, generations, pin, auto=not regional,
                                       chipmunk=variant == CHIPMUNK))
    if variant == CHIPMUNK:
        cc.clear_step(compiled)
    if regional:
        uncompile_blocks(model)
    return res


def baseline_attention(name: str, model, kw: dict):
    """The baselines' attention where diffusers' own is not the fastest exact one: hunyuan-video-1.5
    attends over its valid key prefix (hunyuan15_baseline.py). Returns the processors to restore, or None."""
    if name != "hunyuan-video-1.5":
        return None
    import hunyuan15_baseline

    return hunyuan15_baseline.use_prefix_baseline(model, kw)


def baseline_text(name: str) -> str:
    if name != "hunyuan-video-1.5":
        return "baseline attention: the model's own"
    return (f"baseline attention: exact, unmasked SDPA over the valid key prefix (video + {HV15_VALID[1]} byT5 + "
            f"{HV15_VALID[0]} MLLM tokens; padded queries zero), not diffusers' N x N boolean mask; chipmunk: stock model")


def free_gpu() -> None:
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()


def measure(args, variants, blocks, preset, seq, labels) -> dict:
    """Build the model at `blocks` depth and run every variant on it; frees the model after."""
    model = build(args.model, blocks)
    if args.lora:  # unfused peft-shaped adapters on every block linear, as load_lora_weights leaves them
        from lora_adapters import add_lora

        add_lora(model, rank=args.lora, scales=(1.0,))
    kw = apply_text_mask(args.model, model, inputs(args.model, model, frames=args.frames), args.text_mask)
    cfg_calls = MODELS[args.model].get("cfg_calls", 1)

    def step_kwargs(s):
        return dict(kw, **timestep_inputs(args.model, kw, s, args.steps, shift=args.shift), return_dict=False)

    out = {}
    for variant in variants:
        stock = baseline_attention(args.model, model, kw) if variant != CHIPMUNK else None
        out[variant] = run_variant(variant, model, step_kwargs, seq, labels, cfg_calls, preset, args.steps,
                                   args.generations, args.regional)
        if stock is not None:
            model.set_attn_processor(stock)
        print(f"  {variant} done on {depth_text(args.model, blocks)}", flush=True)
    del model, kw, step_kwargs
    free_gpu()
    return out


def extrapolated(measured: dict, n1: int, n2: int, n_pub: int, labels: list[str]) -> dict:
    out = {}
    for variant in measured[n1]:
        med = extrapolate(measured[n1][variant]["medians_ms"], n1, measured[n2][variant]["medians_ms"], n2, n_pub)
        out[variant] = dict(medians_ms=med, total_ms=total_from_medians(med, labels), compile_s=None, peak_gb=None)
    return out


# -- reporting -------------------------------------------------------------------------------------
def print_table(title: str, results: dict, labels: list[str]) -> None:
    count = Counter(labels)
    print(f"\n## {title}")
    print(f"{'variant':<24}{'total ms':>11}{'compile s':>11}{'peak GiB':>10}  "
          "per-step-kind median ms (x steps of that kind)")
    for variant, r in results.items():
        comp = f"{r['compile_s']:>11.1f}" if r["compile_s"] is not None else f"{'-':>11}"
        peak = f"{r['peak_gb']:>10.1f}" if r["peak_gb"] is not None else f"{'-':>10}"
        kinds = ", ".join(f"{k} x{count[k]}={v:.1f}" for k, v in r["medians_ms"].items())
        print(f"{variant:<24}{r['total_ms']:>11.1f}{comp}{peak}  {kinds}")


def speedups(final: dict) -> dict:
    out = {"speedup": final[BASELINE]["total_ms"] / final[CHIPMUNK]["total_ms"]}
    if DEFAULT_SDPA in final:
        out["speedup_vs_default_sdpa"] = final[DEFAULT_SDPA]["total_ms"] / final[CHIPMUNK]["total_ms"]
    return out


def write_row(row: dict) -> None:
    for d in [os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"), os.environ.get("OUT")]:
        if d:
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, "e2e.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")


def depth_statement(name: str, counts: list[int] | None) -> str:
    if counts is None:
        return f"measured at the {depth_text(name, None)}"
    if len(counts) == 1:
        return (f"MEASURED on a reduced model ({depth_text(name, counts[0])}), NOT at the "
                f"{depth_text(name, None)}; not extrapolated")
    n1, n2 = counts
    return (f"EXTRAPOLATED to the {depth_text(name, None)} from measured reduced models "
            f"with blocks={n1} ({depth_text(name, n1)}) and blocks={n2} ({depth_text(name, n2)}), "
            f"linearly per step kind")


def final_results(name, counts, measured, labels) -> dict:
    """The extrapolated results (two block counts) or the measured ones (one or none)."""
    if counts is not None and len(counts) == 2:
        return extrapolated(measured, *counts, published_units(name), labels)
    return measured[(counts or [None])[0]]


def generation_speedups(res: dict) -> dict | None:
    """Speedups over the baseline of whole generations (run_generations) at one measured depth:
    chipmunk pinned ("pinned"), with automatic step tracking ("auto"), and both variants in a
    scheduler's loop with chipmunk following it ("scheduler"); None when not timed."""
    base, chip = res.get(BASELINE, {}), res.get(CHIPMUNK, {})
    if "generation_ms" not in base or "generation_ms" not in chip:
        return None
    out = {"pinned": base["generation_ms"] / chip["generation_ms"]}
    if "generation_auto_ms" in chip:
        out["auto"] = base["generation_ms"] / chip["generation_auto_ms"]
    if "generation_sched_ms" in chip and "generation_sched_ms" in base:
        out["scheduler"] = base["generation_sched_ms"] / chip["generation_sched_ms"]
    if "generation_pipe_ms" in chip and "generation_sched_ms" in base:
        out["pipeline"] = base["generation_sched_ms"] / chip["generation_pipe_ms"]
    return out


def generation_text(res: dict, depth: str) -> str | None:
    sp = generation_speedups(res)
    if sp is None:
        return None
    chip = res[CHIPMUNK]
    text = (f"whole generations, {depth} (median, back to back, one synchronize each): {BASELINE} "
            f"{res[BASELINE]['generation_ms']:.0f} ms; chipmunk pinned {chip['generation_ms']:.0f} ms "
            f"({sp['pinned']:.3f}x)")
    if "auto" in sp:
        text += f", automatic step tracking {chip['generation_auto_ms']:.0f} ms ({sp['auto']:.3f}x)"
    if "scheduler" in sp:
        text += (f"; in a scheduler's loop (follow_scheduler): {BASELINE} {res[BASELINE]['generation_sched_ms']:.0f} ms, "
                 f"chipmunk {chip['generation_sched_ms']:.0f} ms ({sp['scheduler']:.3f}x)")
    if "pipeline" in sp:
        text += (f"; that loop inside a pipeline's call, nothing followed (the backend finds its scheduler): "
                 f"chipmunk {chip['generation_pipe_ms']:.0f} ms ({sp['pipeline']:.3f}x)")
    return text


def print_results(args, counts, measured, final, labels, seq, gpu) -> None:
    for n, res in measured.items():
        print_table(f"measured: {depth_text(args.model, n)}", res, labels)
        gen = generation_text(res, depth_text(args.model, n))
        if gen:
            print(gen)
    if final is not measured.get((counts or [None])[0]):
        print_table(f"EXTRAPOLATED to the {depth_text(args.model, None)} from blocks={counts}", final, labels)
    sp = speedups(final)
    print(f"\nspeedup {sp['speedup']:.3f}x ({BASELINE} total / chipmunk total)"
          + (f"; {sp['speedup_vs_default_sdpa']:.3f}x over {DEFAULT_SDPA}" if DEFAULT_SDPA in final else ""))
    print(f"{args.model}: {depth_statement(args.model, counts)}")
    print(text_mask_text(args.model, args.text_mask))
    print(f"GPU {gpu}, torch {torch.__version__}")
    print(f"{args.steps}-step total computed from per-kind medians over steps {seq}")


def json_row(args, counts, preset, measured, final, labels, seq, gpu) -> dict:
    last = list(measured)[-1]  # compile time and peak memory: of the last (deepest) measured model
    return dict(model=args.model, gpu=gpu, torch=torch.__version__, blocks=counts, frames=args.frames,
                lora_rank=args.lora, freezing=args.freezing, regional=args.regional,
                text_mask=args.text_mask, baseline_attention=baseline_text(args.model),
                steps=args.steps, shift=getattr(args, "shift", 1.0), refresh_levels=getattr(args, "refresh_levels", None),
                preset=preset, reps=args.reps, coverage=seq, kind_counts=dict(Counter(labels)),
                extrapolated=counts is not None and len(counts) == 2, published_units=published_units(args.model),
                medians_ms={v: r["medians_ms"] for v, r in final.items()},
                total_ms={v: r["total_ms"] for v, r in final.items()}, **speedups(final),
                compile_s={v: r["compile_s"] for v, r in measured[last].items()},
                peak_gb={v: r["peak_gb"] for v, r in measured[last].items()}, compile_peak_blocks=last,
                measured={str(n): res for n, res in measured.items()},
                generation_speedups={str(n): generation_speedups(res) for n, res in measured.items()},
                chipmunk_counters=measured[last][CHIPMUNK].get("counters"),
                chipmunk_stats=measured[last][CHIPMUNK].get("stats"))


def parse_args():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="flux", choices=sorted(MODELS))
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--shift", type=float, default=1.0,
                    help="the sampler's flow shift (HunyuanVideo 7, Wan 720p 5): the timesteps' spacing, and where "
                         "refreshes written as noise levels (attn.full_step_levels) fall")
    ap.add_argument("--blocks", default=None,
                    help="reduced depth: 'n' (measured) or 'n1,n2' (extrapolated to the published depth); "
                         "a unit = one layer, or for flux/hunyuan-video one double + two single blocks")
    ap.add_argument("--frames", type=int, default=None, help="latent frames (video models)")
    ap.add_argument("--config", default=None, help="chipmunk preset/yaml (default: the model's preset)")
    ap.add_argument("--set", action="append", default=[], metavar="[SECTION.]KEY=VALUE",
                    help="override one key of the preset, e.g. attn.full_step_every=5, attn.min_mass=0.7 or "
                         "cuda_graphs_max_gib=8 "
                         "(repeatable; values are YAML)")
    ap.add_argument("--reps", type=int, default=2, help="timed steps per step kind")
    ap.add_argument("--generations", type=int, default=0, metavar="N",
                    help="also time N whole generations per variant back to back, one synchronize each "
                         "(chipmunk pinned and with automatic step tracking); at each measured depth")
    ap.add_argument("--default-sdpa", action="store_true", help="also time plain torch.compile with default SDPA")
    ap.add_argument("--lora", type=int, default=0, metavar="RANK",
                    help="unfused LoRA adapters of this rank on every block linear (benchmarks/lora_adapters.py), "
                         "for every variant; chipmunk folds them into the MLP weights on each call")
    ap.add_argument("--freezing", action="store_true",
                    help="torch._inductor.config.freezing = True for every variant (weights as constants: "
                         "Inductor folds LoRA adapters once at compile time)")
    ap.add_argument("--regional", action="store_true",
                    help="regional compilation for every variant: diffusers' compile_repeated_blocks (one graph "
                         "per block class) instead of torch.compile of the whole model")
    ap.add_argument("--text-mask", choices=("ones", "none"), default=None,
                    help="hunyuan-video/mochi: 'ones' (default) passes the all-ones encoder_attention_mask as is; "
                         "'none' (hunyuan-video only) makes attention run with attn_mask=None (same result)")
    args = ap.parse_args()
    try:
        args.text_mask = resolve_text_mask(args.model, args.text_mask)
    except ValueError as e:
        ap.error(str(e))
    return args


def main():
    args = parse_args()
    if args.freezing:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
    counts = parse_blocks(args.blocks, published_units(args.model))
    spec = MODELS[args.model]
    # the step count in the config: every way of running the steps (pinned, tracked, a followed
    # scheduler) scales the schedule's periods alike (ChipmunkConfig.schedule_steps)
    preset = with_overrides(args.config or spec["preset"], [f"steps={args.steps}", *args.set])
    args.refresh_levels = ChipmunkConfig.from_any(preset).attn.full_step_levels
    preset, resolved = levels_as_steps(preset, args.steps, args.shift)
    if resolved is not None:
        print(f"# attn.full_step_levels at {args.steps} steps of flow shift {args.shift}: refreshes at steps {resolved}",
              flush=True)
    labels = step_labels(preset, args.steps)
    seq = coverage(preset, args.steps, args.reps)
    variants = [BASELINE] + ([DEFAULT_SDPA] if args.default_sdpa else []) + [CHIPMUNK]
    gpu = torch.cuda.get_device_name()
    print(f"# {args.model} on {gpu}, torch {torch.__version__}, steps={args.steps}, "
          f"calls/step={spec.get('cfg_calls', 1)}, preset={preset}, coverage steps {seq}, "
          f"{text_mask_text(args.model, args.text_mask)}; {baseline_text(args.model)}"
          f"{f'; LoRA rank {args.lora} on every block linear' if args.lora else ''}"
          f"{'; Inductor freezing' if args.freezing else ''}"
          f"{'; regional compilation (compile_repeated_blocks)' if args.regional else ''}", flush=True)
    if counts is not None and len(counts) == 2 and counts[0] < min_dense_layers(preset):
        print(f"WARNING: blocks={counts[0]} < first_n_dense_layers={min_dense_layers(preset)}: the two depths hold "
              f"different dense-only layers, so the extrapolation mixes dense and sparse per-unit costs", flush=True)
    measured = {n: measure(args, variants, n, preset, seq, labels) for n in (counts or [None])}
    final = final_results(args.model, counts, measured, labels)
    print_results(args, counts, measured, final, labels, seq, gpu)
    write_row(json_row(args, counts, preset, measured, final, labels, seq, gpu))


if __name__ == "__main__":
    main()
