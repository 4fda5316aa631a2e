"""Attention refreshes written as noise levels (`attn.full_step_levels`): resolved from each step's
timestep over the generation's first, so one list refreshes at the same noise under any flow shift,
step count and timestep scale; from the timestep signal, a followed scheduler or the pipeline's
scheduler; a generation with no levels runs the period, counted."""

import pytest
import torch

import chipmunk_compile
from chipmunk_compile.config import AttnConfig, ChipmunkConfig
from chipmunk_compile.schedule import LEVEL_TOLERANCE, REFRESH, attn_step_kind, last_refresh_step, steps_at_levels

from examples.tiny_dit.sampler import flow_sigmas as sampler_sigmas
from helpers import ccount, chip, fresh_dynamo, step_counts  # noqa: F401
from test_numerics import Net, latents, sparse_cfg

LEVELS = [0.98, 0.94, 0.88, 0.80, 0.70, 0.56, 0.40, 0.20]


def flow_sigmas(steps: int, shift: float) -> list:
    """The tiny DiT sampler's noise level per step (as SD3/FLUX/HunyuanVideo shift them)."""
    return sampler_sigmas(steps, shift)[:steps].tolist()


def refreshes(cfg: AttnConfig, levels: tuple) -> list:
    return [k for k in range(len(levels)) if attn_step_kind(cfg, k, 0, None, levels) == REFRESH]


def test_levels_place_the_refreshes_by_noise_under_any_shift():
    c = AttnConfig(first_n_dense_layers=0, full_step_levels=LEVELS)
    # equal steps in t: level k = 1 - k/50; the first step after warm-up reaches 0.98
    assert refreshes(c, tuple(flow_sigmas(50, 1.0))) == [1, 3, 6, 10, 15, 22, 30, 40]
    # HunyuanVideo's shift 7 spends its first steps near t = 1: the same levels come later in steps
    shifted = tuple(flow_sigmas(50, 7.0))
    got = refreshes(c, shifted)
    assert got == [1, 6, 15, 25, 32, 38, 43, 46, 49]
    near = [v * (1 - LEVEL_TOLERANCE) for v in shifted]  # within bfloat16 rounding of a level counts
    for k in got[1:]:  # each refresh is the first step at or below one of the levels
        assert any(near[k] <= lv < near[k - 1] for lv in LEVELS), k
    # a schedule in steps would have stayed where equal steps put it
    steps = AttnConfig(first_n_dense_layers=0, full_step_schedule=[1, 3, 6, 10, 15, 22, 30, 40])
    assert refreshes(steps, shifted) == [1, 3, 6, 10, 15, 22, 30, 40]
    # 25 steps of the same sampler: the same levels, half the steps apart
    assert refreshes(c, tuple(flow_sigmas(25, 1.0))) == [1, 2, 3, 5, 8, 11, 15, 20]
    assert last_refresh_step(c, 37, None, shifted) == 32


def test_levels_reach_a_step_at_its_exact_noise_through_bfloat16_rounding():
    """A level written as a step's exact noise still refreshes at that step when the timestep comes
    to the host rounded to bfloat16 (0.94 reads 0.9414)."""
    exact = tuple(flow_sigmas(50, 1.0))
    rounded = tuple(torch.tensor(exact).bfloat16().double().tolist())
    assert rounded[3] > 0.94  # the step's level, rounded up past the written one
    written = (0.94, 0.88, 0.80)
    assert steps_at_levels(rounded, written, 1) == steps_at_levels(exact, written, 1) == {1, 3, 6, 10}


def test_levels_config_is_validated():
    c = ChipmunkConfig.from_any({"attn": {"full_step_levels": [0.2, 0.9, 0.9, 0.5]}})
    assert c.attn.full_step_levels == [0.9, 0.5, 0.2]
    with pytest.raises(ValueError, match="both place the refreshes"):
        ChipmunkConfig.from_any({"preset": "hunyuan-video", "attn": {"full_step_levels": [0.5]}})
    ok = ChipmunkConfig.from_any({"preset": "hunyuan-video", "attn": {"full_step_levels": [0.5],
                                                                      "full_step_schedule": None}})
    assert ok.attn.full_step_levels == [0.5]
    for bad in ([], [1.5], [-0.1]):
        with pytest.raises(ValueError, match="noise levels in"):
            ChipmunkConfig.from_any({"attn": {"full_step_levels": bad}})


def test_a_gap_cap_adds_refreshes_where_the_noise_falls_slowly():
    """`attn.max_refresh_gap`: every level's refresh stays, and no two refreshes are further apart
    than the cap (in steps of a schedule_steps-long generation, scaled like the periods)."""
    l10 = [round(1 - k / 50, 2) for k in range(5, 50, 5)]
    shifted = tuple(flow_sigmas(50, 3.0))
    plain = AttnConfig(first_n_dense_layers=0, full_step_levels=l10)
    capped = AttnConfig(first_n_dense_layers=0, full_step_levels=l10, max_refresh_gap=6)
    # under a flow shift of 3 the noise reaches 0.9 only at step 13: twelve steps on one cache
    assert refreshes(plain, shifted) == [1, 13, 22, 28, 34, 38, 41, 44, 47, 49]
    got = refreshes(capped, shifted)
    assert got == [1, 7, 13, 19, 22, 28, 34, 38, 41, 44, 47, 49]
    assert set(refreshes(plain, shifted)) <= set(got)
    assert max(b - a for a, b in zip(got, got[1:])) <= 6
    assert last_refresh_step(capped, 12, None, shifted) == 7
    # equal steps already refresh every 5: the cap adds nothing
    assert refreshes(capped, tuple(flow_sigmas(50, 1.0))) == refreshes(plain, tuple(flow_sigmas(50, 1.0)))
    # 25 steps of a 50-step schedule: the cap scales to 3 steps, as the periods do
    half = tuple(flow_sigmas(25, 3.0))
    got25 = [k for k in range(25) if attn_step_kind(capped, k, 0, 0.5, half) == REFRESH]
    assert max(b - a for a, b in zip(got25, got25[1:])) <= 3
    assert set(refreshes(plain, half)) <= set(got25)


def test_a_gap_cap_needs_levels_and_a_whole_number_of_steps():
    ok = ChipmunkConfig.from_any({"attn": {"full_step_levels": [0.5], "max_refresh_gap": 4.0}})
    assert ok.attn.max_refresh_gap == 4 and isinstance(ok.attn.max_refresh_gap, int)
    with pytest.raises(ValueError, match="give attn.full_step_levels"):
        ChipmunkConfig.from_any({"attn": {"max_refresh_gap": 4}})
    for bad in (0, 2.5, True, -3, "6", float("inf"), float("nan")):
        with pytest.raises(ValueError, match="whole number of steps"):
            ChipmunkConfig.from_any({"attn": {"full_step_levels": [0.5], "max_refresh_gap": bad}})


def _refresh_steps_of(model, call, steps: int) -> list:
    """Run `call(i)` for steps 0..steps-1 and return the steps at which `model`'s attention refreshed."""
    out, before = [], step_counts(model).get("attention_refresh", 0)
    with torch.no_grad():
        for i in range(steps):
            call(i)
            now = step_counts(model).get("attention_refresh", 0)
            if now > before:
                out.append(i)
            before = now
    return out


def _in_a_pipeline(model, call, sigmas) -> list:
    """`_refresh_steps_of` run inside a pipeline's __call__ whose scheduler has timesteps `sigmas` * 1000."""
    from types import SimpleNamespace

    class Pipeline:
        def __init__(self, transformer):
            self.transformer = transformer
            self.scheduler = SimpleNamespace(timesteps=torch.tensor(sigmas) * 1000)

        def __call__(self):
            return _refresh_steps_of(model, call, STEPS)

    return Pipeline(model)()


STEPS = 16
LEVEL_CFG = sparse_cfg(attn={"full_step_levels": [0.9, 0.6, 0.3], "extrapolate": 0.0})


def _expected(shift: float = 1.0, levels: tuple = None) -> list:
    c = ChipmunkConfig.from_any(LEVEL_CFG).attn
    levels = levels or tuple(flow_sigmas(STEPS, shift))
    return sorted(steps_at_levels(levels, tuple(c.full_step_levels), c.warmup_steps))


@pytest.mark.parametrize("scale", [1000.0, 1.0])
def test_the_timestep_signal_gives_the_levels_at_any_scale(fresh_dynamo, scale):
    """Steps tracked by their timesteps: the same refreshes for timesteps in [0, 1000] (HunyuanVideo)
    and in [0, 1] (FLUX's t / 1000); a second generation under another shift moves them."""
    m = Net(depth=1).eval()
    cm = chip(m, LEVEL_CFG)
    for shift in (1.0, 4.0):
        sig = flow_sigmas(STEPS, shift)
        got = _refresh_steps_of(m, lambda i: cm(latents(i), torch.tensor([sig[i] * scale])), STEPS)
        assert got == _expected(shift), (shift, got)
        stats = chipmunk_compile.stats(m)
        assert stats["noise_level"] == pytest.approx(sig[-1] / sig[0], rel=1e-6)
        assert stats["refresh_steps"] == got
    assert _expected(1.0) != _expected(4.0)
    assert ccount("fallback:attn_levels_unknown") == 0


def test_a_capped_generation_refreshes_where_the_schedule_says(fresh_dynamo):
    """The model's refreshes under a gap cap: the levels' steps plus the capped ones, as the schedule
    computes them from the timesteps."""
    cfg = sparse_cfg(attn={"full_step_levels": [0.9, 0.6, 0.3], "extrapolate": 0.0, "max_refresh_gap": 3})
    m = Net(depth=1).eval()
    cm = chip(m, cfg)
    sig = flow_sigmas(STEPS, 4.0)
    got = _refresh_steps_of(m, lambda i: cm(latents(i), torch.tensor([sig[i]])), STEPS)
    c = ChipmunkConfig.from_any(cfg).attn
    levels = tuple(v / sig[0] for v in sig)
    assert got == sorted(steps_at_levels(levels, tuple(c.full_step_levels), c.warmup_steps, 3))
    assert set(_expected(4.0)) < set(got)
    assert max(b - a for a, b in zip(got, got[1:])) <= 3
    assert chipmunk_compile.stats(m)["refresh_steps"] == got


def test_a_followed_scheduler_gives_the_levels_without_reading_timesteps(fresh_dynamo, monkeypatch):
    diffusers = pytest.importorskip("diffusers")
    from chipmunk_compile import backend

    reads = []
    real = backend.read_signature
    monkeypatch.setattr(backend, "read_signature", lambda *a: reads.append(1) or real(*a))
    m = Net(depth=1).eval()
    cm = chip(m, LEVEL_CFG)
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=4.0)
    chipmunk_compile.follow_scheduler(cm, sched)
    sched.set_timesteps(STEPS)
    timesteps = list(sched.timesteps)

    def call(i):
        cm(latents(i), timesteps[i].reshape(1))
        sched.step(torch.zeros(1, 64, 16), timesteps[i], torch.zeros(1, 64, 16))

    got = _refresh_steps_of(m, call, STEPS)
    assert reads == []
    assert got == _expected(levels=tuple(float(t / timesteps[0]) for t in timesteps)) != _expected(1.0)


def test_a_pipelines_scheduler_gives_the_levels_to_steps_of_a_cache_context(fresh_dynamo):
    """Steps from a cache context's step index (no timestep read) inside a pipeline's __call__:
    the levels come from that pipeline's scheduler; outside any pipeline there are none (the period
    runs, counted once per generation)."""
    pytest.importorskip("diffusers")

    from diffusers import ModelMixin
    from diffusers.models.cache_utils import CacheMixin

    class ContextNet(ModelMixin, CacheMixin):
        def __init__(self):
            super().__init__()
            self.net = Net(depth=1)

        def forward(self, x, t):
            return self.net(x, t)

    m = ContextNet().eval()
    cm = chip(m, LEVEL_CFG)
    sig = flow_sigmas(STEPS, 4.0)

    def call(i):
        with cm.cache_context("cond", step_index=i):
            cm(latents(i), torch.tensor([sig[i] * 1000]))

    assert _in_a_pipeline(m, call, sig) == _expected(4.0)
    assert ccount("fallback:attn_levels_unknown") == 0
    chipmunk_compile.reset(m)
    every = ChipmunkConfig.from_any(LEVEL_CFG).attn.full_step_every
    assert _refresh_steps_of(m, call, STEPS) == [1] + list(range(every, STEPS, every))
    assert ccount("fallback:attn_levels_unknown") == 1


def test_rising_timesteps_give_no_levels_and_run_the_period_counted(fresh_dynamo):
    """A timestep that rises towards the clean image has no known scale: the period runs, counted
    once per generation, and the output stays the compiled model's."""
    m = Net(depth=1).eval()
    cm = chip(m, LEVEL_CFG)
    got = _refresh_steps_of(m, lambda i: cm(latents(i), torch.tensor([10.0 + 50.0 * i])), STEPS)
    every = ChipmunkConfig.from_any(LEVEL_CFG).attn.full_step_every
    assert got == [1] + list(range(every, STEPS, every))
    assert ccount("fallback:attn_levels_unknown") == 1


def test_pinned_steps_carry_no_levels_after_tracked_ones(fresh_dynamo):
    """Steps pinned by set_step after a generation tracked by its timesteps: no level reaches them, so
    the pinned generation runs the period (counted), not the levels the last generation left."""
    m = Net(depth=1).eval()
    cm = chip(m, LEVEL_CFG)
    sig = flow_sigmas(STEPS, 4.0)
    assert _refresh_steps_of(m, lambda i: cm(latents(i), torch.tensor([sig[i]])), STEPS) == _expected(4.0)
    assert ccount("fallback:attn_levels_unknown") == 0

    def pinned(i):
        chipmunk_compile.set_step(cm, i)
        cm(latents(i), torch.tensor([sig[i]]))

    every = ChipmunkConfig.from_any(LEVEL_CFG).attn.full_step_every
    assert _refresh_steps_of(m, pinned, STEPS) == [1] + list(range(every, STEPS, every))
    assert ccount("fallback:attn_levels_unknown") == 1
    assert chipmunk_compile.stats(m)["noise_level"] is None and chipmunk_compile.stats(m)["refresh_steps"] is None


def test_pinned_steps_given_timesteps_refresh_at_their_levels(fresh_dynamo):
    """set_step(..., timesteps=...): the pinned steps refresh where those timesteps put the levels,
    given once at step 0 and kept for the later steps; a generation pinned with another shift moves
    them; clear_step drops them (the next pinned generation runs the period, counted)."""
    m = Net(depth=1).eval()
    cm = chip(m, LEVEL_CFG)  # pinned from its first call: the compile's session takes the pin
    for shift in (1.0, 4.0):
        sig = flow_sigmas(STEPS, shift)

        def pinned(i, sig=sig):
            if i == 0:  # a timestep scale unlike the signal's: levels are relative to step 0
                chipmunk_compile.set_step(cm, 0, timesteps=torch.tensor(sig) * 1000)
            else:
                chipmunk_compile.set_step(cm, i)
            cm(latents(i), torch.tensor([0.5]))  # a constant timestep input: no signal of its own

        got = _refresh_steps_of(m, pinned, STEPS)
        assert got == _expected(shift), (shift, got)
        stats = chipmunk_compile.stats(m)
        assert stats["noise_level"] == pytest.approx(sig[-1] / sig[0], rel=1e-6)
        assert stats["refresh_steps"] == got
    assert ccount("fallback:attn_levels_unknown") == 0
    chipmunk_compile.clear_step(m)
    every = ChipmunkConfig.from_any(LEVEL_CFG).attn.full_step_every

    def plain(i):
        chipmunk_compile.set_step(cm, i)
        cm(latents(i), torch.tensor([0.5]))

    assert _refresh_steps_of(m, plain, STEPS) == [1] + list(range(every, STEPS, every))
    assert ccount("fallback:attn_levels_unknown") == 1


def test_set_step_refuses_timesteps_that_give_no_levels(fresh_dynamo):
    """Rising or non-numeric timesteps, and a step past the timesteps given, are clear errors that
    leave the pinned step and its levels as they were."""
    m = Net(depth=1).eval()
    cm = chip(m, LEVEL_CFG)
    with torch.no_grad():
        cm(latents(0), torch.tensor([1.0]))
    sig = flow_sigmas(STEPS, 4.0)
    chipmunk_compile.set_step(cm, 3, timesteps=sig)
    for bad in ([10.0, 20.0, 30.0], [0.0, 0.0], ["a", "b"], []):
        with pytest.raises(ValueError, match="falling from a positive first one"):
            chipmunk_compile.set_step(cm, 4, timesteps=bad)
    with pytest.raises(ValueError, match=f"outside the {STEPS} timesteps"):
        chipmunk_compile.set_step(cm, STEPS)
    with pytest.raises(ValueError, match="outside the 2 timesteps"):
        chipmunk_compile.set_step(cm, 2, timesteps=[1.0, 0.5])
    (session,) = chipmunk_compile.runtime.sessions_of(m)
    assert session.tracker.explicit == (3, None)
    assert session.tracker.pinned_levels == pytest.approx(tuple(v / sig[0] for v in sig))


def test_pinned_steps_in_a_pipeline_take_its_schedulers_levels(fresh_dynamo):
    """Steps pinned with no timesteps inside a pipeline's __call__: the levels come from that
    pipeline's scheduler, as for a cache context's steps."""

    m = Net(depth=1).eval()
    cm = chip(m, LEVEL_CFG)
    sig = flow_sigmas(STEPS, 4.0)
    with torch.no_grad():  # a generation of 2 steps outside the pipeline, before the pinned one in it
        cm(latents(0), torch.tensor([1.0]))
        cm(latents(1), torch.tensor([0.5]))

    def pinned(i):
        chipmunk_compile.set_step(cm, i)
        cm(latents(i), torch.tensor([0.5]))

    assert _in_a_pipeline(m, pinned, sig) == _expected(4.0)
    assert ccount("fallback:attn_levels_unknown") == 0


def test_set_step_reads_the_same_timesteps_once(fresh_dynamo, monkeypatch):
    """A loop that gives set_step the scheduler's timesteps on every step: the tensor is read (a
    device→host copy on a GPU) once, and again only after it changed (its version) or for another
    tensor; the pinned steps still refresh at their levels."""
    from chipmunk_compile import runtime

    reads = []
    real = runtime.levels_of
    monkeypatch.setattr(runtime, "levels_of", lambda t, begin=0: reads.append(1) or real(t, begin))
    m = Net(depth=1).eval()
    cm = chip(m, LEVEL_CFG)
    timesteps = torch.tensor(flow_sigmas(STEPS, 4.0)) * 1000

    def pinned(i):
        chipmunk_compile.set_step(cm, i, timesteps=timesteps)
        cm(latents(i), torch.tensor([0.5]))

    assert _refresh_steps_of(m, pinned, STEPS) == _expected(4.0)
    assert len(reads) == 1
    timesteps.copy_(torch.tensor(flow_sigmas(STEPS, 1.0)) * 1000)  # changed in place: read again
    assert _refresh_steps_of(m, pinned, STEPS) == _expected(1.0)
    assert len(reads) == 2
    chipmunk_compile.set_step(cm, 0, timesteps=timesteps.clone())  # another tensor
    assert len(reads) == 3
