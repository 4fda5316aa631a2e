"""chipmunk_compile: a torch.compile backend that makes diffusion transformers faster with
Chipmunk dynamic column-sparse deltas, on any DiT, with no model edits.

    model = torch.compile(model, backend="chipmunk", options={"config": "flux"})
    for step in range(50):
        out = model(latents, t, ...)          # each call advances the schedule
    chipmunk_compile.reset(model)             # next generation (also detected automatically); caches kept
    chipmunk_compile.release(model)           # free chipmunk's memory (caches, step graphs)
    print(chipmunk_compile.inspect(model, *example_args))
    found = chipmunk_compile.calibrate(pipe, run, min_psnr=30)  # the cheapest config at 30 dB of dense

The backend is registered through the `torch_dynamo_backends` entry point, so an installed package
needs no import for `backend="chipmunk"`. Where that entry point is missing (a source tree on
PYTHONPATH, or a pip that installed into another interpreter), importing this package registers the
backend by name instead; it never registers it a second time.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .config import AttnConfig, ChipmunkConfig, GroupingConfig, MlpConfig, StepCacheConfig, list_presets
from .calibration import Calibration, calibrate
from .compiled_options import compiled_in_place, compiled_options
from .report import RejectedRow, Report, SiteRow
from .runtime import sessions_of
from .schedule import refresh_steps

__all__ = [
    "AttnConfig", "ChipmunkConfig", "GroupingConfig", "MlpConfig", "StepCacheConfig", "Report",
    "inspect", "list_presets", "register", "release", "reset", "set_step", "clear_step", "follow_scheduler", "stats",
    "calibrate", "Calibration",
]
__version__ = "0.1.0"


def register() -> None:
    """Register the backend by name for environments where entry points are not installed."""
    from torch._dynamo.backends.registry import _COMPILER_FNS, register_backend

    if "chipmunk" not in _COMPILER_FNS:
        from .backend import chipmunk_backend

        register_backend(compiler_fn=chipmunk_backend, name="chipmunk")


def _entry_point_installed() -> bool:
    from importlib.metadata import entry_points

    return any(e.name == "chipmunk" for e in entry_points(group="torch_dynamo_backends"))


# Without the entry point, torch.compile(backend="chipmunk") raised InvalidBackend even after this
# import (seen on the GPU machine, whose plain `pip` installed the package into another Python).
# Registering imports torch._dynamo (~1 s), so it happens only where the entry point is missing.
if not _entry_point_installed():
    register()


def reset(model: Any) -> None:
    """Start a new generation: the step counter back to 0, so the next call is a dense step that
    recomputes every cache from the weights as they are. The caches stay allocated and the step
    graphs recorded for them keep replaying (until session 44 reset dropped both, so every later
    generation ran its steps eagerly and recorded them again); `release` frees them."""
    for session in sessions_of(model):
        session.new_generation()


def release(model: Any) -> None:
    """Free the memory chipmunk holds for `model`: every cache, column-major weight copy, step-cache
    output and recorded step graph (with the graphs' memory pool once none is left). The compiled
    graphs stay; the next call begins a new generation and allocates again. For memory another
    model or the VAE needs between generations (`torch.cuda.empty_cache()` then returns it to the
    driver)."""
    for session in sessions_of(model):
        session.release()


def set_step(model: Any, step: int, branch: Optional[str] = None, *, timesteps: Any = None) -> None:
    """Pin the step (and guidance branch) that the next calls of `model` run as. Without a branch,
    the calls at one pinned step are its guidance branches, named by diffusers' cache context
    (`cache_context("cond")`) or else numbered in call order.

    `timesteps`: the generation's timesteps or sigmas, one per step from step 0 (any scale, falling:
    e.g. `scheduler.timesteps`), for refreshes written as noise levels (`attn.full_step_levels`),
    which pinned steps otherwise take from a followed scheduler or the calling pipeline's, else run
    the period (counted `fallback:attn_levels_unknown`). Kept for the later pinned steps until
    given again or `clear_step`; the same tensor given again, unchanged, is not read again (a read of
    device timesteps waits for the GPU).

    Use when a pipeline gives no usable signal; `clear_step` returns to automatic tracking (which
    then begins a new generation). Works before the first compile: the sessions it creates take the
    pin (until session 58 that raised, so a loop pinning from step 0 failed at its first call)."""
    from .runtime import _PINS, pinned_levels_of

    sessions = sessions_of(model)
    if not sessions and not isinstance(model, torch.nn.Module):
        raise TypeError(f"set_step: expected the (compiled) model, got {type(model).__name__}")
    step = int(step)
    levels = None
    if timesteps is not None:
        levels = pinned_levels_of(timesteps)
        if levels is None:
            raise ValueError("set_step: timesteps must be numbers falling from a positive first one (the "
                             f"generation's timesteps or sigmas, step 0's first), got {timesteps!r}")
    kept = _PINS.get(model) if isinstance(model, torch.nn.Module) else None
    given = [levels] if levels is not None else [kept[1] if kept else None, *(s.tracker.pinned_levels for s in sessions)]
    for known in given:
        if known is not None and not 0 <= step < len(known):
            raise ValueError(f"set_step: step {step} is outside the {len(known)} timesteps given for this "
                             "generation (set_step(..., timesteps=...) with the new ones, or clear_step)")
    if isinstance(model, torch.nn.Module):  # also for sessions a later compile creates
        _PINS[model] = ((step, branch), levels if levels is not None else kept[1] if kept else None)
    for session in sessions:
        session.tracker.explicit = (step, branch)
        if levels is not None:
            session.tracker.pinned_levels = levels


def follow_scheduler(model: Any, scheduler: Any) -> None:
    """Take the step of `model`'s calls from `scheduler.step_index` (a diffusers scheduler, e.g.
    `pipe.scheduler`), instead of reading each call's timestep from the device.

    The read is a device→host copy: each call waits there for the GPU to finish the previous one.
    A scheduler's step index is host state, so the host can run ahead and its per-call work
    overlaps the GPU's. Step 0 while `step_index` is None (before the generation's first
    `scheduler.step`), counted from the scheduler's `begin_index` (img2img and inpaint pipelines
    begin part-way through the schedule); a step lower than the last starts a new generation; calls at the same step
    are its guidance branches (named by the cache context when the pipeline sets one). A scheduler
    whose step index stays the same over 9 calls is not the loop's (a pipeline that steps copies of
    it, as SkyReels-V2's diffusion forcing does per frame): following stops, counted and logged
    (`scheduler_not_advancing`), and the steps come from the timesteps. A scheduler
    without `step_index` (DDIM, DDPM, PNDM, CogVideoX's) gets the same count on the host: its
    `step` and `set_timesteps` are wrapped on the instance (`runtime.count_scheduler_steps`). Works
    before the first compile; `follow_scheduler(model, None)` goes back to the timestep."""
    from .runtime import _SCHEDULERS, count_scheduler_steps

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"follow_scheduler: expected the (compiled) model, got {type(model).__name__}")
    if scheduler is None:
        _SCHEDULERS.pop(model, None)
    else:
        if not hasattr(scheduler, "step_index"):
            if not (callable(getattr(scheduler, "step", None)) and callable(getattr(scheduler, "set_timesteps", None))):
                raise TypeError(f"follow_scheduler: {type(scheduler).__name__} has no step_index, nor step and "
                                "set_timesteps to count its steps by (diffusers schedulers have them)")
            count_scheduler_steps(scheduler)
        _SCHEDULERS[model] = scheduler
    for session in sessions_of(model):  # a scheduler that stood still before is given another chance
        session.tracker.scheduled_stalled = False


def clear_step(model: Any) -> None:
    """Undo `set_step` (the pin and its timesteps), given the model or its compiled wrapper: the
    next call is tracked automatically, and begins a new generation."""
    from .runtime import _PINS

    for session in sessions_of(model):
        session.tracker.explicit = None
        session.tracker.pinned_levels = None
    inner = getattr(model, "_orig_mod", None)
    for key in [m for m in list(_PINS.keys()) if m is model or m is inner or getattr(m, "_orig_mod", None) is model]:
        del _PINS[key]


def stats(model: Any) -> dict:
    """Per-site step-type counts and token grouping (`grouping_now` when this generation's position
    ids or rotary tables give another grid than the compiled one), the current step position and
    where the last call's step came from (`step_source`: "set_step", "cache_context",
    "followed_scheduler", "pipeline_scheduler", "timestep" or "calls"; "timestep" reads the device,
    a wait for the GPU on every call), and the cache memory of `model`
    (`state_bytes`: device caches plus the host homes of offloaded branches, also per site with its
    `offloaded_branches`; `offload_slot_bytes`: the device slots those are staged into;
    `weight_copy_bytes`: the column-major copies of the MLPs' second weights that the Triton sparse
    MLP reads, one per weight, beside the model's own; `idle_state_bytes`: the part of `state_bytes`
    kept for other shapes (resolutions, batches: config `state_shapes`) that the current generation
    has not used, which is freed first when memory runs short, and by `release`); for
    attention sites under the `attn.min_mass` guard also the share of the attention mass their kept
    keys held at each layer's first selection (`attn_mass`) and the layers it keeps dense; with
    `attn.full_step_levels`, the current step's noise level (`noise_level`) and the generation's
    refresh steps up to it (`refresh_steps`; both None when the levels are unknown)."""
    out = {"sites": [], "state_bytes": 0, "weight_copy_bytes": 0, "idle_state_bytes": 0}
    for session in sessions_of(model):
        session.prune()
        pos = session.position()
        out.update(step=pos.step, branch=pos.branch, generation=pos.generation, calls=session.calls,
                   step_source=session.tracker.source)
        if session._wants_levels:  # refreshes written as noise levels: the step's level and the refresh
            known = bool(pos.levels) and pos.step < len(pos.levels)  # steps they gave so far (None: unknown)
            out["noise_level"] = pos.levels[pos.step] if known else None
            steps = refresh_steps(session.config.attn, pos.scale, pos.levels) if known else None
            out["refresh_steps"] = sorted(s for s in steps if s <= pos.step) if steps is not None else None
        out["state_bytes"] += session.state.nbytes()
        out["weight_copy_bytes"] += sum(s.weight_copy_bytes() for s in session.sites)
        out["idle_state_bytes"] += sum(st.nbytes for _, _, st in session.idle_states())
        if session.config.offload_state:
            out["offload_slot_bytes"] = out.get("offload_slot_bytes", 0) + session.offload_slot_bytes()
        for s in session.sites:
            row = {"kind": s.kind, "path": s.path, "layer": s.layer, "steps": dict(s.steps),
                   "grouping": s.grouping, "state_bytes": sum(st.nbytes for st in s.states.values())}
            if s.regroup is not None and s.regroup[0].key:  # this generation's ids / rotary tables give another grid
                row["grouping_now"] = s.regroup[0].describe()
            offloaded = sum(1 for st in s.states.values() if st.offloaded)
            if offloaded:  # guidance branches (and block instances) whose caches live in host memory
                row["offloaded_branches"] = offloaded
            if s.attn_mass:  # the attention guard's measurement per layer (a host read, here only)
                row["attn_mass"] = {layer: round(float(m), 4) for layer, m in sorted(s.attn_mass.items())}
                row["dense_by_guard"] = sorted(layer for layer, v in s.attn_diffuse.items() if v)
            out["sites"].append(row)
        if session.step_cache is not None:
            out["step_cache"] = session.step_cache.summary()
    return out


def _inspect_config(model: Any, config: Any) -> tuple[ChipmunkConfig, str]:
    """The config `inspect` traces with, and where it came from."""
    if config is not None:
        return ChipmunkConfig.from_any(config), "config="
    sessions = sessions_of(model)
    if sessions:  # what the compiled model runs (several sessions: regional blocks, frames of one model)
        return ChipmunkConfig.from_any(sessions[0].config), "the compiled model's"  # (a copy)
    from .backend import split_options

    options = compiled_options(model)
    if options is not None:
        return split_options(options)[0], "the compiled model's options"
    return ChipmunkConfig(), "not compiled with chipmunk: config= sets another"


def _config_label(cfg: ChipmunkConfig) -> str:
    """The preset's name, with "changed" where the config is not that preset as written."""
    if cfg.name not in list_presets():
        return cfg.name  # a YAML file's own name
    same = ChipmunkConfig.from_any(cfg.name).to_dict() == {**cfg.to_dict(), "name": cfg.name}
    return cfg.name if same else f"{cfg.name}, changed"


def inspect(model: Any, *args, config: Any = None, **kwargs) -> Report:
    """Trace `model(*args, **kwargs)` and report every matched site and rejected candidate.

    The model runs once through Dynamo with its original ops (no chipmunk op, no Inductor). The config
    is `config` when given, else the one a model compiled with chipmunk runs (its sessions' once it
    has run, else its torch.compile options), else `default`; the report names it."""
    if not args and not kwargs:  # else the model's own "missing argument" error, from deep in Dynamo
        raise TypeError("chipmunk_compile.inspect(model, *args, config=None, **kwargs) traces one call of the "
                        "model: give that call's inputs (e.g. the tensors a pipeline passes the transformer at one "
                        "step)")
    from .backend import find_owner, frame_site_name
    from .rewrite import rewrite
    from .runtime import Session

    cfg, source = _inspect_config(model, config)
    report = Report(config=f"{_config_label(cfg)} ({source})")

    session = Session(cfg, None)  # one for all graphs: a grid seen before a graph break carries over

    def inspect_backend(gm, example_inputs, **_):
        owner, _, frame = find_owner(gm)  # a frame of no module names its rows by its code, as the backend does
        plan = rewrite(gm, cfg, session, apply_changes=False, example_inputs=example_inputs,
                       frame_name=frame_site_name(owner, frame))
        report.graphs += 1
        report.sites += [SiteRow(s.kind, s.pattern, s.path, s.layer, s.shapes, s.grouping) for s in plan.sites]
        report.rejected += [RejectedRow(r.kind, r.pattern, r.path, r.reason, r.shapes) for r in plan.rejections]
        return gm.forward

    target = getattr(model, "_orig_mod", model)
    if compiled_in_place(target):
        # compiled in place (`module.compile(...)`): its __call__ would run that compilation (a model
        # call: a step of its generation) and leave nothing to trace; trace what it compiled instead
        target = target._call_impl
    compiled = torch.compile(target, backend=inspect_backend, dynamic=False)
    with torch.no_grad():
        compiled(*args, **kwargs)
    return report
