"""What every arch-zoo case is made of: the `Case` record and the tiny-model helpers.

Shared by `arch_zoo.py` (the measurement and the first architectures) and `arch_zoo_newer.py`.
Invariant: a case builds its model with `_build` (seeded, eval mode, float32, CPU) and random inputs
with `_r` (seeded per input), so every run of the zoo sees the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Case:
    model: torch.nn.Module
    kwargs: dict
    latent: str = "hidden_states"  # the input that drifts from call to call
    timestep: str = "timestep"  # the input that goes down from call to call
    patches: dict = field(default_factory=dict)  # torch._dynamo.config patches


def _r(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _build(cls_name, **config):
    import diffusers

    torch.manual_seed(0)
    return getattr(diffusers, cls_name)(**config).eval()


def _grid_ids(h, w):
    """Flux-style (h*w, 3) position ids: (0, row, col)."""
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None]
    return ids.reshape(-1, 3)


def _flux_inputs(h: int = 12, w: int = 12, **extra) -> dict:
    """Inputs of a FLUX-like transformer: h*w packed image tokens of 4 channels with (0, row, col)
    ids, 8 text tokens of width 32 with zero ids, t = 1; `extra` adds model-specific ones."""
    return dict(hidden_states=_r(1, h * w, 4), encoder_hidden_states=_r(1, 8, 32, seed=2),
                timestep=torch.tensor([1.0]), img_ids=_grid_ids(h, w), txt_ids=torch.zeros(8, 3), return_dict=False,
                **extra)
