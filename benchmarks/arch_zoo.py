"""Which diffusers transformers chipmunk understands, and how exactly: a zoo of tiny random models.

    python benchmarks/arch_zoo.py                          # all 88 rows (here, arch_zoo_newer.py, arch_zoo_research.py, arch_zoo_spellings.py; CPU, ~3-8 min)
    python benchmarks/arch_zoo.py --models flux wan sana   # a few (names: keys of MODELS)
    python benchmarks/arch_zoo.py --out /tmp/zoo           # results elsewhere

Per model (1-2 layers plus any refiner/text blocks, 2 heads of dim 16, random weights, float32,
CPU; image latents of 16x16..24x24, video of 3 frames: ~60-260 latent tokens + a few text tokens):
  sites      — `chipmunk_compile.inspect`: matched attention / MLP sites, rejected candidates and
               the token grouping of each site (min_tokens 0, no dense-only first layers);
  dense err  — the model compiled with backend="chipmunk" (inner compiler "eager", so no C++
               build) against eager, call 0: a dense step, must be exact (~1e-6);
  sparse err — calls 1-4 with slowly changing inputs (latent + 0.02·step·drift, timestep going
               down): refresh / sparse steps at top_keys 0.25 (attn) and 0.3 (MLP), group/block
               16; max over the calls of max|a-b| / max|b|. Random weights give diffuse attention,
               so this is a smoke test of the sparse path, not a quality number;
  out_change — how much the eager output itself moves from one call to the next (max over calls of
               max|y_s - y_s-1| / max|y_s-1|): the error of simply reusing the previous output;
  sparse_steps — site-calls that ran the sparse path (from `chipmunk_compile.stats`; 0 means the
               sparse error measured nothing);
  fallbacks  — `counters["chipmunk"]` keys starting with "fallback", summed over the run.
Every model runs in its own try/except: a failure is recorded (phase, exception, last frames) and
the zoo goes on. Writes benchmarks/results/arch_zoo.{csv,md}.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
import traceback

import torch
from torch._dynamo.utils import counters

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import chipmunk_compile  # noqa: E402
from arch_zoo_newer import NEWER_MODELS  # noqa: E402
from arch_zoo_research import RESEARCH_MODELS  # noqa: E402
from arch_zoo_runtimes import RUNTIME_MODELS  # noqa: E402
from arch_zoo_spellings import SPELLING_MODELS  # noqa: E402
from zoo_common import Case, _build, _flux_inputs, _grid_ids, _r  # noqa: E402,F401

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
CFG = {"attn": {"min_tokens": 0, "first_n_dense_layers": 0}, "mlp": {"min_tokens": 0, "first_n_dense_layers": 0},
       "step_signal": "calls"}
SPARSE = {"attn": {"min_tokens": 0, "first_n_dense_layers": 0, "top_keys": 0.25, "random_keys": 0.0,
                   "full_step_every": 4, "group": 16},
          "mlp": {"min_tokens": 0, "first_n_dense_layers": 0, "top_keys": 0.3, "random_keys": 0.0,
                  "full_step_every": 4, "block": 16},
          "step_signal": "calls"}
# refreshes at calls 1 and 4 (the second measures the residual's slope), so calls 5-6 run the residual forecast,
# which the default config turns on (attn.extrapolate 1)
CALLS = 7
COLUMNS = ["model", "status", "attn", "mlp", "rejected", "graphs", "grouping", "grouped", "dense_err", "sparse_err",
           "out_change", "sparse_steps", "forecast", "fallbacks", "seconds", "note"]


# ---------------------------------------------------------------------------------------------
# Tiny configs + inputs, one function per architecture
# ---------------------------------------------------------------------------------------------
def flux():
    m = _build("FluxTransformer2DModel", patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
               attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
               axes_dims_rope=(4, 6, 6))
    return Case(m, _flux_inputs(pooled_projections=_r(1, 32, seed=3)))


def sd3():
    m = _build("SD3Transformer2DModel", sample_size=16, patch_size=2, in_channels=4, num_layers=2,
               attention_head_dim=16, num_attention_heads=2, caption_projection_dim=32, joint_attention_dim=32,
               pooled_projection_dim=64, out_channels=4)
    return Case(m, dict(hidden_states=_r(1, 4, 24, 24), encoder_hidden_states=_r(1, 8, 32, seed=2),
                        pooled_projections=_r(1, 64, seed=3), timestep=torch.tensor([1.0]), return_dict=False))


def pixart():
    m = _build("PixArtTransformer2DModel", num_attention_heads=2, attention_head_dim=16, in_channels=4,
               out_channels=8, num_layers=2, cross_attention_dim=32, sample_size=24, patch_size=2,
               caption_channels=16, norm_type="ada_norm_single", use_additional_conditions=False)
    return Case(m, dict(hidden_states=_r(1, 4, 24, 24), encoder_hidden_states=_r(1, 8, 16, seed=2),
                        timestep=torch.tensor([500.0]),
                        added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False))


def dit():
    m = _build("DiTTransformer2DModel", num_attention_heads=2, attention_head_dim=16, in_channels=4,
               out_channels=8, num_layers=2, norm_num_groups=1, sample_size=24, patch_size=2,
               activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_zero")
    return Case(m, dict(hidden_states=_r(1, 4, 24, 24), timestep=torch.tensor([500]), class_labels=torch.tensor([1]),
                        return_dict=False))


def hunyuan_video():
    m = _build("HunyuanVideoTransformer3DModel", in_channels=4, out_channels=4, num_attention_heads=2,
               attention_head_dim=16, num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=1,
               patch_size_t=1, guidance_embeds=True, text_embed_dim=16, pooled_projection_dim=8,
               rope_axes_dim=(4, 6, 6))
    mask = torch.zeros(1, 8, dtype=torch.long)
    mask[:, :5] = 1
    return Case(m, dict(hidden_states=_r(1, 4, 3, 8, 8), timestep=torch.tensor([1000.0]),
                        encoder_hidden_states=_r(1, 8, 16, seed=2), encoder_attention_mask=mask,
                        pooled_projections=_r(1, 8, seed=3), guidance=torch.tensor([3500.0]), return_dict=False))


def _wan_config():
    return dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", rope_max_seq_len=64)


def _wan_inputs():
    return dict(hidden_states=_r(1, 4, 3, 16, 16), timestep=torch.tensor([1000]),
                encoder_hidden_states=_r(1, 8, 32, seed=2), return_dict=False)


def wan():
    return Case(_build("WanTransformer3DModel", **_wan_config()), _wan_inputs())


def skyreels_v2():
    return Case(_build("SkyReelsV2Transformer3DModel", **_wan_config()), _wan_inputs())


def wan_vace():
    m = _build("WanVACETransformer3DModel", **_wan_config(), vace_layers=[0], vace_in_channels=12)
    return Case(m, dict(_wan_inputs(), control_hidden_states=_r(1, 12, 3, 16, 16, seed=4)))


def cogvideox():
    m = _build("CogVideoXTransformer3DModel", num_attention_heads=2, attention_head_dim=16, in_channels=4,
               out_channels=4, time_embed_dim=4, text_embed_dim=8, num_layers=2, sample_width=16, sample_height=16,
               sample_frames=9, patch_size=2, temporal_compression_ratio=4, max_text_seq_length=8)
    return Case(m, dict(hidden_states=_r(1, 3, 4, 16, 16), encoder_hidden_states=_r(1, 8, 8, seed=2),
                        timestep=torch.tensor([1000]), return_dict=False))


def mochi():
    m = _build("MochiTransformer3DModel", patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=2,
               pooled_projection_dim=16, in_channels=4, out_channels=None, qk_norm="rms_norm", text_embed_dim=16,
               time_embed_dim=4, activation_fn="swiglu", max_sequence_length=16)
    # the attention selects the valid text tokens with torch.nonzero
    return Case(m, dict(hidden_states=_r(1, 4, 3, 16, 16), encoder_hidden_states=_r(1, 16, 16, seed=2),
                        timestep=torch.tensor([1000.0]), encoder_attention_mask=torch.ones(1, 16, dtype=torch.long),
                        return_dict=False),
                patches={"capture_dynamic_output_shape_ops": True})


def allegro():
    m = _build("AllegroTransformer3DModel", patch_size=2, patch_size_t=1, num_attention_heads=2,
               attention_head_dim=16, in_channels=4, out_channels=4, num_layers=2, cross_attention_dim=32,
               sample_height=16, sample_width=20, sample_frames=3, caption_channels=24)
    return Case(m, dict(hidden_states=_r(1, 4, 3, 16, 20), encoder_hidden_states=_r(1, 5, 24, seed=2),
                        timestep=torch.tensor([500]), return_dict=False))


def cogview4():
    m = _build("CogView4Transformer2DModel", patch_size=2, in_channels=4, out_channels=4, num_layers=2,
               attention_head_dim=16, num_attention_heads=2, text_embed_dim=32, time_embed_dim=32, condition_dim=16,
               pos_embed_max_size=16, sample_size=16, rope_axes_dim=(8, 8))
    size = torch.tensor([[128, 128]])
    return Case(m, dict(hidden_states=_r(1, 4, 16, 24), encoder_hidden_states=_r(1, 6, 32, seed=2),
                        timestep=torch.tensor([500]), original_size=size, target_size=size,
                        crop_coords=torch.tensor([[0, 0]]), return_dict=False))


def cogview3plus():
    m = _build("CogView3PlusTransformer2DModel", patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
               num_attention_heads=2, out_channels=4, text_embed_dim=8, time_embed_dim=8, condition_dim=2,
               pos_embed_max_size=16, sample_size=16)
    size = torch.tensor([[128, 128]])
    return Case(m, dict(hidden_states=_r(1, 4, 16, 16), encoder_hidden_states=_r(1, 8, 8, seed=2),
                        original_size=size, target_size=size, crop_coords=torch.tensor([[0, 0]]),
                        timestep=torch.tensor([500]), return_dict=False))


def lumina2():
    m = _build("Lumina2Transformer2DModel", sample_size=16, patch_size=2, in_channels=4, hidden_size=32, num_layers=2,
               num_refiner_layers=1, num_attention_heads=2, num_kv_heads=2, multiple_of=16, ffn_dim_multiplier=None,
               norm_eps=1e-5, scaling_factor=1.0, axes_dim_rope=(4, 6, 6), axes_lens=(128, 128, 128),
               cap_feat_dim=32)
    return Case(m, dict(hidden_states=_r(1, 4, 16, 16), encoder_hidden_states=_r(1, 8, 32, seed=2),
                        timestep=torch.tensor([0.1]), encoder_attention_mask=torch.ones(1, 8, dtype=torch.bool),
                        return_dict=False))


def ltx_video():
    m = _build("LTXVideoTransformer3DModel", in_channels=4, out_channels=4, num_attention_heads=2,
               attention_head_dim=16, cross_attention_dim=32, num_layers=2, qk_norm="rms_norm_across_heads",
               caption_channels=16)
    f, h, w = 3, 8, 8
    return Case(m, dict(hidden_states=_r(1, f * h * w, 4), encoder_hidden_states=_r(1, 8, 16, seed=2),
                        timestep=torch.tensor([1000]), encoder_attention_mask=torch.ones(1, 8, dtype=torch.bool),
                        num_frames=f, height=h, width=w, return_dict=False))


def sana():
    m = _build("SanaTransformer2DModel", patch_size=1, in_channels=4, out_channels=4, num_layers=2,
               attention_head_dim=16, num_attention_heads=2, num_cross_attention_heads=2, cross_attention_head_dim=16,
               cross_attention_dim=32, caption_channels=16, sample_size=16)
    return Case(m, dict(hidden_states=_r(1, 4, 16, 16), encoder_hidden_states=_r(1, 8, 16, seed=2),
                        timestep=torch.tensor([500]), return_dict=False))


def auraflow():
    m = _build("AuraFlowTransformer2DModel", sample_size=16, patch_size=2, in_channels=4, num_mmdit_layers=1,
               num_single_dit_layers=1, attention_head_dim=16, num_attention_heads=2, caption_projection_dim=32,
               joint_attention_dim=32, out_channels=4, pos_embed_max_size=256)
    return Case(m, dict(hidden_states=_r(1, 4, 16, 16), encoder_hidden_states=_r(1, 8, 32, seed=2),
                        timestep=torch.tensor([1.0]), return_dict=False))


def hunyuan_dit():
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    m = _build("HunyuanDiT2DModel", sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
               num_attention_heads=2, cross_attention_dim=16, cross_attention_dim_t5=16, pooled_projection_dim=8,
               hidden_size=32, text_len=6, text_len_t5=6, activation_fn="gelu-approximate")
    g = 8
    rope = get_2d_rotary_pos_embed(16, ((0, 0), (g, g)), (g, g), output_type="pt")
    return Case(m, dict(hidden_states=_r(1, 4, 2 * g, 2 * g), encoder_hidden_states=_r(1, 6, 16, seed=2),
                        text_embedding_mask=torch.ones(1, 6), encoder_hidden_states_t5=_r(1, 6, 16, seed=3),
                        text_embedding_mask_t5=torch.ones(1, 6), timestep=torch.tensor([500.0]),
                        image_meta_size=torch.tensor([[1024.0, 1024, 128, 128, 0, 0]]),
                        style=torch.zeros(1, dtype=torch.long), image_rotary_emb=rope, return_dict=False))


def qwen_image():
    m = _build("QwenImageTransformer2DModel", patch_size=2, in_channels=16, out_channels=4, num_layers=2,
               attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16, guidance_embeds=False,
               axes_dims_rope=(8, 4, 4))
    h = w = 10
    return Case(m, dict(hidden_states=_r(1, h * w, 16), encoder_hidden_states=_r(1, 8, 16, seed=2),
                        encoder_hidden_states_mask=torch.ones(1, 8, dtype=torch.long), timestep=torch.tensor([1.0]),
                        img_shapes=[(1, h, w)], return_dict=False))


def chroma():
    m = _build("ChromaTransformer2DModel", patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
               attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
               approximator_hidden_dim=64, approximator_layers=2)
    h = w = 12
    return Case(m, dict(hidden_states=_r(1, h * w, 4), encoder_hidden_states=_r(1, 8, 32, seed=2),
                        img_ids=_grid_ids(h, w), txt_ids=torch.zeros(8, 3), timestep=torch.tensor([1.0]),
                        return_dict=False))


def cosmos():
    m = _build("CosmosTransformer3DModel", in_channels=4, out_channels=4, num_attention_heads=2,
               attention_head_dim=16, num_layers=2, mlp_ratio=2, text_embed_dim=16, adaln_lora_dim=4,
               max_size=(4, 32, 32), patch_size=(1, 2, 2), rope_scale=(2.0, 1.0, 1.0), concat_padding_mask=False,
               extra_pos_embed_type="learnable")  # concat_padding_mask resizes with torchvision (not needed here)
    return Case(m, dict(hidden_states=_r(1, 4, 3, 16, 16), timestep=torch.tensor([500]),
                        encoder_hidden_states=_r(1, 8, 16, seed=2), attention_mask=torch.ones(1, 8), fps=30,
                        return_dict=False))


def easyanimate():
    m = _build("EasyAnimateTransformer3DModel", attention_head_dim=16, num_attention_heads=2, in_channels=4,
               mmdit_layers=2, num_layers=2, out_channels=4, patch_size=2, sample_height=60, sample_width=90,
               text_embed_dim=16, time_embed_dim=8, time_position_encoding_type="3d_rope",
               timestep_activation_fn="silu")
    return Case(m, dict(hidden_states=_r(1, 4, 3, 16, 16), timestep=torch.tensor([500]),
                        encoder_hidden_states=_r(1, 8, 16, seed=2), return_dict=False))


def hidream():
    m = _build("HiDreamImageTransformer2DModel", patch_size=2, in_channels=4, out_channels=4, num_layers=1,
               num_single_layers=1, attention_head_dim=16, num_attention_heads=2, caption_channels=[8, 4],
               text_emb_dim=8, num_routed_experts=2, num_activated_experts=2, axes_dims_rope=(8, 4, 4),
               max_resolution=(32, 32), llama_layers=(0, 1), force_inference_output=True)
    return Case(m, dict(hidden_states=_r(1, 4, 16, 16), encoder_hidden_states_t5=_r(1, 8, 8, seed=2),
                        encoder_hidden_states_llama3=_r(2, 1, 8, 4, seed=3), pooled_embeds=_r(1, 8, seed=4),
                        timesteps=torch.tensor([500]), return_dict=False),
                timestep="timesteps")


def latte():
    m = _build("LatteTransformer3DModel", sample_size=16, video_length=3, num_layers=2, patch_size=2,
               attention_head_dim=16, num_attention_heads=2, caption_channels=8, in_channels=4,
               cross_attention_dim=32, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
               num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6)
    return Case(m, dict(hidden_states=_r(1, 4, 3, 16, 16), encoder_hidden_states=_r(1, 8, 8, seed=2),
                        timestep=torch.tensor([500]), enable_temporal_attentions=True, return_dict=False))


def flux2():
    m = _build("Flux2Transformer2DModel", patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
               attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=256,
               axes_dims_rope=(4, 4, 4, 4))
    h = w = 12
    img_ids = torch.cartesian_prod(torch.arange(1), torch.arange(h), torch.arange(w), torch.arange(1))[None]
    txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(8))[None]
    return Case(m, dict(hidden_states=_r(1, h * w, 4), encoder_hidden_states=_r(1, 8, 32, seed=2), img_ids=img_ids,
                        txt_ids=txt_ids, timestep=torch.tensor([1.0]), guidance=torch.tensor([1.0]),
                        return_dict=False))


def z_image():
    m = _build("ZImageTransformer2DModel", all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32,
               n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, qk_norm=True, cap_feat_dim=16,
               rope_theta=256.0, t_scale=1000.0, axes_dims=[8, 4, 4], axes_lens=[256, 32, 32])
    return Case(m, dict(x=[_r(16, 1, 16, 16)], cap_feats=[_r(8, 16, seed=2)], t=torch.tensor([0.9]),
                        return_dict=False), latent="x", timestep="t")


def kandinsky5():
    m = _build("Kandinsky5Transformer3DModel", in_visual_dim=4, in_text_dim=32, in_text_dim2=16, time_dim=32,
               out_visual_dim=4, patch_size=(1, 2, 2), model_dim=32, ff_dim=64, num_text_blocks=1,
               num_visual_blocks=2, axes_dims=(4, 6, 6))
    for name, p in m.named_parameters():  # zero-initialised modulation: every block would be the identity
        if "modulation.out_layer" in name:
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(5))
    t, h, w = 3, 16, 16  # channels-last latents (B, T, H, W, C)
    return Case(m, dict(hidden_states=_r(1, t, h, w, 4), encoder_hidden_states=_r(1, 8, 32, seed=2),
                        timestep=torch.tensor([1000.0]), pooled_projections=_r(1, 16, seed=3),
                        visual_rope_pos=[torch.arange(t), torch.arange(h // 2), torch.arange(w // 2)],
                        text_rope_pos=torch.arange(8), return_dict=False))


def hunyuan_video15():
    m = _build("HunyuanVideo15Transformer3DModel", in_channels=4, out_channels=4, num_attention_heads=2,
               attention_head_dim=16, num_layers=2, num_refiner_layers=1, mlp_ratio=2.0, patch_size=1,
               patch_size_t=1, text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=12, rope_axes_dim=(4, 6, 6),
               target_size=16, task_type="t2v")
    return Case(m, dict(hidden_states=_r(1, 4, 3, 8, 8), timestep=torch.tensor([1000.0]),
                        encoder_hidden_states=_r(1, 6, 16, seed=2), encoder_hidden_states_2=_r(1, 4, 8, seed=3),
                        encoder_attention_mask=torch.ones(1, 6), encoder_attention_mask_2=torch.ones(1, 4),
                        image_embeds=torch.zeros(1, 3, 12), return_dict=False))


def omnigen():
    m = _build("OmniGenTransformer2DModel", hidden_size=32, num_attention_heads=2, num_key_value_heads=2,
               intermediate_size=64, num_layers=2, pad_token_id=0, vocab_size=1000, in_channels=4, time_step_dim=4,
               rope_scaling={"long_factor": list(range(1, 9)), "short_factor": list(range(1, 9))})
    n_txt, h, w = 12, 16, 16
    n = n_txt + 1 + (h // 2) * (w // 2)  # text, time token, image tokens
    return Case(m, dict(hidden_states=_r(1, 4, h, w), timestep=torch.tensor([0.1]),
                        input_ids=torch.randint(1, 10, (1, n_txt), generator=torch.Generator().manual_seed(2)),
                        input_img_latents=[], input_image_sizes={}, attention_mask=torch.ones(1, n, n),
                        position_ids=torch.arange(n)[None], return_dict=False))


MODELS = {
    "flux": ("FluxTransformer2DModel", flux),
    "sd3": ("SD3Transformer2DModel", sd3),
    "pixart": ("PixArtTransformer2DModel", pixart),
    "dit": ("DiTTransformer2DModel", dit),
    "hunyuan_video": ("HunyuanVideoTransformer3DModel", hunyuan_video),
    "wan": ("WanTransformer3DModel", wan),
    "cogvideox": ("CogVideoXTransformer3DModel", cogvideox),
    "mochi": ("MochiTransformer3DModel", mochi),
    "allegro": ("AllegroTransformer3DModel", allegro),
    "cogview4": ("CogView4Transformer2DModel", cogview4),
    "cogview3plus": ("CogView3PlusTransformer2DModel", cogview3plus),
    "lumina2": ("Lumina2Transformer2DModel", lumina2),
    "ltx_video": ("LTXVideoTransformer3DModel", ltx_video),
    "sana": ("SanaTransformer2DModel", sana),
    "auraflow": ("AuraFlowTransformer2DModel", auraflow),
    "hunyuan_dit": ("HunyuanDiT2DModel", hunyuan_dit),
    "qwen_image": ("QwenImageTransformer2DModel", qwen_image),
    "chroma": ("ChromaTransformer2DModel", chroma),
    "cosmos": ("CosmosTransformer3DModel", cosmos),
    "skyreels_v2": ("SkyReelsV2Transformer3DModel", skyreels_v2),
    "easyanimate": ("EasyAnimateTransformer3DModel", easyanimate),
    "hidream": ("HiDreamImageTransformer2DModel", hidream),
    "latte": ("LatteTransformer3DModel", latte),
    "flux2": ("Flux2Transformer2DModel", flux2),
    "z_image": ("ZImageTransformer2DModel", z_image),
    "kandinsky5": ("Kandinsky5Transformer3DModel", kandinsky5),
    "hunyuan_video15": ("HunyuanVideo15Transformer3DModel", hunyuan_video15),
    "omnigen": ("OmniGenTransformer2DModel", omnigen),
    "wan_vace": ("WanVACETransformer3DModel", wan_vace),
}
MODELS.update(NEWER_MODELS)  # diffusers' newer transformers (arch_zoo_newer.py)
MODELS.update(RESEARCH_MODELS)  # DiTs written outside diffusers, as research code spells them (arch_zoo_research.py)
MODELS.update(SPELLING_MODELS)  # more of their spellings (arch_zoo_spellings.py)
MODELS.update(RUNTIME_MODELS)  # DiTs as UI runtimes write their own model code (arch_zoo_runtimes.py)


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------
def _first_tensor(out):
    while not isinstance(out, torch.Tensor):
        out = out.sample if hasattr(out, "sample") else out[0]
    return out


def _map(x, fn):
    if isinstance(x, torch.Tensor):
        return fn(x)
    return type(x)(_map(v, fn) for v in x)


def _step_inputs(case: Case, drift, step: int) -> dict:
    """latent = base + 0.02·step·drift; timestep scaled down 5 % a call (same dtype)."""
    kw = dict(case.kwargs)
    base = case.kwargs[case.latent]
    kw[case.latent] = (base + 0.02 * step * drift if isinstance(base, torch.Tensor)
                       else type(base)(b + 0.02 * step * d for b, d in zip(base, drift)))
    t0 = case.kwargs[case.timestep]
    kw[case.timestep] = (t0.double() * (1 - 0.05 * step)).to(t0.dtype)
    return kw


def _rel(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def _short(desc: str, n: int = 64) -> str:
    return desc if len(desc) <= n else desc[: n - 1] + "…"


def _where(exc: BaseException) -> str:
    """The last frames of a traceback, compactly: file:line func (at most 3, innermost last)."""
    frames = traceback.extract_tb(exc.__traceback__)[-3:]
    return " < ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in reversed(frames))


def measure(key: str) -> dict:
    cls_name, make = MODELS[key]
    row = {c: "" for c in COLUMNS}
    row.update(model=cls_name, status="error")
    counters.clear()
    torch._dynamo.reset()
    t0 = time.perf_counter()
    phase = "build"
    try:
        case = make()
        with torch._dynamo.config.patch(**case.patches):
            phase = "inspect"
            rep = chipmunk_compile.inspect(case.model, **case.kwargs, config=CFG)
            groupings = list(dict.fromkeys(s.grouping for s in rep.sites if s.grouping))
            row.update(attn=rep.count("attention"), mlp=rep.count("mlp"), rejected=len(rep.rejected),
                       graphs=rep.graphs, grouping="; ".join(_short(g) for g in groupings))
            reasons = list(dict.fromkeys(f"{r.kind}: {r.reason}" for r in rep.rejected))
            row["note"] = ("rejected " + "; ".join(_short(r, 90) for r in reasons)) if reasons else ""

            phase = "compile+run"
            torch._dynamo.reset()
            counters.clear()
            compiled = torch.compile(case.model, backend="chipmunk",
                                     options={"config": SPARSE, "compiler": "eager"})
            base = case.kwargs[case.latent]
            drift = _map(base, lambda t: torch.randn(t.shape, generator=torch.Generator().manual_seed(7)))
            errs, refs = [], []
            with torch.no_grad():
                for step in range(CALLS):
                    kw = _step_inputs(case, drift, step)
                    refs.append(_first_tensor(case.model(**kw)))
                    errs.append(_rel(_first_tensor(compiled(**kw)), refs[-1]))
        steps: dict[str, int] = {}
        compiled_sites = chipmunk_compile.stats(case.model)["sites"]
        for s in compiled_sites:
            for k, v in s["steps"].items():
                steps[k] = steps.get(k, 0) + v
        # grouping as the compiled model got it (inspect traces once; compile may split frames)
        row["grouped"] = f"{sum(not (s['grouping'] or 'none').startswith('none') for s in compiled_sites)}/{len(compiled_sites)}"
        fb = {k: v for k, v in counters["chipmunk"].items() if k.startswith("fallback")}
        row.update(status="ok", dense_err=f"{errs[0]:.1e}", sparse_err=f"{max(errs[1:]):.1e}",
                   out_change=f"{max(_rel(a, b) for a, b in zip(refs[1:], refs)):.1e}",
                   sparse_steps=steps.get("sparse", 0), forecast=counters["chipmunk"].get("attention_forecast", 0),
                   fallbacks=" ".join(f"{k}={v}" for k, v in fb.items()))
    except Exception as e:  # one model's failure never stops the zoo
        msg = " ".join(f"{type(e).__name__}: {e}".split())
        row["note"] = f"{phase}: {_short(msg, 220)} [{_where(e)}]"
        traceback.print_exc()
    row["seconds"] = f"{time.perf_counter() - t0:.1f}"
    return row


def _markdown(rows) -> str:
    head = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    return head + "".join("| " + " | ".join(str(r[c]).replace("|", "\\|") for c in COLUMNS) + " |\n" for r in rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS), metavar="NAME",
                    help=f"any of: {' '.join(MODELS)}")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args()
    import diffusers

    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}; {len(args.models)} model(s)", flush=True)
    rows = []
    for key in args.models:
        rows.append(measure(key))
        r = rows[-1]
        print(f"{r['model']:<34} {r['status']:<5} attn={r['attn']} mlp={r['mlp']} rej={r['rejected']} "
              f"dense={r['dense_err']} sparse={r['sparse_err']} {r['seconds']}s {r['note'][:160]}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "arch_zoo.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    md = (f"Tiny random-weight diffusers transformers through chipmunk (torch {torch.__version__}, diffusers "
          f"{diffusers.__version__}, CPU float32; `python benchmarks/arch_zoo.py`). grouping: what inspect() found; "
          f"grouped: sites with a grid in the compiled model / its sites; dense_err: call 0 vs eager; "
          f"sparse_err: max over calls 1-{CALLS - 1} (top_keys 0.25 attn / 0.3 MLP); out_change: eager output change "
          f"between calls; sparse_steps: site-calls that ran sparse; forecast: sparse attention calls with the residual "
          f"forecast (default attn.extrapolate 1).\n\n" + _markdown(rows))
    with open(os.path.join(args.out, "arch_zoo.md"), "w") as f:
        f.write(md)
    print("\n" + _markdown(rows))
    print(f"wrote {os.path.join(args.out, 'arch_zoo.csv')} and arch_zoo.md")


if __name__ == "__main__":
    main()
