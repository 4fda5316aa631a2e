"""Structural fuzzing: random DiTs assembled from the spellings real code uses, each checked for its
sites and for exact outputs where the method is exact.

    python benchmarks/fuzz_dits.py                     # seeds 0-99, a table and benchmarks/results/fuzz_dits.csv
    python benchmarks/fuzz_dits.py --seeds 17 --show   # one seed: its spec, inspect()'s table, the outcome
    python benchmarks/fuzz_dits.py --seeds cover       # the few seeds that take every value of every axis
    python benchmarks/fuzz_dits.py --device cuda       # GPU sizes (`for_gpu`): Triton kernels, step graphs

The arch zoos hold one hand-written model per architecture; here a seed picks one value per axis
(`AXES`: image or video of 3 or 5 latent frames, token layout, patch embedding, text (joint, a second stream, registers or cross-attention;
a second stream's tokens as queries too or as keys and values only),
text padding, q/k/v projection and head layout,
attention spelling, grouped-query heads, q/k norm, rotary, feed-forward, parallel block, modulation,
norm, depth, batch, grid, heads, compilation mode (and the whole model's through a wrapper or in place),
dtype (float32, bfloat16 or float16), autocast, guidance as a batch or two or three calls)
and builds a small model from them, so the
combinations nobody wrote by hand get matched too.

What a seed must satisfy (`check`), or it is a bug in the backend:
- `inspect()` finds one attention site per block and one MLP site per feed-forward (every spelling
  here is one the README lists as supported; the timestep embedding's and the modulation's linears,
  and a cross-attention to the text, are rejected candidates, as in any DiT), each grouped on the
  spec's grid with the text where the model shows the grid (`expected_grouping`);
- compiled with `backend="chipmunk"` (eager inner compiler; every call a step, refreshes every 3rd
  call, no forecast), each call equals eager within `TOL`, in two runs of 17 calls at the sizes of
  `SEGMENTS` (the spec's grid; another resolution and batch, a recompile; the first again; another
  grid of the same token count; the first again), three of the four switches on sparse steps:
  - `FULL`, every key and neuron kept, inputs drifting as a sampler's: the sparse steps recompute
    everything, so they are exact whatever the caches hold (this checks the ops' arithmetic,
    layouts, masks and shapes);
  - `FROZEN`, a quarter of the keys and neurons, the inputs of each size repeated: a sparse step's
    delta is then zero, so it is exact only if every cache is read where, in the order and at the
    size it was written (here the same-count grid is left out: `SEGMENTS`);
  sparse steps ran in both;
- `inspect()` of the compiled model, after those calls, reports the same sites at the compiled config
  and takes no step;
- no fallback counted but the exact path of a new size's first call on a sparse step
  (`EXPECTED_FALLBACKS`; on the GPU, no kernel fallback either).

Invariant: a spec is a pure function of its seed (`spec_for`), and a model and its inputs are a pure
function of the spec (`build`: seeded, eval mode, on `DEVICE`).
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import math
import os
import random
import time
import traceback
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

AXES = {
    "layout": ["bnc", "nbc"],  # batch-first tokens, or sequence-first (N, B, C) inside the blocks
    "embed": ["conv", "unfold", "tokens"],  # Conv2d patchify / reshape-permute patchify / packed tokens + ids
    "text": ["none", "prefix", "suffix", "mmdit", "registers", "cross"],  # joint tokens in one stream, a
    # second stream, learned register tokens in front of the image's, or cross-attention to the text
    # after each block's self-attention (PixArt, Wan): a rejected candidate that stays as it is
    "text_mask": ["none", "pad"],  # the last text token is padding, masked out of every key set with text
    "qkv": ["fused_chunk", "fused_heads", "separate"],
    "attn": ["sdpa", "sdpa_scale", "matmul", "einsum", "baddbmm", "max_sub", "manual_exp", "fp32_softmax"],
    "kv_heads": ["all", "half"],  # grouped-query attention: half as many k/v heads, repeated
    "qk_norm": ["none", "rms", "layer"],
    "rope": ["none", "half", "complex"],
    "mlp": ["gelu", "gelu_tanh", "silu", "relu", "relu2", "swiglu_chunk", "swiglu_two", "geglu_slice"],
    "mlp_bias": [True, False],
    "parallel": [False, True],  # cat(attn, mlp hidden) -> one linear (single-stream blocks only)
    "modulation": ["adaln", "none"],
    "norm": ["layer", "rms"],
    "depth": [2, 3],
    "batch": [1, 2],
    "grid": [(6, 8), (7, 5), (8, 8)],
    "heads": [(2, 16), (4, 8)],  # (heads, head dim)
    "compile": ["whole", "dynamic", "regional"],  # torch.compile(model), dynamic=True, each block's .compile()
    "dtype": ["float32", "float32", "bfloat16"],
    # classifier-free guidance as a batch of the pipeline's, or calls per step (the prompt's, then
    # zeros for the text; `guidance_calls` says two or three), steps then read from the timestep
    # (drifting run, whole-model compiles) or set with set_step
    "cfg": ["batched", "two_calls"],
    "autocast": [False, False, True],  # float32 weights called under torch.autocast(bfloat16)
    # mmdit's text tokens as queries too (a stream updated by each block), or only as keys and values
    # in front of the image's keys (PRX: image queries over cat(text keys, image keys))
    "text_queries": [True, False],
    # an image, or a video of 3 latent frames (Conv3d patch embedding, a patchify over t×h×w, or
    # packed tokens with (t, h, w) ids). This axis and the one above are drawn after the others
    # (session 71), which kept each seed's other values; only sequence-first seeds, whose grid is
    # drawn after every axis, got another grid. A video's count is redrawn by `video_frames` below
    "frames": [1, 3],
    # how the whole model is compiled: a torch.compile wrapper, or in place (`model.compile(...)`, as the
    # README says for pipelines that check isinstance; blocks compiled alone are in place anyway). Drawn
    # last, after a sequence-first seed's grid (session 72), so every other value of a seed stays
    "compile_call": ["wrapper", "in_place"],
    # a video's latent frames: 3, or 5 (the 4-frame voxel then leaves a 1-frame remainder); drawn
    # last too (session 72), and `frames` takes it where it drew a video
    "video_frames": [3, 5],
    # a 16-bit seed's dtype: bfloat16, or float16 (fp16 checkpoints: SD3, PixArt, Sana); drawn last
    # too (session 73), and `dtype` takes it where it drew bfloat16 (autocast stays bfloat16)
    "half_dtype": ["bfloat16", "float16"],
    # guidance as calls: two a step (the prompt's, the unconditional), or three (a second condition
    # between them, as image-conditioned editing pipelines run); drawn last too (session 73)
    "guidance_calls": [2, 3],
}
LATE_AXES = ("compile_call", "video_frames", "half_dtype", "guidance_calls")  # drawn after the sequence-first grid
SEQ_FIRST_GRIDS = [(16, 16), (18, 15), (16, 20)]
CH, PATCH, TEXT, TEXT_DIM, REGISTERS = 4, 2, 5, 12, 4
TOL = {"float32": 2e-4, "bfloat16": 3e-2, "float16": 5e-3}  # 16 bits: eager and the op round at different places
FULL = {"attn": {"min_tokens": 0, "first_n_dense_layers": 0, "top_keys": 1.0, "random_keys": 0.0,
                 "full_step_every": 3, "group": 8, "extrapolate": 0},
        "mlp": {"min_tokens": 0, "first_n_dense_layers": 0, "top_keys": 1.0, "random_keys": 0.0,
                "full_step_every": 3, "block": 8},
        "step_signal": "calls", "schedule_steps": None}
# a quarter of the keys and neurons: sparse steps are exact only while the inputs do not move, and
# then only if every cache is read where and in the order it was written
FROZEN = {"attn": {**FULL["attn"], "top_keys": 0.25}, "mlp": {**FULL["mlp"], "top_keys": 0.25},
          "step_signal": "calls", "schedule_steps": None}
# (size, calls) in order. Every call is a step, steps 1, 3, 6, 9, ... refreshes, so the switches
# at steps 7, 10 and 13 land on sparse steps (15 on a refresh): "first" the spec's grid, "other"
# another grid and batch (a recompile), "reordered" another grid of the first's token count at its
# batch (the same shapes, other positions). In the frozen run "reordered" calls are "first" ones: there a sparse
# step is exact only over caches of the same inputs, and "reordered" shares "first"'s caches (one
# shape), whose other content a sparse step reads as it reads any earlier step's, approximately.
SEGMENTS = (("first", 7), ("other", 3), ("first", 3), ("reordered", 2), ("first", 2))
# the other batch's first call (step 7) is a sparse step with no caches of its own filled yet: the
# exact path runs, counted as these fallbacks
EXPECTED_FALLBACKS = ("fallback:attn_cache_not_filled", "fallback:mlp_cache_not_filled")


@dataclass(frozen=True)
class Spec:
    seed: int
    layout: str
    embed: str
    text: str
    text_mask: str
    qkv: str
    attn: str
    kv_heads: str
    qk_norm: str
    rope: str
    mlp: str
    mlp_bias: bool
    parallel: bool
    modulation: str
    norm: str
    depth: int
    batch: int
    grid: tuple
    heads: tuple
    compile: str
    dtype: str
    cfg: str
    autocast: bool
    text_queries: bool
    frames: int
    compile_call: str
    video_frames: int
    half_dtype: str
    guidance_calls: int

    @property
    def dim(self) -> int:
        return self.heads[0] * self.heads[1]

    def short(self) -> str:
        return " ".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self) if f.name != "seed")


def spec_for(seed: int) -> Spec:
    rng = random.Random(seed)
    pick = {k: v[rng.randrange(len(v))] for k, v in AXES.items() if k not in LATE_AXES}
    if pick["text"] == "mmdit":
        pick["parallel"] = False  # a two-stream block has its own feed-forward per stream
    else:
        pick["text_queries"] = True  # only a second stream can attend with its keys alone
    if pick["dtype"] != "float32":
        pick["autocast"] = False
    if pick["text"] in ("none", "registers"):
        pick["text_mask"], pick["cfg"] = "none", "batched"  # no text to drop for the second branch
    if pick["layout"] == "nbc":  # (S, B, C) is read as sequence-first from 256 tokens (patterns/mlp.py)
        pick["grid"] = SEQ_FIRST_GRIDS[rng.randrange(len(SEQ_FIRST_GRIDS))]
    for k in LATE_AXES:
        pick[k] = AXES[k][rng.randrange(len(AXES[k]))]
    if pick["compile"] == "regional":
        pick["compile_call"] = "blocks"  # each block's .compile() (in place, but not the whole model's)
    if pick["frames"] > 1:
        pick["frames"] = pick["video_frames"]
    else:
        pick["video_frames"] = 0  # an image
    if pick["dtype"] == "bfloat16":
        pick["dtype"] = pick["half_dtype"]
    else:
        pick["half_dtype"] = ""  # float32 weights
    if pick["cfg"] != "two_calls":
        pick["guidance_calls"] = 1  # guidance batched, or none
    return Spec(seed=seed, **pick)


# ----------------------------------------------------------------------------------------------
# Building blocks, one spelling per choice
# ----------------------------------------------------------------------------------------------
def _norm(spec: Spec, dim: int) -> nn.Module:
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6) if spec.norm == "layer" else nn.RMSNorm(dim, eps=1e-6)


class QKNorm(nn.Module):
    def __init__(self, kind: str, d: int):
        super().__init__()
        self.kind = kind
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(d)) if kind != "none" else None

    def forward(self, x):
        if self.kind == "rms":
            return F.rms_norm(x, (x.shape[-1],), self.weight, 1e-6)
        if self.kind == "layer":
            return F.layer_norm(x, (x.shape[-1],), self.weight, None, 1e-6)
        return x


def rope_tables(pos: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 2) (h, w) or (N, 3) (t, h, w) positions -> cos, sin of shape (N, d): half the frequencies
    per spatial axis, the frame index added to the first half at a slower rate."""
    quarter = d // 4
    freqs = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float32, device=pos.device) / quarter))
    first = pos[:, -2:-1] * freqs
    if pos.shape[1] == 3:
        first = first + pos[:, :1] * (0.37 * freqs)
    ang = torch.cat([first, pos[:, -1:] * freqs], dim=-1)  # (N, d/2)
    return ang.cos(), ang.sin()


def apply_rope(kind: str, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, N, D); cos/sin (N, D/2)."""
    if kind == "half":
        x1, x2 = x.chunk(2, dim=-1)
        c, s = cos.to(x.dtype), sin.to(x.dtype)
        return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1)
    if kind == "complex":
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * torch.complex(cos, sin)).flatten(-2).type_as(x)
    return x


def attention(spec: Spec, q, k, v, keep=None) -> torch.Tensor:
    """(B, H, N, D) each -> (B, H, N, D), spelled as `spec.attn` says; `keep` (B, 1, 1, N) boolean: the
    keys every query may attend (a text padding mask), applied as each spelling's code would."""
    scale = q.shape[-1] ** -0.5
    if spec.kv_heads == "half":  # k/v carry every other head, repeated to the query heads
        k, v = (t[:, ::2].repeat_interleave(2, dim=1) for t in (k, v))
    if spec.attn in ("sdpa", "sdpa_scale"):
        extra = {"scale": scale} if spec.attn == "sdpa_scale" else {}
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, **extra)
    b, h, n, d = q.shape
    if spec.attn == "baddbmm":  # (B*H, N, D) batches, as diffusers' older processors wrote it
        q, k, v = (t.reshape(b * h, -1, d) for t in (q, k, v))
        empty = torch.empty(b * h, n, k.shape[1], dtype=q.dtype, device=q.device)
        s = torch.baddbmm(empty, q, k.transpose(1, 2), beta=0, alpha=scale)
        if keep is not None:
            keep = keep.expand(b, h, 1, -1).reshape(b * h, 1, -1)
    elif spec.attn == "einsum":
        s = torch.einsum("bhid,bhjd->bhij", q * scale, k)
    else:
        s = q @ k.transpose(-2, -1) * scale
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    if spec.attn == "max_sub":
        p = (s - s.amax(dim=-1, keepdim=True).detach()).softmax(dim=-1)
    elif spec.attn == "manual_exp":
        e = (s - s.amax(dim=-1, keepdim=True)).exp()
        p = e / e.sum(dim=-1, keepdim=True)
    elif spec.attn == "fp32_softmax":
        p = F.softmax(s, dim=-1, dtype=torch.float32).to(v.dtype)
    else:
        p = s.softmax(dim=-1)
    if spec.attn == "einsum":
        return torch.einsum("bhij,bhjd->bhid", p, v)
    if spec.attn == "baddbmm":
        return torch.bmm(p, v).reshape(b, h, n, d)
    return p @ v


class Projection(nn.Module):
    """tokens (B, N, C), or (N, B, C) when `seq_first` -> q, k, v (B, H, N, D), spelled as `spec.qkv`
    says, with q/k norms."""

    def __init__(self, spec: Spec):
        super().__init__()
        self.spec, (self.h, self.d) = spec, spec.heads
        self.seq_first = spec.layout == "nbc"
        c = spec.dim
        if spec.qkv == "separate":
            self.q, self.k, self.v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        else:
            self.qkv = nn.Linear(c, 3 * c)
        self.nq, self.nk = QKNorm(spec.qk_norm, self.d), QKNorm(spec.qk_norm, self.d)

    def forward(self, x):
        perm = (1, 2, 0, 3) if self.seq_first else (0, 2, 1, 3)
        if self.spec.qkv == "fused_heads":
            q, k, v = self.qkv(x).unflatten(-1, (3, self.h, self.d)).unbind(-3)
        elif self.spec.qkv == "fused_chunk":
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        q, k, v = (t.unflatten(-1, (self.h, self.d)) if t.dim() == 3 else t for t in (q, k, v))
        q, k, v = (t.permute(*perm) for t in (q, k, v))
        return self.nq(q), self.nk(k), v


def heads_out(o: torch.Tensor, seq_first: bool) -> torch.Tensor:
    """(B, H, N, D) -> (B, N, C), or (N, B, C) when `seq_first`."""
    return (o.permute(2, 0, 1, 3) if seq_first else o.transpose(1, 2)).flatten(2)


class FeedForward(nn.Module):
    """linear -> activation -> linear, or a gated form, as `spec.mlp` says. `hidden` alone returns
    the activation (a parallel block's second linear takes it)."""

    def __init__(self, spec: Spec, dim: int, out: bool = True):
        super().__init__()
        self.kind, bias, hid = spec.mlp, spec.mlp_bias, 2 * dim
        if self.kind == "swiglu_two":
            self.w1, self.w3 = nn.Linear(dim, hid, bias=bias), nn.Linear(dim, hid, bias=bias)
        else:
            self.w1 = nn.Linear(dim, 2 * hid if self.kind in ("swiglu_chunk", "geglu_slice") else hid, bias=bias)
        self.w2 = nn.Linear(hid, dim, bias=bias) if out else None
        self.hid = hid

    def hidden(self, x):
        k = self.kind
        if k == "swiglu_two":
            return F.silu(self.w1(x)) * self.w3(x)
        h = self.w1(x)
        if k == "swiglu_chunk":
            a, g = h.chunk(2, dim=-1)
            return F.silu(a) * g
        if k == "geglu_slice":
            return h[..., :self.hid] * F.gelu(h[..., self.hid:])
        return {"gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "silu": F.silu,
                "relu": F.relu, "relu2": lambda t: F.relu(t).square()}[k](h)

    def forward(self, x):
        return self.w2(self.hidden(x))


def heads_in(t: torch.Tensor, spec: Spec) -> torch.Tensor:
    """(B, N, C), or (N, B, C) under the nbc layout -> (B, H, N, D)."""
    return t.unflatten(-1, spec.heads).permute(*((1, 2, 0, 3) if spec.layout == "nbc" else (0, 2, 1, 3)))


class CrossAttention(nn.Module):
    """Queries from the image tokens, keys and values from the text tokens (same layout as x), in the
    spec's attention spelling; `keep` (B, 1, 1, T) masks the padded text key."""

    def __init__(self, spec: Spec):
        super().__init__()
        self.spec, c = spec, spec.dim
        self.norm, self.q, self.kv, self.out = _norm(spec, c), nn.Linear(c, c), nn.Linear(c, 2 * c), nn.Linear(c, c)

    def forward(self, x, ctx, keep):
        q = heads_in(self.q(self.norm(x)), self.spec)
        k, v = (heads_in(t, self.spec) for t in self.kv(ctx).chunk(2, dim=-1))
        return self.out(heads_out(attention(self.spec, q, k, v, keep), self.spec.layout == "nbc"))


class Block(nn.Module):
    """One transformer block over tokens (B, N, C), or (N, B, C) under the nbc layout, with an optional
    second (text) stream of its own weights whose tokens join the attention in front of the image's,
    or a cross-attention to the text after the self-attention."""

    def __init__(self, spec: Spec):
        super().__init__()
        self.spec, c = spec, spec.dim
        self.tok = 0 if spec.layout == "nbc" else 1  # the token axis
        self.n1, self.n2 = _norm(spec, c), _norm(spec, c)
        self.proj = Projection(spec)
        self.ff = FeedForward(spec, c, out=not spec.parallel)
        self.out = nn.Linear(c + self.ff.hid, c) if spec.parallel else nn.Linear(c, c)
        self.mod = nn.Linear(c, 6 * c) if spec.modulation == "adaln" else None
        self.tkv = None
        if spec.text == "mmdit" and not spec.text_queries:  # the text's keys and values only
            self.tn1, self.tkv, self.tnk = _norm(spec, c), nn.Linear(c, 2 * c), QKNorm(spec.qk_norm, spec.heads[1])
        elif spec.text == "mmdit":
            self.tn1, self.tn2 = _norm(spec, c), _norm(spec, c)
            self.tproj, self.tout, self.tff = Projection(spec), nn.Linear(c, c), FeedForward(spec, c)
            self.tmod = nn.Linear(c, 6 * c) if spec.modulation == "adaln" else None
        self.cross = CrossAttention(spec) if spec.text == "cross" else None

    def _mods(self, lin, cond):
        if lin is None:
            return (0.0, 0.0, 1.0, 0.0, 0.0, 1.0)
        return lin(F.silu(cond)).unsqueeze(self.tok).chunk(6, dim=-1)

    def forward(self, x, txt, cond, cos, sin, keep):
        seq_first = self.tok == 0
        s1, c1, g1, s2, c2, g2 = self._mods(self.mod, cond)
        h = self.n1(x) * (1 + c1) + s1
        q, k, v = self.proj(h)
        if self.cross is not None:  # txt is the context of the cross-attention, not a stream
            ctx, txt, keep_ctx, keep = txt, None, keep, None
        if self.tkv is not None:  # image queries over cat(text keys, image keys); the text stays as it is
            ctx, txt = txt, None
            tk, tv = (heads_in(t, self.spec) for t in self.tkv(self.tn1(ctx)).chunk(2, dim=-1))
            k, v = torch.cat([self.tnk(tk), k], dim=2), torch.cat([tv, v], dim=2)
            if cos is not None:  # the joint keys take the whole table (text first), the queries the image's rows
                n_txt = tk.shape[2]
                q, k = apply_rope(self.spec.rope, q, cos[n_txt:], sin[n_txt:]), apply_rope(self.spec.rope, k, cos, sin)
                cos = None
        if txt is not None:
            ts1, tc1, tg1, ts2, tc2, tg2 = self._mods(self.tmod, cond)
            tq, tk, tv = self.tproj(self.tn1(txt) * (1 + tc1) + ts1)
            q, k, v = (torch.cat([a, b], dim=2) for a, b in ((tq, q), (tk, k), (tv, v)))
        if cos is not None:
            q, k = apply_rope(self.spec.rope, q, cos, sin), apply_rope(self.spec.rope, k, cos, sin)
        o = heads_out(attention(self.spec, q, k, v, keep), seq_first)
        if txt is not None:
            n_txt = txt.shape[self.tok]
            to, o = o.split([n_txt, o.shape[self.tok] - n_txt], dim=self.tok)
            txt = txt + tg1 * self.tout(to)
            txt = txt + tg2 * self.tff(self.tn2(txt) * (1 + tc2) + ts2)
        if self.spec.parallel:
            x = x + g1 * self.out(torch.cat([o, self.ff.hidden(h)], dim=-1))
        else:
            x = x + g1 * self.out(o)
            x = x + g2 * self.ff(self.n2(x) * (1 + c2) + s2)
        if self.cross is not None:
            x, txt = x + self.cross(x, ctx, keep_ctx), ctx
        if self.tkv is not None:
            txt = ctx
        return x, txt


class FuzzDiT(nn.Module):
    def __init__(self, spec: Spec):
        super().__init__()
        self.spec, c = spec, spec.dim
        if spec.embed == "conv" and spec.frames > 1:
            self.embed = nn.Conv3d(CH, c, (1, PATCH, PATCH), (1, PATCH, PATCH))
        elif spec.embed == "conv":
            self.embed = nn.Conv2d(CH, c, PATCH, PATCH)
        else:
            self.embed = nn.Linear(CH * PATCH * PATCH, c)
        self.t1, self.t2 = nn.Linear(32, c), nn.Linear(c, c)
        self.txt = nn.Linear(TEXT_DIM, c) if spec.text in ("prefix", "suffix", "mmdit", "cross") else None
        self.registers = nn.Parameter(torch.randn(1, REGISTERS, c)) if spec.text == "registers" else None
        self.blocks = nn.ModuleList(Block(spec) for _ in range(spec.depth))
        self.final = nn.Linear(c, CH * PATCH * PATCH)

    def forward(self, hidden_states, timestep, encoder_hidden_states=None, img_ids=None):
        spec, dev = self.spec, hidden_states.device
        if spec.embed == "tokens":
            b, n, _ = hidden_states.shape
            x, pos = self.embed(hidden_states), img_ids
        elif spec.frames > 1:  # (B, C, T, H, W)
            b, _, t, hh, ww = hidden_states.shape
            gh, gw = hh // PATCH, ww // PATCH
            if spec.embed == "conv":
                x = self.embed(hidden_states).flatten(2).transpose(1, 2)
            else:
                p = hidden_states.reshape(b, CH, t, gh, PATCH, gw, PATCH).permute(0, 2, 3, 5, 1, 4, 6)
                x = self.embed(p.reshape(b, t * gh * gw, CH * PATCH * PATCH))
            ts, ys, xs = torch.meshgrid(torch.arange(t, device=dev), torch.arange(gh, device=dev),
                                        torch.arange(gw, device=dev), indexing="ij")
            pos = torch.stack([ts.flatten(), ys.flatten(), xs.flatten()], dim=-1).float()
        else:
            b, _, hh, ww = hidden_states.shape
            gh, gw = hh // PATCH, ww // PATCH
            if spec.embed == "conv":
                x = self.embed(hidden_states).flatten(2).transpose(1, 2)
            else:
                p = hidden_states.reshape(b, CH, gh, PATCH, gw, PATCH).permute(0, 2, 4, 1, 3, 5)
                x = self.embed(p.reshape(b, gh * gw, CH * PATCH * PATCH))
            ys, xs = torch.meshgrid(torch.arange(gh, device=dev), torch.arange(gw, device=dev), indexing="ij")
            pos = torch.stack([ys.flatten(), xs.flatten()], dim=-1).float()
        half = 16
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=dev) / half)
        ang = timestep.float()[:, None] * freqs[None]
        cond = self.t2(F.silu(self.t1(torch.cat([ang.cos(), ang.sin()], dim=-1).to(self.t1.weight.dtype))))
        n_img = x.shape[1]
        txt = self.txt(encoder_hidden_states) if self.txt is not None else None
        if self.registers is not None:
            txt = self.registers.expand(b, -1, -1)
        if txt is not None and spec.text != "cross":
            pos = torch.cat([torch.zeros(txt.shape[1], pos.shape[1], device=dev), pos], dim=0)  # text at 0, as Flux
        keep = None
        if spec.text_mask == "pad":  # the last text token is padding; text keys first, as the rotary table
            keep = torch.ones(b, 1, 1, txt.shape[1] + (0 if spec.text == "cross" else n_img), dtype=torch.bool,
                              device=dev)
            keep[..., TEXT - 1] = False
            if spec.text == "suffix":
                keep = torch.cat([keep[..., TEXT:], keep[..., :TEXT]], dim=-1)
        cos = sin = None
        if spec.rope != "none":
            cos, sin = rope_tables(pos, spec.heads[1])
        n_txt = txt.shape[1] if txt is not None and spec.text != "cross" else 0
        if spec.text in ("prefix", "suffix", "registers"):  # one joint stream
            x = torch.cat([x, txt], dim=1) if spec.text == "suffix" else torch.cat([txt, x], dim=1)
            if spec.text == "suffix" and cos is not None:  # positions follow the tokens' order
                cos, sin = (torch.cat([t[n_txt:], t[:n_txt]], dim=0) for t in (cos, sin))
        stream2 = txt if spec.text in ("mmdit", "cross") else None  # cross: each block's context
        if spec.layout == "nbc":
            x = x.transpose(0, 1)
            stream2 = stream2.transpose(0, 1) if stream2 is not None else None
        for blk in self.blocks:
            x, stream2 = blk(x, stream2, cond, cos, sin, keep)
        if spec.layout == "nbc":
            x = x.transpose(0, 1)
        if spec.text in ("prefix", "registers"):
            x = x[:, n_txt:]
        elif spec.text == "suffix":
            x = x[:, :n_img]
        out = self.final(x)
        if spec.embed == "tokens":
            return out
        if spec.frames > 1:
            out = out.reshape(b, t, gh, gw, CH, PATCH, PATCH).permute(0, 4, 1, 2, 5, 3, 6)
            return out.reshape(b, CH, t, hh, ww)
        out = out.reshape(b, gh, gw, CH, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(b, CH, hh, ww)


DEVICE = "cpu"  # --device cuda: the Triton kernels and step graphs (`for_gpu` sizes the specs for them)


def for_gpu(spec: Spec) -> Spec:
    """The spec at sizes the GPU kernels take: head dim 64, three times the grid's rows and columns
    (432 to 1440 tokens), float16 where the seed drew it, else bfloat16."""
    return dataclasses.replace(spec, heads=(spec.heads[0], 64), grid=(3 * spec.grid[0], 3 * spec.grid[1]),
                               dtype="float16" if spec.dtype == "float16" else "bfloat16")


def build(spec: Spec) -> tuple[nn.Module, dict]:
    torch.manual_seed(spec.seed)
    return FuzzDiT(spec).eval().to(DEVICE, getattr(torch, spec.dtype)), inputs(spec, spec.grid)


def inputs(spec: Spec, grid: tuple) -> dict:
    """The model's inputs at a latent grid of `grid` patches (seeded by the spec and the grid)."""
    g = torch.Generator().manual_seed(spec.seed + 1000 * grid[0] + grid[1])
    gh, gw = grid
    t = spec.frames
    kw: dict = {"timestep": torch.full((spec.batch,), 900.0)}
    if spec.embed == "tokens":
        kw["hidden_states"] = torch.randn(spec.batch, t * gh * gw, CH * PATCH * PATCH, generator=g)
        ts, ys, xs = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
        cols = [ts, ys, xs] if t > 1 else [ys, xs]  # (h, w) ids for an image, (t, h, w) for a video
        kw["img_ids"] = torch.stack([c.flatten() for c in cols], dim=-1).float()
    elif t > 1:
        kw["hidden_states"] = torch.randn(spec.batch, CH, t, gh * PATCH, gw * PATCH, generator=g)
    else:
        kw["hidden_states"] = torch.randn(spec.batch, CH, gh * PATCH, gw * PATCH, generator=g)
    if spec.text in ("prefix", "suffix", "mmdit", "cross"):
        kw["encoder_hidden_states"] = torch.randn(spec.batch, TEXT, TEXT_DIM, generator=g)
    dtype = getattr(torch, spec.dtype)
    return {k: v.to(DEVICE, dtype) if k in ("hidden_states", "encoder_hidden_states") else v.to(DEVICE)
            for k, v in kw.items()}


def other_grid(spec: Spec) -> tuple:
    """A second resolution: the grid transposed, or two rows more where it is square."""
    gh, gw = spec.grid
    return (gh + 2, gw) if gh == gw else (gw, gh)


def reordered_grid(spec: Spec) -> tuple:
    """Another grid of the same token count (so the same shapes at the same batch, in another token
    order): the grid transposed, or half the rows and twice the columns where it is square."""
    gh, gw = spec.grid
    return (gh // 2, gw * 2) if gh == gw else (gw, gh)


def expected_sites(spec: Spec) -> tuple[int, int]:
    """(attention, MLP) sites: one attention per block; one feed-forward per block and stream. A
    sequence-first text stream of one prompt, (5, 1, C), is read as one token of a batch of 5
    (patterns/mlp.py reads (S, B, C) as sequence-first from 256 tokens): no site."""
    text_ff = spec.text == "mmdit" and spec.text_queries and not (spec.layout == "nbc" and spec.batch == 1)
    return spec.depth, spec.depth * (2 if text_ff else 1)


def expected_grouping(spec: Spec, site) -> list[str]:
    """What `inspect()`'s grouping column must say of `site` (substrings; [] when nothing is known): the
    spec's grid wherever the model shows it (a patch embedding, or position ids its rotary reads; packed
    tokens without rotary never read their ids), and the text tokens' count and side where they share
    the site's tokens. A text stream's own feed-forward has no grid."""
    if ".tff." in site.path or (spec.embed == "tokens" and spec.rope == "none"):
        return []
    want = ["t×h×w {}×{}×{}".format(spec.frames, *spec.grid) if spec.frames > 1 else "h×w {}×{}".format(*spec.grid)]
    joint = spec.text in ("prefix", "suffix", "registers") or (spec.text == "mmdit" and spec.text_queries
                                                                and site.kind == "attention")
    if joint:
        n = REGISTERS if spec.text == "registers" else TEXT
        want.append(f"text {n} {'last' if spec.text == 'suffix' else 'first'}")
    return want


def _calls(kw: dict, n: int) -> list[dict]:
    """The latent drifts 2% a call and the timestep goes down, as a sampler's would."""
    latent = kw["hidden_states"]
    drift = torch.randn(latent.shape, generator=torch.Generator().manual_seed(7)).to(latent.device, latent.dtype)
    return [{**kw, "hidden_states": kw["hidden_states"] + 0.02 * i * drift, "timestep": kw["timestep"] * (1 - 0.05 * i)}
            for i in range(n)]


def _branches(spec: Spec, calls: list[dict]) -> list[tuple[dict, int, str | None]]:
    """(inputs, step, branch) per call: each of `calls` a step; under guidance as calls two or three
    calls a step: the prompt's, then (of three) the prompt at half strength (a second condition), then
    one with zeros for the text (the unconditional branch)."""
    if spec.cfg != "two_calls":
        return [(c, i, None) for i, c in enumerate(calls)]
    out = []
    for i, c in enumerate(calls):
        text = c["encoder_hidden_states"]
        out.append((c, i, "cond"))
        if spec.guidance_calls == 3:
            out.append(({**c, "encoder_hidden_states": 0.5 * text}, i, "cond_2"))
        out.append(({**c, "encoder_hidden_states": torch.zeros_like(text)}, i, "uncond"))
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _compiled(spec: Spec, model: nn.Module, config: dict) -> tuple[nn.Module, nn.Module]:
    """(the model compiled as the spec says, an uncompiled twin for the eager reference)."""
    if DEVICE != "cpu":
        config = {**config, "attn": {**config["attn"], "group": 64}, "mlp": {**config["mlp"], "block": 64}}
    options = {"config": config, "compiler": "eager"}
    dynamic = True if spec.compile == "dynamic" else None
    if spec.compile_call == "wrapper":
        return torch.compile(model, backend="chipmunk", options=options, dynamic=dynamic), model
    eager = copy.deepcopy(model)
    if spec.compile == "regional":  # as diffusers' compile_repeated_blocks: each block on its own
        for blk in model.blocks:
            blk.compile(backend="chipmunk", options=options)
    else:
        model.compile(backend="chipmunk", options=options, dynamic=dynamic)
    return model, eager


def _autocast(spec: Spec):
    """torch.autocast to bfloat16 around a call where the spec says so (float32 weights), else off."""
    return torch.autocast(torch.device(DEVICE).type, torch.bfloat16, enabled=spec.autocast)


def _run(spec: Spec, config: dict, drift: bool) -> tuple[list[float], dict, dict, list[str]]:
    """A fresh model compiled under `config`, called at the sizes of `SEGMENTS` (the spec's grid, another
    resolution and batch, the first again, another grid of the same token count, the first again: each
    size keeps its own caches, and a token order its own fill); returns each call's error against
    eager, the sites' step counts, the fallbacks counted, and what `inspect()` of the compiled model
    got wrong (it must report the spec's sites at the compiled config, and take no step).
    `drift`: the latent and timestep move from call to call; else every call at a size repeats its first."""
    import chipmunk_compile

    model, kw = build(spec)
    torch._dynamo.reset()
    counters.clear()
    # a step is two calls: the timestep tells them apart, or set_step does (blocks compiled alone see
    # no timestep: the user gives the steps, as the backend's warning says)
    auto = drift and spec.compile != "regional"
    if spec.cfg == "two_calls":
        config = {**config, "step_signal": "auto" if auto else "explicit"}
    compiled, eager = _compiled(spec, model, config)
    sizes = {"first": kw, "other": inputs(dataclasses.replace(spec, batch=3 - spec.batch), other_grid(spec)),
             "reordered": inputs(spec, reordered_grid(spec))}  # other: batch 1 <-> 2 too
    calls, done = [], dict.fromkeys(sizes, 0)
    for size, n in SEGMENTS:  # drifting: each size's inputs go on from where its last call left them
        size = size if drift or size != "reordered" else "first"  # (SEGMENTS)
        calls += _calls(sizes[size], done[size] + n)[done[size]:] if drift else [sizes[size]] * n
        done[size] += n
    errs = []
    with torch.no_grad(), _autocast(spec):
        for call, step, branch in _branches(spec, calls):
            if branch is not None and not auto:
                chipmunk_compile.set_step(compiled, step, branch=branch)
            errs.append(_rel(compiled(**call).float(), eager(**call).float()))
    steps: dict[str, int] = {}
    for site in chipmunk_compile.stats(compiled)["sites"]:
        for k, v in site["steps"].items():
            steps[k] = steps.get(k, 0) + v
    fb = {k: v for k, v in counters["chipmunk"].items()
          if (k.startswith("fallback") and k not in EXPECTED_FALLBACKS)
          or (DEVICE != "cpu" and k.startswith("kernel_fallback"))}
    return errs, steps, fb, _inspect_compiled(spec, compiled, kw)


def _inspect_compiled(spec: Spec, compiled: nn.Module, kw: dict) -> list[str]:
    """What `inspect()` of the compiled model gets wrong: its sites, its config, a step taken."""
    import chipmunk_compile

    before = chipmunk_compile.stats(compiled)
    with _autocast(spec):
        rep = chipmunk_compile.inspect(compiled, **kw)
    after = chipmunk_compile.stats(compiled)
    problems = []
    if (rep.count("attention"), rep.count("mlp")) != expected_sites(spec):
        problems.append(f"inspect of the compiled model: {rep.count('attention')} attention, {rep.count('mlp')} mlp")
    if not rep.config.endswith("(the compiled model's)"):
        problems.append(f"inspect of the compiled model: config {rep.config}")
    if (after["calls"], after["step"]) != (before["calls"], before["step"]):
        problems.append("inspect of the compiled model took a step")
    return problems


def check(spec: Spec, *, show: bool = False) -> dict:
    """Runs the seed's checks; returns its row (status "ok", "mismatch" or "error", and why)."""
    import chipmunk_compile

    row = {"seed": spec.seed, "status": "error", "attn": "", "mlp": "", "rejected": "", "max_err": "",
           "frozen_err": "", "sparse_steps": "", "fallbacks": "", "note": "", "spec": spec.short()}
    model, kw = build(spec)
    want_attn, want_mlp = expected_sites(spec)
    phase = "inspect"
    try:
        torch._dynamo.reset()
        rep = chipmunk_compile.inspect(model, **kw, config=FULL)
        if show:
            print(rep)
        row.update(attn=f"{rep.count('attention')}/{want_attn}", mlp=f"{rep.count('mlp')}/{want_mlp}",
                   rejected=len(rep.rejected))
        problems = []
        if (rep.count("attention"), rep.count("mlp")) != (want_attn, want_mlp):
            reasons = dict.fromkeys(f"{r.kind} {r.path}: {r.reason}" for r in rep.rejected)
            problems.append("sites; rejected " + "; ".join(reasons))
        ungrouped = [f"{s.kind} {s.path}: {s.grouping}" for s in rep.sites
                     if not all(w in str(s.grouping) for w in expected_grouping(spec, s))]
        if ungrouped:
            problems.append(f"grouping ({len(ungrouped)} sites) " + "; ".join(ungrouped[:2]))
        fallbacks: dict = {}
        for phase, config, drift, col in (("full keys", FULL, True, "max_err"),
                                           ("frozen inputs", FROZEN, False, "frozen_err")):
            errs, steps, fb, inspected = _run(spec, config, drift)
            problems += inspected
            fallbacks.update(fb)
            row[col] = f"{max(errs):.1e}"
            if max(errs) > TOL["bfloat16" if spec.autocast else spec.dtype]:
                problems.append(f"{phase}: error {max(errs):.1e} at call {errs.index(max(errs))} "
                                f"(errors {' '.join(f'{e:.0e}' for e in errs)})")
            if not steps.get("sparse", 0):
                problems.append(f"{phase}: no sparse step ran")
            if phase == "full keys":
                row["sparse_steps"] = steps.get("sparse", 0)
        row["fallbacks"] = " ".join(f"{k}={v}" for k, v in fallbacks.items())
        if fallbacks:
            problems.append("fallbacks " + row["fallbacks"])
        row["status"] = "mismatch" if problems else "ok"
        row["note"] = "; ".join(problems)
    except Exception as e:  # one seed's failure never stops the sweep
        row["note"] = f"{phase}: " + " ".join(f"{type(e).__name__}: {e}".split())[:300]
        if show:
            traceback.print_exc()
    finally:
        torch._dynamo.reset()
    return row


def covering_seeds(n: int = 300) -> list[int]:
    """Few seeds among the first `n` whose specs together take every value of every axis (greedy:
    the seed adding the most unseen values first, the lowest seed on ties)."""
    specs = {seed: spec_for(seed) for seed in range(n)}
    values = {seed: {(f, repr(getattr(sp, f))) for f in AXES} for seed, sp in specs.items()}
    todo = {(f, repr(v)) for f, vs in AXES.items() for v in vs}
    todo &= set().union(*values.values())  # values a pick rule never leaves (e.g. nbc's grids) drop out
    out = []
    while todo:
        seed = max(values, key=lambda s: (len(values[s] & todo), -s))
        out.append(seed)
        todo -= values[seed]
    return sorted(out)


def _seeds(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0-99", help="e.g. 0-99, 3,17,40-45, or cover (covering_seeds())")
    ap.add_argument("--show", action="store_true", help="print each seed's spec and inspect() table")
    ap.add_argument("--device", default="cpu", help="cuda: the specs at GPU sizes (`for_gpu`), Triton kernels, "
                    "step graphs; a kernel fallback fails the seed")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "fuzz_dits.csv"))
    a = ap.parse_args()
    global DEVICE
    DEVICE = a.device
    torch.set_num_threads(1)
    rows = []
    for seed in covering_seeds() if a.seeds == "cover" else _seeds(a.seeds):
        spec = spec_for(seed) if DEVICE == "cpu" else for_gpu(spec_for(seed))
        if a.show:
            print(f"# seed {seed}: {spec.short()}")
        t0 = time.perf_counter()
        row = check(spec, show=a.show)
        row["seconds"] = f"{time.perf_counter() - t0:.1f}"
        rows.append(row)
        print(f"{seed:4d} {row['status']:8s} attn {row['attn']:5s} mlp {row['mlp']:5s} err {row['max_err']:7s} "
              f"{row['note'][:150]}", flush=True)
    bad = [r for r in rows if r["status"] != "ok"]
    print(f"\n{len(rows) - len(bad)} of {len(rows)} seeds ok" + (f"; not ok: {[r['seed'] for r in bad]}" if bad else ""))
    if a.out:
        os.makedirs(os.path.dirname(a.out), exist_ok=True)
        with open(a.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
