"""Shared helpers for the CPU test suite (not the kernel tests): fresh Dynamo state, compile
shortcuts, and tiny random-init diffusers transformers with example inputs.

tests/conftest.py belongs to the kernel tests; everything the CPU suite shares lives here.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch
from torch._dynamo.utils import counters

import chipmunk_compile

# Dense everywhere unless a test says otherwise: the tiny models have few tokens and few layers.
ALL_SITES = {"attn": {"min_tokens": 0}, "mlp": {"min_tokens": 0}}


def cfg(attn: dict | None = None, mlp: dict | None = None, **top) -> dict:
    """A config dict with min_tokens 0 and no dense-only first layers, plus the given settings. The
    tests' periods are in steps of their own short generations: `schedule_steps` null (not scaled
    by a followed scheduler's step count) unless given."""
    a = {"min_tokens": 0, "first_n_dense_layers": 0, **(attn or {})}
    m = {"min_tokens": 0, "first_n_dense_layers": 0, **(mlp or {})}
    return {"attn": a, "mlp": m, "schedule_steps": None, **top}


# top_keys 1.0 and no random keys: every sparse step attends every key / recomputes every neuron.
FULL_KEYS = {"top_keys": 1.0, "random_keys": 0.0}


@pytest.fixture
def fresh_dynamo():
    """`torch._dynamo.reset()` and `counters.clear()` around a test."""
    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()
    counters.clear()


def chip(model, config: Any, *, compiler: str = "eager", fullgraph: bool = True, **kw):
    return torch.compile(model, backend="chipmunk", options={"config": config, "compiler": compiler},
                         fullgraph=fullgraph, **kw)


def ccount(name: str) -> int:
    return counters["chipmunk"][name]


def step_counts(model) -> dict[str, int]:
    """Sum of per-site step-type counts from `chipmunk_compile.stats`."""
    out: dict[str, int] = {}
    for s in chipmunk_compile.stats(model)["sites"]:
        for k, v in s["steps"].items():
            key = f"{s['kind']}_{k}"
            out[key] = out.get(key, 0) + v
    return out


def matches_eager(model, config: Any, calls, *, tol: float = 1e-5) -> dict[str, int]:
    """`model` compiled with `config` gives eager's output on every call (`calls`: (args, kwargs)
    per call, one step each) within `tol` (max_rel); returns the sites' step counts."""
    compiled = chip(model, config)
    with torch.no_grad():
        for i, (args, kwargs) in enumerate(calls):
            out, ref = compiled(*args, **kwargs), model(*args, **kwargs)
            assert max_rel(out, ref) < tol, (i, max_rel(out, ref))
    return step_counts(model)


def plan_sites(model, kwargs: dict, config: Any) -> list:
    """The sites the rewrite plans for `model` called on `kwargs` (analysis only: graphs unchanged)."""
    from chipmunk_compile import ChipmunkConfig
    from chipmunk_compile.rewrite import rewrite
    from chipmunk_compile.runtime import Session

    cfg = ChipmunkConfig.from_any(config)
    plans = []

    def backend(gm, example_inputs, **_):
        plans.append(rewrite(gm, cfg, Session(cfg, None), apply_changes=False, example_inputs=example_inputs))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend, dynamic=False)(**kwargs)
    return [s for p in plans for s in p.sites]


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


# --------------------------------------------------------------------------------------------
# Tiny diffusers models
# --------------------------------------------------------------------------------------------
@dataclass
class TinyModel:
    name: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[float], dict]  # timestep value -> kwargs
    attention: int  # expected self/joint-attention sites
    mlp: int  # expected MLP sites
    rejected_attention: int  # expected rejected attention candidates (cross-attention)
    reject_reason: str = ""  # a substring of every rejected attention's reason


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=_g(seed))


def _build(cls, **kwargs):
    torch.manual_seed(0)
    return cls(**kwargs).eval()


def flux():
    from diffusers import FluxTransformer2DModel

    return _build(FluxTransformer2DModel, patch_size=1, in_channels=4, num_layers=2, num_single_layers=2,
                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                  pooled_projection_dim=32, axes_dims_rope=(4, 4, 8))


def flux_inputs(t: float, *, h: int = 8, w: int = 8, batch: int = 1, text: int = 8):
    img_ids = torch.zeros(h * w, 3)
    img_ids[:, 1] = torch.arange(h).repeat_interleave(w).float()
    img_ids[:, 2] = torch.arange(w).repeat(h).float()
    return dict(hidden_states=_rand(batch, h * w, 4, seed=1), encoder_hidden_states=_rand(batch, text, 32, seed=2),
                pooled_projections=_rand(batch, 32, seed=3), timestep=torch.full((batch,), t),
                img_ids=img_ids, txt_ids=torch.zeros(text, 3), return_dict=False)


def hunyuan():
    from diffusers import HunyuanVideoTransformer3DModel

    return _build(HunyuanVideoTransformer3DModel, in_channels=4, out_channels=4, num_attention_heads=2,
                  attention_head_dim=8, num_layers=1, num_single_layers=1, num_refiner_layers=1,
                  patch_size=1, patch_size_t=1, guidance_embeds=True, text_embed_dim=16,
                  pooled_projection_dim=8, rope_axes_dim=(2, 2, 4))


def hunyuan_inputs(t: float, *, text_valid: int = 5):
    mask = torch.zeros(1, 8, dtype=torch.long)
    mask[:, :text_valid] = 1
    return dict(hidden_states=_rand(1, 4, 2, 8, 8, seed=1), timestep=torch.tensor([t]),
                encoder_hidden_states=_rand(1, 8, 16, seed=2), encoder_attention_mask=mask,
                pooled_projections=_rand(1, 8, seed=3), guidance=torch.tensor([3500.0]), return_dict=False)


def wan():
    from diffusers import WanTransformer3DModel

    return _build(WanTransformer3DModel, patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                  in_channels=4, out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2,
                  cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


def wan_inputs(t: float):
    return dict(hidden_states=_rand(1, 4, 2, 16, 16, seed=1), timestep=torch.tensor([t]),
                encoder_hidden_states=_rand(1, 12, 16, seed=2), return_dict=False)


def mochi():
    from diffusers import MochiTransformer3DModel

    return _build(MochiTransformer3DModel, patch_size=2, num_attention_heads=2, attention_head_dim=8,
                  num_layers=2, pooled_projection_dim=16, in_channels=4, out_channels=None,
                  qk_norm="rms_norm", text_embed_dim=16, time_embed_dim=4, activation_fn="swiglu",
                  max_sequence_length=16)


def mochi_inputs(t: float):
    return dict(hidden_states=_rand(1, 4, 2, 16, 16, seed=1), encoder_hidden_states=_rand(1, 16, 16, seed=2),
                timestep=torch.tensor([t]), encoder_attention_mask=torch.ones(1, 16, dtype=torch.long),
                return_dict=False)


def sd3():
    from diffusers import SD3Transformer2DModel

    return _build(SD3Transformer2DModel, sample_size=16, patch_size=2, in_channels=4, num_layers=2,
                  attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                  joint_attention_dim=32, pooled_projection_dim=64, out_channels=4)


def sd3_inputs(t: float):
    return dict(hidden_states=_rand(1, 4, 16, 16, seed=1), encoder_hidden_states=_rand(1, 8, 32, seed=2),
                pooled_projections=_rand(1, 64, seed=3), timestep=torch.tensor([t]), return_dict=False)


def cogvideox():
    from diffusers import CogVideoXTransformer3DModel

    return _build(CogVideoXTransformer3DModel, num_attention_heads=2, attention_head_dim=8, in_channels=4,
                  out_channels=4, time_embed_dim=2, text_embed_dim=8, num_layers=2, sample_width=16,
                  sample_height=16, sample_frames=9, patch_size=2, temporal_compression_ratio=4,
                  max_text_seq_length=8)


def cogvideox_inputs(t: float):
    return dict(hidden_states=_rand(1, 3, 4, 16, 16, seed=1), encoder_hidden_states=_rand(1, 8, 8, seed=2),
                timestep=torch.tensor([t]), return_dict=False)


def dit():
    from diffusers import DiTTransformer2DModel

    return _build(DiTTransformer2DModel, num_attention_heads=2, attention_head_dim=8, in_channels=4,
                  out_channels=8, num_layers=2, norm_num_groups=1, sample_size=16, patch_size=2,
                  activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_zero")


def dit_inputs(t: float):
    return dict(hidden_states=_rand(1, 4, 16, 16, seed=1), timestep=torch.tensor([int(t)]),
                class_labels=torch.tensor([1]), return_dict=False)


def pixart():
    from diffusers import PixArtTransformer2DModel

    return _build(PixArtTransformer2DModel, num_attention_heads=2, attention_head_dim=8, in_channels=4,
                  out_channels=8, num_layers=2, cross_attention_dim=16, sample_size=16, patch_size=2,
                  caption_channels=16, norm_type="ada_norm_single", use_additional_conditions=False)


def pixart_inputs(t: float):
    return dict(hidden_states=_rand(1, 4, 16, 16, seed=1), encoder_hidden_states=_rand(1, 8, 16, seed=2),
                timestep=torch.tensor([t]), added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                return_dict=False)


# name -> (builder, inputs, expected attention sites, expected MLP sites,
#          expected rejected attention candidates, substring of their reason)
MODELS = {
    # double blocks: 1 joint attention + ff + ff_context; single blocks: 1 attention + 1 parallel MLP
    "flux": TinyModel("FluxTransformer2DModel", flux, flux_inputs, attention=2 + 2, mlp=2 * 2 + 2,
                      rejected_attention=0),
    # 1 double + 1 single block as Flux; the token refiner's ff is an MLP over the text tokens, its
    # self-attention has a (B, H, N, N) outer-product mask with key 0 always on: not key padding, a
    # pair bias
    "hunyuan": TinyModel("HunyuanVideoTransformer3DModel", hunyuan, hunyuan_inputs, attention=1 + 1 + 1,
                         mlp=2 + 1 + 1, rejected_attention=0),
    # per block: self-attention attn1 + ffn; attn2 is cross-attention; the text embedder is a
    # linear-gelu_tanh-linear MLP over the text tokens
    "wan": TinyModel("WanTransformer3DModel", wan, wan_inputs, attention=2, mlp=2 + 1, rejected_attention=2,
                     reject_reason="cross-attention"),
    # per block: one joint attention (video + valid text tokens) + SwiGLU ff (+ ff_context, not in the
    # last, context-pre-only block); the caption pooler's attention has one query: cross-attention
    "mochi": TinyModel("MochiTransformer3DModel", mochi, mochi_inputs, attention=2, mlp=2 + 1,
                       rejected_attention=1, reject_reason="cross-attention"),
    # per block: one joint attention + ff (+ ff_context, not in the last, context-pre-only block)
    "sd3": TinyModel("SD3Transformer2DModel", sd3, sd3_inputs, attention=2, mlp=2 + 1, rejected_attention=0),
    # per block: one joint attention over text + video tokens, one ff over both
    "cogvideox": TinyModel("CogVideoXTransformer3DModel", cogvideox, cogvideox_inputs, attention=2, mlp=2,
                           rejected_attention=0),
    # per block: self-attention + ff (class-conditional, no text)
    "dit": TinyModel("DiTTransformer2DModel", dit, dit_inputs, attention=2, mlp=2, rejected_attention=0),
    # per block: self-attention attn1 + ff; attn2 is cross-attention; the caption projection is a
    # linear-gelu_tanh-linear MLP over the text tokens
    "pixart": TinyModel("PixArtTransformer2DModel", pixart, pixart_inputs, attention=2, mlp=2 + 1,
                        rejected_attention=2, reject_reason="cross-attention"),
}


@contextlib.contextmanager
def model_context(name: str):
    """Mochi's attention selects the valid text tokens with torch.nonzero: Dynamo traces it (one
    graph, fullgraph=True) only with capture_dynamic_output_shape_ops."""
    if name == "mochi":
        with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
            yield
    else:
        yield


class TinyBlock(torch.nn.Module):
    """A pre-norm DiT block: SDPA self-attention + gelu-tanh MLP (one attention and one MLP site)."""

    def __init__(self, d: int = 64, heads: int = 4, mult: int = 4, pair_bias: int = 0):
        super().__init__()
        nn = torch.nn
        self.h = heads
        self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, mult * d), nn.Linear(mult * d, d)
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        # pair_bias = N > 0: SDPA also adds a learned (heads, N, N) score bias, -inf beyond ±N/8 tokens
        if pair_bias:
            far = (torch.arange(pair_bias)[:, None] - torch.arange(pair_bias)[None, :]).abs() > pair_bias // 8
            self.bias = nn.Parameter(torch.randn(heads, pair_bias, pair_bias).masked_fill(far, float("-inf")))
        else:
            self.bias = None

    def forward(self, x):
        import torch.nn.functional as F

        B, N, D = x.shape
        q, k, v = self.qkv(self.n1(x)).view(B, N, 3, self.h, D // self.h).permute(2, 0, 3, 1, 4)
        x = x + self.o(F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias).transpose(1, 2).reshape(B, N, D))
        return x + self.fc2(F.gelu(self.fc1(self.n2(x)), approximate="tanh"))


class TwoTinyBlocks(torch.nn.Module):
    """Two TinyBlocks in a row (`x` only, no timestep): the smallest model with per-block sites."""

    def __init__(self, width: int = 64, heads: int = 2, mult: int = 2):
        super().__init__()
        self.blocks = torch.nn.ModuleList([TinyBlock(width, heads=heads, mult=mult) for _ in range(2)])

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x
