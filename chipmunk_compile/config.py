"""Configuration of the chipmunk backend: dataclasses, presets, YAML and per-layer overrides.

Invariants:
- A `ChipmunkConfig` is fully validated in `__post_init__`; every op reads its numbers from the
  config resolved for its site (`config.for_site(path)`), never from globals.
- `ChipmunkConfig.from_any` accepts a preset name, a YAML path, a dict or a config, and always
  returns a new object, so mutating the result never changes a preset.
- Overrides are keyed by fnmatch globs over module paths (``transformer_blocks.0.attn``) and
  apply in file order; later globs win.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import os
from dataclasses import dataclass, field
from typing import Any, Optional

PRESET_DIR = os.path.join(os.path.dirname(__file__), "presets")
DELTA_MODES = ("self_normalized", "exact_normalizer")
MLP_SCORES = ("preact", "output")


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a fraction in [0, 1], got {value!r}")


def _check_extrapolate(name: str, value: float) -> None:
    """A forecast's damping factor: 0 (off) to 2."""
    if not 0.0 <= value <= 2.0:
        raise ValueError(f"{name} must be in [0, 2], got {value!r}")


@dataclass
class AttnConfig:
    """Column-sparse attention (method.md §1)."""

    enabled: bool = True
    # The defaults are the `default` preset (presets/default.yaml: why they differ from the method's
    # base values, kept as the `method` preset, and what they measured).
    top_keys: float = 0.10  # fraction of key columns kept per query group
    random_keys: float = 0.01  # extra random columns, as a fraction of the keys
    # queries sharing one key set: the published CUDA kernel uses 192, our Triton kernels are
    # fastest at 128 (one 128-row tile per group; benchmarks/results/bench_kernels_h200.csv)
    group: int = 128
    first_n_dense_layers: int = 2
    warmup_steps: int = 1  # plain dense steps before the first refresh
    full_step_every: int = 5  # refresh (dense + new indices + cache) period
    full_step_schedule: Optional[list[int]] = None  # explicit refresh steps; overrides the period
    # refreshes written as noise levels instead of steps (overrides the period; not with
    # full_step_schedule): the first step after warm-up and the first step at or below each level,
    # a step's level being its timestep over the generation's first (1 = the first step's noise; a
    # flow-matching sampler from pure noise: sigma). The same list then refreshes at the same noise
    # under any flow shift or step count, where a schedule in steps suits one shift only (on the tiny
    # video DiT the 8 refreshes best at equal steps lose 8.8 dB under HunyuanVideo's shift 7; docs/
    # results.md "A video model"). Levels come from the step signal's timesteps or the pipeline's
    # scheduler; a generation without either runs the period (counted `attn_levels_unknown`).
    full_step_levels: Optional[list[float]] = None
    # with full_step_levels: also refresh once this many steps have passed since the last refresh (in
    # steps of a `schedule_steps`-long generation, scaled like the periods), so that a sampler whose
    # noise falls slowly in some stretch cannot leave the cache stale there (levels 0.9, 0.8, ..., 0.1
    # under a flow shift of 3 leave steps 2-12 without a refresh). None: the levels alone.
    max_refresh_gap: Optional[int] = None
    # False: indices picked at the first refresh only, later refreshes rebuild the cache with them (as the
    # published FLUX; the method's base and its video presets: True). presets/default.yaml: why False.
    recompute_mask: bool = False
    min_tokens: int = 1024  # shorter attention stays dense
    delta: str = "self_normalized"  # or "exact_normalizer" (method.md §1 "Normalization")
    keep_text_keys: bool = True  # text tokens (when grouping knows them) are always attended
    # queries per group whose exact probabilities rank the key columns at a refresh (evenly spread
    # over the group; >= group: all of them). Costs colsum_queries/group of a QKᵀ pass.
    colsum_queries: int = 32
    # their scores from q and k rounded to float8 e4m3, where keys are many (>= 16384) and the GPU
    # has fp8 tensor cores (sm_89+; the CPU reference emulates it): 31% less column-sum time at the
    # HunyuanVideo shape, unchanged sparse-step error on the tiny DiT (benchmarks/colsum_precision.py,
    # benchmarks/colsum_sampling.py). False: scores in the input dtype.
    colsum_fp8: bool = True
    # quality guard (> 0): at a layer's first key selection, the share of the (sampled) attention
    # mass its kept columns hold is measured (`stats()` reports it); below min_mass the layer stays
    # dense from then on (counted `fallback:attn_diffuse`, logged): its attention is too diffuse for
    # column-sparse deltas. 0 = off, nothing measured (the published presets keep every layer).
    min_mass: float = 0.0
    # forecast of the cached residual (o - attn_S) on sparse steps: o_cache + e * min(t - t_ref, span)
    # * slope, the slope taken between the last two refreshes of a generation, span steps apart
    # (with the previous indices when a refresh picks new ones). 0 = the published hold (the cache
    # stays as the refresh left it), 1 = first-order extrapolation; values between damp it. Costs
    # one (B, N, H, D) buffer per site and branch and one slope read in the sparse kernel's epilogue.
    extrapolate: float = 1.0
    # a site whose calls were skipped over a scheduled refresh (by a hook's step cache: cache-dit's
    # DBCache, diffusers' FirstBlockCache or TaylorSeer; chipmunk's own never skips a refresh) and
    # whose cache is at least catch_up refresh periods old refreshes at its next call instead of a
    # sparse step on that cache. 1: at the first call after a missed refresh; 0: never (the sparse
    # steps read the cache of the last refresh the site ran, however old). 2: a sparse step may read
    # a cache up to twice as old as the schedule makes it, so a hook that computes the blocks every
    # 3rd step still leaves sparse steps, while a block skipped for many steps refreshes
    # (benchmarks/compose_cache_dit.py, docs/behaviour.md "Graph breaks").
    catch_up: float = 2.0

    def __post_init__(self):
        _check_fraction("attn.top_keys", self.top_keys)
        if self.catch_up < 0:
            raise ValueError(f"attn.catch_up must be >= 0, got {self.catch_up!r}")
        _check_extrapolate("attn.extrapolate", self.extrapolate)
        _check_fraction("attn.min_mass", self.min_mass)
        _check_fraction("attn.random_keys", self.random_keys)
        if self.group < 1:
            raise ValueError(f"attn.group must be >= 1, got {self.group}")
        if self.colsum_queries < 1:
            raise ValueError(f"attn.colsum_queries must be >= 1, got {self.colsum_queries}")
        if self.full_step_every < 1:
            raise ValueError("attn.full_step_every must be >= 1")
        if self.delta not in DELTA_MODES:
            raise ValueError(f"attn.delta must be one of {DELTA_MODES}, got {self.delta!r}")
        if self.full_step_schedule is not None:
            self.full_step_schedule = sorted(int(s) for s in self.full_step_schedule)
        if self.full_step_levels is not None:
            if self.full_step_schedule is not None:
                raise ValueError("attn.full_step_levels and attn.full_step_schedule both place the refreshes: "
                                 "give one (set the other to null)")
            levels = [float(v) for v in self.full_step_levels]
            if not levels or any(not 0.0 <= v <= 1.0 for v in levels):
                raise ValueError("attn.full_step_levels must be a non-empty list of noise levels in [0, 1] "
                                 f"(1 = the first step's), got {self.full_step_levels!r}")
            self.full_step_levels = sorted(set(levels), reverse=True)
        if self.max_refresh_gap is not None:
            if self.full_step_levels is None:
                raise ValueError("attn.max_refresh_gap caps the gaps between refreshes written as noise levels: "
                                 "give attn.full_step_levels with it (refreshes in steps: full_step_every or "
                                 "full_step_schedule)")
            gap = self.max_refresh_gap
            # a YAML 4.0 is 4 steps; a string, a bool, NaN or inf is refused with this message, not int()'s
            if isinstance(gap, bool) or not isinstance(gap, (int, float)) or not float(gap).is_integer() or gap < 1:
                raise ValueError(f"attn.max_refresh_gap must be a whole number of steps >= 1, got {gap!r}")
            self.max_refresh_gap = int(self.max_refresh_gap)


@dataclass
class MlpConfig:
    """Column-sparse MLP deltas (method.md §2)."""

    enabled: bool = True
    top_keys: float = 0.3  # fraction of hidden neurons recomputed per token block
    random_keys: float = 0.05
    block: int = 128  # tokens per block sharing one neuron set
    first_n_dense_layers: int = 2
    full_step_every: int = 10  # dense MLP period (steps 0, 10, 20, ...)
    block_mask_cache: int = 2  # after the first period, new indices every this many steps
    # new indices on every sparse step before this step (scaled like the period), then every
    # block_mask_cache-th; None: the first dense period (the published rule: its period is 10)
    select_every_step_until: Optional[int] = None
    min_tokens: int = 1024
    # neuron ranking per token block: "preact" = |change of the block-mean pre-activation| (the
    # published rule); "output" = |change of act(block mean)| x ||w2[:, j]||, the neuron's estimated
    # contribution to the change of the MLP output
    score: str = "preact"
    # forecast of the stale neurons' error (off by default): a dense step after the first of a
    # generation also runs the sparse path and stores rate = (y_dense - y_sparse) / (steps since the
    # last dense step); sparse steps add e * min(t - t_dense, span) * rate to their output. Costs
    # one output-sized buffer per site and branch, a sparse pass per dense step, an add per sparse step.
    extrapolate: float = 0.0
    # a dense step missed by a skipped call runs at the site's next call once its caches are at
    # least catch_up dense periods old (as attn.catch_up)
    catch_up: float = 2.0

    def __post_init__(self):
        _check_extrapolate("mlp.extrapolate", self.extrapolate)
        if self.catch_up < 0:
            raise ValueError(f"mlp.catch_up must be >= 0, got {self.catch_up!r}")
        if self.score not in MLP_SCORES:
            raise ValueError(f"mlp.score must be one of {MLP_SCORES}, got {self.score!r}")
        _check_fraction("mlp.top_keys", self.top_keys)
        _check_fraction("mlp.random_keys", self.random_keys)
        if self.block < 1 or self.full_step_every < 1 or self.block_mask_cache < 1:
            raise ValueError("mlp.block, mlp.full_step_every and mlp.block_mask_cache must be >= 1")
        until = self.select_every_step_until
        if until is not None and (isinstance(until, bool) or not isinstance(until, int) or until < 0):
            raise ValueError(f"mlp.select_every_step_until must be a step >= 0 or null, got {until!r}")


@dataclass
class StepCacheConfig:
    """Whole-call step caching stacked on the sparse ops (issue 4)."""

    enabled: bool = False
    skip_steps: Optional[list[int]] = None  # fixed schedule: steps whose call is skipped
    threshold: float = 0.0  # adaptive: skip while accumulated relative input change < threshold
    max_consecutive: int = 2  # adaptive: never skip more than this many calls in a row
    # adaptive: never skip before this step. 7 as the published 25-of-50 schedule (its first skip):
    # on the 4096-token tiny DiT, skipping steps 2-3 cost 8-13 dB (fidelity_pareto_tiny_flux_128)
    warmup_steps: int = 7
    # a skipped call's outputs forecast from the last two computed calls of its branch (first order,
    # in step units, as TaylorSeer): last + e * (t - t_last) / (t_last - t_prev) * (last - prev).
    # 0 = reuse the last outputs as they are; 1 = linear; between: damped. One more output copy per branch.
    extrapolate: float = 0.0

    def __post_init__(self):
        if self.skip_steps is not None:
            self.skip_steps = sorted(int(s) for s in self.skip_steps)
        if self.threshold < 0:
            raise ValueError("step_cache.threshold must be >= 0")
        _check_extrapolate("step_cache.extrapolate", self.extrapolate)


@dataclass
class GroupingConfig:
    """Spatial token grouping (issue 5): which queries share a group / MLP block."""

    enabled: bool = True
    grid: Optional[list[int]] = None  # (h, w) or (t, h, w) in tokens; None = infer from the graph
    text_tokens: Optional[int] = None  # count of non-grid tokens; None = infer (N - prod(grid))
    text_first: Optional[bool] = None  # where the non-grid tokens sit; None = infer
    tile: Optional[list[int]] = None  # voxel/tile size; None = (8, 8) images, (4, 6, 8) video

    def __post_init__(self):
        if self.grid is not None and len(self.grid) not in (2, 3):
            raise ValueError(f"grouping.grid must be (h, w) or (t, h, w), got {self.grid}")


@dataclass
class ChipmunkConfig:
    attn: AttnConfig = field(default_factory=AttnConfig)
    mlp: MlpConfig = field(default_factory=MlpConfig)
    step_cache: StepCacheConfig = field(default_factory=StepCacheConfig)
    grouping: GroupingConfig = field(default_factory=GroupingConfig)
    # "auto": pipeline signals (diffusers cache context, timestep value), else one call = one step;
    # "calls": every call is a new step; "explicit": only chipmunk_compile.set_step().
    step_signal: str = "auto"
    # "auto" steps inside a pipeline's call (an object on the call stack whose __call__ runs the loop,
    # holding the model and a scheduler with timesteps): from that scheduler's host-side step_index,
    # as chipmunk_compile.follow_scheduler gives them, instead of reading each call's timestep from
    # the device, a read that waits for the GPU (pipeline_loop.py). false: read the timestep
    follow_pipeline: bool = True
    # record each step kind of a compiled graph as one CUDA graph and replay it (graphs.py); only
    # for CUDA inputs, and off when Inductor's own cudagraphs (mode="reduce-overhead") are on
    cuda_graphs: bool = True
    # budget per device for what live step recordings hold (their input buffers and outputs): a
    # recording past it is not made, that step runs eagerly (graphs.py; counted)
    cuda_graphs_max_gib: float = 4.0
    # site caches in pinned host memory, staged per call into two device slots with the next call's
    # prefetched on a side stream (ops/offload.py), for states larger than the GPU (HunyuanVideo 720p
    # at full depth, Wan2.1-14B with CFG). true: every branch (and no CUDA graphs: host-ordered
    # copies); "auto": a branch whose caches would leave less than `offload_reserve` of the device's
    # memory free (for the model's activations) is offloaded, the others stay on the device; false: never
    offload_state: Any = "auto"
    offload_reserve: float = 0.15  # share of the device's memory (its per-process limit) "auto" keeps free
    # shapes (resolution, batch) whose caches each site keeps per branch: a graph that serves
    # several token counts (dynamic shapes) then switches between them without allocating again or
    # recording its step graphs again; the least recently used beyond is freed, and any shape the
    # current generation has not used is freed first when memory runs short (ops/sites.py)
    state_shapes: int = 2
    # the sampler step count that the refresh periods and schedules (attn.full_step_every /
    # full_step_schedule, mlp.full_step_every) are written for: a generation of S steps, when S is
    # known, runs them scaled by S / schedule_steps, so a refresh spans the same share of the
    # trajectory (schedule.py). S is known from `steps`, else from a followed scheduler
    # (len(timesteps)), else from the pipeline on the call stack that runs the loop
    # (runtime.pipeline_scheduler); in a loop of one's own it is known once a generation ended: once
    # two in a row ran one count, the next ones are scaled to it (before: as written).
    # null: always as written
    schedule_steps: Optional[int] = 50
    steps: Optional[int] = None  # the sampler's step count, for loops whose scheduler is not followed
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    name: str = "default"
    version: int = 1

    def __post_init__(self):
        if self.offload_state not in (True, False, "auto"):
            raise ValueError(f"offload_state must be true, false or 'auto', got {self.offload_state!r}")
        _check_fraction("offload_reserve", self.offload_reserve)
        if isinstance(self.state_shapes, bool) or not isinstance(self.state_shapes, int) or self.state_shapes < 1:
            raise ValueError(f"state_shapes must be an integer >= 1, got {self.state_shapes!r}")
        for key in ("schedule_steps", "steps"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{key} must be an integer >= 1 or null, got {value!r}")
        if not self.cuda_graphs_max_gib >= 0:
            raise ValueError(f"cuda_graphs_max_gib must be >= 0, got {self.cuda_graphs_max_gib!r}")
        if not isinstance(self.follow_pipeline, bool):
            raise ValueError(f"follow_pipeline must be true or false, got {self.follow_pipeline!r}")
        if self.step_signal not in ("auto", "calls", "explicit"):
            raise ValueError(f"step_signal must be auto, calls or explicit, got {self.step_signal!r}")
        for glob, patch in self.overrides.items():
            unknown = set(patch) - {"attn", "mlp"}
            if unknown:
                raise ValueError(f"override {glob!r}: only 'attn' and 'mlp' may be overridden, got {unknown}")
            self._patched(patch)  # validate eagerly

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ChipmunkConfig":
        d = copy.deepcopy(dict(d))
        base = d.pop("preset", None)
        cfg = cls.from_any(base) if base else cls()
        return cfg.merged(d)

    @classmethod
    def from_any(cls, spec: Any = None) -> "ChipmunkConfig":
        if spec is None:
            return cls()
        if isinstance(spec, ChipmunkConfig):
            return copy.deepcopy(spec)
        if isinstance(spec, dict):
            return cls.from_dict(spec)
        if isinstance(spec, str):
            if spec.endswith((".yaml", ".yml")) or os.sep in spec:
                return cls.from_dict(_load_yaml(spec))
            path = os.path.join(PRESET_DIR, f"{spec}.yaml")
            if not os.path.exists(path):
                raise ValueError(f"unknown chipmunk preset {spec!r}; presets: {', '.join(list_presets())}")
            return cls.from_dict({"name": spec, **_load_yaml(path)})
        raise TypeError(f"cannot build a ChipmunkConfig from {type(spec).__name__}")

    def merged(self, d: dict[str, Any]) -> "ChipmunkConfig":
        """A new config with the nested dict `d` laid over this one (unknown keys raise)."""
        out = self.to_dict()
        for key, value in d.items():
            if key not in out:
                raise ValueError(f"unknown chipmunk config key {key!r}")
            if isinstance(out[key], dict) and key != "overrides":
                sub = _section_type(key)
                names = {f.name for f in dataclasses.fields(sub)}
                bad = set(value or {}) - names
                if bad:
                    raise ValueError(f"unknown keys in {key}: {sorted(bad)}")
                out[key].update(value or {})
            elif key == "overrides":
                out[key].update(value or {})
            else:
                out[key] = value
        return _from_plain(out)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # -- per-site view ------------------------------------------------------------------------
    def _patched(self, patch: dict[str, Any]) -> tuple[AttnConfig, MlpConfig]:
        attn = dataclasses.replace(self.attn, **patch.get("attn", {}))
        mlp = dataclasses.replace(self.mlp, **patch.get("mlp", {}))
        return attn, mlp

    def for_site(self, module_path: str) -> tuple[AttnConfig, MlpConfig]:
        """The attention and MLP settings for a site at `module_path`, overrides applied."""
        attn, mlp = self.attn, self.mlp
        for glob, patch in self.overrides.items():
            if fnmatch.fnmatchcase(module_path, glob):
                attn = dataclasses.replace(attn, **patch.get("attn", {}))
                mlp = dataclasses.replace(mlp, **patch.get("mlp", {}))
        return attn, mlp


def _section_type(key: str):
    return {"attn": AttnConfig, "mlp": MlpConfig, "step_cache": StepCacheConfig, "grouping": GroupingConfig}[key]


def _from_plain(d: dict[str, Any]) -> ChipmunkConfig:
    d = dict(d)
    for key in ("attn", "mlp", "step_cache", "grouping"):
        d[key] = _section_type(key)(**d[key])
    return ChipmunkConfig(**d)


def _load_yaml(path: str) -> dict[str, Any]:
    import yaml

    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a chipmunk config file must hold a mapping")
    return data


def list_presets() -> list[str]:
    return sorted(p[:-5] for p in os.listdir(PRESET_DIR) if p.endswith(".yaml"))
