"""Arch-zoo cases for DiTs written the way research code writes them, outside diffusers: the
attention and MLP spellings that a model nobody wrote glue for is likely to use.

- `research_timm`: DiT/SiT's block (timm's `Attention` with fused SDPA, adaLN-Zero modulation,
  timm's `Mlp` with tanh GELU), a conv patch embedding, class and timestep conditioning;
- `research_mha`: blocks on `nn.MultiheadAttention` (sequence-first, as its default layout) and an
  `nn.Sequential` feed-forward;
- `research_encoder`: an `nn.TransformerEncoder` (pre-norm GELU layers) over patch tokens, which
  runs as one fused op per layer under `no_grad`;
- `research_einsum`: einsum attention with the scale on q and the row max subtracted before the
  softmax, a GEGLU feed-forward (one linear chunked in halves);
- `research_checkpoint`: `research_timm`'s blocks run through `torch.utils.checkpoint.checkpoint`,
  as training code leaves them (Dynamo records each as a higher-order op with its own subgraph).

Invariant: every case is built seeded on the CPU in float32 (`zoo_common` conventions) and takes
`hidden_states` (B, C, H, W) and `timestep` (B,), so the zoo's measurement drives it like any other.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from zoo_common import Case, _r

DIM, HEADS, CH, PATCH, SIZE = 32, 2, 4, 2, 24


def _timestep_embedding(t: torch.Tensor, dim: int = DIM) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class _PatchDiT(nn.Module):
    """Conv patch embedding, timestep conditioning, `blocks` (optionally each through activation
    checkpointing), linear unpatchify."""

    def __init__(self, blocks: nn.ModuleList, checkpointed: bool = False):
        super().__init__()
        self.checkpointed = checkpointed
        self.x_embedder = nn.Conv2d(CH, DIM, PATCH, PATCH)
        self.t_embedder = nn.Sequential(nn.Linear(DIM, DIM), nn.SiLU(), nn.Linear(DIM, DIM))
        self.blocks = blocks
        self.final = nn.Linear(DIM, PATCH * PATCH * CH)

    def forward(self, hidden_states, timestep):
        b, c, h, w = hidden_states.shape
        x = self.x_embedder(hidden_states).flatten(2).transpose(1, 2)
        cond = self.t_embedder(_timestep_embedding(timestep))
        x = self.run_blocks(x, cond, (h // PATCH, w // PATCH))
        x = self.final(x).reshape(b, h // PATCH, w // PATCH, PATCH, PATCH, c)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)

    def run_blocks(self, x, cond, grid: tuple):
        """The tokens through the blocks; subclasses wire them otherwise (rotary tables, skips)."""
        for block in self.blocks:
            x = checkpoint(block, x, cond, use_reentrant=False) if self.checkpointed else block(x, cond)
        return x


class _TimmAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, HEADS, c // HEADS).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class _TimmMlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(DIM, 4 * DIM), nn.GELU(approximate="tanh"), nn.Linear(4 * DIM, DIM)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class _TimmBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1 = nn.LayerNorm(DIM, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(DIM, elementwise_affine=False, eps=1e-6)
        self.attn, self.mlp = _TimmAttention(), _TimmMlp()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(DIM, 6 * DIM))

    def forward(self, x, c):
        s1, sc1, g1, s2, sc2, g2 = self.adaLN_modulation(c).unsqueeze(1).chunk(6, dim=-1)
        x = x + g1 * self.attn(self.norm1(x) * (1 + sc1) + s1)
        return x + g2 * self.mlp(self.norm2(x) * (1 + sc2) + s2)


class _MhaBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.attn = nn.MultiheadAttention(DIM, HEADS)  # sequence-first, its default
        self.ff = nn.Sequential(nn.Linear(DIM, 4 * DIM), nn.GELU(), nn.Dropout(0.1), nn.Linear(4 * DIM, DIM))

    def forward(self, x, c):
        h = (self.norm1(x) + c[:, None]).transpose(0, 1)
        x = x + self.attn(h, h, h)[0].transpose(0, 1)
        return x + self.ff(self.norm2(x))


class _EncoderBlocks(nn.Module):
    def __init__(self, layers: int):
        super().__init__()
        layer = nn.TransformerEncoderLayer(DIM, HEADS, 4 * DIM, dropout=0.1, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, x, c):
        return self.encoder(x + c[:, None])


class _EinsumAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_qkv, self.to_out = nn.Linear(DIM, 3 * DIM, bias=False), nn.Linear(DIM, DIM)
        self.scale = (DIM // HEADS) ** -0.5

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (t.reshape(b, n, HEADS, -1).transpose(1, 2) for t in self.to_qkv(x).chunk(3, dim=-1))
        sim = torch.einsum("b h i d, b h j d -> b h i j", q * self.scale, k)
        sim = sim - sim.amax(dim=-1, keepdim=True).detach()
        out = torch.einsum("b h i j, b h j d -> b h i d", sim.softmax(dim=-1), v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, DIM))


class _GEGLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj, self.out = nn.Linear(DIM, 8 * DIM), nn.Linear(4 * DIM, DIM)

    def forward(self, x):
        h, gate = self.proj(x).chunk(2, dim=-1)
        return self.out(h * F.gelu(gate))


class _EinsumBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.attn, self.ff = _EinsumAttention(), _GEGLU()

    def forward(self, x, c):
        x = x + self.attn(self.norm1(x) + c[:, None])
        return x + self.ff(self.norm2(x))


def _case(blocks: nn.ModuleList, checkpointed: bool = False, cls: type = None) -> Case:
    """`blocks` in `cls` (a `_PatchDiT`, the default) with seeded random weights, and its inputs."""
    torch.manual_seed(0)
    model = (cls or _PatchDiT)(blocks, checkpointed)
    torch.manual_seed(0)
    for p in model.parameters():  # adaLN-Zero's zero init would hide the blocks: random weights throughout
        nn.init.normal_(p, std=0.05)
    return Case(model.eval(), dict(hidden_states=_r(1, CH, SIZE, SIZE), timestep=torch.tensor([500.0])))


def research_timm():
    return _case(nn.ModuleList([_TimmBlock() for _ in range(2)]))


def research_mha():
    return _case(nn.ModuleList([_MhaBlock() for _ in range(2)]))


def research_encoder():
    return _case(nn.ModuleList([_EncoderBlocks(2)]))


def research_einsum():
    return _case(nn.ModuleList([_EinsumBlock() for _ in range(2)]))


def research_checkpoint():
    return _case(nn.ModuleList([_TimmBlock() for _ in range(2)]), checkpointed=True)


RESEARCH_MODELS = {
    "research_timm": ("hand-written DiT: timm Attention (SDPA) + Mlp, adaLN-Zero", research_timm),
    "research_mha": ("hand-written DiT: nn.MultiheadAttention + nn.Sequential FF", research_mha),
    "research_encoder": ("hand-written DiT: nn.TransformerEncoder (fused fast path)", research_encoder),
    "research_einsum": ("hand-written DiT: einsum attention (row max subtracted) + GEGLU", research_einsum),
    "research_checkpoint": ("hand-written DiT: timm blocks under activation checkpointing", research_checkpoint),
}
