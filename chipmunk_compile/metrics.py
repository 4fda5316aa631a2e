"""Image and latent fidelity metrics for comparing a sped-up sampler against dense (PSNR, SSIM, relative error).

Invariants: inputs are image batches (B, C, H, W) or video batches (B, T, C, H, W) in [-1, 1] (or
latents of any shape for `relative_error`); a video's PSNR is over all its pixels, its SSIM the mean
over its frames; every metric is computed in float64 per image and averaged; identical inputs
give PSNR = inf, SSIM = 1, relative error = 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB, for images in [-1, 1] (peak-to-peak 2)."""
    a, b = a.double().clamp(-1, 1), b.double().clamp(-1, 1)
    mse = ((a - b) ** 2).flatten(1).mean(1)
    vals = [math.inf if m == 0 else 10 * math.log10(4.0 / m) for m in mse.tolist()]
    finite = [v for v in vals if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.inf  # identical images do not drag the mean


def _gauss(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean SSIM (Gaussian window 11, sigma 1.5) over images and channels, images in [-1, 1]; videos
    (B, T, C, H, W) as their B·T frames."""
    if a.dim() == 5:
        a, b = a.flatten(0, 1), b.flatten(0, 1)
    a = (a.double().clamp(-1, 1) + 1) / 2
    b = (b.double().clamp(-1, 1) + 1) / 2
    C = a.shape[1]
    w = _gauss().to(a.device)[None, None].repeat(C, 1, 1, 1)
    mu_a, mu_b = F.conv2d(a, w, groups=C), F.conv2d(b, w, groups=C)
    saa = F.conv2d(a * a, w, groups=C) - mu_a ** 2
    sbb = F.conv2d(b * b, w, groups=C) - mu_b ** 2
    sab = F.conv2d(a * b, w, groups=C) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    m = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (saa + sbb + c2))
    return float(m.mean())


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ over the whole batch (b is the reference)."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
