"""`chipmunk_compile.follow_scheduler`: steps from a diffusers scheduler's host-side step_index, so no
call reads its timestep from the device. The schedule it runs equals automatic tracking's; a new
`set_timesteps` starts a new generation; calls at one step are its guidance branches in call order
(or by the cache context's name); None goes back to reading the timestep."""

import pytest
import torch

import chipmunk_compile
from chipmunk_compile import backend
from chipmunk_compile.runtime import sessions_of

from helpers import chip, fresh_dynamo, step_counts  # noqa: F401
from test_numerics import Net, latents, sparse_cfg

diffusers = pytest.importorskip("diffusers")
CFG = sparse_cfg()
STEPS = 12


def _reads(monkeypatch) -> list:
    calls = []
    real = backend.read_signature

    def counted(args, indices):
        calls.append(1)
        return real(args, indices)

    monkeypatch.setattr(backend, "read_signature", counted)
    return calls


def _generation(compiled, sched, cfg_calls=1, positions=None):
    sched.set_timesteps(STEPS)
    x = latents(0)
    with torch.no_grad():
        for t in sched.timesteps:
            for _ in range(cfg_calls):
                out = compiled(x, t.reshape(1))
                if positions is not None:
                    positions.append(sessions_of(compiled)[0].position())
            x = sched.step(out, t, x).prev_sample


def _followed(config):
    """A fresh Net compiled with `config` after a Dynamo reset, following a new FlowMatch scheduler:
    (model, compiled, scheduler)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    torch._dynamo.reset()
    model = Net().eval()
    compiled = chip(model, config)
    sched = FlowMatchEulerDiscreteScheduler()
    chipmunk_compile.follow_scheduler(compiled, sched)  # before the first compile
    return model, compiled, sched


def test_followed_steps_run_the_tracked_schedule_without_reads(fresh_dynamo, monkeypatch):
    from diffusers import FlowMatchEulerDiscreteScheduler

    tracked = Net().eval()
    _generation(chip(tracked, CFG), FlowMatchEulerDiscreteScheduler())  # reads every timestep
    want = step_counts(tracked)
    followed, compiled, sched = _followed(CFG)
    reads = _reads(monkeypatch)
    _generation(compiled, sched)
    assert reads == []
    assert step_counts(followed) == want
    assert step_counts(followed)["attention_sparse"] > 0
    _generation(compiled, sched)  # set_timesteps: step_index back to None, step 0
    assert sessions_of(compiled)[0].position().generation == 1 and reads == []
    chipmunk_compile.follow_scheduler(compiled, None)
    _generation(compiled, sched)
    assert len(reads) == STEPS  # the timestep is read again


def test_calls_at_one_step_are_branches_in_call_order(fresh_dynamo):
    from diffusers import FlowMatchEulerDiscreteScheduler

    m = Net().eval()
    compiled = chip(m, CFG)
    sched = FlowMatchEulerDiscreteScheduler()
    chipmunk_compile.follow_scheduler(compiled, sched)
    positions = []
    _generation(compiled, sched, cfg_calls=2, positions=positions)
    assert [(p.step, p.branch) for p in positions[:4]] == [(0, "0"), (0, "1"), (1, "0"), (1, "1")]
    assert positions[-1].step == STEPS - 1


def test_a_scheduler_without_step_index_is_counted(fresh_dynamo, monkeypatch):
    """DDIM has no step_index (nor DDPM, PNDM, CogVideoX's): its step() calls since set_timesteps are
    counted on the host, so the followed generation runs the tracked schedule without reads, and
    the next set_timesteps begins a new generation (follow_scheduler refused it until session 44)."""
    from diffusers import DDIMScheduler

    tracked = Net().eval()
    _generation(chip(tracked, CFG), DDIMScheduler())
    want = step_counts(tracked)
    torch._dynamo.reset()
    followed = Net().eval()
    compiled = chip(followed, CFG)
    sched = DDIMScheduler()
    assert not hasattr(sched, "step_index")
    chipmunk_compile.follow_scheduler(compiled, sched)
    chipmunk_compile.follow_scheduler(compiled, sched)  # wrapped once
    reads, positions = _reads(monkeypatch), []
    _generation(compiled, sched, positions=positions)
    assert reads == [] and step_counts(followed) == want and want["attention_sparse"] > 0
    assert [p.step for p in positions] == list(range(STEPS)) and positions[-1].generation == positions[0].generation
    positions.clear()
    _generation(compiled, sched, positions=positions)
    assert positions[0].step == 0 and positions[0].generation == positions[-1].generation > 0


def test_bad_arguments_are_refused():
    m = Net().eval()
    with pytest.raises(TypeError, match="no step_index"):
        chipmunk_compile.follow_scheduler(m, object())
    with pytest.raises(TypeError, match="compiled\\) model"):
        chipmunk_compile.follow_scheduler("model", object())


def test_a_cache_context_without_a_step_index_names_the_branches(fresh_dynamo):
    """As diffusers' FluxPipeline calls the transformer: cache_context("cond") / ("uncond") with no
    step index. The followed scheduler gives the step, the context's name the branch."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.hooks import hooks

    m = Net().eval()
    compiled = chip(m, CFG)
    sched = FlowMatchEulerDiscreteScheduler()
    chipmunk_compile.follow_scheduler(compiled, sched)
    sched.set_timesteps(4)
    x, seen = latents(0), []
    with torch.no_grad():
        for t in sched.timesteps:
            for name in ("cond", "uncond"):
                hooks._set_cache_context(compiled, hooks.CacheContext(name))  # what cache_context(name) does
                out = compiled(x, t.reshape(1))
                hooks._set_cache_context(compiled, None)
                pos = sessions_of(compiled)[0].position()
                seen.append((pos.step, pos.branch))
            x = sched.step(out, t, x).prev_sample
    assert seen == [(s, b) for s in range(4) for b in ("cond", "uncond")]


def _partial_generation(compiled, sched, start: int, positions: list):
    """An img2img / inpaint pipeline's loop: the schedule's timesteps from `start` on, the scheduler
    told so by `set_begin_index` (its first step() then jumps step_index to start + 1)."""
    sched.set_timesteps(STEPS)
    sched.set_begin_index(start)
    x = latents(0)
    with torch.no_grad():
        for t in sched.timesteps[start:]:
            out = compiled(x, t.reshape(1))
            positions.append(sessions_of(compiled)[0].position())
            x = sched.step(out, t, x).prev_sample


def test_a_loop_begun_part_way_runs_steps_from_zero(fresh_dynamo):
    """img2img with strength < 1 (diffusers' get_timesteps + set_begin_index): followed, the steps are
    0, 1, ... as timestep tracking counts them, not 0, start + 1, ...; without the begin index taken
    off, the first sparse steps came before any refresh (attn_cache_not_filled fallbacks) and the
    schedule was another one."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    start = 5
    tracked = Net().eval()
    positions: list = []
    _partial_generation(chip(tracked, CFG), FlowMatchEulerDiscreteScheduler(), start, positions)
    assert [p.step for p in positions] == list(range(STEPS - start))
    want = step_counts(tracked)
    followed, compiled, sched = _followed(CFG)
    positions.clear()
    _partial_generation(compiled, sched, start, positions)
    assert [p.step for p in positions] == list(range(STEPS - start))
    assert step_counts(followed) == want and want["attention_sparse"] > 0
    positions.clear()
    _partial_generation(compiled, sched, start - 2, positions)  # another strength: a new generation
    assert [p.step for p in positions] == list(range(STEPS - start + 2))
    assert positions[0].generation == positions[-1].generation == 1


def test_a_followed_generation_scales_the_schedule_to_its_step_count(fresh_dynamo):
    """The schedule's periods are written for `schedule_steps` steps: a followed 12-step generation
    (len(timesteps)) runs them scaled by 12 / 24, as a timestep-tracked one with `steps: 12` does;
    without either the tracked one runs them as written."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scaled = dict(CFG, schedule_steps=24)
    tracked = Net().eval()
    _generation(chip(tracked, dict(scaled, steps=STEPS)), FlowMatchEulerDiscreteScheduler())
    want = step_counts(tracked)
    followed, compiled, sched = _followed(scaled)
    _generation(compiled, sched)
    assert step_counts(followed) == want
    torch._dynamo.reset()
    as_written = Net().eval()
    _generation(chip(as_written, scaled), FlowMatchEulerDiscreteScheduler())
    assert step_counts(as_written)["attention_refresh"] < want["attention_refresh"]  # every 4, not every 2


def test_a_step_count_that_leaves_no_sparse_step_runs_plain_dense(fresh_dynamo, caplog):
    """A few-step sampler: the periods (4 of `schedule_steps` 24) scale to 1 at 4 steps, so no
    sparse step would read a cache. The op then runs the exact op with no state: no cache is built
    and no block means are taken (each kernel call counts a reference fallback on the CPU), the
    outputs equal eager, and a generation where neither op has a sparse step is counted and logged
    once per count. Until session 48 the MLP still filled its caches on every (dense) step: a
    generation slower than the dense model, with nothing said."""
    import logging

    from torch._dynamo.utils import counters

    from test_numerics import run

    few = dict(CFG, schedule_steps=24, steps=4)
    model = Net().eval()
    counters["chipmunk"].clear()
    with caplog.at_level(logging.WARNING, logger="chipmunk_compile"):
        compiled = chip(model, few)
        outs, refs = run(model, compiled, 4)
        outs2, refs2 = run(model, compiled, 4)  # a second generation: back at the first timestep
    for o, r in zip(outs + outs2, refs + refs2):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)
    st = chipmunk_compile.stats(model)
    assert st["state_bytes"] == 0 and set(step_counts(model)) == {"attention_dense", "mlp_dense"}
    assert not [k for k in counters["chipmunk"] if k.startswith("kernel_fallback")]  # no block means, no colsum
    assert counters["chipmunk"]["generation_all_dense"] == 2
    assert len([r for r in caplog.records if "runs dense throughout" in r.getMessage()]) == 1
    # only the MLP's period scales to 1: attention keeps its sparse steps, nothing is logged
    torch._dynamo.reset()
    caplog.clear()
    counters["chipmunk"].clear()
    mixed = dict(few, attn=dict(few["attn"], full_step_every=12))
    model = Net().eval()
    with caplog.at_level(logging.WARNING, logger="chipmunk_compile"):
        run(model, chip(model, mixed), 4)
    kinds = {s["kind"]: s for s in chipmunk_compile.stats(model)["sites"]}
    assert kinds["mlp"]["state_bytes"] == 0 and set(kinds["mlp"]["steps"]) == {"dense"}
    assert kinds["attention"]["state_bytes"] > 0 and "sparse" in kinds["attention"]["steps"]
    assert counters["chipmunk"]["generation_all_dense"] == 0 and not caplog.records


def test_an_unscaled_step_count_is_logged_once(fresh_dynamo, caplog):
    """Tracked by timesteps, a generation's step count is known only once it ended: the next one
    logs that its periods ran unscaled, once per count."""
    import logging

    from diffusers import FlowMatchEulerDiscreteScheduler

    compiled = chip(Net().eval(), dict(CFG, schedule_steps=24))
    with caplog.at_level(logging.INFO, logger="chipmunk_compile"):
        for _ in range(3):
            _generation(compiled, FlowMatchEulerDiscreteScheduler())
    notes = [r.getMessage() for r in caplog.records if "schedule's periods" in r.getMessage()]
    assert len(notes) == 1 and f"ran {STEPS} steps" in notes[0]


def test_a_scheduler_that_does_not_advance_is_no_longer_followed(fresh_dynamo):
    """SkyReels-V2's diffusion-forcing pipeline steps a copy of its scheduler per frame, so the
    scheduler a user follows (`pipe.scheduler`) never advances: every call ran as step 0, dense,
    with no speedup and nothing said. After MAX_BRANCHES + 1 calls at one step index, following
    stops (counted, logged) and the steps come from the timesteps: the generation then runs its
    steps and the next one begins at step 0. Following again (`follow_scheduler`) gives the
    scheduler another chance."""
    from copy import deepcopy

    from torch._dynamo.utils import counters

    from chipmunk_compile.runtime import MAX_BRANCHES

    model, compiled, sched = _followed(CFG)
    counters["chipmunk"].clear()
    positions = []
    for _ in range(2):  # two generations, each stepping a copy of the followed scheduler
        _generation(compiled, deepcopy(sched), positions=positions)
        sched.set_timesteps(STEPS)  # what the pipeline does to its own scheduler per generation
    assert counters["chipmunk"]["fallback:scheduler_not_advancing"] == 1
    steps = [p.step for p in positions]
    first = steps[:STEPS]
    assert first[:MAX_BRANCHES + 1] == [0] * (MAX_BRANCHES + 1) and first[-1] > 0  # tracked from there on
    assert steps[STEPS:] == list(range(STEPS))  # the next generation: steps 0, 1, ... from the timesteps
    assert {p.generation for p in positions[STEPS:]} == {positions[0].generation + 1}
    chipmunk_compile.follow_scheduler(compiled, sched)
    assert not sessions_of(compiled)[0].tracker.scheduled_stalled


def test_tracked_generations_are_scaled_to_a_repeated_step_count(fresh_dynamo):
    """Tracked by its timesteps, a generation's step count is known once it ended. Once two
    generations in a row ran one count, the next ones are scaled to it (a server runs one count:
    FLUX's pipeline 28 of a schedule written for 50); until then, and after a generation of another
    count, the periods run as written. Twice, so that a short warm-up generation does not make the
    next one all dense."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    compiled = chip(Net().eval(), dict(CFG, schedule_steps=24))
    scales = []
    for steps in (2, STEPS, STEPS, STEPS, 8, 8, 8):  # a 2-step warm-up first
        positions = []
        sched = FlowMatchEulerDiscreteScheduler()
        sched.set_timesteps(steps)
        x = latents(0)
        with torch.no_grad():
            for t in sched.timesteps:
                out = compiled(x, t.reshape(1))
                positions.append(sessions_of(compiled)[0].position())
                x = sched.step(out, t, x).prev_sample
        scales.append({p.scale for p in positions[1:]})
    half, third = STEPS / 24, 8 / 24
    assert scales == [{None}, {None}, {None}, {half}, {half}, {None}, {third}]


class _Pipeline:
    """What a diffusers pipeline is to chipmunk: an object holding a scheduler and the model, whose
    `__call__` sets the timesteps and runs the loop (no pipeline class is named anywhere)."""

    def __init__(self, scheduler, transformer=None):
        self.scheduler, self.transformer = scheduler, transformer

    def __call__(self, model, steps, seed, positions):
        self.scheduler.set_timesteps(steps)
        x = latents(0, seed=seed)
        with torch.no_grad():
            for t in self.scheduler.timesteps:
                out = model(x, t.reshape(1))
                positions.append(sessions_of(model)[0].position())
                x = self.scheduler.step(out, t, x).prev_sample
        return x


@pytest.mark.parametrize("holds_model", [True, False])
def test_a_pipeline_on_the_stack_gives_the_step_count_from_the_first_generation(fresh_dynamo, holds_model):
    """A pipeline's loop, tracked by its timesteps with no scheduler followed: the step count comes
    from the pipeline that runs the loop (on the call stack, holding the model and a scheduler with
    its timesteps set), so the periods are scaled from the first generation on, and a seed gives
    the same result in every generation. Until session 51 the first two generations ran the
    periods as written and the later ones scaled. An object that does not hold the model gives no
    count (the scaling then waits for two generations of one count, as in a loop of one's own)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    compiled = chip(Net().eval(), dict(CFG, schedule_steps=24))
    pipe = _Pipeline(FlowMatchEulerDiscreteScheduler(), compiled if holds_model else None)
    scales, outs = [], []
    for seed in (1, 2, 1, 2):
        positions = []
        outs.append(pipe(compiled, STEPS, seed, positions))
        scales.append({p.scale for p in positions})
    if holds_model:
        assert scales == [{STEPS / 24}] * 4
        assert torch.equal(outs[2], outs[0]) and torch.equal(outs[3], outs[1])
    else:
        assert scales == [{None}, {None}, {STEPS / 24}, {STEPS / 24}]
