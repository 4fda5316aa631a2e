"""Which kind of step a site runs: pure functions of (config, step, layer).

Invariants:
- Decisions depend only on host integers (step, layer) and the config: no tensor is read, so
  choosing a step type never syncs the device.
- Attention: layers below `first_n_dense_layers` and steps below `warmup_steps` are DENSE;
  refresh steps (explicit schedule, else the first step after warm-up and every
  `full_step_every`-th) are REFRESH; the rest SPARSE.
- MLP: steps that are multiples of `full_step_every` are DENSE (steps 0, 10, ...), the rest SPARSE.
  New neuron indices on every sparse step of the first period, then every `block_mask_cache`.
"""

from __future__ import annotations

from .config import AttnConfig, MlpConfig

DENSE, REFRESH, SPARSE = "dense", "refresh", "sparse"


def attn_step_kind(cfg: AttnConfig, step: int, layer: int) -> str:
    if not cfg.enabled or layer < cfg.first_n_dense_layers or step < cfg.warmup_steps:
        return DENSE
    if cfg.full_step_schedule is not None:
        return REFRESH if step in cfg.full_step_schedule else SPARSE
    if step == cfg.warmup_steps or step % cfg.full_step_every == 0:
        return REFRESH
    return SPARSE


def mlp_step_kind(cfg: MlpConfig, step: int, layer: int) -> str:
    if not cfg.enabled or layer < cfg.first_n_dense_layers or step % cfg.full_step_every == 0:
        return DENSE
    return SPARSE


def mlp_recompute_indices(cfg: MlpConfig, step: int) -> bool:
    return step < cfg.full_step_every or step % cfg.block_mask_cache == 0
