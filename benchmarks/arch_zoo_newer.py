"""Arch-zoo cases of diffusers' newer transformers (added in session 10, diffusers 0.42.1).

Same conventions as `arch_zoo.py`, which measures them with its own (`python benchmarks/arch_zoo.py
--models flux3 helios`): 1-2 layers per block type (refiner/text blocks at 1), 2 heads of dim 16,
float32, CPU, ~60-260 latent tokens and ~8 text tokens, random weights. Where a model zero-initialises
a modulation or gate (its blocks would be identities at random init), the case re-initialises it with
small noise. Choices that matter for what is measured are commented at the case: ChronoEdit and
WanAnimate take 512 text tokens (their processors split image and text context at 512); audio and
gist-token counts differ from the text count, so a cross-attention never has equal lengths by chance.
Models whose denoising steps read a KV cache (FLUX.2 Klein KV, Qwen-Image 2.1, AnyFlow FAR, the SANA-WM refiner,
Wan-Animate-2) are measured at such a step: the case fills the cache with the model's own eager "extract"/"capture"
calls, as the pipeline does, and the measured calls only read it.
"""

from __future__ import annotations

import torch

from zoo_common import Case, _build, _flux_inputs, _grid_ids, _r  # noqa: F401


# ---------------------------------------------------------------------------------------------
# images: Flux-like joint attention and newer MMDiTs
# ---------------------------------------------------------------------------------------------
def flux3():
    # per-mode blocks (image, image_cond, txt: num_layers each) + joint single blocks; 4-axis (t, h, w, l) RoPE
    m = _build("Flux3Transformer2DModel", in_channels=4, cond_in_channels=4, num_layers=1, num_single_layers=1,
               attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, timestep_channels=32,
               axes_dims_rope=(4, 4, 4, 4))
    h = w = 12
    img_ids = torch.cartesian_prod(torch.arange(1), torch.arange(h), torch.arange(w), torch.arange(1))
    txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(8))
    return Case(m, dict(hidden_states=_r(1, h * w, 4), encoder_hidden_states=_r(1, 8, 32, seed=2),
                        timestep=torch.tensor([1.0]), img_ids=img_ids, txt_ids=txt_ids, return_dict=False))


def qwen_image21():
    # single-stream over [text, target image]; text is block-causal (bool tril mask), the image queries attend to
    # everything unmasked. img_mask marks the VLM image slots: each slot stands for 2x2 latent tokens.
    m = _build("QwenImage21Transformer2DModel", patch_size=1, in_channels=16, out_channels=4, num_layers=2,
               attention_head_dim=16, num_attention_heads=2, context_in_dim=16, mlp_ratio=3, axes_dims_rope=(8, 4, 4))
    h = w = 12
    n_txt = 8
    img_mask = torch.zeros(1, n_txt + h * w // 4, dtype=torch.bool)
    img_mask[:, n_txt:] = True
    return Case(m, dict(hidden_states=_r(1, h * w, 16), encoder_hidden_states=_r(1, n_txt, 16, seed=2),
                        timestep=torch.tensor([1.0]), img_shapes=[[(1, h, w)]], img_mask=img_mask,
                        return_dict=False))


def qwen_image21_cached():
    # the pipeline's denoising steps after the first: the target image's queries attend to the text prefix's
    # cached keys (filled by one "extract" call) concatenated with their own, under a key-padding mask
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache

    case = qwen_image21()
    cache = QwenImage21KVCache(2)
    with torch.no_grad():
        case.model(**case.kwargs, kv_cache=cache, kv_cache_mode="extract")
    return Case(case.model, dict(case.kwargs, kv_cache=cache, kv_cache_mode="cached"))


def flux2_kv_cached():
    # FLUX.2 Klein's KV pipeline after its first step: [text, image] queries; the reference image's keys, cached
    # by one "extract" call, sit between the text and image keys (the own keys split in two slices)
    from diffusers.models.transformers.transformer_flux2 import Flux2KVAttnProcessor, Flux2KVParallelSelfAttnProcessor

    m = _build("Flux2Transformer2DModel", patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
               attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=256,
               axes_dims_rope=(4, 4, 4, 4))
    for block in m.transformer_blocks:  # the KV processors, as the Klein KV pipeline installs them
        block.attn.set_processor(Flux2KVAttnProcessor())
    for block in m.single_transformer_blocks:
        block.attn.set_processor(Flux2KVParallelSelfAttnProcessor())
    h = w = 12
    ids = lambda t0: torch.cartesian_prod(torch.tensor([t0]), torch.arange(h), torch.arange(w), torch.arange(1))[None]
    txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(8))[None]
    kw = dict(encoder_hidden_states=_r(1, 8, 32, seed=2), txt_ids=txt_ids, timestep=torch.tensor([1.0]),
              guidance=torch.tensor([1.0]), return_dict=False)
    with torch.no_grad():
        _, cache = m(hidden_states=torch.cat([_r(1, h * w, 4, seed=3), _r(1, h * w, 4)], 1),
                     img_ids=torch.cat([ids(10), ids(0)], 1), kv_cache_mode="extract", num_ref_tokens=h * w, **kw)
    return Case(m, dict(kw, hidden_states=_r(1, h * w, 4), img_ids=ids(0), kv_cache=cache, kv_cache_mode="cached"))


def hunyuan_image():
    m = _build("HunyuanImageTransformer2DModel", in_channels=4, out_channels=4, num_attention_heads=2,
               attention_head_dim=16, num_layers=1, num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0,
               patch_size=(1, 1), text_embed_dim=16, rope_axes_dim=(8, 8))
    mask = torch.zeros(1, 8, dtype=torch.long)
    mask[:, :5] = 1
    return Case(m, dict(hidden_states=_r(1, 4, 12, 12), timestep=torch.tensor([1000.0]),
                        encoder_hidden_states=_r(1, 8, 16, seed=2), encoder_attention_mask=mask, return_dict=False))


def longcat_image():
    m = _build("LongCatImageTransformer2DModel", patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
               attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
               axes_dims_rope=[4, 6, 6])
    return Case(m, _flux_inputs())


def ovis_image():
    m = _build("OvisImageTransformer2DModel", patch_size=1, in_channels=4, out_channels=4, num_layers=1,
               num_single_layers=1, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
               axes_dims_rope=(4, 6, 6))
    return Case(m, _flux_inputs())


def bria():
    m = _build("BriaTransformer2DModel", patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
               attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=[4, 6, 6])
    return Case(m, _flux_inputs())


def bria_fibo():
    # one text-encoder layer per block (num_layers + num_single_layers), projected to inner_dim // 2 and
    # concatenated onto the context stream
    m = _build("BriaFiboTransformer2DModel", patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
               attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=[4, 6, 6],
               text_encoder_dim=16)
    return Case(m, _flux_inputs(text_encoder_layers=[_r(1, 8, 16, seed=3), _r(1, 8, 16, seed=4)]))


def bria_fibo2():
    # Z-Image-style single stream [gist tokens, image]; a Perceiver squeezes the 12 text tokens into 8 gist tokens
    # (text length != gist count, else the Perceiver's cross-attention has Nq == Nk and passes as self-attention);
    # layer 1 is an injection block (gated cross-attention to its own text bundle). encoder_hidden_states is
    # (B, 1 + len(injection_layer_ids), text_len, cap_feat_dim).
    m = _build("BriaFibo2Transformer2DModel", in_channels=4, patch_size=2, dim=32, n_layers=2, n_refiner_layers=1,
               n_heads=2, cap_feat_dim=16, injection_layer_ids=(1,), perceiver_num_layers=1, min_num_gist_tokens=8,
               max_num_gist_tokens=8, gist_step=8, gist_min_text_len=4, gist_max_text_len=16, axes_dims=(4, 6, 6),
               axes_lens=(16, 32, 32))
    for name, p in m.named_parameters():  # zero-initialised cross-attention gate: the injection would be a no-op
        if name.endswith("cross_attn_gate"):
            torch.nn.init.normal_(p, std=0.5, generator=torch.Generator().manual_seed(5))
    return Case(m, dict(hidden_states=_r(1, 4, 24, 24), timestep=torch.tensor([0.9]),
                        encoder_hidden_states=_r(1, 2, 12, 16, seed=2), return_dict=False))


# ---------------------------------------------------------------------------------------------
# images: single-stream, packed sequences, MoE, U-Net blocks
# ---------------------------------------------------------------------------------------------
def _renorm(m, pattern, std=0.1, seed=5):
    """Re-init zero-initialised modulation parameters (else every block is the identity)."""
    g = torch.Generator().manual_seed(seed)
    n = 0
    for name, p in m.named_parameters():
        if pattern in name:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * std)
            n += 1
    assert n, pattern
    return m


def prx():
    m = _build("PRXTransformer2DModel", in_channels=4, patch_size=2, context_in_dim=16, hidden_size=32,
               mlp_ratio=2.0, num_heads=2, depth=2, axes_dim=[8, 8])
    _renorm(m, "modulation.lin")  # Modulation zero-initialises its Linear: gates 0 -> identity blocks
    # text-only K/V concat (image queries attend to [text, image] keys); optional bool text mask
    return Case(m, dict(hidden_states=_r(1, 4, 24, 24), timestep=torch.tensor([1.0]),
                        encoder_hidden_states=_r(1, 8, 16, seed=2), attention_mask=torch.ones(1, 8, dtype=torch.bool),
                        return_dict=False))


def glm_image():
    m = _build("GlmImageTransformer2DModel", patch_size=2, in_channels=4, out_channels=4, num_layers=2,
               attention_head_dim=16, num_attention_heads=2, text_embed_dim=16, time_embed_dim=32, condition_dim=16,
               prior_vq_quantizer_codebook_size=64)
    h = w = 24
    n = (h // 2) * (w // 2)
    return Case(m, dict(hidden_states=_r(1, 4, h, w), encoder_hidden_states=_r(1, 8, 16, seed=2),
                        prior_token_id=torch.randint(0, 64, (1, n), generator=torch.Generator().manual_seed(3)),
                        prior_token_drop=torch.zeros(1, n, dtype=torch.bool), timestep=torch.tensor([500]),
                        target_size=torch.tensor([[128.0, 128.0]]), crop_coords=torch.tensor([[0.0, 0.0]]),
                        return_dict=False))


def ernie_image():
    m = _build("ErnieImageTransformer2DModel", hidden_size=32, num_attention_heads=2, num_layers=2,
               ffn_hidden_size=64, in_channels=4, out_channels=4, patch_size=2, text_in_dim=16,
               rope_axes_dim=(4, 6, 6))
    _renorm(m, "adaLN_modulation.1")  # zero-initialised: gates 0 -> identity blocks
    _renorm(m, "final_linear", seed=6)  # zero-initialised: output would be 0
    # sequence-first layout [S, B, H]; bool key-padding mask from text_lens ([img, text] order);
    # 16x16 image tokens: a sequence-first MLP needs 256 tokens (patterns/mlp.py)
    return Case(m, dict(hidden_states=_r(1, 4, 32, 32), timestep=torch.tensor([500.0]),
                        text_bth=_r(1, 8, 16, seed=2), text_lens=torch.tensor([8]), return_dict=False))


def krea2():
    m = _build("Krea2Transformer2DModel", in_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
               num_key_value_heads=1, intermediate_size=64, timestep_embed_dim=32, text_hidden_dim=32,
               num_text_layers=3, text_num_attention_heads=2, text_num_key_value_heads=2, text_intermediate_size=64,
               num_layerwise_text_blocks=1, num_refiner_text_blocks=1, axes_dims_rope=(4, 6, 6))
    h = w = 12  # packed latents; GQA 2 q heads / 1 kv head (real model: 48/12)
    pos = torch.cat([torch.zeros(8, 3), _grid_ids(h, w)])  # text rows all-zero, then image grid
    return Case(m, dict(hidden_states=_r(1, h * w, 16), encoder_hidden_states=_r(1, 8, 3, 32, seed=2),
                        timestep=torch.tensor([0.9]), position_ids=pos,
                        encoder_attention_mask=torch.ones(1, 8, dtype=torch.bool), return_dict=False))


def ideogram4():
    m = _build("Ideogram4Transformer2DModel", in_channels=16, num_layers=2, attention_head_dim=16,
               num_attention_heads=2, intermediate_size=64, adaln_dim=32, llm_features_dim=24, rope_theta=10000,
               mrope_section=(3, 3, 2))
    n_txt, h, w = 8, 12, 12  # one packed sequence: 8 text tokens then 144 image tokens
    L = n_txt + h * w
    pos = torch.cat([torch.stack([torch.arange(n_txt)] * 3, -1).float(), _grid_ids(h, w) + n_txt])[None]
    indicator = torch.full((1, L), 2, dtype=torch.long)
    indicator[:, :n_txt] = 3
    # segment_ids -> a full (B, 1, L, L) bool block-diagonal mask (all True for one sample)
    return Case(m, dict(hidden_states=_r(1, L, 16), timestep=torch.tensor([0.1]),
                        encoder_hidden_states=_r(1, L, 24, seed=2), position_ids=pos,
                        segment_ids=torch.zeros(1, L, dtype=torch.long), indicator=indicator, return_dict=False))


def nucleus_moe_image(moe=True, capacity=1.0):
    # layer 0 dense SwiGLU FF, layer 1 expert-choice MoE (2 experts + shared expert); the args are for ablations
    # (capacity=2.0: every expert takes every token, so the routing is continuous)
    m = _build("NucleusMoEImageTransformer2DModel", patch_size=2, in_channels=16, num_layers=2,
               attention_head_dim=16, num_attention_heads=2, num_key_value_heads=2, joint_attention_dim=16,
               axes_dims_rope=(4, 6, 6), mlp_ratio=6.0,  # dense inner = int(dim*ratio*2/3)//128*128: 0 below 6
               moe_enabled=moe, dense_moe_strategy="leave_first_block_dense", num_experts=2,
               moe_intermediate_dim=64, capacity_factors=capacity)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # packed expert weights are torch.empty (uninitialised)
        for name, p in m.named_parameters():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-2] ** -0.5)
    h = w = 12
    return Case(m, dict(hidden_states=_r(1, h * w, 16), img_shapes=[(1, h, w)],
                        encoder_hidden_states=_r(1, 8, 16, seed=2),
                        encoder_hidden_states_mask=torch.ones(1, 8, dtype=torch.bool), timestep=torch.tensor([0.9]),
                        return_dict=False))


def dreamlite():
    # U-Net spatial transformer: self-attn + cross-attn + GEGLU FF per block (layer_norm: timestep unused)
    m = _build("DreamLiteTransformer2DModel", num_attention_heads=2, attention_head_dim=16, in_channels=8,
               out_channels=8, num_layers=2, norm_num_groups=4, cross_attention_dim=16, qk_norm="rms_norm",
               ff_mult=2)
    return Case(m, dict(hidden_states=_r(1, 8, 12, 12), encoder_hidden_states=_r(1, 8, 16, seed=2),
                        timestep=torch.tensor([500]), return_dict=False))


def joyimage_edit():
    m = _build("JoyImageEditTransformer3DModel", patch_size=[1, 2, 2], in_channels=4, hidden_size=32,
               num_attention_heads=2, text_dim=16, mlp_width_ratio=2.0, num_layers=2, rope_dim_list=[4, 6, 6])
    # edit mode: 2 items (target + reference) of 1 frame each, (B, N, C, T, H, W) -> 2 x 8 x 8 tokens
    return Case(m, dict(hidden_states=_r(1, 2, 4, 1, 16, 16), timestep=torch.tensor([500.0]),
                        encoder_hidden_states=_r(1, 8, 16, seed=2), return_dict=False))


# ---------------------------------------------------------------------------------------------
# video
# ---------------------------------------------------------------------------------------------
def ltx2_video():
    # audio-video model: video + audio self-attn, text cross-attn for both, a2v / v2a cross-attn, 2 FFNs per block
    m = _build("LTX2VideoTransformer3DModel", in_channels=4, out_channels=4, num_attention_heads=2,
               attention_head_dim=16, cross_attention_dim=32, audio_in_channels=4, audio_out_channels=4,
               audio_num_attention_heads=2, audio_attention_head_dim=16, audio_cross_attention_dim=32,
               num_layers=2, caption_channels=16)
    # 12 audio tokens != 8 text tokens: with equal counts the audio->text cross-attention (audio_attn2) would pass
    # the backend's query-length == key-length test for self-attention
    f, h, w, n_audio = 3, 8, 8, 12
    return Case(m, dict(hidden_states=_r(1, f * h * w, 4), audio_hidden_states=_r(1, n_audio, 4, seed=4),
                        encoder_hidden_states=_r(1, 8, 16, seed=2), audio_encoder_hidden_states=_r(1, 8, 16, seed=3),
                        timestep=torch.tensor([1000.0]), encoder_attention_mask=torch.ones(1, 8),
                        audio_encoder_attention_mask=torch.ones(1, 8), num_frames=f, height=h, width=w,
                        audio_num_frames=n_audio, return_dict=False))


def sana_video():
    # self-attention is ReLU linear attention (SanaLinearAttnProcessor3_0); FFN is GLUMBTempConv (convs)
    m = _build("SanaVideoTransformer3DModel", in_channels=4, out_channels=4, num_attention_heads=2,
               attention_head_dim=16, num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=16,
               cross_attention_dim=32, caption_channels=16, mlp_ratio=2.5, sample_size=16, patch_size=(1, 2, 2),
               rope_max_seq_len=64)
    return Case(m, dict(hidden_states=_r(1, 4, 3, 16, 16), encoder_hidden_states=_r(1, 8, 16, seed=2),
                        timestep=torch.tensor([500]), return_dict=False))


def kandinsky6():
    # video + audio fused blocks; 1 text block per modality, 2 fused visual blocks
    m = _build("Kandinsky6Transformer3DModel", in_visual_dim=4, out_visual_dim=4, in_text_dim=32, in_text_dim2=16,
               time_dim=32, patch_size=(1, 2, 2), model_dim=32, ff_dim=64, num_text_blocks=1, num_visual_blocks=2,
               axes_dims=(4, 6, 6), visual_cond=True, in_audio_dim=4, out_audio_dim=4, text_token_padding=True,
               ca_rope=True, cross_gates=True, fix_modulation=True)  # the flags the released checkpoints set
    t, h, w = 3, 16, 16  # channels-last latents (B, T, H, W, C), C = 2*in_visual_dim + 1 with visual_cond
    mask = torch.zeros(1, 8, dtype=torch.bool)  # boolean text padding mask (text_token_padding checkpoints)
    mask[:, :6] = True
    # 12 audio tokens != 8 text tokens (see ltx2_video)
    return Case(m, dict(hidden_states=_r(1, t, h, w, 9), encoder_hidden_states=_r(1, 8, 32, seed=2),
                        pooled_projections=_r(1, 16, seed=3), timestep=torch.tensor([1000.0]),
                        audio_hidden_states=_r(1, 12, 4, seed=4), encoder_attention_mask=mask, return_dict=False))


def chronoedit():
    # Wan-2.1 i2v-style (CLIP image tokens through add_k/add_v); 2 latent frames = ChronoEdit's
    # (input image, edited image) pair, which takes the temporal-skip RoPE branch. The Wan attention processor
    # splits image / text context at a hard-coded 512 text tokens, so the text here is 512 tokens (as the
    # pipelines pad it); with fewer the image branch would attend over an empty key set.
    m = _build("ChronoEditTransformer3DModel", patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
               in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2,
               cross_attn_norm=True, qk_norm="rms_norm_across_heads", image_dim=16, added_kv_proj_dim=32,
               rope_max_seq_len=64, rope_temporal_skip_len=8)
    return Case(m, dict(hidden_states=_r(1, 4, 2, 16, 16), timestep=torch.tensor([1000]),
                        encoder_hidden_states=_r(1, 512, 32, seed=2),
                        encoder_hidden_states_image=_r(1, 4, 16, seed=3), return_dict=False))


def motif_video():
    # 1 dual-stream block, 1 single-stream encoder block, 1 single-stream decoder block; text cross-attn on
    mask = torch.zeros(1, 8, dtype=torch.long)
    mask[:, :5] = 1
    m = _build("MotifVideoTransformer3DModel", in_channels=4, out_channels=4, num_attention_heads=2,
               attention_head_dim=16, num_layers=1, num_single_layers=2, num_decoder_layers=1, mlp_ratio=2.0,
               patch_size=2, patch_size_t=1, text_embed_dim=16, image_embed_dim=12, rope_axes_dim=(4, 6, 6),
               enable_text_cross_attention_dual=True, enable_text_cross_attention_single=True)
    return Case(m, dict(hidden_states=_r(1, 4, 3, 16, 16), timestep=torch.tensor([1000]),
                        encoder_hidden_states=_r(1, 8, 16, seed=2), encoder_attention_mask=mask,
                        image_embeds=_r(1, 4, 12, seed=3), return_dict=False))


def helios():
    # autoregressive video: current chunk (3 frames) + short / mid (2x) / long (4x) history tokens in front
    m = _build("HeliosTransformer3DModel", patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
               in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2,
               rope_dim=(4, 6, 6))
    h = w = 12  # 3*6*6 = 108 current + 36 short + 9 mid + 4 long = 157 tokens
    return Case(m, dict(hidden_states=_r(1, 4, 3, h, w), timestep=torch.tensor([1000]),
                        encoder_hidden_states=_r(1, 8, 32, seed=2),
                        indices_hidden_states=torch.arange(7, 10)[None],
                        indices_latents_history_short=torch.arange(6, 7)[None],
                        indices_latents_history_mid=torch.arange(4, 6)[None],
                        indices_latents_history_long=torch.arange(0, 4)[None],
                        latents_history_short=_r(1, 4, 1, h, w, seed=3), latents_history_mid=_r(1, 4, 2, h, w, seed=4),
                        latents_history_long=_r(1, 4, 4, h, w, seed=5), return_dict=False))


def wan_animate():
    # Wan 2.1 i2v blocks + pose latents + face motion encoder / face adapter cross-attn (after block 0)
    m = _build("WanAnimateTransformer3DModel", patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
               in_channels=12, latent_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2,
               image_dim=16, added_kv_proj_dim=32, rope_max_seq_len=64, motion_encoder_channel_sizes={"8": 8, "4": 8},
               motion_encoder_size=8, motion_style_dim=16, motion_dim=4, motion_encoder_dim=16,
               face_encoder_hidden_dim=16, face_encoder_num_heads=2, inject_face_latents_blocks=2,
               motion_encoder_batch_size=8)
    # text padded to 512 tokens: see chronoedit(). 5 face frames -> 2 after the face encoder's two stride-2 convs, +1 pad frame = 3 latent frames
    return Case(m, dict(hidden_states=_r(1, 12, 3, 16, 16), timestep=torch.tensor([1000]),
                        encoder_hidden_states=_r(1, 512, 32, seed=2), encoder_hidden_states_image=_r(1, 4, 16, seed=3),
                        pose_hidden_states=_r(1, 4, 2, 16, 16, seed=4), face_pixel_values=_r(1, 3, 5, 8, 8, seed=5),
                        return_dict=False))


def hunyuan_video_framepack():
    # HunyuanVideo blocks + clean / 2x / 4x history latents (packed in front) + SigLIP image tokens
    mask = torch.zeros(1, 8, dtype=torch.long)
    mask[:, :5] = 1
    m = _build("HunyuanVideoFramepackTransformer3DModel", in_channels=4, out_channels=4, num_attention_heads=2,
               attention_head_dim=16, num_layers=1, num_single_layers=1, num_refiner_layers=1, mlp_ratio=4.0,
               patch_size=2, patch_size_t=1, guidance_embeds=True, text_embed_dim=16, pooled_projection_dim=8,
               rope_axes_dim=(4, 6, 6), has_image_proj=True, image_proj_dim=16, has_clean_x_embedder=True)
    # frame indices are 1-D (the RoPE meshgrids them directly)
    h = w = 12  # 108 current + 72 clean + 9 (2x) + 4 (4x) = 193 latent tokens
    return Case(m, dict(hidden_states=_r(1, 4, 3, h, w), timestep=torch.tensor([1000.0]),
                        encoder_hidden_states=_r(1, 8, 16, seed=2), encoder_attention_mask=mask,
                        pooled_projections=_r(1, 8, seed=3), image_embeds=_r(1, 4, 16, seed=4),
                        indices_latents=torch.arange(7, 10), guidance=torch.tensor([6000.0]),
                        latents_clean=_r(1, 4, 2, h, w, seed=5), indices_latents_clean=torch.tensor([0, 6]),
                        latents_history_2x=_r(1, 4, 2, h, w, seed=6), indices_latents_history_2x=torch.arange(4, 6),
                        latents_history_4x=_r(1, 4, 4, h, w, seed=7), indices_latents_history_4x=torch.arange(0, 4),
                        return_dict=False))


def consisid():
    # CogVideoX-style expert blocks + identity branch: local facial extractor (perceiver) and a perceiver
    # cross-attention after every cross_attn_interval-th block; hand-written softmax(q@k^T) attention there
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    m = _build("ConsisIDTransformer3DModel", num_attention_heads=2, attention_head_dim=16, in_channels=4,
               out_channels=4, time_embed_dim=8, text_embed_dim=16, num_layers=2, sample_width=16,
               sample_height=16, sample_frames=9, patch_size=2, max_text_seq_length=8,
               use_rotary_positional_embeddings=True, is_train_face=True, cross_attn_interval=2,
               cross_attn_dim_head=16, cross_attn_num_heads=2, LFE_id_dim=8, LFE_vit_dim=16, LFE_depth=2,
               LFE_dim_head=8, LFE_num_heads=2, LFE_num_id_token=2, LFE_num_querie=4,
               LFE_output_dim=21, LFE_ff_mult=2, LFE_num_scale=2)  # output dim = int(inner_dim * 2 / 3)
    f, h, w = 3, 16, 16
    rope = get_3d_rotary_pos_embed(embed_dim=16, crops_coords=((0, 0), (h // 2, w // 2)), grid_size=(h // 2, w // 2),
                                   temporal_size=f, device=torch.device("cpu"))
    return Case(m, dict(hidden_states=_r(1, f, 4, h, w), encoder_hidden_states=_r(1, 8, 16, seed=2),
                        timestep=torch.tensor([1000]), image_rotary_emb=rope, id_cond=_r(1, 8, seed=3),
                        id_vit_hidden=[_r(1, 6, 16, seed=4), _r(1, 6, 16, seed=5)], return_dict=False))


# ---------------------------------------------------------------------------------------------
# session 20 additions (diffusers 0.42.1): AnyFlow (+ FAR), JoyImage Edit Plus, Kandinsky 6 SR, MiniMax-H3,
# SANA-WM (+ its LTX-2 refiner), Wan-Animate-2
# ---------------------------------------------------------------------------------------------
def anyflow():
    # Wan-2.1 blocks with a dual (t, r) flow-map timestep embedding; latents (B, F, C, H, W), per-frame timesteps (B, F)
    m = _build("AnyFlowTransformer3DModel", patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
               in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64)
    f = 3
    return Case(m, dict(hidden_states=_r(1, f, 4, 16, 16), timestep=torch.full((1, f), 1000.0),
                        r_timestep=torch.full((1, f), 750.0), encoder_hidden_states=_r(1, 8, 32, seed=2),
                        return_dict=False))


def anyflow_far():
    # FAR chunk-causal AnyFlow, the pipeline's denoising step of chunk 2 of chunk_partition (1, 1, 2): the 2-frame
    # chunk's 128 queries attend (flex backend, no mask) to the KV cache -- chunk 0 compressed by the (1, 4, 4)
    # far_patch_embedding (16 tokens), chunk 1 full (64 tokens) -- then their own 128 keys; full_chunk_limit 2 so a
    # compressed chunk exists at 3 chunks. The cache is filled by two "cache steps" (encode_kv_cache: flex BlockMask).
    m = _build("AnyFlowFARTransformer3DModel", patch_size=(1, 2, 2), compressed_patch_size=(1, 4, 4),
               full_chunk_limit=2, num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
               text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64, chunk_partition=(1, 1, 2))
    cp, h, w, limit = [1, 1, 2], 16, 16, 2
    full_tpf, comp_tpf = (h // 2) * (w // 2), (h // 4) * (w // 4)
    kv_cache = {i: {"full_cache": torch.zeros(2, 1, 2, limit * max(cp) * full_tpf, 16),
                    "compressed_cache": torch.zeros(2, 1, 2, (len(cp) - limit + 1) * max(cp) * comp_tpf, 16)}
                for i in range(2)}
    flag = {"num_cached_chunks": 0, "is_cache_step": False}
    text = _r(1, 8, 32, seed=2)
    clean = _r(1, 2, 4, h, w, seed=3)  # chunks 0 and 1, already denoised
    with torch.no_grad():
        for k in (1, 2):
            mask = m.build_attention_mask(chunk_partition=cp[:k], height=h, width=w, mode="cache")
            m(hidden_states=clean[:, :k], chunk_partition=cp[:k], timestep=torch.zeros(1, k),
              r_timestep=torch.zeros(1, k), encoder_hidden_states=text, attention_mask=mask, kv_cache=kv_cache,
              kv_cache_flag=dict(flag, is_cache_step=True), return_dict=False)
            flag["num_cached_chunks"] += 1
    return Case(m, dict(hidden_states=_r(1, 2, 4, h, w), timestep=torch.full((1, 2), 1000.0),
                        r_timestep=torch.full((1, 2), 750.0), encoder_hidden_states=text, chunk_partition=cp,
                        kv_cache=kv_cache, kv_cache_flag=flag, return_dict=False))


def joyimage_edit_plus():
    # packed patches (B, N, C, pt, ph, pw): an 8x8 target + a 6x6 reference (another size) = 100 patches, joint
    # [image, text] attention with a bool key mask (2 of 8 text tokens padded)
    m = _build("JoyImageEditPlusTransformer3DModel", patch_size=[1, 2, 2], in_channels=4, hidden_size=32,
               num_attention_heads=2, text_dim=16, mlp_width_ratio=2.0, num_layers=2, rope_dim_list=[4, 6, 6])
    mask = torch.ones(1, 8, dtype=torch.long)
    mask[:, 6:] = 0
    return Case(m, dict(hidden_states=_r(1, 64 + 36, 4, 1, 2, 2), timestep=torch.tensor([500.0]),
                        encoder_hidden_states=_r(1, 8, 16, seed=2), encoder_hidden_states_mask=mask,
                        shape_list=[[(1, 8, 8), (1, 6, 6)]], return_dict=False))


def kandinsky6_sr():
    # text-free SR DiT; self-attention is NABLA: a BlockMask (64-token blocks = 8x8 local tiles) computed from the
    # pooled q/k of every call, on the flex backend. Channels-last (B, T, H, W, 2*C+1); grid 2x8x16 = 256 tokens
    m = _build("Kandinsky6SRTransformer3DModel", in_visual_dim=4, out_visual_dim=4, time_dim=32, patch_size=(1, 1, 1),
               model_dim=32, ff_dim=64, num_visual_blocks=2, axes_dims=(4, 6, 6), nabla_window=(3, 3, 3))
    return Case(m, dict(hidden_states=_r(1, 2, 8, 16, 9), timestep=torch.tensor([1000.0]), return_dict=False))


def minimax_h3():
    # one packed sequence [8 text, 3x8x8 video, 12 audio] under full self-attention (no cross-attention); per-row
    # modality tags and timestep indices pick the AdaLN rows. diffusers ships no pipeline for it: the layout is ours --
    # text rows at (i, i, i), video rows at (t, h, w), audio rows at (t_video, 0, 0); video frame 0 is an i2v
    # conditioning frame at t = 0 (with the text), frames 1-2 and the audio are the targets
    m = _build("MiniMaxH3Transformer3DModel", num_attention_heads=2, attention_head_dim=16, hidden_size=32,
               num_layers=2, num_refiner_layers=1, ffn_dim=64, in_channels=4, audio_in_channels=4,
               patch_size=(1, 2, 2), text_dim=16, freq_dim=32, time_embed_hidden_dim=32, time_embed_dim=16,
               rope_freq_dim=2)  # rotates 2 * 3 * 2 = 12 of the 16 head channels
    n_txt, f, h, w, n_aud = 8, 3, 8, 8, 12
    n_vid = f * h * w
    txt_pos = torch.arange(n_txt)[:, None].expand(n_txt, 3)
    vid_pos = torch.cartesian_prod(torch.arange(f), torch.arange(h), torch.arange(w))
    aud_pos = torch.stack([torch.arange(n_aud) * f // n_aud, torch.zeros(n_aud, dtype=torch.long),
                           torch.zeros(n_aud, dtype=torch.long)], -1)
    tags = torch.cat([torch.ones(n_txt), torch.zeros(n_vid), torch.full((n_aud,), 2.0)]).long()
    t_idx = torch.cat([torch.ones(n_txt + h * w), torch.zeros(n_vid - h * w + n_aud)]).long()
    return Case(m, dict(hidden_states=_r(1, n_vid, 16), audio_hidden_states=_r(1, n_aud, 4, seed=4),
                        encoder_hidden_states=_r(1, n_txt, 16, seed=2), timestep=torch.tensor([0.9, 0.0]),
                        timestep_indices=t_idx, token_tags=tags, position_ids=torch.cat([txt_pos, vid_pos, aud_pos]),
                        video_indices=torch.arange(n_txt, n_txt + n_vid),
                        audio_indices=torch.arange(n_txt + n_vid, n_txt + n_vid + n_aud),
                        text_indices=torch.arange(n_txt), return_dict=False))


def sana_wm():
    # camera-controlled SANA-WM: block 0 bidirectional gated-delta-net linear attention, block 1 (softmax_every_n=2)
    # softmax SDPA, each with a UCPE camera branch (SDPA again in block 1, cast to bf16 by the model); text
    # cross-attention; GLUMBConvTemp FFN. Camera inputs from the pipeline's own prepare_camera (5 px frames at
    # temporal stride 2 -> 3 latent frames of 8x8, Pluecker channels 6*2); per-frame timesteps with frame 0 the
    # clean anchor. Zero-initialised, re-initialised: plucker_embedder (post-attention Pluecker term would be 0) and
    # the GDN block's temporal short convolutions on K (conv_k, conv_k_cam: its keys would all be 0)
    import numpy as np
    from diffusers.pipelines.sana_wm.cam_utils import prepare_camera

    m = _build("SanaWMTransformer3DModel", in_channels=4, num_layers=2, hidden_size=32, num_attention_heads=2,
               softmax_every_n=2, linear_head_dim=16, caption_channels=16, chunk_plucker_channels=12,
               chunk_plucker_post_attn_blocks=2)
    _renorm(m, "plucker_embedder.proj")
    _renorm(m, "conv_k", std=0.5, seed=6)
    n_px = 5
    poses = np.tile(np.eye(4, dtype=np.float32), (n_px, 1, 1))
    poses[:, 2, 3] = np.arange(n_px) * 0.1  # dolly forward
    poses[:, 0, 3] = np.arange(n_px) * 0.05
    intr = np.tile(np.array([200.0, 200.0, 128.0, 128.0], dtype=np.float32), (n_px, 1))
    cam = prepare_camera(poses, intr, target_size=(256, 256), vae_stride=(2, 32, 32))
    mask = torch.ones(1, 8, dtype=torch.long)
    mask[:, 6:] = 0
    timestep = torch.tensor([[[0.0, 1000.0, 1000.0]]])  # (B, 1, T)
    return Case(m, dict(hidden_states=_r(1, 4, 3, 8, 8), timestep=timestep, encoder_hidden_states=_r(1, 1, 8, 16, seed=2),
                        mask=mask, camera_conditions=cam["raymap"][None], chunk_plucker=cam["chunk_plucker"][None],
                        return_dict=False))


def sana_wm_refiner():
    # SANA-WM stage-2 (LTX-2 blocks, video only), the refiner's denoising step of AR block 1: the 2-frame block's 128
    # queries attend to [1 sink frame (pre-RoPE K re-RoPE'd at its shifted offset), 2 history frames (post-RoPE),
    # own 128] = 320 keys. Sink and history are captured as refiner.py does (capture_pre_rope, then
    # inject_and_capture_post_rope on block 0); 8x8 latents, patch 1
    from diffusers.models.transformers.transformer_sana_wm_refiner import SanaWMRefinerKVCache

    m = _build("SanaWMLTX2RefinerTransformer3DModel", in_channels=4, out_channels=4, num_attention_heads=2,
               attention_head_dim=16, cross_attention_dim=32, audio_in_channels=4, audio_out_channels=4,
               audio_num_attention_heads=2, audio_attention_head_dim=16, audio_cross_attention_dim=32, num_layers=2,
               caption_channels=16)
    h = w = 8
    z = _r(1, 4, 5, h, w, seed=3)  # stage-1 latents: sink frame 0, block 0 = frames 1-2, block 1 = frames 3-4
    pack = lambda x: x.flatten(2).transpose(1, 2)  # refiner.py's _pack_latents at patch 1
    rope = lambda frames: m.build_rotary_emb_for_absolute_positions(1, frames, h, w, torch.device("cpu"), 24.0)
    text = _r(1, 8, 16, seed=2)
    tmask = torch.ones(1, 8)
    tmask[:, 6:] = 0
    cache = SanaWMRefinerKVCache(2)
    kw = dict(encoder_hidden_states=text, encoder_attention_mask=tmask, kv_cache=cache, return_dict=False)
    with torch.no_grad():
        m(hidden_states=pack(z[:, :, :1]), timestep=torch.zeros(1, h * w), video_rotary_emb=rope([0]),
          kv_cache_mode="capture_pre_rope", **kw)
        for layer in cache.layer_caches:
            layer.store_sink(*layer.get_captured_pre_rope())
        cache.sink_pe = rope([0])  # sink_rope_offset = block_start - history_frames - sink_size = 0
        m(hidden_states=pack(z[:, :, 1:3]), timestep=torch.zeros(1, 2 * h * w), video_rotary_emb=rope([1, 2]),
          kv_cache_mode="inject_and_capture_post_rope", **kw)
        for layer in cache.layer_caches:
            layer.store_history(*layer.get_captured_post_rope())
    cache.sink_pe = rope([0])  # block 1: 3 - 2 - 1 = 0
    return Case(m, dict(kw, hidden_states=pack(z[:, :, 3:5]) * 0.1 + _r(1, 2 * h * w, 4) * 0.9,
                        timestep=torch.full((1, 2 * h * w), 900.0), video_rotary_emb=rope([3, 4]),
                        kv_cache_mode="inject"))


def wan_animate2():
    # Wan-Animate-2's denoising step: a reference (driving-video) pass "extract"s every layer's pre-RoPE K/V, then
    # the generation pass ("cached") packs [generation | reference] into 128-aligned buffers and attends through a
    # flex BlockMask (each generation frame: all generation tokens + the same-index reference frame). 5 px frames per
    # segment -> 2 reference latent frames (128 tokens), generation 3 frames (+1 reference-image slot; 192 tokens),
    # 128x128 px; CLIP tokens (1280-d, fixed) through the added K/V. One eager call builds the block mask (cached on
    # the model, create_block_mask(_compile=True))
    from diffusers.models.transformers.transformer_wan_animate_2 import WanAnimate2KVCache

    m = _build("WanAnimate2Transformer3DModel", patch_size=(1, 2, 2), text_len=8, in_dim=12, dim=32, ffn_dim=64,
               freq_dim=32, text_dim=32, out_dim=4, num_heads=2, num_layers=2)
    h = w = 16
    cache = WanAnimate2KVCache(2)
    text = [_r(6, 32, seed=2)]  # zero-padded to text_len 8 by the model
    clip = _r(1, 4, 1280, seed=3)
    grid_ref = torch.tensor([[2, h // 2, w // 2]])
    with torch.no_grad():
        m([_r(4, 2, h, w, seed=4)], timestep=torch.tensor([1000.0]), encoder_hidden_states=text,
          encoder_hidden_states_image=clip, condition_latents=[_r(8, 2, h, w, seed=5)], kv_cache=cache,
          kv_cache_mode="extract", seq_len=2 * (h // 2) * (w // 2), offset_grid_sizes=grid_ref)
    kw = dict(hidden_states=[_r(4, 3, h, w)], timestep=torch.tensor([1000.0]), encoder_hidden_states=text,
              encoder_hidden_states_image=clip, condition_latents=[_r(8, 3, h, w, seed=6)], kv_cache=cache,
              kv_cache_mode="cached", seq_len=3 * (h // 2) * (w // 2), reference_grid_sizes=grid_ref, origin_len=5,
              origin_area=[8 * h, 8 * w], return_dict=False)
    with torch.no_grad():
        m(**kw)
    return Case(m, kw)


# ---------------------------------------------------------------------------------------------
# audio: 1-D latent sequences
# ---------------------------------------------------------------------------------------------
def ace_step():
    # 1-D conv patch embedding (patch 2) over [context latents, latents]; alternating sliding-window (additive banded
    # mask) and full self-attention, cross-attention to the condition, SwiGLU MLP from two linears
    m = _build("AceStepTransformer1DModel", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=2, num_key_value_heads=2, head_dim=16, in_channels=8, audio_acoustic_hidden_dim=4,
               patch_size=2, sliding_window=16, encoder_hidden_size=32)
    n = 128  # 64 tokens after patching
    return Case(m, dict(hidden_states=_r(1, n, 4), timestep=torch.tensor([0.9]), timestep_r=torch.tensor([0.9]),
                        encoder_hidden_states=_r(1, 8, 32, seed=2), context_latents=_r(1, n, 4, seed=3),
                        return_dict=False))


def minimax_music3():
    # channels-first latents, a 1x1 conv, frame-aligned conditioning concatenated on channels; the timestep
    # embedding is prepended as one extra token (seen by self-attention, cut off before the output); gated MLP
    # from one chunked linear
    m = _build("MiniMaxMusic3Transformer1DModel", in_channels=4, condition_dim=8, num_layers=2, num_attention_heads=2,
               attention_head_dim=16, ff_inner_dim=64, rotary_dim=8, fourier_embedding_dim=16)
    n = 96
    return Case(m, dict(hidden_states=_r(1, 4, n), timestep=torch.tensor([0.1]),
                        encoder_hidden_states=_r(1, n, 8, seed=2), return_dict=False))


# ---------------------------------------------------------------------------------------------
# session 35: the rest of diffusers 0.42.1's transformers
# ---------------------------------------------------------------------------------------------
def lumina_next():
    # Lumina-Next: per block one self-attention (to_out = Identity, all-True bool mask) and one text cross-attention
    # that share the query input; their (B, N, heads, d) outputs are summed (cross gated by tanh(gate), zero-init:
    # re-initialised) before attn2.to_out; complex 2-D RoPE table as an input (the pipeline passes 384 x 384, the
    # patch embedding cuts it); sandwich RMSNorms around each branch
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

    m = _build("LuminaNextDiT2DModel", sample_size=16, patch_size=2, in_channels=4, hidden_size=32, num_layers=2,
               num_attention_heads=2, num_kv_heads=2, multiple_of=16, ffn_dim_multiplier=0.75,  # FFN 64
               cross_attention_dim=32)
    for i, layer in enumerate(m.layers):
        torch.nn.init.normal_(layer.gate, std=0.5, generator=torch.Generator().manual_seed(5 + i))
    return Case(m, dict(hidden_states=_r(1, 4, 24, 24), timestep=torch.tensor([0.5]),
                        encoder_hidden_states=_r(1, 8, 32, seed=2), encoder_mask=torch.ones(1, 8, dtype=torch.long),
                        image_rotary_emb=get_2d_rotary_pos_embed_lumina(16, 384, 384),
                        # the pipeline's proportional attention: a constant softmax scale
                        cross_attention_kwargs={"base_sequence_length": 64}, return_dict=False))


def cosmos3_omni():
    # packed mixture-of-transformers (Qwen3-style backbone) with no batch axis: every activation is (tokens, C). A
    # causal text ("und") prefix and the vision ("gen") tokens run through separate weights; the vision queries
    # attend to cat(text keys, vision keys) (non-causal), the text queries to the text keys (causal). Pipeline layout
    # (t2v, every frame noisy): 8 text tokens at mRoPE ids (i, i, i), then 3x6x6 vision patches at
    # (8 + 15000 + t, h, w); GQA (2 query heads, 1 kv head); per-token timesteps
    m = _build("Cosmos3OmniTransformer", head_dim=16, hidden_size=32, intermediate_size=64, num_attention_heads=2,
               num_key_value_heads=1, num_hidden_layers=2, latent_channel=4, latent_patch_size=2,
               patch_latent_dim=16, vocab_size=64, rope_axes_dim=(4, 2, 2))
    n_txt, f, h, w = 8, 3, 6, 6  # latent 3 x 12 x 12, patch 2: 108 vision tokens
    n_vis = f * h * w
    txt_pos = torch.arange(n_txt)[None].expand(3, -1)
    vis_pos = torch.cartesian_prod(torch.arange(f) + n_txt + 15000, torch.arange(h), torch.arange(w)).T
    return Case(m, dict(input_ids=torch.randint(0, 64, (n_txt,), generator=torch.Generator().manual_seed(2)),
                        text_indexes=torch.arange(n_txt), position_ids=torch.cat([txt_pos, vis_pos], 1),
                        und_len=n_txt, sequence_length=n_txt + n_vis, vision_tokens=[_r(1, 4, f, 2 * h, 2 * w)],
                        vision_token_shapes=[(f, h, w)], vision_sequence_indexes=torch.arange(n_txt, n_txt + n_vis),
                        vision_mse_loss_indexes=torch.arange(n_txt, n_txt + n_vis),
                        vision_timesteps=torch.full((n_vis,), 900.0), vision_noisy_frame_indexes=[torch.arange(f)],
                        return_dict=False),
                latent="vision_tokens", timestep="vision_timesteps")


def stable_audio():
    # channels-first 1-D latents with 1x1-conv residuals; one global token (duration + timestep) in front of the
    # sequence, cut off at the end; partial RoPE (half of each head) given as a (cos, sin) tuple as the pipeline
    # builds it; cross-attention with 1 kv head of 2 (repeat_interleave); SwiGLU feed-forward
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    m = _build("StableAudioDiTModel", sample_size=96, in_channels=4, num_layers=2, attention_head_dim=16,
               num_attention_heads=2, num_key_value_attention_heads=1, out_channels=4, cross_attention_dim=32,
               time_proj_dim=32, global_states_input_dim=32, cross_attention_input_dim=32)
    n = 96  # + the global token: 97 in self-attention
    rope = get_1d_rotary_pos_embed(8, n + 1, use_real=True, repeat_interleave_real=False)
    return Case(m, dict(hidden_states=_r(1, 4, n), timestep=torch.tensor([0.5]),
                        encoder_hidden_states=_r(1, 8, 32, seed=2), global_hidden_states=_r(1, 1, 32, seed=3),
                        rotary_embedding=rope, return_dict=False))


def stable_audio3():
    # differential attention: one to_qkv gives q1, q2, k1, k2, v and out = SDPA(q1, k1, v) - SDPA(q2, k2, v) (self
    # and cross); RMS qk-norm, partial RoPE; 4 learned memory tokens in front of the sequence (cut off before the
    # output); SwiGLU from one chunked linear; zero-init 1x1 residual convs (re-initialised)
    m = _build("StableAudio3DiTModel", io_channels=4, patch_size=1, embed_dim=32, depth=2, num_heads=2,
               cond_token_dim=16, global_cond_dim=8, local_add_cond_dim=5, timestep_features_dim=16, ff_mult=2.0,
               num_memory_tokens=4, use_differential_attention=True)
    for i, conv in enumerate((m.preprocess_conv, m.postprocess_conv)):
        torch.nn.init.normal_(conv.weight, std=0.2, generator=torch.Generator().manual_seed(5 + i))
    mask = torch.ones(1, 8, dtype=torch.bool)
    mask[:, 6:] = False
    return Case(m, dict(hidden_states=_r(1, 4, 96), timestep=torch.tensor([0.9]),
                        encoder_hidden_states=_r(1, 8, 16, seed=2), global_hidden_states=_r(1, 8, seed=3),
                        encoder_attention_mask=mask, return_dict=False))


def longcat_audio_dit():
    # F5/E2-style audio DiT: global AdaLN, qk RMSNorm across heads, RoPE on q and k (in the cross-attention too, with
    # the text keys' own positions), boolean key masks, ConvNeXtV2 text blocks (their GRN normalises over the
    # sequence: not per-token MLPs), Linear-SiLU-Linear embedders, GELU-tanh MLP, a long skip; zero-init output head
    # and global AdaLN (re-initialised)
    m = _build("LongCatAudioDiTTransformer", dit_dim=32, dit_depth=2, dit_heads=2, dit_text_dim=16, latent_dim=4,
               ff_mult=2.0)
    g = torch.Generator().manual_seed(5)
    for mod in (m.norm_out.linear, m.proj_out, m.adaln_global_mlp.mlp[-1]):
        for p in mod.parameters():
            torch.nn.init.normal_(p, std=0.1, generator=g)
    n = 96
    text_mask = torch.ones(1, 8, dtype=torch.bool)
    text_mask[:, 6:] = False
    return Case(m, dict(hidden_states=_r(1, n, 4), encoder_hidden_states=_r(1, 8, 16, seed=2),
                        encoder_attention_mask=text_mask, timestep=torch.tensor([0.9]),
                        attention_mask=torch.ones(1, n, dtype=torch.bool), latent_cond=_r(1, n, 4, seed=3),
                        return_dict=False))


# ---------------------------------------------------------------------------------------------
# proteins
# ---------------------------------------------------------------------------------------------
def rfd4_proteina():
    # protein denoiser: tokens are residues with a (B, N, N, C) pair representation; softmax attention with an additive
    # per-head pair bias (a linear of the pair representation: not a key-padding mask, so it stays dense), a sigmoid
    # output gate; SwiGLU transitions from one chunked linear; pair updates (triangle multiplications, a ReLU MLP
    # over the N*N pairs) after every 2nd layer; two timesteps. latent = local_latents (bb_ca enters through one-hot
    # distance bins, which a drift would flip)
    n = 48
    m = _build("RFD4ProteinaTransformer", nlayers=2, token_dim=32, nheads=2, dim_cond=32, pair_repr_dim=16,
               latent_dim=8, token_type_emb_dim=8, cath_emb_dim=8, t_emb_dim=16, seq_sep_dim=8, xt_pair_dist_dim=8,
               feats_seq=("xt_bb_ca", "xt_local_latents", "token_type"),
               feats_cond_seq=("time_emb_bb_ca", "time_emb_local_latents"),
               feats_pair_repr=("xt_bb_ca_pair_dists", "token_bond_path_length", "molecule_idx_pair"),
               feats_pair_cond=("time_emb_bb_ca", "time_emb_local_latents"), update_pair_repr_every_n=2,
               tri_mult_c=16, num_sequence_classes=20)
    mask = torch.ones(1, n, dtype=torch.bool)
    mask[:, 44:] = False  # 4 padding residues
    idx = torch.arange(n)
    cond = {"is_in_context_conditioning": torch.zeros(1, n, dtype=torch.bool),
            "supports_local_latent": torch.ones(1, n, dtype=torch.bool),
            "token_bond_path_length": (idx[:, None] - idx[None]).abs()[None].clamp(max=7),
            "molecule_iid": torch.zeros(1, n, dtype=torch.long)}
    return Case(m, dict(bb_ca=_r(1, n, 3), local_latents=_r(1, n, 8, seed=2), bb_ca_time=torch.tensor([0.3]),
                        local_latents_time=torch.tensor([0.3]), padding_mask=mask,
                        token_type=torch.zeros(1, n, dtype=torch.long), conditioning=cond, return_dict=False),
                latent="local_latents", timestep="bb_ca_time")


# ---------------------------------------------------------------------------------------------
# U-Nets: attention and feed-forwards at several resolutions (session 65)
# ---------------------------------------------------------------------------------------------
def unet2d():
    # SD-style U-Net: conv_in (3x3, stride 1) on the 16x16 latent, cross-attention transformers at 16x16 and, after a
    # stride-2 downsample, 8x8 tokens (merged from NCHW by each transformer's reshape); GEGLU feed-forwards. Widths
    # 32/48, so that no channel count equals a token count (a coincidence the grid guards refuse)
    m = _build("UNet2DConditionModel", sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
               block_out_channels=(32, 48), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=16,
               norm_num_groups=8)
    return Case(m, dict(sample=_r(1, 4, 16, 16), timestep=torch.tensor([500.0]),
                        encoder_hidden_states=_r(1, 8, 32, seed=2), return_dict=False), latent="sample")


def unet_svd():
    # Stable Video Diffusion's spatio-temporal U-Net: spatial attention per frame at 16x16 and 8x8, temporal attention
    # over the 3 frames of each position; one image-embedding token of context
    m = _build("UNetSpatioTemporalConditionModel", sample_size=16, in_channels=8, out_channels=4,
               down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
               up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
               block_out_channels=(32, 96), layers_per_block=1, cross_attention_dim=32, num_attention_heads=(2, 4),
               addition_time_embed_dim=8, projection_class_embeddings_input_dim=24)
    return Case(m, dict(sample=_r(1, 3, 8, 16, 16), timestep=torch.tensor([500.0]),
                        encoder_hidden_states=_r(1, 1, 32, seed=2), added_time_ids=_r(1, 3, seed=4),
                        return_dict=False), latent="sample")


NEWER_MODELS = {
    "flux3": ("Flux3Transformer2DModel", flux3),
    "qwen_image21": ("QwenImage21Transformer2DModel", qwen_image21),
    "qwen_image21_cached": ("QwenImage21Transformer2DModel (KV-cached steps)", qwen_image21_cached),
    "flux2_kv_cached": ("Flux2Transformer2DModel (Klein KV-cached steps)", flux2_kv_cached),
    "hunyuan_image": ("HunyuanImageTransformer2DModel", hunyuan_image),
    "longcat_image": ("LongCatImageTransformer2DModel", longcat_image),
    "ovis_image": ("OvisImageTransformer2DModel", ovis_image),
    "bria": ("BriaTransformer2DModel", bria),
    "bria_fibo": ("BriaFiboTransformer2DModel", bria_fibo),
    "bria_fibo2": ("BriaFibo2Transformer2DModel", bria_fibo2),
    "prx": ("PRXTransformer2DModel", prx),
    "glm_image": ("GlmImageTransformer2DModel", glm_image),
    "ernie_image": ("ErnieImageTransformer2DModel", ernie_image),
    "krea2": ("Krea2Transformer2DModel", krea2),
    "ideogram4": ("Ideogram4Transformer2DModel", ideogram4),
    "nucleus_moe_image": ("NucleusMoEImageTransformer2DModel", nucleus_moe_image),
    "dreamlite": ("DreamLiteTransformer2DModel", dreamlite),
    "joyimage_edit": ("JoyImageEditTransformer3DModel", joyimage_edit),
    "ltx2_video": ("LTX2VideoTransformer3DModel", ltx2_video),
    "sana_video": ("SanaVideoTransformer3DModel", sana_video),
    "kandinsky6": ("Kandinsky6Transformer3DModel", kandinsky6),
    "chronoedit": ("ChronoEditTransformer3DModel", chronoedit),
    "motif_video": ("MotifVideoTransformer3DModel", motif_video),
    "helios": ("HeliosTransformer3DModel", helios),
    "wan_animate": ("WanAnimateTransformer3DModel", wan_animate),
    "hunyuan_video_framepack": ("HunyuanVideoFramepackTransformer3DModel", hunyuan_video_framepack),
    "consisid": ("ConsisIDTransformer3DModel", consisid),
    "anyflow": ("AnyFlowTransformer3DModel", anyflow),
    "anyflow_far": ("AnyFlowFARTransformer3DModel (KV-cached chunk step)", anyflow_far),
    "joyimage_edit_plus": ("JoyImageEditPlusTransformer3DModel", joyimage_edit_plus),
    "kandinsky6_sr": ("Kandinsky6SRTransformer3DModel", kandinsky6_sr),
    "minimax_h3": ("MiniMaxH3Transformer3DModel", minimax_h3),
    "sana_wm": ("SanaWMTransformer3DModel", sana_wm),
    "sana_wm_refiner": ("SanaWMLTX2RefinerTransformer3DModel (KV-cached AR step)", sana_wm_refiner),
    "wan_animate2": ("WanAnimate2Transformer3DModel (cached step)", wan_animate2),
    "ace_step": ("AceStepTransformer1DModel", ace_step),
    "minimax_music3": ("MiniMaxMusic3Transformer1DModel", minimax_music3),
    "lumina_next": ("LuminaNextDiT2DModel", lumina_next),
    "cosmos3_omni": ("Cosmos3OmniTransformer", cosmos3_omni),
    "stable_audio": ("StableAudioDiTModel", stable_audio),
    "stable_audio3": ("StableAudio3DiTModel", stable_audio3),
    "longcat_audio_dit": ("LongCatAudioDiTTransformer", longcat_audio_dit),
    "rfd4_proteina": ("RFD4ProteinaTransformer", rfd4_proteina),
    "unet2d": ("UNet2DConditionModel", unet2d),
    "unet_svd": ("UNetSpatioTemporalConditionModel", unet_svd),
}
