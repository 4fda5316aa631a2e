"""pipeline_loop.py: a call that a pipeline's `__call__` runs takes its step from that pipeline's
scheduler (`step_index`, host state), with no timestep read and no `follow_scheduler`; outside a
pipeline, or with `follow_pipeline: false`, the timestep is read as before. Pipelines here are
objects shaped like diffusers' (no class is named by the backend)."""

import copy
import logging

import pytest
import torch

import chipmunk_compile
from chipmunk_compile.runtime import sessions_of

from helpers import ccount, chip, fresh_dynamo, step_counts  # noqa: F401
from test_follow_scheduler import CFG, STEPS, _Pipeline, _generation, _reads
from test_numerics import Net, latents

diffusers = pytest.importorskip("diffusers")


class _GuidedPipeline(_Pipeline):
    """Two guidance calls per step, the model called from a method of the pipeline (a frame deeper)."""

    def _denoise(self, model, x, t, positions):
        outs = []
        for _ in range(2):
            outs.append(model(x, t.reshape(1)))
            positions.append(sessions_of(model)[0].position())
        return outs[0] + 0.5 * (outs[0] - outs[1])

    def __call__(self, model, steps, seed, positions):
        self.scheduler.set_timesteps(steps)
        x = latents(0, seed=seed)
        with torch.no_grad():
            for t in self.scheduler.timesteps:
                x = self.scheduler.step(self._denoise(model, x, t, positions), t, x).prev_sample
        return x


class _CopyStepping(_Pipeline):
    """Steps a copy of its scheduler (SkyReels-V2's diffusion forcing does, per frame): its own
    scheduler's step index never moves."""

    def __call__(self, model, steps, seed, positions):
        self.scheduler.set_timesteps(steps)
        stepped = copy.deepcopy(self.scheduler)
        x = latents(0, seed=seed)
        with torch.no_grad():
            for t in self.scheduler.timesteps:
                out = model(x, t.reshape(1))
                positions.append(sessions_of(model)[0].position())
                x = stepped.step(out, t, x).prev_sample
        return x


def _tracked(config=CFG, steps=STEPS):
    """A loop of one's own over a fresh Net (reads every timestep): (step counts, final latents)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    torch._dynamo.reset()
    model = Net().eval()
    sched = FlowMatchEulerDiscreteScheduler()
    compiled = chip(model, config)
    sched.set_timesteps(steps)
    x = latents(0, seed=1)
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(compiled(x, t.reshape(1)), t, x).prev_sample
    return step_counts(model), x


@pytest.mark.parametrize("in_place", [False, True])
def test_a_pipeline_call_runs_the_tracked_schedule_without_reads(fresh_dynamo, monkeypatch, in_place):
    """Also with the transformer compiled in place (`pipe.transformer.compile(...)`, as the README
    gives for pipelines that check isinstance)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    want_counts, want_x = _tracked()
    assert want_counts["attention_sparse"] > 0 and want_counts["mlp_sparse"] > 0
    torch._dynamo.reset()
    model = Net().eval()
    if in_place:
        model.compile(backend="chipmunk", options={"config": CFG, "compiler": "eager"})
        compiled = model
    else:
        compiled = chip(model, CFG)
    pipe = _Pipeline(FlowMatchEulerDiscreteScheduler(), compiled)
    reads, positions = _reads(monkeypatch), []
    x = pipe(compiled, STEPS, 1, positions)
    assert reads == []
    assert [p.step for p in positions] == list(range(STEPS))
    assert step_counts(model) == want_counts and torch.equal(x, want_x)
    assert chipmunk_compile.stats(compiled)["step_source"] == "pipeline_scheduler"
    positions.clear()
    pipe(compiled, STEPS, 1, positions)  # set_timesteps: a new generation, still no read
    assert reads == [] and {p.generation for p in positions} == {1} and positions[0].step == 0


def test_guidance_calls_from_a_helper_method_are_branches(fresh_dynamo, monkeypatch):
    from diffusers import FlowMatchEulerDiscreteScheduler

    compiled = chip(Net().eval(), CFG)
    pipe = _GuidedPipeline(FlowMatchEulerDiscreteScheduler(), compiled)
    reads, positions = _reads(monkeypatch), []
    pipe(compiled, 4, 1, positions)
    assert reads == []
    assert [(p.step, p.branch) for p in positions] == [(s, b) for s in range(4) for b in ("0", "1")]


def test_a_loop_of_ones_own_between_pipeline_calls_reads_the_timestep(fresh_dynamo, monkeypatch):
    """After a pipeline's generation, the user's own loop (the pipeline's scheduler now finished,
    its step index at the end) is tracked by its timesteps, as a generation of its own, or by the
    scheduler it follows explicitly; the next pipeline call follows its scheduler again, as a new
    generation. `stats` says where each took its steps from."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    compiled = chip(Net().eval(), CFG)
    pipe = _Pipeline(FlowMatchEulerDiscreteScheduler(), compiled)
    reads, positions = _reads(monkeypatch), []
    pipe(compiled, STEPS, 1, positions)
    own = FlowMatchEulerDiscreteScheduler()
    _generation(compiled, own, positions=positions)
    assert len(reads) == STEPS and chipmunk_compile.stats(compiled)["step_source"] == "timestep"
    chipmunk_compile.follow_scheduler(compiled, own)  # a scheduler given explicitly comes first
    _generation(compiled, own, positions=positions)
    assert chipmunk_compile.stats(compiled)["step_source"] == "followed_scheduler"
    chipmunk_compile.follow_scheduler(compiled, None)
    pipe(compiled, STEPS, 1, positions)
    assert len(reads) == STEPS
    steps = [p.step for p in positions]
    assert steps == list(range(STEPS)) * 4
    assert [p.generation for p in positions[::STEPS]] == [0, 1, 2, 3]


def test_each_pipeline_gives_its_own_schedulers_steps(fresh_dynamo, monkeypatch):
    """Two pipelines of one class share the model, each with its own scheduler and step count."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    compiled = chip(Net().eval(), dict(CFG, schedule_steps=24))
    a = _Pipeline(FlowMatchEulerDiscreteScheduler(), compiled)
    b = _Pipeline(FlowMatchEulerDiscreteScheduler(), compiled)
    reads, seen = _reads(monkeypatch), []
    for pipe, steps in ((a, STEPS), (b, 6), (a, STEPS)):
        positions = []
        pipe(compiled, steps, 1, positions)
        seen.append(([p.step for p in positions], {p.scale for p in positions}))
    assert reads == []
    assert [s for s, _ in seen] == [list(range(STEPS)), list(range(6)), list(range(STEPS))]
    assert [sc for _, sc in seen] == [{STEPS / 24}, {6 / 24}, {STEPS / 24}]


def test_a_scheduler_without_its_own_step_index_is_left_alone(fresh_dynamo):
    """DDIM keeps no step_index: the pipeline's calls are tracked as in a loop of one's own (Net reads
    no integer timestep: counted calls), and the scheduler is not wrapped to count its steps (only an
    explicit follow_scheduler does that)."""
    from diffusers import DDIMScheduler

    compiled = chip(Net().eval(), CFG)
    sched = DDIMScheduler()
    pipe = _Pipeline(sched, compiled)
    positions = []
    pipe(compiled, STEPS, 1, positions)
    assert [p.step for p in positions] == list(range(STEPS))
    assert chipmunk_compile.stats(compiled)["step_source"] == "calls"  # not the pipeline's scheduler
    assert not getattr(sched, "_chipmunk_counts_steps", False) and ccount("step_signal_none") == STEPS


def test_follow_pipeline_false_reads_every_timestep(fresh_dynamo, monkeypatch):
    from diffusers import FlowMatchEulerDiscreteScheduler

    compiled = chip(Net().eval(), dict(CFG, follow_pipeline=False))
    pipe = _Pipeline(FlowMatchEulerDiscreteScheduler(), compiled)
    reads, positions = _reads(monkeypatch), []
    pipe(compiled, STEPS, 1, positions)
    assert len(reads) == STEPS and [p.step for p in positions] == list(range(STEPS))
    with pytest.raises(ValueError, match="follow_pipeline"):
        chipmunk_compile.ChipmunkConfig.from_any({"follow_pipeline": "yes"})


def test_a_pipeline_stepping_a_copy_stops_being_followed(fresh_dynamo, monkeypatch, caplog):
    """Its scheduler's step index stays at 0: the calls run as step 0 (dense, exact) until the stall
    is seen, counted and logged; the rest of the generation is tracked by its timesteps, and later
    calls of that pipeline are not followed again."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from chipmunk_compile.runtime import MAX_BRANCHES

    compiled = chip(Net().eval(), CFG)
    pipe = _CopyStepping(FlowMatchEulerDiscreteScheduler(), compiled)
    reads, positions = _reads(monkeypatch), []
    with caplog.at_level(logging.WARNING, logger="chipmunk_compile"):
        pipe(compiled, STEPS, 1, positions)
    assert ccount("fallback:scheduler_not_advancing") == 1 and "the pipeline's scheduler" in caplog.text
    steps = [p.step for p in positions]
    assert steps[:MAX_BRANCHES + 1] == [0] * (MAX_BRANCHES + 1) and steps[-1] > 0
    assert len(reads) == STEPS - MAX_BRANCHES
    positions.clear()
    pipe(compiled, STEPS, 1, positions)
    assert [p.step for p in positions] == list(range(STEPS)) and len(reads) == 2 * STEPS - MAX_BRANCHES


def test_regional_compilation_inside_a_pipeline_gets_steps_and_branches(fresh_dynamo):
    """Per-block compilation (diffusers' compile_repeated_blocks): a block sees no timestep, so in a
    loop of one's own every call counts as a step (guidance calls too, counted `step_signal_none`).
    Inside a pipeline's call the pipeline's scheduler gives the steps, and the calls at one step are
    its guidance branches."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from test_regional_compile import OPTIONS, Stack

    options = {**OPTIONS, "config": {k: v for k, v in OPTIONS["config"].items() if k != "step_signal"}}
    torch.manual_seed(0)
    model = Stack().eval()
    for block in model.blocks:
        block.compile(backend="chipmunk", options=options)

    class Guided(_Pipeline):
        def __call__(self, steps, positions):
            self.scheduler.set_timesteps(steps)
            x = torch.randn(2, 200, 64, generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                for t in self.scheduler.timesteps:
                    for _ in range(2):
                        out = self.transformer(x)
                        positions.append(sessions_of(self.transformer)[0].position())
                    x = self.scheduler.step(out, t, x).prev_sample

    positions = []
    Guided(FlowMatchEulerDiscreteScheduler(), model)(4, positions)
    assert [(p.step, p.branch) for p in positions] == [(s, b) for s in range(4) for b in ("0", "1")]
    assert ccount("step_signal_none") == 0
    assert chipmunk_compile.stats(model)["step_source"] == "pipeline_scheduler"
