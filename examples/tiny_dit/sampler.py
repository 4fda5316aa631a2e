"""Rectified-flow Euler sampler for Flux-style transformers (independent of chipmunk).

``transformer`` is any callable with the diffusers ``FluxTransformer2DModel`` call signature
(the module itself, a ``torch.compile``'d module, ...). Each step calls it once, or twice with
classifier-free guidance (first inside ``transformer.cache_context("cond")``, then inside
``cache_context("uncond")`` when the module has that method, as diffusers' Flux pipeline does).

Time convention: ``x_t = (1 - t) x_0 + t * noise``; the model predicts ``v = noise - x_0``; we integrate
t from 1 to 0 over ``sigmas = linspace(1, 0, steps + 1)`` (optionally shifted), and pass ``timestep = t``
as a ``(B,)`` tensor in [0, 1] in the transformer's input dtype (Flux pipelines pass ``timestep / 1000``,
which is the same number). The state is kept in float32.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from .model import TinyDiT, make_img_ids, make_txt_ids, unpatchify, unpatchify_video


def flow_sigmas(steps: int, shift: float = 1.0) -> torch.Tensor:
    """``steps + 1`` times from 1 to 0 (float64), ``shift`` > 1 spends more steps near t = 1 (SD3/Flux shift)."""
    s = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return shift * s / (1 + (shift - 1) * s)


def _context(transformer, name: str):
    fn = getattr(transformer, "cache_context", None)
    return fn(name) if callable(fn) else contextlib.nullcontext()


@torch.no_grad()
def sample(
    transformer: Callable,
    cond: dict[str, torch.Tensor],
    *,
    steps: int = 50,
    seed: int = 0,
    guidance_scale: float | None = None,
    uncond: dict[str, torch.Tensor] | None = None,
    image_size: int = 64,
    patch_size: int = 2,
    channels: int = 3,
    frames: int = 1,
    img_ids: torch.Tensor | None = None,
    txt_ids: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    shift: float = 1.0,
    dtype: torch.dtype | None = None,
    callback: Callable[[int, float, torch.Tensor], None] | None = None,
    return_tokens: bool = False,
) -> torch.Tensor:
    """Generate images with ``steps`` Euler steps of the rectified-flow ODE.

    Args:
        transformer: callable like ``FluxTransformer2DModel.__call__``.
        cond: ``{"encoder_hidden_states": (B, T, J), "pooled_projections": (B, P)}``; B = batch.
            (``sample(tiny_dit_model, labels, ...)`` is accepted too and forwards to :func:`sample_classes`.)
        seed: seeds the initial noise, drawn on the CPU (same images on any device).
        guidance_scale: ``None`` (or 1.0 without ``uncond``): one call per step. Otherwise CFG:
            ``v = v_uncond + g * (v_cond - v_uncond)``, with ``uncond`` of the same shapes as ``cond``.
        noise: optional initial tokens ``(B, N, C)`` replacing the seeded noise.
        dtype: dtype of the transformer inputs (default: that of ``cond``'s tensors).
        callback: ``callback(step_index, t, x)`` after every step (x = float32 tokens).
        return_tokens: return the final ``(B, N, C)`` tokens instead of images.
        frames: > 1 for a video model: ``frames`` frames of tokens, frame-major.
    Returns:
        images ``(B, channels, image_size, image_size)`` (videos: ``(B, frames, channels, image_size,
        image_size)``) float32 in [-1, 1] (clamped).
    """
    if isinstance(transformer, TinyDiT) and not isinstance(cond, dict):  # sample(model, labels, ...) form
        return sample_classes(transformer, cond, steps=steps, seed=seed, guidance_scale=guidance_scale, noise=noise,
                              shift=shift, dtype=dtype, callback=callback, return_tokens=return_tokens)
    ehs = cond["encoder_hidden_states"]
    device = ehs.device
    dtype = dtype or ehs.dtype
    B = ehs.shape[0]
    grid = image_size // patch_size
    n_tok, c_tok = frames * grid * grid, channels * patch_size * patch_size
    if img_ids is None:
        img_ids = make_img_ids(grid, grid, device, frames=frames)
    if txt_ids is None:
        txt_ids = make_txt_ids(ehs.shape[1], device)
    use_cfg = guidance_scale is not None and not (guidance_scale == 1.0 and uncond is None)
    if use_cfg and uncond is None:
        raise ValueError("guidance_scale needs `uncond` conditioning")

    if noise is None:
        g = torch.Generator().manual_seed(int(seed))
        noise = torch.randn(B, n_tok, c_tok, generator=g)
    x = noise.to(device=device, dtype=torch.float32)
    sig = flow_sigmas(steps, shift).tolist()

    def call(c, xin, t):
        return transformer(
            hidden_states=xin, encoder_hidden_states=c["encoder_hidden_states"].to(dtype),
            pooled_projections=c["pooled_projections"].to(dtype), timestep=t, img_ids=img_ids, txt_ids=txt_ids,
            return_dict=False,
        )[0].float()

    for i in range(steps):
        t_cur, t_next = sig[i], sig[i + 1]
        xin = x.to(dtype)
        t = torch.full((B,), t_cur, device=device, dtype=dtype)
        with _context(transformer, "cond"):
            v = call(cond, xin, t)
        if use_cfg:
            with _context(transformer, "uncond"):
                v_u = call(uncond, xin, t)
            v = v_u + guidance_scale * (v - v_u)
        x = x + (t_next - t_cur) * v
        if callback is not None:
            callback(i, t_cur, x)
    if return_tokens:
        return x
    if frames > 1:
        return unpatchify_video(x, frames, image_size, image_size, patch_size).clamp(-1, 1)
    return unpatchify(x, image_size, image_size, patch_size).clamp(-1, 1)


def sample_classes(
    model: TinyDiT,
    labels: torch.Tensor | list[int],
    *,
    transformer: Callable | None = None,
    steps: int = 50,
    seed: int = 0,
    guidance_scale: float | None = None,
    **kwargs,
) -> torch.Tensor:
    """Class-conditional images from a :class:`TinyDiT`; ``transformer`` overrides ``model.transformer``
    (e.g. a compiled one). Returns ``(B, 3, 64, 64)`` (videos: ``(B, T, 3, H, W)``) in [-1, 1]."""
    cond = model.class_condition(labels)
    B = cond["encoder_hidden_states"].shape[0]
    uncond = model.uncond_condition(B) if guidance_scale is not None else None
    c = model.config
    ids = model.position_ids()
    return sample(
        transformer if transformer is not None else model.transformer, cond, steps=steps, seed=seed,
        guidance_scale=guidance_scale, uncond=uncond, image_size=c.image_size, patch_size=c.patch_size,
        channels=c.image_channels, frames=c.frames, img_ids=ids["img_ids"], txt_ids=ids["txt_ids"], **kwargs,
    )
