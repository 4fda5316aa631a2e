"""Whole-call step caching, stacked on (or instead of) the sparse ops (issue 4).

A skipped call returns the outputs of the last computed call of the same guidance branch, or with
`step_cache.extrapolate` = e > 0 their first-order forecast from the last two computed calls of that
branch and generation (TaylorSeer's order 1, in step units): last + e·(t − t_last)/(t_last −
t_prev)·(last − prev), for every floating tensor output (others are returned as they are).
- fixed schedule (`step_cache.skip_steps`): those steps are skipped (the published 25-of-50 set);
- adaptive (`step_cache.threshold > 0`): the relative L1 change of the model's main input since the
  last computed call is accumulated; while the sum stays under the threshold the call is skipped,
  at most `max_consecutive` in a row and never before `warmup_steps`.

Invariants:
- Only a session whose model runs as one graph is step-cached: with graph breaks, skipping one
  graph would mix stale and fresh halves, so the call is computed and the fallback counted.
- A call is only skipped when a computed output of the same branch and generation exists.
- The adaptive rule reads one scalar per call on the host, outside the compiled graph. Under
  context parallelism (collectives in the graph) it is the maximum over the ranks' (one
  all-reduce), so all ranks skip the same calls: a rank that skipped alone would leave the others
  waiting in the attention's all-to-all.
- `summary()["skipped_steps"]` lists, per guidance branch, the steps skipped in that branch's
  latest generation (the schedule the adaptive rule produced), so a user sees where it skipped.
- A step on which some sparse site's schedule refreshes (attention refresh, MLP dense step) is
  never skipped (counted as step_cache_kept_refresh): skipping it would leave chipmunk's caches
  and indices stale until the next refresh (found with the adaptive rule, which skipped every
  even step, steps 10..40 included: 20-22 dB instead of 31 on the trained tiny DiT).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from .ops.sites import count, fallback
from .patterns.fx_utils import source_name
from .schedule import DENSE, REFRESH, attn_step_kind, mlp_step_kind
from .sequence_parallel import agree_max, covering_group

_PAST_DENSE_LAYERS = 1 << 30  # a layer number past every first_n_dense_layers


def refreshes_at(sites, step: int, scale=None, levels=None) -> bool:
    """True when a site that can be sparse runs its refresh (attention) or dense step (MLP) at `step`."""
    for s in sites:
        cfg = s.cfg
        if not cfg.enabled:
            continue
        if s.kind == "attention" and attn_step_kind(cfg, step, _PAST_DENSE_LAYERS, scale, levels) == REFRESH:
            return True
        if s.kind == "mlp" and mlp_step_kind(cfg, step, _PAST_DENSE_LAYERS, scale) == DENSE:
            return True
    return False


@dataclass
class _Entry:
    step: int
    generation: int
    outputs: Any
    ref_input: Optional[torch.Tensor]
    accumulated: float = 0.0
    consecutive: int = 0
    prev_step: Optional[int] = None  # the computed call before, same branch and generation
    prev_outputs: Any = None


class StepCache:
    def __init__(self, cfg):
        self.cfg = cfg
        self.entries: dict[str, _Entry] = {}
        self.skipped = 0
        self.computed = 0
        self.multi_graph = False
        self.groups: list[str] = []  # process groups of the model's collectives (sequence_parallel)
        self.skipped_steps: dict[str, list[int]] = {}  # branch -> steps skipped in its latest generation
        self._generation: dict[str, int] = {}

    def reset(self) -> None:
        self.entries.clear()
        self.skipped_steps.clear()
        self._generation.clear()

    def summary(self) -> dict:
        return {"skipped": self.skipped, "computed": self.computed,
                "skipped_steps": {b: list(s) for b, s in self.skipped_steps.items()}}

    def _record(self, branch: str, generation: int, step: int, skipped: bool) -> None:
        if self._generation.get(branch) != generation:
            self._generation[branch] = generation
            self.skipped_steps[branch] = []
        if skipped:
            self.skipped_steps[branch].append(step)

    def _should_skip(self, entry: Optional[_Entry], step: int, generation: int, x) -> bool:
        if entry is None or entry.generation != generation or entry.step >= step:
            return False
        if self.cfg.skip_steps is not None:
            return step in self.cfg.skip_steps
        if self.cfg.threshold <= 0 or step < self.cfg.warmup_steps or entry.consecutive >= self.cfg.max_consecutive:
            return False
        if x is None or entry.ref_input is None or x.shape != entry.ref_input.shape:
            return False
        ref = entry.ref_input.float()
        rel = (x.float() - ref).abs().mean() / ref.abs().mean().clamp_min(1e-12)
        if self.groups:  # context parallelism: every rank must skip the same calls
            group = covering_group(self.groups)
            if group is None:
                fallback("step_cache_collectives", "collectives over process groups of different ranks; "
                         "adaptive skips are off")
                return False
            rel = agree_max(rel, group)
        rel = rel.item()
        entry.accumulated += rel
        return entry.accumulated < self.cfg.threshold

    def __call__(self, session, args, compiled, input_index: Optional[int] = None):
        if self.multi_graph:
            fallback("step_cache_graph_breaks", "the model compiled to several graphs; step caching is off")
            return compiled(*args)
        pos = session.position()
        x = args[input_index] if input_index is not None else None
        entry = self.entries.get(pos.branch)
        skip = self._should_skip(entry, pos.step, pos.generation, x)
        if skip and refreshes_at(session.sites, pos.step, pos.scale, pos.levels):
            count("step_cache_kept_refresh")
            skip = False
        self._record(pos.branch, pos.generation, pos.step, skip)
        if skip:
            entry.consecutive += 1
            self.skipped += 1
            count("step_cache_skipped")
            return self._forecast(entry, pos.step)
        outputs = compiled(*args)
        ref = x.detach().clone() if isinstance(x, torch.Tensor) else None
        new = _Entry(pos.step, pos.generation, outputs, ref)
        if self.cfg.extrapolate > 0 and entry is not None and entry.generation == pos.generation \
                and entry.step < pos.step:
            new.prev_step, new.prev_outputs = entry.step, entry.outputs
        self.entries[pos.branch] = new
        self.computed += 1
        return outputs

    def _forecast(self, entry: _Entry, step: int):
        if self.cfg.extrapolate <= 0 or entry.prev_outputs is None:
            return entry.outputs
        count("step_cache_forecast")
        c = self.cfg.extrapolate * (step - entry.step) / (entry.step - entry.prev_step)

        def one(last, prev):
            if isinstance(last, torch.Tensor) and last.is_floating_point() and isinstance(prev, torch.Tensor) \
                    and prev.shape == last.shape:
                return torch.lerp(last, prev, -c)  # last + c * (last - prev)
            return last
        return _tree_zip(one, entry.outputs, entry.prev_outputs)


def _tree_zip(fn, a, b):
    """fn over the leaves of two outputs of a compiled graph (tensors in tuples/lists)."""
    if isinstance(a, (tuple, list)) and type(a) is type(b) and len(a) == len(b):
        return type(a)(_tree_zip(fn, x, y) for x, y in zip(a, b))
    return fn(a, b)


def main_input_index(gm: torch.fx.GraphModule, signal_indices: list[int]) -> Optional[int]:
    """The largest floating user input of the graph (the latents), by its recorded fake value."""
    best, best_numel = None, -1
    for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        src = source_name(node)
        if i in signal_indices or any(t in src for t in ("_parameters[", "_buffers[", "._modules[")):
            continue
        v = node.meta.get("example_value")
        if isinstance(v, torch.Tensor) and v.is_floating_point() and isinstance(v.numel(), int) and v.numel() > best_numel:
            best, best_numel = i, v.numel()
    return best
