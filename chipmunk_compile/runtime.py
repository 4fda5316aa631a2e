"""Step tracking and per-model sessions: the host-side state the ops read.

Invariants:
- One `Session` per compiled root module (or per graph when no module is found). It owns the
  `StepTracker`, the `ChipmunkState` module holding every cache buffer, and its sites.
- `StepTracker.advance` runs once per model call, in the backend's Python wrapper, before the
  compiled graph: the ops only read `(step, branch, generation)`; nothing in the graph syncs.
- Step and branch come from the pipeline's own signals, in this order: an explicit
  `set_step()`, the diffusers cache context (`transformer.cache_context("cond", step_index=...)`),
  a followed scheduler's `step_index` (`follow_scheduler`; the context's name, if any, still names
  the branch), else the scheduler of the pipeline whose `__call__` runs the call (`follow_pipeline`,
  pipeline_loop.py), the values of the timestep-like inputs (same values again = another CFG branch of the same step;
  back at the generation's first values, or moving against the schedule = a new generation), and
  only without any signal one call = one step (counted `step_signal_none`, logged once in "auto"
  mode: guidance calls are steps then, and no generation ends). Values that repeat for more than `MAX_BRANCHES`
  calls in a row are no step signal (token ids, say, and no timestep among the small inputs): the
  further calls stay on branch 0 of that step (counted, logged) instead of each opening a branch
  with caches of its own. A session that holds no site and that no session follows (a rotary
  table's frame) tracks quietly: its missing or constant signal is neither counted nor logged.
- A new generation bumps `generation`; caches filled in an older generation are never read.
- A session whose module lies inside another session's module (a submodule frame compiled on its
  own after a graph break: an MoE feed-forward, say) follows that enclosing session's step: it
  has no timestep input of its own, and it may be entered by several frames per model call.
  Only a session that has an entry graph (one that starts its module's forward, where the step
  advances) can be followed: a model whose own forward yields no graph but one of whose methods
  resumes in a graph after a break (Wan-Animate-2) has a session that never advances, and
  following it would pin every submodule at step 0. Until a session has an entry graph, the
  first resumed frame compiled for it begins its calls (`step_frame`): a forward that
  graph-breaks before its first op has its attention and MLP in resumed graphs only.
- A model whose own forward Dynamo skips (a graph break inside its loop over blocks: diffusers'
  FirstBlockCache and TaylorSeer hooks) has no session; the sessions of its frames with no step
  signal follow a `leader` inside the same model: a session whose entry graph reads a signal (the
  time embedding's), follows no one, and whose steps move. Frames of no module that hold sites (a
  hook's resumed frame) follow it too and are listed with that model (`sessions_of`).
- A call whose entry graph reads no signal takes it from the forward frame's locals when a resumed
  graph of the session reads it (`late_signals`, GLM-Image), else waits (`_defer_call`) until a
  following session's graph reads one (HiDream); the first op that reads the step, or the next
  call, begins it without one.
- State is made of plain tensors, never inference tensors (`plain_tensors`): a call under
  `torch.inference_mode()` may be followed by one under `torch.no_grad()`, which must still update it.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import sys
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from .compiled_options import compiled_in_place
from .pipeline_loop import PipelineLoop, pipeline_scheduler, scheduled_total
from .schedule import never_sparse, step_scale

log = logging.getLogger("chipmunk_compile")

_site_ids = itertools.count()
SITES: "weakref.WeakValueDictionary[int, Any]" = weakref.WeakValueDictionary()
_CONTEXTS: "weakref.WeakKeyDictionary[torch.nn.Module, Any]" = weakref.WeakKeyDictionary()
_SESSIONS: "weakref.WeakKeyDictionary[torch.nn.Module, Session]" = weakref.WeakKeyDictionary()
_SCHEDULERS: "weakref.WeakKeyDictionary[torch.nn.Module, Any]" = weakref.WeakKeyDictionary()
_SCHEDULER_ROOTS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()  # see _set_on
# set_step's pin per model ((step, branch), levels), for the sessions its first compile creates after it
_PINS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()
_PIN_ROOTS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()  # see _set_on
_lock = threading.Lock()
_entry_sessions = 0  # sessions with an entry graph so far: a change makes `enclosing` look again
_signalled_sessions = 0  # sessions whose entry graph reads a step signal: a change makes `leader` look again
_session_order = itertools.count()  # creation order of sessions (a leader is the first one created)


# While the graph runner records a CUDA graph: the list the ops append their deferred commits to
# (graphs.py). None otherwise. Recording happens on the calling thread, one graph at a time.
RECORDING: Optional[list] = None


@contextlib.contextmanager
def _outside_inference_mode():
    with torch.inference_mode(False), torch.no_grad():
        yield


def plain_tensors():
    """Context for the ops' bodies and the backend's own buffers: under `torch.inference_mode()`
    the tensors they make would be inference tensors, which no later call outside inference mode
    may update in place (a first generation under inference_mode and the next under no_grad raised
    "Inplace update to inference tensor outside InferenceMode" until session 40). Inside, tensors
    are plain and autograd is off; reading the caller's inference tensors is allowed there."""
    return _outside_inference_mode() if torch.is_inference_mode_enabled() else contextlib.nullcontext()


class NeedsEagerCall(RuntimeError):
    """Raised inside a recording when the call would allocate persistent state: the runner drops
    the recording and runs the call eagerly instead."""


def new_site_id() -> int:
    return next(_site_ids)


@dataclass
class StepPosition:
    step: int
    branch: str
    generation: int
    scale: Optional[float] = None  # the generation's step count over schedule_steps (schedule.step_scale)
    # the generation's noise level per step so far (schedule.steps_at_levels), None when unknown
    levels: Optional[tuple] = None


MAX_BRANCHES = 8  # guidance branches one step may have, by its repeated signal values


class StepTracker:
    def __init__(self, mode: str = "auto"):
        self.mode = mode
        self.explicit: Optional[tuple[int, Optional[str]]] = None
        # the pinned steps' noise levels (set_step's timesteps, `levels_of`), kept until clear_step
        self.pinned_levels: Optional[tuple] = None
        self.scale: Optional[float] = None  # set per call by Session.begin_call (schedule.step_scale)
        # a followed scheduler whose step index stood still over more calls than one step has
        # branches (the pipeline steps copies of it: SkyReels-V2's diffusion forcing); kept across
        # generations, cleared by follow_scheduler
        self.scheduled_stalled = False
        # () -> True while nothing reads this tracker's steps (a session with no site that no other
        # session follows: a rotary-table frame): its missing or constant signal is then not worth a
        # warning or a counted fallback (Session sets it)
        self.quiet: Optional[Callable[[], bool]] = None
        self._unsignalled = 0  # calls with no step signal (counted; logged from the second)
        self.from_context = False  # the last call's step came from a cache context or a scheduler
        # where the last call's step came from (`stats`): "set_step", "cache_context",
        # "followed_scheduler", "pipeline_scheduler", "timestep" or "calls"
        self.source: Optional[str] = None
        self.reset()

    def reset(self) -> None:
        self.generation = getattr(self, "generation", -1) + 1
        self.step = -1
        self.branch_index = 0
        self.branch = "0"
        self._last_sig: Optional[tuple] = None
        self._first_sig: Optional[tuple] = None
        self._direction: Optional[tuple[int, int]] = None  # (component, sign) of the schedule
        self._last_ctx_step: Optional[int] = None
        self._pinned_calls = False  # a call ran at a pinned step since the last reset
        self._repeats = 0  # calls in a row with the last signal values, after the first
        self._scheduled_repeats = 0  # calls in a row at the last followed-scheduler step, after the first
        # noise level of each step so far (its timestep over the first step's), from the signal's
        # values; None when they give none (rising, another batch, no signal): see `_level`. A step
        # from a scheduler or a cache context takes the session's (`Session._place_levels`).
        self.levels: Optional[tuple] = None

    @property
    def position(self) -> StepPosition:
        return StepPosition(max(self.step, 0), self.branch, self.generation, self.scale, self.levels)

    def _new_generation(self) -> None:
        explicit = self.explicit
        self.reset()
        self.explicit = explicit

    def advance(self, signature: Any = None, context: Any = None, scheduled: Optional[int] = None,
                by_pipeline: bool = False) -> StepPosition:
        """Advance by one model call. `signature` is a tuple of step-signal values, or a
        zero-argument callable producing it (read only when no better signal exists: reading
        device values costs a device→host copy). `scheduled`: the step of a followed scheduler
        (`follow_scheduler`, or with `by_pipeline` the running pipeline's: pipeline_loop.py), used
        when the context carries no step index."""
        name = getattr(context, "name", None) if context is not None else None
        self.from_context = False
        if self.explicit is not None:
            step, branch = self.explicit
            if step < self.step:  # the pinned step went back: a new generation
                self._new_generation()
            # pinned steps carry the levels set_step was given, else the scheduler's (Session._place_levels)
            self.levels = self.pinned_levels
            # no branch pinned: the cache context's name, else the calls at one step in call order
            # (until session 44 every call was branch "0": a pipeline's two guidance calls shared
            # one branch's caches, and its forecast divided by a zero step span: NaN)
            repeat = step == self.step and self._pinned_calls
            self.branch_index = (self.branch_index + 1) % MAX_BRANCHES if repeat else 0
            self._pinned_calls = True
            self.step = step
            self.branch = branch or (str(name) if name is not None else str(self.branch_index))
            self.source = "set_step"
            return self.position
        ctx_step = getattr(context, "step_index", None) if context is not None else None
        self.source = "cache_context"
        if ctx_step is None and scheduled is not None and not self.scheduled_stalled:
            same = scheduled == self._last_ctx_step
            self._scheduled_repeats = self._scheduled_repeats + 1 if same else 0
            if self._scheduled_repeats < MAX_BRANCHES:
                ctx_step = scheduled
                self.source = "pipeline_scheduler" if by_pipeline else "followed_scheduler"
            else:
                self._stop_following(by_pipeline)
        self.from_context = self.mode == "auto" and ctx_step is not None
        if self.from_context:
            self.levels = None  # the session's, from the scheduler (`Session._place_levels`)
            if self._last_ctx_step is not None:  # back to an earlier step: a new generation
                back = ctx_step < self._last_ctx_step
            else:  # the first step index after calls tracked otherwise, before their step (a
                # scheduler followed from the second generation on: until session 44 that generation
                # went on in the last one, its forecasts reading the last one's slopes; not at their
                # step, where a timestep-tracked call of the same step may just have begun one)
                back = 0 <= ctx_step < self.step
            if back:
                self._new_generation()
            # without a context name, calls at the same step are its guidance branches in call order
            self.branch_index = min(self.branch_index + 1, MAX_BRANCHES - 1) if ctx_step == self._last_ctx_step else 0
            self._last_ctx_step = ctx_step
            self.step = int(ctx_step)
            self.branch = str(name) if name is not None else str(self.branch_index)
            return self.position
        if callable(signature):
            signature = signature() if self.mode == "auto" else None
        if self.mode == "auto" and signature is not None:
            self.source = "timestep"
            self._advance_by_signature(signature)
        else:
            self.source = "calls"
            self.levels = None
            if self.mode == "auto" and not self._quiet():
                # logged from the second such call: a model whose signal only a resumed graph reads
                # (GLM-Image) lacks it on its first call alone, before that graph was compiled
                self._unsignalled += 1
                _no_step_signal(warn=self._unsignalled > 1)
            self.step += 1
            self.branch_index = 0
        self.branch = str(name) if name is not None else str(self.branch_index)
        return self.position

    def _stop_following(self, by_pipeline: bool) -> None:
        """The followed scheduler's step index stood still over MAX_BRANCHES + 1 calls: no pipeline
        gives one step that many guidance calls, so it is not the loop's scheduler (SkyReels-V2's
        diffusion forcing steps a copy per frame; until session 47 every call then ran as step 0,
        dense, with no speedup and nothing said). Steps come from the timesteps from here on, at the
        step reached (a device→host read per call, as without following)."""
        from .ops.sites import count

        self.scheduled_stalled = True
        self._last_ctx_step = None
        count("fallback:scheduler_not_advancing")
        whose = "the pipeline's scheduler" if by_pipeline else "the followed scheduler"
        log.warning("chipmunk: %s's step index stayed the same over %d model calls (the pipeline steps copies "
                    "of it?): following it stops, and the steps are read from the timesteps instead", whose,
                    MAX_BRANCHES + 1)

    def _advance_by_signature(self, sig: tuple) -> None:
        if self._last_sig is None:
            if self.step > 0:  # after steps pinned or followed (set_step, follow_scheduler, then
                self._new_generation()  # cleared): a generation of its own (until session 44 it went
                # on in the last one's number, its forecasts reading that generation's slopes)
            self.step, self.branch_index, self._first_sig, self.levels = 0, 0, sig, (1.0,)
        elif _same_values(sig, self._last_sig):  # the same step again: another guidance branch
            self._repeats += 1
            self.branch_index = self._repeats if self._repeats < MAX_BRANCHES else 0
            if self._repeats == MAX_BRANCHES and not self._quiet():
                from .ops.sites import fallback

                fallback("step_signal_constant", f"the small inputs' values were the same on {MAX_BRANCHES + 1} calls "
                         "in a row: they are no step signal, and every further call runs as branch 0 of this step. "
                         "Give the steps with chipmunk_compile.follow_scheduler / set_step, or step_signal='calls'")
        elif sig == self._first_sig or self._moves_backwards(sig):
            self._new_generation()
            self.step, self.branch_index, self._first_sig, self.levels = 0, 0, sig, (1.0,)
        else:
            if self._direction is None:
                self._direction = _direction(self._last_sig, sig)
            self.step += 1
            self.branch_index = self._repeats = 0
            level = self._level(sig) if self.levels is not None else None
            self.levels = None if level is None else self.levels + (level,)
        self._last_sig = sig

    def _level(self, sig: tuple) -> Optional[float]:
        """This step's noise level: the moving signal value over the generation's first (timesteps
        of any scale: FLUX's t/1000 as HunyuanVideo's t). None when the values do not fall from a
        positive first one (a timestep that rises towards the clean image: its scale is unknown) or
        the batch size changed."""
        first, direction = self._first_sig, self._direction
        if direction is None or len(sig) != len(first) or direction[0] >= len(sig):
            return None
        i, sign = direction
        try:
            value, start = float(sig[i]), float(first[i])
        except (TypeError, ValueError):
            return None
        if sign > 0 or not start > 0 or not value >= 0:
            return None
        return value / start

    def _quiet(self) -> bool:
        return self.quiet is not None and self.quiet()

    def _moves_backwards(self, sig: tuple) -> bool:
        last = self._last_sig
        if len(sig) != len(last):  # another batch size (a timestep per sample): compare the values
            sig, last = _distinct(sig), _distinct(last)  # (session 44: a batch change went on counting)
            if sig == _distinct(self._first_sig):
                return True
        if self._direction is None or len(sig) != len(last) or self._direction[0] >= len(sig):
            return False
        i, sign = self._direction
        return (sig[i] - last[i]) * sign < 0


def _no_step_signal(warn: bool = True) -> None:
    """Count a model call whose step came from counting calls in "auto" mode (no timestep-like
    input, no cache-context step index, no followed scheduler, no set_step), and say once what that
    means: a pipeline's guidance calls count as steps of their own and no later generation begins,
    so a second generation would read the first one's caches."""
    from .ops.sites import count

    count("step_signal_none")
    if warn:
        _warn_no_step_signal()


@functools.cache
def _warn_no_step_signal() -> None:
    log.warning("chipmunk: a model call has no step signal (no timestep-like input, no cache-context step index, "
                "no followed scheduler, no set_step): each call counts as one step, so guidance calls count as "
                "steps and no new generation is detected. Give the steps with "
                "chipmunk_compile.follow_scheduler(model, pipe.scheduler) or set_step, and call "
                "chipmunk_compile.reset(model) between generations")


def _same_values(a: tuple, b: tuple) -> bool:
    """One step's signal: equal, or of another batch size with the same values (SD3's skip-layer
    guidance call, batch 1 beside the batch-2 CFG call of its step, was counted as a step)."""
    return a == b or (len(a) != len(b) and _distinct(a) == _distinct(b))


def _distinct(sig: tuple) -> tuple:
    """The signal's values without repeats, in order: a batch's copies of one timestep are one value."""
    return tuple(dict.fromkeys(sig))


def _direction(a: tuple, b: tuple) -> Optional[tuple[int, int]]:
    if len(a) != len(b):
        return None
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i, (1 if y > x else -1)
    return None


class ChipmunkState(torch.nn.Module):
    """Owns every cache buffer of a session, as buffers named `<site>__<branch>__<name>`."""

    def put(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        self.register_buffer(name, tensor, persistent=False)
        return tensor

    def nbytes(self) -> int:
        return sum(b.untyped_storage().nbytes() for b in self.buffers())  # padded layouts: their pad too

    def rename(self, old_prefix: str, new_prefix: str) -> None:
        """Give the buffers named `old_prefix...` the names `new_prefix...` (a state that moved to
        another site: ops/twin_states.py)."""
        for name in [n for n in self._buffers if n.startswith(old_prefix)]:
            self._buffers[new_prefix + name[len(old_prefix):]] = self._buffers.pop(name)

    def clear(self, prefixes: tuple = ("",)) -> None:
        """Drop the buffers whose names start with one of `prefixes` (default: all)."""
        for name in [n for n in self._buffers if n.startswith(prefixes)]:
            del self._buffers[name]


class Session:
    """Everything chipmunk keeps for one compiled model."""

    def __init__(self, config, owner: Optional[torch.nn.Module]):
        self.config = config
        self._noted_counts: set = set()  # step counts _note_step_count has logged
        self._noted_dense_counts: set = set()  # step counts _note_no_sparse_step has logged
        self._all_dense_generation: Optional[int] = None  # the last generation it counted
        # the step count of the last two generations whose count nothing gave (timestep tracking),
        # when equal: later such generations are scaled to it (a server runs one count, FLUX's
        # pipeline 28); twice, so that a short warm-up generation does not scale the next one
        self._tracked_steps: Optional[int] = None
        self._last_tracked: Optional[int] = None
        self._count_used: Optional[int] = None  # the step count the last call's periods were scaled to
        # the step count of the pipeline whose loop runs this generation (pipeline_scheduler), looked
        # up at each generation's first call
        self._pipeline_steps: Optional[int] = None
        self._looked_in: Optional[int] = None  # the generation it was looked up in
        # the levels of the generation's scheduler (followed, else the pipeline's), when the config wants them
        self._scheduler_levels: Optional[tuple] = None
        # refreshes written as noise levels somewhere in the config: the steps' levels are needed
        self._wants_levels = config.attn.full_step_levels is not None or any(
            (patch.get("attn") or {}).get("full_step_levels") is not None for patch in config.overrides.values())
        self._levels_unknown_noted: Optional[int] = None  # the last generation counted attn_levels_unknown
        self._pipeline_loop = PipelineLoop()  # the pipeline whose loop runs the calls, when one does
        self.tracker = StepTracker(config.step_signal)
        me = weakref.ref(self)
        self.tracker.quiet = lambda: (s := me()) is None or (not s.sites and not s.followed)
        self.followed = False  # another session takes its steps from this one (enclosing, leader)
        self.state = ChipmunkState()
        self.sites: list[Any] = []
        self.owner = weakref.ref(owner) if owner is not None else None
        self.calls = 0
        self.step_cache = None  # set by the backend when step caching is on
        self.graph_pool = None  # CUDA-graph memory pool shared by the session's recordings
        self.graph_pool_users: "weakref.WeakSet" = weakref.WeakSet()  # live graphs recorded into it
        self._device_steps: dict = {}  # device -> [int64 (1,) tensor, value it holds, its fp32 copy or None]
        # the frames (file, first line, name) of the graphs compiled that start the module's forward (begin_call)
        self.entry_frames: set = set()
        self.step_frame: Optional[tuple] = None  # without one: the resumed frame whose graphs begin calls
        self._parent: Optional["weakref.ref[Session]"] = None
        self._parent_checked_at = None  # (sessions, entry sessions) when the enclosing one was looked for
        self.order = next(_session_order)
        self.signalled = False  # an entry graph of this session reads a step signal (a timestep input)
        self._root: Optional["weakref.ref[torch.nn.Module]"] = None  # the model running its module (note_root)
        self._leader: Optional["weakref.ref[Session]"] = None
        self._leader_checked_at = None  # (sessions, signalled sessions) when no leader was found
        # (_tree_version, the root's modules held weakly): a freed module's reused id is no member
        self._inside: Optional[tuple] = None
        self._pending: Optional[tuple] = None  # (module,) of a call begun by _defer_call, not yet advanced
        # frame-local names of step signals that only a resumed graph reads (backend.frame_signature)
        self.late_signals: set = set()
        self._dead_sites: list[int] = []  # ids of sites whose compiled graph was freed (see watch)
        self._offload: dict = {}  # device -> ops.offload.StateOffload (config offload_state)
        self.call_layout: Any = None  # input layout of the step graph being called (graphs.GraphRunner)
        # entry frame -> the GraphInstances its graphs share (backend): one numbering of the blocks,
        # and one first block that begins a model call, however many graphs Dynamo compiled for it
        self.frame_instances: "weakref.WeakValueDictionary[tuple, Any]" = weakref.WeakValueDictionary()

    def idle_states(self) -> list[tuple]:
        """(site, state key, state) of every site state that the current generation has not called
        (another resolution's or batch's, kept for its return: `state_shapes`; a static graph's that
        a graph with symbolic shapes has replaced), the least recently used first."""
        generation = self.position().generation
        idle = [(st.used_generation, i, site, key, st) for site in self.sites
                for i, (key, st) in enumerate(site.states.items()) if st.used_generation != generation]
        return [t[2:] for t in sorted(idle, key=lambda t: t[:2])]

    def drop_idle_states(self, need: Optional[int] = None) -> int:
        """Free the caches of the idle states (`idle_states`), the least recently used first, until
        `need` bytes are freed (all of them when None); returns the bytes freed. For when memory runs
        short: such a shape, when it returns, allocates and records again."""
        freed = 0
        for site, key, st in self.idle_states():
            if need is not None and freed >= need:
                break
            del site.states[key]
            freed += st.nbytes
            st.drop()
        if freed:
            from .ops.sites import count

            count("state_idle_dropped")
            log.info("chipmunk: memory is short: %.2f GiB of caches of other shapes freed", freed / 2**30)
        return freed

    def offload(self, device) -> Any:
        """The device's `StateOffload` when the config may keep site caches in host memory, else None."""
        if not self.config.offload_state:
            return None
        device = torch.device(device)
        off = self._offload.get(device)
        if off is None:
            from .ops.offload import StateOffload

            off = self._offload[device] = StateOffload(device, self.config.offload_state, self.config.offload_reserve)
        return off

    def offload_slot_bytes(self) -> int:
        return sum(off.device_bytes() for off in self._offload.values())

    def watch(self, compiled: Any, sites: list) -> None:
        """Free `sites` (registry entries, caches) once `compiled`, the function the backend
        returned for their graph, is garbage-collected: after torch._dynamo.reset() a model
        compiled again would otherwise keep the first compile's caches too (twice the memory).
        The finalizer only records the ids (it may run inside any allocation); `prune` frees them
        at the next compile or report."""
        ids = [s.id for s in sites]
        if ids:
            weakref.finalize(compiled, self._dead_sites.extend, ids)

    def prune(self) -> int:
        """Forget the sites of freed graphs; returns how many."""
        if not self._dead_sites:
            return 0
        dead, self._dead_sites[:] = set(self._dead_sites), []
        self.sites = [s for s in self.sites if s.id not in dead]
        self.state.clear(tuple(f"s{i}__" for i in dead))
        for i in dead:
            SITES.pop(i, None)
        self.plans = [p for p in getattr(self, "plans", []) if not any(s.id in dead for s in p.sites)]
        log.info("chipmunk: %d sites of freed graphs released", len(dead))
        return len(dead)

    def device_step(self, device, step: int) -> torch.Tensor:
        """The current step as a 1-element int64 tensor on `device` (read by random draws inside
        recorded graphs). Written outside any recording: the graph runner calls this before each
        capture and replay, so during a recording the value is already current. Also keeps the
        fp32 copy (`device_step_float`) current once one exists."""
        entry = self._device_steps.get(device)
        if entry is None:
            if RECORDING is not None:
                raise NeedsEagerCall("device step tensor not allocated before recording")
            with plain_tensors():
                entry = self._device_steps[device] = [torch.zeros(1, dtype=torch.int64, device=device), 0, None]
        if entry[1] != step:
            if RECORDING is not None:
                raise NeedsEagerCall("device step tensor not prepared before recording")
            entry[0].fill_(step)
            if entry[2] is not None:
                entry[2].fill_(float(step))
            entry[1] = step
        return entry[0]

    def device_step_float(self, device, step: int) -> torch.Tensor:
        """The current step as a 0-dim fp32 tensor on `device`, kept with `device_step`: the residual
        forecasts of every site read it, where a cast per site would be one more kernel each."""
        self.device_step(device, step)
        entry = self._device_steps[device]
        if entry[2] is None:
            if RECORDING is not None:
                raise NeedsEagerCall("fp32 device step not allocated before recording")
            with plain_tensors():
                entry[2] = torch.full((), float(step), dtype=torch.float32, device=device)
        return entry[2]

    @property
    def has_entry(self) -> bool:
        """Whether an entry graph of this session's module was compiled."""
        return bool(self.entry_frames)

    def mark_entry(self, frame: tuple) -> None:
        """Record that an entry graph of this session's module was compiled, from `frame` (file, first
        line, name of the code Dynamo traced)."""
        global _entry_sessions
        if not self.entry_frames:
            _entry_sessions += 1
        self.entry_frames.add(frame)

    def enclosing(self) -> Optional["Session"]:
        """The outermost other session with an entry graph whose module contains this session's
        module, if any."""
        parent = self._parent() if self._parent is not None else None
        checked = (len(_SESSIONS), _entry_sessions)
        if parent is not None or self.owner is None or self._parent_checked_at == checked:
            return parent
        self._parent_checked_at = checked
        owner = self.owner()
        best, size = None, 0
        for module, session in list(_SESSIONS.items()):
            if session is self or module is owner or not session.has_entry:
                continue
            mods = list(module.modules())
            if len(mods) > size and any(m is owner for m in mods):
                best, size = session, len(mods)
        if best is not None:
            best.followed = True
            self._parent = weakref.ref(best)
            log.info("chipmunk: %s follows the steps of %s", type(owner).__name__,
                     type(best.owner()).__name__ if best.owner is not None else "?")
        return best

    def mark_signalled(self) -> None:
        """Record that an entry graph of this session reads a step signal: it tracks its own steps."""
        global _signalled_sessions
        if not self.signalled:
            self.signalled = True
            _signalled_sessions += 1

    def note_root(self, root: Optional[torch.nn.Module]) -> None:
        """Record the model whose forward was running when a graph of this session's module compiled
        (`stack_root`: the outermost module on the stack that contains it), if any."""
        global _sessions_version
        if root is not None and self._root is None:
            if self.owner is None:  # the model itself, not torch.compile's wrapper around it
                root = getattr(root, "_orig_mod", root)
            self._root = weakref.ref(root)
            if self.owner is None:  # listed for its model (sessions_of): stats, reset, release, set_step
                _OWNERLESS.add(self)
                _sessions_version += 1

    def leader(self) -> Optional["Session"]:
        """For a session with no step signal and no enclosing session: a session with a signalled
        entry graph whose module lies inside the same model (`note_root`). A model whose own forward
        Dynamo skips (a graph break inside its loop over blocks: diffusers' cache hooks, a block that
        breaks) has no session; its time embedding, its blocks and its output norm are frames of
        their own. The blocks then take their steps from the time embedding's session, which reads
        the timestep: guidance branches and new generations included (until session 50 each block
        counted its own calls, and no generation ever ended). Among several such sessions the
        first created whose steps have moved is kept (a rotary-table frame reads position ids that
        never change); until one has moved, the first created serves."""
        if self.signalled or self._root is None:
            return None
        lead = self._leader() if self._leader is not None else None
        if lead is not None:
            return lead
        checked = (len(_SESSIONS), _signalled_sessions)
        if self._leader_checked_at == checked:
            return None
        root = self._root()
        if root is None:
            return None
        _ensure_tree_hook()
        if self._inside is None or self._inside[0] != _tree_version:
            self._inside = (_tree_version, weakref.WeakSet(root.modules()))
        # a leader tracks its own steps: signalled, and following no enclosing session (HiDream's
        # model session encloses its signalled time embedding and would follow it: a cycle)
        found = [s for m, s in list(_SESSIONS.items())
                 if s is not self and s.signalled and s.has_entry and m in self._inside[1] and s.enclosing() is None]
        moving = [s for s in found if s.tracker.step > 0 or s.tracker.generation > 0]
        if not moving:  # look again on the next call, when a step may have moved
            self._leader_checked_at = None if found else checked
            lead = min(found, key=lambda s: s.order) if found else None
            if lead is not None:
                lead.followed = True
            return lead
        lead = min(moving, key=lambda s: s.order)
        lead.followed = True
        self._leader = weakref.ref(lead)
        log.info("chipmunk: %s follows the steps of %s (its model's forward yields no graph)",
                 type(self.owner()).__name__ if self.owner is not None else "?",
                 type(lead.owner()).__name__ if lead.owner is not None else "?")
        return lead

    def step_parent(self) -> Optional["Session"]:
        """The session whose steps this one follows: the enclosing one, else a leader, else none."""
        parent = self.enclosing()
        return parent if parent is not None else self.leader()

    def position(self) -> StepPosition:
        if self._pending is not None:  # an op reads the step before any signal of this call came
            self._resolve(None)
        parent = self.step_parent()
        return parent.position() if parent is not None else self.tracker.position

    def _defer_call(self, module: Optional[torch.nn.Module]) -> None:
        """Begin a model call whose entry graph reads no step signal only once a later graph of the
        same call gives one (`begin_call` of a following session, or `resolve_pending`): HiDream reads
        the timestep in its timestep embedding's frame, which follows the model's session (until
        session 50 every such call was a step of its own, with no signal). The first op that reads
        the step, or the next call, begins it without a signal."""
        if self._pending is not None:  # the last call never gave one
            self._resolve(None)
        self._pending = (module,)

    def resolve_pending(self, signature: Any) -> None:
        """Begin the deferred call of this session, or of the session it follows, with `signature`
        (a tuple of step-signal values, or a callable giving it) when there is one."""
        owner = next((s for s in (self, self.step_parent()) if s is not None and s._pending is not None), None)
        if owner is None:
            return
        sig = signature() if callable(signature) else signature
        if sig is not None:
            owner._resolve(sig)

    def _resolve(self, signature: Any) -> None:
        (module,), self._pending = self._pending, None
        self._begin(signature, module)

    def begin_call(self, signature: Any, module: Optional[torch.nn.Module] = None, deferrable: bool = False) -> None:
        """Advance the step for a model call that `module` (the block that begins it, when the
        graph knows it) runs in: the cache context and followed scheduler set on its model come
        first, the owner's second (a second model sharing the graph runs in its own model's
        context; one scheduler followed for either model serves both). `deferrable`: the entry
        graph reads no signal, so the call waits for a later graph's (`_defer_call`)."""
        parent = self.step_parent()
        if parent is not None:  # the enclosing model's (or the leader's) call already advanced the step
            self.calls += 1
            parent.resolve_pending(signature)  # unless it waits for this call's signal
            return
        if deferrable:
            self._defer_call(module)
            return
        if self._pending is not None:
            self._resolve(None)
        self._begin(signature, module)

    def _begin(self, signature: Any, module: Optional[torch.nn.Module]) -> None:
        models = [m for m in (module, self.owner() if self.owner is not None else None) if m is not None]
        context = next((c for c in map(context_for, models) if c is not None), None)
        scheduler = followed = next((s for s in map(scheduler_for, models) if s is not None), None)
        self.calls += 1
        t = self.tracker
        if followed is None and self.config.follow_pipeline and t.mode == "auto" and t.explicit is None \
                and not t.scheduled_stalled:
            scheduler = self._pipeline_loop.scheduler(models)  # the running pipeline's: no timestep read
        by_pipeline = followed is None and scheduler is not None
        generation, steps, scaled_to = t.generation, max(t.step, 0) + 1, self._count_used  # the ending generation's
        told = self.config.steps or scheduled_total(scheduler)
        given = told or self._pipeline_steps  # what gave the ending generation its count, if anything
        t.advance(signature, context, scheduled_step(scheduler), by_pipeline)
        if t.generation != generation:  # the last one ended: its step count is known now
            if not given and steps >= 2 and t.explicit is None and t.mode == "auto":
                # tracked by its timesteps (not pinned, not counted calls): the next generations are
                # scaled to a count seen twice
                self._tracked_steps = steps if steps == self._last_tracked else None
                self._last_tracked = steps
            self._note_step_count(steps, scaled_to, given)
            self._note_no_site()
        if (not told or self._wants_levels) and self._looked_in != t.generation:  # once per generation
            self._looked_in = t.generation
            found = scheduler if by_pipeline else pipeline_scheduler(models)  # (found already: no walk)
            self._pipeline_steps = scheduled_total(found)
            if self._wants_levels:
                self._scheduler_levels = scheduler_levels(scheduler if scheduler is not None else found)
        self._count_used = told or self._pipeline_steps or self._tracked_steps
        t.scale = step_scale(self._count_used, self.config.schedule_steps)
        if self._wants_levels:
            self._place_levels()
        if t.scale is not None and t.generation != self._all_dense_generation:
            self._note_no_sparse_step(self._count_used, t.scale, t.generation)

    def _place_levels(self) -> None:
        """The steps' noise levels for refreshes written as levels: a step from a cache context or a
        scheduler takes them from the followed scheduler, else the pipeline's on the call stack
        (`scheduler_levels`, read once per generation, at its first call); a step from the timestep
        signal has its own (`StepTracker._level`); a pinned step those given to `set_step`, else
        the scheduler's as a cache context's step. A generation with none runs the period: counted
        once and logged."""
        t = self.tracker
        if t.from_context or (t.explicit is not None and t.levels is None):
            t.levels = self._scheduler_levels
        if t.levels is None and self._levels_unknown_noted != t.generation and not t._quiet():
            from .ops.sites import fallback

            self._levels_unknown_noted = t.generation
            fallback("attn_levels_unknown", "attn.full_step_levels needs the steps' timesteps (a falling "
                     "timestep input, or a diffusers scheduler: follow_scheduler or the pipeline's); this "
                     "generation has none, so its attention refreshes every full_step_every steps")

    def _note_no_site(self) -> None:
        """Count and log once per model that a generation ended with no site anywhere in it: every
        attention and MLP ran outside chipmunk's graphs (code under `torch.compiler.disable`, as
        diffusers' MagCache hooks wrap the blocks in) or was rejected (fewer tokens than
        `min_tokens`, an unmatched spelling). The outputs are the dense model's, with no speedup."""
        model = self._root() if self._root is not None else (self.owner() if self.owner is not None else None)
        if model is None or model in _NOTED_NO_SITE or any(s.sites for s in sessions_of(model)):
            return
        from .ops.sites import count

        _NOTED_NO_SITE.add(model)
        count("generation_no_site")
        log.warning("chipmunk: a generation of %s ended with no attention or MLP rewritten: each ran outside "
                    "chipmunk's graphs (code under torch.compiler.disable, as diffusers' MagCache hooks wrap "
                    "the blocks in) or was rejected; chipmunk_compile.inspect(model, *inputs) lists the "
                    "candidates and why. Nothing runs sparse: the outputs are the dense model's",
                    type(getattr(model, "_orig_mod", model)).__name__)

    def _note_no_sparse_step(self, steps: int, scale: float, generation: int) -> None:
        """Count a generation whose step count leaves neither op a sparse step (a few-step
        sampler): it runs exactly as the dense model, with no speedup; log that once per count."""
        from .ops.sites import count

        ops = [(kind, c) for kind, c in (("attention", self.config.attn), ("mlp", self.config.mlp)) if c.enabled]
        if not ops or not all(never_sparse(kind, c, scale) for kind, c in ops):
            return
        self._all_dense_generation = generation
        count("generation_all_dense")
        if steps in self._noted_dense_counts:
            return
        self._noted_dense_counts.add(steps)
        log.warning("chipmunk: a generation of %d steps runs dense throughout: the periods written for %d "
                    "steps (schedule_steps) scale to 1 step, which leaves no sparse step. Few-step samplers "
                    "change the activations too much between steps for cached deltas (on the tiny DiT, "
                    "`default` as written at 4-8 steps: 25 dB against dense). To run sparse steps anyway, "
                    "set schedule_steps: null (the periods as written) or shorter periods for this count",
                    steps, self.config.schedule_steps)

    def _note_step_count(self, steps: int, scaled_to: Optional[int], told) -> None:
        """Log once per count that a generation ran another step count than its periods were scaled
        to (as written: none) while nothing gave its count (timestep tracking, set_step). Since
        session 47 the next such generations are scaled to the count of the last two, when equal."""
        if told or not self.config.schedule_steps or steps < 2 or steps == (scaled_to or self.config.schedule_steps) \
                or steps in self._noted_counts:
            return
        self._noted_counts.add(steps)
        log.info("chipmunk: a generation ran %d steps; the schedule's periods are written for %d "
                 "(schedule_steps) and ran %s. Generations tracked by their timesteps outside a pipeline are "
                 "scaled to a step count once two in a row ran it; give the count (config steps=%d, or "
                 "chipmunk_compile.follow_scheduler) to scale every generation from its first step: on the tiny "
                 "DiT the default preset gives 29.3 dB against dense at 28 steps as written, 33.4 dB scaled",
                 steps, self.config.schedule_steps,
                 "as written" if scaled_to is None else f"scaled to {scaled_to} steps", steps)

    def adopt(self, module: torch.nn.Module) -> None:
        """Make this session `module`'s too: a block of another model that the session's graph
        serves (two models of one class, each compiled, share one Dynamo graph: Wan 2.2's two
        experts). Without it `stats`, `reset`, `release`, `set_step` and `follow_scheduler`'s lookup
        on the second model found no session (`set_step` raised) though its calls ran here. A module
        with a session of its own keeps it."""
        global _sessions_version
        with _lock:
            if module in _SESSIONS:
                return
            _SESSIONS[module] = self
            _sessions_version += 1
        log.info("chipmunk: %s shares the compiled graph (and the steps) of %s", type(module).__name__,
                 type(self.owner()).__name__ if self.owner is not None and self.owner() is not None else "?")

    def new_generation(self) -> None:
        """The next call begins a generation (a dense step refills every cache it reads); caches and
        step graphs stay, as when the tracker detects a new generation itself."""
        self._pending = None  # a call deferred before the reset belongs to no generation
        self.tracker.reset()

    def release(self) -> None:
        """A new generation, with every cache (homes of offloaded branches and their device slots
        included), weight copy, step-cache output and recorded step graph freed."""
        from .graphs import release_recordings

        self._pending = None
        self.tracker.reset()
        for device in self._offload:  # no copy on the offload stream may outlive its slots
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        self._offload.clear()
        self.state.clear()
        for site in self.sites:
            site.drop_states()
            site.drop_weight_copies()
        if self.step_cache is not None:
            self.step_cache.reset()
        release_recordings(self)


_ROOTS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()  # see _set_on


def context_for(module: torch.nn.Module) -> Any:
    """The diffusers cache context set on `module` or on a model that contains it (regional
    compilation compiles blocks, while pipelines set the context on the whole transformer)."""
    return _set_on(_CONTEXTS, _ROOTS, module)


def scheduler_for(module: torch.nn.Module) -> Any:
    """The scheduler that `follow_scheduler` set on `module` or on a model that contains it."""
    return _set_on(_SCHEDULERS, _SCHEDULER_ROOTS, module)


def _set_on(registry, roots, module: torch.nn.Module) -> Any:
    """registry[module], else registry[the registered model that contains module]. Which model
    contains it (or none) is kept per module in `roots` while the module tree (`_tree_version`) and
    the registered models stay the same, so a model under none of them is not walked on every call.
    Kept as a weak reference: a strong one would keep the module, the weak key, alive through its
    own value (the whole model, never freed)."""
    value = registry.get(module)
    if value is not None or not registry:
        return value
    _ensure_tree_hook()
    models = list(registry.keys())
    key = (_tree_version, tuple(id(m) for m in models))
    kept = roots.get(module)
    if kept is not None and kept[0] == key:
        root = kept[1]() if kept[1] is not None else None
        if root is not None or kept[1] is None:
            return registry.get(root) if root is not None else None
    root = next((c for c in models if c is not module and any(m is module for m in c.modules())), None)
    roots[module] = (key, weakref.ref(root) if root is not None else None)
    return registry.get(root) if root is not None else None


def scheduled_step(scheduler: Any) -> Optional[int]:
    """A followed diffusers scheduler's step, host state only: `step_index` counts its `step()` calls
    since `set_timesteps` and is None before the first one (step 0 of a generation); a scheduler
    without one has the count `count_scheduler_steps` keeps. Counted from the scheduler's
    `begin_index`: an img2img / inpaint / video2video pipeline starts its loop part-way through the
    schedule (`set_begin_index(t_start)`), and its first `step()` jumps `step_index` to t_start + 1.
    Until session 46 those generations ran steps 0, t_start + 1, ...: no refresh before their first
    sparse steps (cache-not-filled fallbacks) and another schedule than timestep tracking's 0, 1, ...."""
    if scheduler is None:
        return None
    index = getattr(scheduler, "step_index", getattr(scheduler, "_chipmunk_step_index", None))
    if index is None:
        return 0
    begin = getattr(scheduler, "begin_index", None)
    return max(int(index) - int(begin or 0), 0)


def scheduler_levels(scheduler: Any) -> Optional[tuple]:
    """A scheduler's noise level per step of its loop: its timesteps from `begin_index` on, over the
    first of them (schedule.steps_at_levels). One read of `timesteps` (a device→host copy where the
    scheduler keeps them on the GPU), once per generation, outside any graph. None without a
    scheduler, or for timesteps that do not fall from a positive first one."""
    timesteps = getattr(scheduler, "timesteps", None) if scheduler is not None else None
    if timesteps is None:
        return None
    return levels_of(timesteps, int(getattr(scheduler, "begin_index", None) or 0))


_PINNED_READ: Optional[tuple] = None  # (weak reference to the timesteps tensor set_step read last, its version, levels)


def pinned_levels_of(timesteps: Any) -> Optional[tuple]:
    """`levels_of` for `set_step`, which a loop may give the same timesteps on every step: a tensor
    read before and unchanged since (its version counter) is not read again, since each read of a
    device tensor is a device→host copy that waits for the GPU (the sync set_step exists to avoid).
    Inference tensors keep no version: read every time."""
    global _PINNED_READ
    if not isinstance(timesteps, torch.Tensor):
        return levels_of(timesteps)
    version = None if timesteps.is_inference() else timesteps._version
    hit = _PINNED_READ
    if hit is not None and version is not None and hit[0]() is timesteps and hit[1] == version:
        return hit[2]
    levels = levels_of(timesteps)
    _PINNED_READ = (weakref.ref(timesteps), version, levels)
    return levels


def levels_of(timesteps: Any, begin: int = 0) -> Optional[tuple]:
    """Noise levels of a generation's steps from its timesteps (or sigmas, any scale), from step
    `begin` on: each over the first. None for values that are not numbers or do not fall from a
    positive first one (a rising timestep: its scale is unknown)."""
    try:
        values = [float(v) for v in (timesteps.tolist() if torch.is_tensor(timesteps) else timesteps)][begin:]
    except (TypeError, ValueError):
        return None
    if not values or not values[0] > 0 or any(b > a for a, b in zip(values, values[1:])):
        return None
    return tuple(v / values[0] for v in values)


def count_scheduler_steps(scheduler: Any) -> None:
    """Count a scheduler's `step()` calls since its last `set_timesteps` in `_chipmunk_step_index`,
    as diffusers' `step_index` does, by wrapping both methods on the instance (once). For the
    schedulers that have no step index (DDIM, DDPM, PNDM, CogVideoX's): until session 44
    `follow_scheduler` refused them and their calls read the timestep from the device."""
    if getattr(scheduler, "_chipmunk_counts_steps", False):
        return
    step, set_timesteps = scheduler.step, scheduler.set_timesteps

    def counted_step(*args, **kwargs):
        out = step(*args, **kwargs)
        scheduler._chipmunk_step_index = (scheduler._chipmunk_step_index or 0) + 1
        return out

    def counted_set_timesteps(*args, **kwargs):
        scheduler._chipmunk_step_index = None
        return set_timesteps(*args, **kwargs)

    scheduler.step, scheduler.set_timesteps = counted_step, counted_set_timesteps
    scheduler._chipmunk_step_index = None
    scheduler._chipmunk_counts_steps = True


def stack_modules() -> list[torch.nn.Module]:
    """The nn.Modules whose forward (or __call__) is running on the Python call stack, innermost
    first, each once."""
    out, frame = [], sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name in ("forward", "__call__", "_call_impl", "_wrapped_call_impl"):
            me = frame.f_locals.get("self")
            if isinstance(me, torch.nn.Module) and not any(me is m for m in out):
                out.append(me)
        frame = frame.f_back
    return out


def stack_root(module: torch.nn.Module, stack: Optional[list] = None) -> Optional[torch.nn.Module]:
    """The outermost other module on the call stack (`stack_modules()`, or `stack`) whose
    submodules include `module`; None when there is none."""
    for root in reversed(stack if stack is not None else stack_modules()):
        if root is not module and any(m is module for m in root.modules()):
            return root
    return None


def indexed_path(name: str) -> bool:
    """Whether a module path has an index (`transformer_blocks.3.attn`): the module is, or lies in,
    one of a list of blocks."""
    return any(part.isdigit() for part in name.split("."))


def frame_block(module: Optional[torch.nn.Module], stack: Optional[list] = None) -> tuple:
    """(block, root) for a graph of `module`'s forward (None: a frame of no module, a hook's resumed
    frame around an attention) running now. `root` is the outermost module on the call stack that
    contains `module` (for a frame of no module: the outermost one). `block` is the outermost of
    `module` and the modules on the stack that hold it whose path in `root` has an index
    (`transformer_blocks.3`, not the model or torch.compile's wrapper around it); None when none has
    one (a whole model is no block). (None, None) when the stack shows no root."""
    stack = stack_modules() if stack is None else stack
    root = stack[-1] if module is None and stack else stack_root(module, stack) if module is not None else None
    if root is None:
        return None, None
    names = {id(m): n for n, m in root.named_modules()}
    holders = [m for m in stack if m is not root and (module is None or any(x is module for x in m.modules()))]
    if module is not None and not any(m is module for m in holders):
        holders.insert(0, module)  # (compiling: its forward is not on the stack yet)
    indexed = [m for m in holders if indexed_path(names.get(id(m), ""))]
    return (indexed[-1] if indexed else None), root


def note_site_frame(module: Optional[torch.nn.Module]) -> None:
    """Record that a graph with sites compiled as a frame of its own inside a model: a block Dynamo
    compiles apart because the model's forward was skipped (a graph break in its loop over blocks,
    as diffusers' cache hooks make), or a hook's frame around a block's attention (`module` None).
    `module_position` numbers the blocks of the recorded classes together, in model order."""
    block, root = frame_block(module)
    if block is not None:
        _SITE_FRAME_KINDS.setdefault(root, set()).add(type(block))


def _outermost(mods: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """`mods` less those inside another of them."""
    inside = {id(sub) for m in mods for sub in m.modules() if sub is not m}
    return [m for m in mods if id(m) not in inside]


def module_position(kind: Optional[type]) -> tuple[Optional[int], Optional[torch.nn.Module], Optional[torch.nn.Module]]:
    """(where, which, root) for a graph of `kind`'s forward (None: a frame of no module) that serves
    several modules: the innermost `kind` module running on the call stack (for a frame of no module,
    its block: `frame_block`), the outermost module on the stack that contains it (itself when none
    does: a whole model), and where it sits in that root, in model order, so that layer numbers are
    those of whole-model compilation (FLUX's 19 double then 38 single blocks count 0..56):
    - among the modules compiled on their own (`module.compile()`, as compile_repeated_blocks does);
    - else its block (`frame_block`) among the blocks of the classes that compiled graphs with sites
      as frames of their own in this root (`note_site_frame`), less those nested in another. Until
      session 51 this tier was missing: each class counted from 0 (under FirstBlockCache FLUX's
      `first_n_dense_layers: 2` kept two double and two single blocks dense), and the attentions of
      TaylorSeer's hook frames were numbered per graph, by first sight;
    - else among the modules of its class.
    The position is None when the stack shows no such pair, the module and root when the stack
    shows none. Walks the frames and the model's module tree: for a block's first call (or first
    call at new weight addresses) only."""
    stack = stack_modules()
    if kind is None:  # the block is not the module the graph's weights belong to: not returned
        inner, (block, root) = None, frame_block(None, stack)
    else:
        inner = next((m for m in stack if isinstance(m, kind)), None)
        block, root = frame_block(inner, stack) if inner is not None else (None, None)
    if root is None:
        return None, inner, inner
    mods = list(root.modules())  # (for a frame of no module, inner is None: only its block is placed)
    kinds = _SITE_FRAME_KINDS.get(root, ())
    for peers, me in (([m for m in mods if compiled_in_place(m)], inner),
                      (_outermost([m for m in mods if type(m) in kinds]), block),
                      ([m for m in mods if type(m) is type(inner)], inner)):
        if any(m is me for m in peers):
            return next(i for i, m in enumerate(peers) if m is me), inner, root
    return None, inner, root


def session_for(owner: Optional[torch.nn.Module], config, frame: tuple = (),
                root: Optional[torch.nn.Module] = None) -> Session:
    """The session of `owner`, created on first use; the config of the first compile wins.

    `frame`, `root`: an entry frame of `owner`'s forward being compiled and the model running it.
    A module with no session yet joins the session of another module of its class in the same model
    that compiled that frame: a recompile for a later block under regional compilation (FLUX's
    second single block, whose input strides differ from the first's) serves the earlier blocks from
    then on too, and in one session their steps and caches carry on across the two graphs
    (twin_states.py). Until session 67 it was a session of its own: the first block's caches were
    left behind in the first graph, and it refilled them in the middle of a generation."""
    global _sessions_version
    if owner is None:
        return Session(config, None)
    with _lock:
        session = _SESSIONS.get(owner)
        if session is not None:
            session.prune()
        wanted = config.to_dict()
        if session is None and frame and root is not None:
            session = next((s for m, s in _SESSIONS.items()
                            if m is not owner and type(m) is type(owner) and frame in s.entry_frames
                            and s._root is not None and s._root() is root and s.config.to_dict() == wanted), None)
            if session is not None:
                _SESSIONS[owner] = session
                _sessions_version += 1
                log.info("chipmunk: %s joins the session of another of its class: a graph compiled again for it "
                         "serves the same blocks", type(owner).__name__)
                return session
        if session is None or session.config.to_dict() != wanted:
            if session is not None:
                log.info("chipmunk: new config for %s: caches dropped", type(owner).__name__)
            session = Session(config, owner)
            pin = _set_on(_PINS, _PIN_ROOTS, owner)  # set_step before the compile that made this session
            if pin is not None:
                session.tracker.explicit, session.tracker.pinned_levels = pin
            _SESSIONS[owner] = session
            _sessions_version += 1
        return session


_sessions_version = 0  # bumped whenever a session is created or replaced (session_for)
_tree_version = 0  # bumped whenever any module registers a submodule (a global torch hook, installed once)
_tree_hook = None
_SESSIONS_OF: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()
# sessions of graphs that belong to no module but hold sites (a hook's resumed frame around an
# attention), with the model they ran in (Session.note_root)
_OWNERLESS: "weakref.WeakSet[Session]" = weakref.WeakSet()
_NOTED_NO_SITE: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()  # models _note_no_site logged
# per model: the classes of its modules whose forward compiled a graph with sites on its own (note_site_frame)
_SITE_FRAME_KINDS: "weakref.WeakKeyDictionary[torch.nn.Module, set]" = weakref.WeakKeyDictionary()


def _bump_tree_version(module, name, submodule):
    global _tree_version
    if torch.compiler.is_compiling():
        # a module built inside a compiled forward (Motif slices a ModuleList there) is a temporary
        # that holds no session; bumping here would make Dynamo guard on the counter and replay
        # the bump after every call: a recompile (and new, empty caches) on every call
        return
    _tree_version += 1


def _ensure_tree_hook() -> None:
    """Install (once) the global hook that bumps `_tree_version` whenever a module registers a submodule."""
    global _tree_hook
    if _tree_hook is None:
        _tree_hook = torch.nn.modules.module.register_module_module_registration_hook(_bump_tree_version)


def sessions_of(model: Any) -> list[Session]:
    """The sessions of `model`: its own (or its compiled wrapper's) and those of its submodules.

    Finding them walks the module tree (~1.5 ms at FLUX's 1,275 modules), and `set_step` runs this on
    every call, so the result is kept per model until a session is created or replaced, or any
    module registers a submodule (setattr, add_module: torch's global registration hook). Kept as
    weak references: a cached lookup never keeps a session's caches alive. Not seen: a submodule
    deleted, or `_modules` edited directly (ModuleList.insert); its session stays listed until the
    next registration anywhere."""
    if not isinstance(model, torch.nn.Module):
        return _find_sessions(model)
    _ensure_tree_hook()
    key = (_sessions_version, _tree_version)
    hit = _SESSIONS_OF.get(model)
    if hit is not None and hit[0] == key:
        found = [ref() for ref in hit[1]]
        if all(s is not None for s in found):
            return found
    found = _find_sessions(model)
    if found:  # before the first compile there is nothing to keep
        _SESSIONS_OF[model] = (key, [weakref.ref(s) for s in found])
    return found


def _find_sessions(model: Any) -> list[Session]:
    mods = [model, getattr(model, "_orig_mod", None)]
    if isinstance(model, torch.nn.Module):
        mods += list(model.modules())
    out, seen = [], set()
    for m in mods:
        if isinstance(m, torch.nn.Module) and m in _SESSIONS and id(_SESSIONS[m]) not in seen:
            seen.add(id(_SESSIONS[m]))
            out.append(_SESSIONS[m])
    ids = {id(m) for m in mods if m is not None}
    for session in sorted(_OWNERLESS, key=lambda x: x.order):
        root = session._root() if session._root is not None else None
        if root is not None and id(root) in ids:
            out.append(session)
    return out


def install_diffusers_context_probe() -> None:
    """Record `transformer.cache_context(...)` per module, without hooking the module itself.

    diffusers' `ModelMixin.cache_context` imports `_set_cache_context` from `diffusers.hooks.hooks`
    at call time, so wrapping that module attribute sees every context a pipeline sets.
    """
    try:
        import diffusers.hooks.hooks as hooks
    except Exception:  # diffusers absent or too old: the timestep signal still works
        return
    original = hooks._set_cache_context
    if getattr(original, "_chipmunk_probe", False):
        return

    def _set_cache_context(module, context):
        if context is None:
            _CONTEXTS.pop(module, None)
        else:
            _CONTEXTS[module] = context
        return original(module, context)

    _set_cache_context._chipmunk_probe = True
    hooks._set_cache_context = _set_cache_context
