"""Which kind of step a site runs: pure functions of (config, step, layer).

Invariants:
- Decisions depend only on host integers (step, layer) and the config: no tensor is read, so
  choosing a step type never syncs the device.
- Attention: layers below `first_n_dense_layers` and steps below `warmup_steps` are DENSE;
  refresh steps (explicit schedule, else the first step after warm-up and every
  `full_step_every`-th) are REFRESH; the rest SPARSE.
- MLP: steps that are multiples of `full_step_every` are DENSE (steps 0, 10, ...), the rest SPARSE.
  New neuron indices on every sparse step of the first period (or before `select_every_step_until`,
  scaled like a period), then every `block_mask_cache`.
- `scale` (a generation's step count over `schedule_steps`, None when unknown or equal): the
  periods become max(1, round(period * scale)) and a schedule's steps from 2 on round(step * scale),
  so a refresh spans the same share of the sampling trajectory at 28 steps as at 50. Warm-up
  steps and `block_mask_cache` stay in steps. A period of 1 (a few-step sampler: under 15 steps
  for the default's 5 of 50) leaves no sparse step, so that op runs plain dense (`never_sparse`):
  no caches built, no block means, no state read or written. (Measured on the 1024-token tiny DiT, `default`:
  29.3 dB against dense at 28 steps as written, 33.4 dB scaled; 33.6 dB at 50.)
- Catch-up (`catch_up`, 2 periods by default): a site whose calls were skipped over a scheduled
  refresh or dense MLP step refreshes (runs dense) at its next call once its caches are that many
  periods old (`attn_catches_up`, `mlp_catches_up`: the step its branch last filled its caches at).
  An attention call that far from the branch's previous call runs plain dense instead of a refresh
  (ops/attention.py: a refresh costs more than dense, and calls that far apart read no cache).
- Refreshes written as noise levels (`attn.full_step_levels`): `levels` is the generation's noise
  level per step so far (step k's timestep over its first step's, on the host: `runtime`), and the
  refreshes are the first step after warm-up and the first step at or below each level. Known
  causally (step k's kind needs levels 0..k only), so the same list places its refreshes at the
  same noise levels under any sampler shift or step count (no `scale`). With `max_refresh_gap`, a
  step that many steps (scaled) after the last refresh refreshes too, still causally. Unknown levels
  (None: nothing gave the generation's timesteps) run the period (`full_step_every`, scaled) instead.
"""

from __future__ import annotations

import functools
from typing import Optional

from .config import AttnConfig, MlpConfig

DENSE, REFRESH, SPARSE = "dense", "refresh", "sparse"


def period(every: int, scale: Optional[float] = None) -> int:
    """A refresh period of the schedule at a generation's step count (`scale`: see the module doc)."""
    return every if scale is None else max(1, round(every * scale))


def scheduled_steps(steps, scale: Optional[float] = None):
    """An explicit schedule's steps at a generation's step count: steps 0 and 1 stay (the first
    dense step and refresh), later ones scaled (as written, the list itself: no copy per call)."""
    if scale is None:
        return steps
    return frozenset(s if s < 2 else max(2, round(s * scale)) for s in steps)


# a step's level within this of a written level counts as reaching it: timesteps reach the host
# rounded to the model's input dtype (bfloat16: 2**-8 relative), so a level written as a step's
# exact noise level must still refresh at that step
LEVEL_TOLERANCE = 2.0**-8


@functools.lru_cache(maxsize=256)
def steps_at_levels(levels: tuple, written: tuple, warmup: int, gap: Optional[int] = None) -> frozenset:
    """The refresh steps of a generation whose steps so far have noise levels `levels` (1 = its
    first step's timestep, falling towards 0), for the levels `written`: the first step at or past
    `warmup`, each later step that reaches a written level the step before it had not, and (`gap`)
    each step `gap` steps after the last refresh."""
    out, last = set(), warmup
    for k in range(warmup, len(levels)):
        now, before = levels[k] * (1 - LEVEL_TOLERANCE), levels[k - 1] * (1 - LEVEL_TOLERANCE)
        if k == warmup or any(now <= lv < before for lv in written) or (gap is not None and k - last >= gap):
            out.add(k)
            last = k
    return frozenset(out)


def refresh_steps(cfg: AttnConfig, scale: Optional[float] = None, levels: Optional[tuple] = None):
    """A generation's explicit refresh steps (those known so far, for levels), None for the period."""
    if cfg.full_step_levels is not None and levels is not None:
        gap = None if cfg.max_refresh_gap is None else period(cfg.max_refresh_gap, scale)
        return steps_at_levels(levels, tuple(cfg.full_step_levels), cfg.warmup_steps, gap)
    if cfg.full_step_schedule is not None:
        return scheduled_steps(cfg.full_step_schedule, scale)
    return None


def never_sparse(kind: str, cfg, scale: Optional[float]) -> bool:
    """A generation at `scale` runs no sparse step of this op (`kind` "attention" or "mlp"): its
    period scales to 1. An explicit attention schedule (of steps or levels) keeps its sparse steps."""
    if kind == "attention" and (cfg.full_step_schedule is not None or cfg.full_step_levels is not None):
        return False
    return period(cfg.full_step_every, scale) == 1


def attn_step_kind(cfg: AttnConfig, step: int, layer: int, scale: Optional[float] = None,
                   levels: Optional[tuple] = None) -> str:
    if not cfg.enabled or layer < cfg.first_n_dense_layers or step < cfg.warmup_steps:
        return DENSE
    steps = refresh_steps(cfg, scale, levels)
    if steps is not None:
        return REFRESH if step in steps else SPARSE
    every = period(cfg.full_step_every, scale)
    if every == 1:  # no sparse step would read a refresh's cache: plain dense attention
        return DENSE
    if step == cfg.warmup_steps or step % every == 0:
        return REFRESH
    return SPARSE


def mlp_step_kind(cfg: MlpConfig, step: int, layer: int, scale: Optional[float] = None) -> str:
    if not cfg.enabled or layer < cfg.first_n_dense_layers or step % period(cfg.full_step_every, scale) == 0:
        return DENSE
    return SPARSE


def last_refresh_step(cfg: AttnConfig, step: int, scale: Optional[float] = None,
                      levels: Optional[tuple] = None) -> int:
    """The latest step <= `step` that the schedule makes a refresh (past the dense layers and the
    warm-up; -1 before any): what a site's caches should be at least as new as (`catch_up`)."""
    if step < cfg.warmup_steps:
        return -1
    steps = refresh_steps(cfg, scale, levels)
    if steps is not None:
        return max((s for s in steps if s <= step), default=-1)
    every = period(cfg.full_step_every, scale)
    return max(cfg.warmup_steps, step - step % every)


def last_dense_mlp_step(cfg: MlpConfig, step: int, scale: Optional[float] = None) -> int:
    """The latest step <= `step` that the schedule makes a dense MLP step (`catch_up`)."""
    return step - step % period(cfg.full_step_every, scale)


def attn_catch_up_span(cfg: AttnConfig, last: int, scale: Optional[float] = None,
                       levels: Optional[tuple] = None) -> float:
    """`catch_up` refresh periods in steps, at a step whose latest scheduled refresh is `last`
    (an explicit schedule's period: the gap before that refresh)."""
    steps = refresh_steps(cfg, scale, levels)
    if steps is not None:
        gap = last - max((s for s in steps if s < last), default=0)
    else:
        gap = period(cfg.full_step_every, scale)
    return cfg.catch_up * max(gap, 1)


def attn_catches_up(cfg: AttnConfig, step: int, filled: int, scale: Optional[float] = None,
                    levels: Optional[tuple] = None) -> Optional[float]:
    """Whether a sparse step at `step` on caches a refresh filled at step `filled` refreshes instead
    (`catch_up`): a scheduled refresh after `filled` was missed, and the caches are at least
    `catch_up` refresh periods old. The span in steps (`attn_catch_up_span`, > 0) when it does, for
    the caller's next test; None when it does not."""
    if cfg.catch_up <= 0:
        return None
    last = last_refresh_step(cfg, step, scale, levels)
    if filled >= last:
        return None
    span = attn_catch_up_span(cfg, last, scale, levels)
    return span if step - filled >= span else None


def mlp_catches_up(cfg: MlpConfig, step: int, filled: int, scale: Optional[float] = None) -> bool:
    """As `attn_catches_up`, for a sparse MLP step on caches of the dense step at `filled`."""
    return cfg.catch_up > 0 and filled < last_dense_mlp_step(cfg, step, scale) \
        and step - filled >= cfg.catch_up * period(cfg.full_step_every, scale)


def mlp_recompute_indices(cfg: MlpConfig, step: int, scale: Optional[float] = None) -> bool:
    until = cfg.full_step_every if cfg.select_every_step_until is None else cfg.select_every_step_until
    return step < period(until, scale) or step % cfg.block_mask_cache == 0


def step_scale(steps: Optional[int], schedule_steps: Optional[int]) -> Optional[float]:
    """`scale` for a generation of `steps` steps (None: as written)."""
    if not steps or not schedule_steps or steps == schedule_steps:
        return None
    return steps / schedule_steps
