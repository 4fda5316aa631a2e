"""Arch-zoo cases for DiTs written the way UI runtimes write their own model code (session 48), not
diffusers' classes: the code most end users run.

- `runtime_mmdit`: a FLUX-like MMDiT as node-graph runtimes implement it. The forward takes the
  (B, C, H, W) latent and patchifies it itself (a reshape/permute, no conv), builds the image
  position ids inside the graph from the latent's size (no ids input), computes rotary tables from
  the ids as 2×2 rotation matrices and applies them by multiply-add over the last axis pair; double
  blocks join text and image q/k/v on the sequence axis per head and split the attention output by
  slicing; single blocks run one fused linear for q/k/v and the MLP's first layer and one linear
  over cat(attention, activation); the timestep arrives scaled to [0, 1] and is multiplied by 1000
  inside the timestep embedding; guidance and a pooled text vector are conditioning inputs.

Invariant: `arch_zoo_research.py`'s conventions (seeded CPU float32 models of width 32, 2 heads,
random weights throughout); inputs `x` (B, C, H, W) and `timesteps` (B,) are the drifting latent and
the timestep the zoo's measurement drives.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo_common import Case, _r

DIM, HEADS, CH, PATCH, SIZE, TXT, CTX, POOLED = 32, 2, 4, 2, 24, 8, 24, 16
HEAD_DIM = DIM // HEADS
AXES = (4, 6, 6)  # rotary dims per id axis (sum = HEAD_DIM)


def _sinusoid(t: torch.Tensor, dim: int = 64, factor: float = 1000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * factor)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _rotary_matrices(ids: torch.Tensor) -> torch.Tensor:
    """(B, L, 3) ids -> (B, 1, L, HEAD_DIM/2, 2, 2) rotations [[cos, -sin], [sin, cos]] per axis pair."""
    parts = []
    for axis, dim in enumerate(AXES):
        omega = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device) / dim))
        angle = ids[..., axis].double()[..., None] * omega  # (B, L, dim/2)
        rot = torch.stack([torch.cos(angle), -torch.sin(angle), torch.sin(angle), torch.cos(angle)], dim=-1)
        parts.append(rot.reshape(*angle.shape, 2, 2))
    return torch.cat(parts, dim=-3).unsqueeze(1).float()


def _rotate(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    pairs = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    out = rot[..., 0] * pairs[..., 0] + rot[..., 1] * pairs[..., 1]
    return out.reshape(*x.shape).type_as(x)


def _attend(q, k, v, rot):
    q, k = _rotate(q, rot), _rotate(k, rot)
    o = F.scaled_dot_product_attention(q, k, v)
    b, h, n, d = o.shape
    return o.permute(0, 2, 1, 3).reshape(b, n, h * d)


class _RMS(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).type_as(x) * self.scale


def _heads(qkv: torch.Tensor):
    """(B, L, 3·H·D) -> three (B, H, L, D)."""
    b, n, _ = qkv.shape
    return qkv.view(b, n, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4).unbind(0)


class _Modulation(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.n, self.lin = n, nn.Linear(DIM, n * DIM)

    def forward(self, vec):
        return self.lin(F.silu(vec))[:, None, :].chunk(self.n, dim=-1)


class _Stream(nn.Module):
    """One stream of a double block: modulation, qkv, q/k norms, output projection, MLP."""

    def __init__(self):
        super().__init__()
        self.mod = _Modulation(6)
        self.norm1 = nn.LayerNorm(DIM, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.q_norm, self.k_norm = _RMS(HEAD_DIM), _RMS(HEAD_DIM)
        self.proj = nn.Linear(DIM, DIM)
        self.norm2 = nn.LayerNorm(DIM, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(DIM, 4 * DIM), nn.GELU(approximate="tanh"), nn.Linear(4 * DIM, DIM))

    def qkv_of(self, x, m):
        q, k, v = _heads(self.qkv((1 + m[1]) * self.norm1(x) + m[0]))
        return self.q_norm(q), self.k_norm(k), v

    def finish(self, x, attn, m):
        x = x + m[2] * self.proj(attn)
        return x + m[5] * self.mlp((1 + m[4]) * self.norm2(x) + m[3])


class _DoubleBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.img, self.txt = _Stream(), _Stream()

    def forward(self, img, txt, vec, rot):
        mi, mt = self.img.mod(vec), self.txt.mod(vec)
        (qi, ki, vi), (qt, kt, vt) = self.img.qkv_of(img, mi), self.txt.qkv_of(txt, mt)
        q, k, v = (torch.cat(p, dim=2) for p in ((qt, qi), (kt, ki), (vt, vi)))
        attn = _attend(q, k, v, rot)
        n_txt = txt.shape[1]
        return self.img.finish(img, attn[:, n_txt:], mi), self.txt.finish(txt, attn[:, :n_txt], mt)


class _SingleBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.mod = _Modulation(3)
        self.norm = nn.LayerNorm(DIM, elementwise_affine=False, eps=1e-6)
        self.linear1 = nn.Linear(DIM, 3 * DIM + 4 * DIM)
        self.linear2 = nn.Linear(DIM + 4 * DIM, DIM)
        self.q_norm, self.k_norm = _RMS(HEAD_DIM), _RMS(HEAD_DIM)

    def forward(self, x, vec, rot):
        shift, scale, gate = self.mod(vec)
        qkv, mlp = torch.split(self.linear1((1 + scale) * self.norm(x) + shift), [3 * DIM, 4 * DIM], dim=-1)
        q, k, v = _heads(qkv)
        attn = _attend(self.q_norm(q), self.k_norm(k), v, rot)
        return x + gate * self.linear2(torch.cat((attn, F.gelu(mlp, approximate="tanh")), dim=2))


class _RuntimeMMDiT(nn.Module):
    def __init__(self):
        super().__init__()
        self.img_in = nn.Linear(CH * PATCH * PATCH, DIM)
        self.txt_in = nn.Linear(CTX, DIM)
        self.time_in = nn.Sequential(nn.Linear(64, DIM), nn.SiLU(), nn.Linear(DIM, DIM))
        self.guidance_in = nn.Sequential(nn.Linear(64, DIM), nn.SiLU(), nn.Linear(DIM, DIM))
        self.vector_in = nn.Sequential(nn.Linear(POOLED, DIM), nn.SiLU(), nn.Linear(DIM, DIM))
        self.double_blocks = nn.ModuleList([_DoubleBlock() for _ in range(2)])
        self.single_blocks = nn.ModuleList([_SingleBlock() for _ in range(2)])
        self.final = nn.Linear(DIM, CH * PATCH * PATCH)

    def forward(self, x, timesteps, context, y, guidance):
        b, c, h, w = x.shape
        hp, wp = h // PATCH, w // PATCH
        img = x.reshape(b, c, hp, PATCH, wp, PATCH).permute(0, 2, 4, 1, 3, 5).reshape(b, hp * wp, c * PATCH * PATCH)
        img_ids = torch.zeros(hp, wp, 3, device=x.device, dtype=x.dtype)
        img_ids[..., 1] = img_ids[..., 1] + torch.linspace(0, hp - 1, steps=hp, device=x.device, dtype=x.dtype)[:, None]
        img_ids[..., 2] = img_ids[..., 2] + torch.linspace(0, wp - 1, steps=wp, device=x.device, dtype=x.dtype)[None, :]
        img_ids = img_ids.reshape(1, hp * wp, 3).expand(b, -1, -1)
        txt_ids = torch.zeros(b, context.shape[1], 3, device=x.device, dtype=x.dtype)
        rot = _rotary_matrices(torch.cat((txt_ids, img_ids), dim=1))
        vec = self.time_in(_sinusoid(timesteps)) + self.guidance_in(_sinusoid(guidance)) + self.vector_in(y)
        img, txt = self.img_in(img), self.txt_in(context)
        for block in self.double_blocks:
            img, txt = block(img, txt, vec, rot)
        joint = torch.cat((txt, img), dim=1)
        for block in self.single_blocks:
            joint = block(joint, vec, rot)
        out = self.final(joint[:, txt.shape[1]:])
        out = out.reshape(b, hp, wp, c, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(b, c, h, w)


def runtime_mmdit() -> Case:
    torch.manual_seed(0)
    model = _RuntimeMMDiT()
    torch.manual_seed(0)
    for p in model.parameters():
        nn.init.normal_(p, std=0.05)
    return Case(model.eval(), dict(x=_r(1, CH, SIZE, SIZE), timesteps=torch.tensor([1.0]),
                                   context=_r(1, TXT, CTX, seed=2), y=_r(1, POOLED, seed=3),
                                   guidance=torch.tensor([3.5])), latent="x", timestep="timesteps")


RUNTIME_MODELS = {
    "runtime_mmdit": ("hand-written DiT: MMDiT as UI runtimes write it (in-graph patchify and ids, 2×2 rotary)",
                      runtime_mmdit),
}
