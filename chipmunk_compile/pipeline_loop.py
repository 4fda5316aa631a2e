"""The pipeline whose loop calls a model: found on the call stack, with no glue from the user.

A diffusers pipeline's `__call__` runs the denoising loop: it holds the model (`pipe.transformer`)
and a scheduler whose `set_timesteps` ran before the loop. Two things come from it:
- the generation's step count (`scheduled_total`), which scales the refresh periods;
- the step itself: the scheduler's host-side `step_index` (`PipelineLoop`), so that a call need not
  read its timestep from the device, a read that makes the host wait for the GPU on every call
  (FLUX.1-dev at its published depth, H100: 1.5-2% of a generation).

Invariants:
- Only an object whose `__call__` is running on the stack now, that holds a scheduler with its
  timesteps set and, among its attributes, a module that is or contains the model, counts (any
  pipeline class, none named). `PipelineLoop` checks that on every call: at the stack depth where
  it last found the pipeline (the frame's code and its `self`, microseconds), else by a walk.
- A step is taken from a scheduler only if it keeps its own `step_index` (flow-matching, Euler,
  DPM, UniPC and most others). Schedulers without one (DDIM, DDPM, PNDM) are left alone: they are
  counted only when the user follows them explicitly (`follow_scheduler` wraps their `step`).
- Nothing is held strongly: the pipeline by a weak reference (an object that takes none is found
  again by a walk on each call), no frame at all.
"""

from __future__ import annotations

import logging
import sys
import weakref
from typing import Any, Optional

import torch

log = logging.getLogger("chipmunk_compile")


def scheduled_total(scheduler: Any) -> Optional[int]:
    """A followed scheduler's step count: the length of its `timesteps` (host metadata, no read;
    the whole schedule, also when an img2img loop begins part-way through it), None without one."""
    timesteps = getattr(scheduler, "timesteps", None) if scheduler is not None else None
    try:
        return len(timesteps) or None
    except TypeError:
        return None


def _holds(pipeline: Any, models: list) -> bool:
    """Whether one of `pipeline`'s attributes is a module that is or contains one of `models`."""
    try:
        parts = list(vars(pipeline).values())
    except TypeError:
        return False
    for part in parts:
        if isinstance(part, torch.nn.Module) and any(m is x for m in part.modules() for x in models):
            return True
    return False


def _pipeline_frame(models: list, frame) -> Optional[tuple]:
    """(pipeline, its scheduler, its `__call__` frame, that frame's depth above `frame`) of the
    innermost running pipeline call that holds one of `models`, else None."""
    depth = 0
    while frame is not None:
        if frame.f_code.co_name == "__call__":
            me = frame.f_locals.get("self")
            try:  # any object's __call__: its attribute lookups may raise anything
                scheduler = getattr(me, "scheduler", None) if me is not None else None
                if scheduled_total(scheduler) and _holds(me, models):
                    return me, scheduler, frame, depth
            except Exception:  # noqa: BLE001 — not a pipeline
                log.debug("chipmunk: no scheduler from a __call__ frame", exc_info=True)
        frame, depth = frame.f_back, depth + 1
    return None


def pipeline_scheduler(models: list) -> Any:
    """The scheduler of the pipeline whose loop calls one of `models` now: the innermost object on
    the call stack whose `__call__` is running and which holds a scheduler with timesteps
    (`set_timesteps` ran before the loop: `scheduled_total`) and, among its attributes, a module
    that is or contains one of `models` (torch.compile's wrapper around the model included). Any
    diffusers pipeline, none named. Walks the stack and the pipeline's modules: at a generation's
    first call only. Without one (a loop of the user's own) generations are scaled to a count once
    two in a row ran it. Until session 51 a pipeline's first two generations ran the periods as
    written (FLUX's pipeline at 20 steps: a schedule for 50), and the later ones scaled, so a seed
    gave another image in the first two generations than after."""
    if not models:
        return None
    found = _pipeline_frame(models, sys._getframe(1))
    return found[1] if found is not None else None


def steps_itself(scheduler: Any) -> bool:
    """Whether a scheduler keeps its own host-side step count (diffusers' `step_index` property)."""
    return scheduler is not None and hasattr(type(scheduler), "step_index")


class PipelineLoop:
    """Per session: the scheduler whose `step_index` gives the step of a call that a pipeline's
    `__call__` runs (module docstring), or None outside one. Remembers where it found the pipeline
    (its `__call__`'s code and the frame's depth above the caller), so a call inside the same loop
    costs a few frame hops, not a walk of the stack and of the pipeline's modules."""

    def __init__(self):
        self._code = None  # the pipeline's __call__ code, where it was found last
        self._depth = 0
        self._pipe: Optional[weakref.ref] = None

    def scheduler(self, models: list) -> Any:
        frame = sys._getframe(1)
        if self._code is not None:
            pipe = self._pipe() if self._pipe is not None else None
            up = frame
            for _ in range(self._depth):
                up = up.f_back
                if up is None:
                    break
            if pipe is not None and up is not None and up.f_code is self._code and up.f_locals.get("self") is pipe:
                scheduler = getattr(pipe, "scheduler", None)
                return scheduler if steps_itself(scheduler) and scheduled_total(scheduler) else None
        found = _pipeline_frame(models, frame) if models else None
        if found is None:
            self._code = None
            return None
        pipe, scheduler, where, self._depth = found
        self._code = where.f_code
        try:
            self._pipe = weakref.ref(pipe)
        except TypeError:  # takes no weak reference: found by a walk on every call
            self._code = self._pipe = None
        return scheduler if steps_itself(scheduler) else None
