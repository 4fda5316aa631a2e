"""More arch-zoo cases written the way research code writes DiTs (session 44): spellings of
attention, MLP and block wiring that `arch_zoo_research.py` does not cover.

- `research_timm_nonfused`: timm's non-fused attention path, `(q @ kᵀ) * scale`, `.softmax(-1)`,
  `attn_drop` (p = 0), with q/k LayerNorm per head;
- `research_rope_sdpa`: separate q/k/v linears, a 2D axial rotary table applied through
  `view_as_complex`, `F.scaled_dot_product_attention(..., scale=)`;
- `research_swiglu`: LLaMA's feed-forward `w3(silu(w1 x) * w2 x)`, three linears without bias;
- `research_rel_bias`: explicit attention with a learned (heads, N, N) relative-position bias;
- `research_baddbmm`: scores from `baddbmm(empty, q, kᵀ, beta=0, alpha=scale)` on a (B·H, N, D)
  layout, then `bmm`;
- `research_uvit`: U-ViT's long skips: the outputs of the first two blocks are kept and joined back
  into the last two (`skip_linear(cat(x, skip))`), so block outputs live across later blocks;
- `research_uvit_token`: the same with the timestep embedding as a token in front of the patch
  tokens, as U-ViT has it (session 47);
- `research_conv_mlp`: a feed-forward of two 1×1 `Conv1d` over the (B, C, N) transpose: no MLP site
  (the pattern anchors on linears), and it must stay exactly as it was.

Invariant: `arch_zoo_research.py`'s conventions: seeded CPU float32 models of DIM 32, 2 heads,
24×24 latents in patches of 2 (144 tokens), inputs `hidden_states` (B, C, H, W) and `timestep` (B,).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from arch_zoo_research import DIM, HEADS, PATCH, SIZE, _PatchDiT, _TimmAttention, _TimmMlp
from arch_zoo_research import _case as research_case
from zoo_common import Case

HEAD_DIM = DIM // HEADS
TOKENS = (SIZE // PATCH) ** 2


class _Block(nn.Module):
    """adaLN-Zero block around any attention and feed-forward; extra arguments go to the attention."""

    def __init__(self, attn: nn.Module, mlp: nn.Module):
        super().__init__()
        self.norm1 = nn.LayerNorm(DIM, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(DIM, elementwise_affine=False, eps=1e-6)
        self.attn, self.mlp = attn, mlp
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(DIM, 6 * DIM))

    def forward(self, x, c, *attn_args):
        s1, sc1, g1, s2, sc2, g2 = self.adaLN_modulation(c).unsqueeze(1).chunk(6, dim=-1)
        x = x + g1 * self.attn(self.norm1(x) * (1 + sc1) + s1, *attn_args)
        return x + g2 * self.mlp(self.norm2(x) * (1 + sc2) + s2)


def _qkv(linear: nn.Linear, x):
    b, n, _ = x.shape
    return linear(x).reshape(b, n, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4).unbind(0)


def _merge_heads(o):
    b, _, n, _ = o.shape
    return o.transpose(1, 2).reshape(b, n, DIM)


class _TimmNonFused(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.q_norm, self.k_norm = nn.LayerNorm(HEAD_DIM, eps=1e-6), nn.LayerNorm(HEAD_DIM, eps=1e-6)
        self.attn_drop = nn.Dropout(0.0)
        self.scale = HEAD_DIM ** -0.5

    def forward(self, x):
        q, k, v = _qkv(self.qkv, x)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = self.attn_drop(attn.softmax(dim=-1))
        return self.proj(_merge_heads(attn @ v))


def _axial_rope(h: int, w: int, theta: float = 10000.0) -> torch.Tensor:
    """(h·w, HEAD_DIM / 2) complex table: the first half of the frequencies by row, the rest by column."""
    quarter = HEAD_DIM // 4
    freqs = 1.0 / theta ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    rows = torch.arange(h, dtype=torch.float32)[:, None].expand(h, w).reshape(-1)
    cols = torch.arange(w, dtype=torch.float32)[None, :].expand(h, w).reshape(-1)
    angles = torch.cat([torch.outer(rows, freqs), torch.outer(cols, freqs)], dim=-1)
    return torch.polar(torch.ones_like(angles), angles)


def _rotate(x, table):
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * table[None, None]).flatten(3).type_as(x)


class _RopeSdpa(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q, self.to_k, self.to_v = (nn.Linear(DIM, DIM) for _ in range(3))
        self.proj = nn.Linear(DIM, DIM)

    def forward(self, x, rope):
        b, n, _ = x.shape
        q, k, v = (lin(x).view(b, n, HEADS, HEAD_DIM).transpose(1, 2) for lin in (self.to_q, self.to_k, self.to_v))
        o = F.scaled_dot_product_attention(_rotate(q, rope), _rotate(k, rope), v, scale=HEAD_DIM ** -0.5)
        return self.proj(_merge_heads(o))


class _RopeDiT(_PatchDiT):
    """_PatchDiT that computes the rotary table of its grid and passes it to every block."""

    def run_blocks(self, x, cond, grid: tuple):
        rope = _axial_rope(*grid)
        for block in self.blocks:
            x = block(x, cond, rope)
        return x


class _SwiGLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1, self.w2 = nn.Linear(DIM, 4 * DIM, bias=False), nn.Linear(DIM, 4 * DIM, bias=False)
        self.w3 = nn.Linear(4 * DIM, DIM, bias=False)

    def forward(self, x):
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class _ConvMlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv1d(DIM, 4 * DIM, 1), nn.Conv1d(4 * DIM, DIM, 1)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x.transpose(1, 2)))).transpose(1, 2)


class _RelBiasAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.rel_bias = nn.Parameter(torch.zeros(HEADS, TOKENS, TOKENS))
        self.scale = HEAD_DIM ** -0.5

    def forward(self, x):
        q, k, v = _qkv(self.qkv, x)
        attn = ((q @ k.transpose(-2, -1)) * self.scale + self.rel_bias).softmax(dim=-1)
        return self.proj(_merge_heads(attn @ v))


class _BaddbmmAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.scale = HEAD_DIM ** -0.5

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (t.reshape(b * HEADS, n, HEAD_DIM) for t in _qkv(self.qkv, x))
        empty = torch.empty(b * HEADS, n, n, dtype=q.dtype, device=q.device)
        scores = torch.baddbmm(empty, q, k.transpose(1, 2), beta=0, alpha=self.scale)
        return self.proj(_merge_heads(torch.bmm(scores.softmax(dim=-1), v).reshape(b, HEADS, n, HEAD_DIM)))


class _UViTBlock(_Block):
    def __init__(self, takes_skip: bool):
        super().__init__(_TimmAttention(), _TimmMlp())
        self.skip_linear = nn.Linear(2 * DIM, DIM) if takes_skip else None

    def forward(self, x, c, skip=None):
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        return super().forward(x, c)


class _UViT(_PatchDiT):
    """The first half of the blocks keep their outputs; the second half takes them back, last first."""

    def run_blocks(self, x, cond, grid: tuple):
        half, skips = len(self.blocks) // 2, []
        for block in self.blocks[:half]:
            x = block(x, cond)
            skips.append(x)
        for block in self.blocks[half:]:
            x = block(x, cond, skips.pop())
        return x


class _UViTTimeToken(_UViT):
    """U-ViT as published: the timestep embedding also enters as a token in front of the patch tokens."""

    def run_blocks(self, x, cond, grid: tuple):
        return super().run_blocks(torch.cat([cond[:, None], x], dim=1), cond, grid)[:, 1:]


def _case(blocks: nn.ModuleList, cls: type = _PatchDiT) -> Case:
    return research_case(blocks, cls=cls)


def _two(attn_cls, mlp_cls=_TimmMlp) -> nn.ModuleList:
    return nn.ModuleList([_Block(attn_cls(), mlp_cls()) for _ in range(2)])


def research_timm_nonfused():
    return _case(_two(_TimmNonFused))


def research_rope_sdpa():
    return _case(_two(_RopeSdpa), _RopeDiT)


def research_swiglu():
    return _case(_two(_TimmAttention, _SwiGLU))


def research_rel_bias():
    return _case(_two(_RelBiasAttention))


def research_baddbmm():
    return _case(_two(_BaddbmmAttention))


def research_uvit():
    return _case(nn.ModuleList([_UViTBlock(takes_skip=i >= 2) for i in range(4)]), _UViT)


def research_uvit_token():
    return _case(nn.ModuleList([_UViTBlock(takes_skip=i >= 2) for i in range(4)]), _UViTTimeToken)


def research_conv_mlp():
    return _case(_two(_TimmAttention, _ConvMlp))


SPELLING_MODELS = {
    "research_timm_nonfused": ("hand-written DiT: timm's non-fused attention, q/k norm, attn_drop", research_timm_nonfused),
    "research_rope_sdpa": ("hand-written DiT: q/k/v linears, complex axial rotary, SDPA(scale=)", research_rope_sdpa),
    "research_swiglu": ("hand-written DiT: LLaMA SwiGLU w3(silu(w1 x) * w2 x)", research_swiglu),
    "research_rel_bias": ("hand-written DiT: explicit attention + learned (H, N, N) bias", research_rel_bias),
    "research_baddbmm": ("hand-written DiT: baddbmm(beta=0, alpha=scale) scores on (B*H, N, D)", research_baddbmm),
    "research_uvit": ("hand-written DiT: U-ViT long skips (block outputs kept across blocks)", research_uvit),
    "research_uvit_token": ("hand-written DiT: U-ViT with the timestep as a token before the image", research_uvit_token),
    "research_conv_mlp": ("hand-written DiT: 1x1 Conv1d feed-forward (no MLP site)", research_conv_mlp),
}
