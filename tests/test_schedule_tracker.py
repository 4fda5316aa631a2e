"""Step-type schedules and the StepTracker (timestep signatures, CFG branches, generations,
diffusers cache contexts, explicit set_step), unit-level and through a compiled model."""

from types import SimpleNamespace

import pytest
import torch

import chipmunk_compile
from chipmunk_compile.config import AttnConfig, MlpConfig
from chipmunk_compile.runtime import StepTracker
from chipmunk_compile.schedule import (
    DENSE, REFRESH, SPARSE, attn_step_kind, mlp_recompute_indices, mlp_step_kind,
)

from helpers import chip, cfg, fresh_dynamo  # noqa: F401


# -- schedule -----------------------------------------------------------------------------------
def test_attn_schedule_period():
    c = AttnConfig(first_n_dense_layers=2, warmup_steps=1, full_step_every=10)
    kinds = [attn_step_kind(c, s, layer=5) for s in range(22)]
    assert kinds[0] == DENSE
    assert kinds[1] == REFRESH and kinds[10] == REFRESH and kinds[20] == REFRESH
    assert all(kinds[s] == SPARSE for s in range(2, 10))
    assert all(attn_step_kind(c, s, layer=1) == DENSE for s in range(22))


def test_attn_schedule_explicit_and_disabled():
    c = AttnConfig(first_n_dense_layers=0, full_step_schedule=[1, 10, 40])
    kinds = {s: attn_step_kind(c, s, 0) for s in range(50)}
    assert kinds[0] == DENSE
    assert [s for s, k in kinds.items() if k == REFRESH] == [1, 10, 40]
    assert kinds[20] == SPARSE  # a multiple of full_step_every but not scheduled
    off = AttnConfig(enabled=False, first_n_dense_layers=0)
    assert {attn_step_kind(off, s, 3) for s in range(20)} == {DENSE}


def test_mlp_schedule():
    c = MlpConfig(first_n_dense_layers=1, full_step_every=10, block_mask_cache=2)
    assert [mlp_step_kind(c, s, 3) for s in (0, 1, 9, 10, 11)] == [DENSE, SPARSE, SPARSE, DENSE, SPARSE]
    assert mlp_step_kind(c, 5, 0) == DENSE
    assert all(mlp_recompute_indices(c, s) for s in range(1, 10))
    assert [mlp_recompute_indices(c, s) for s in (11, 12, 13, 14)] == [False, True, False, True]


def test_mlp_selects_every_step_until_the_given_step_then_every_block_mask_cache():
    """`select_every_step_until` ends the every-step selection before the first dense period does
    (flux-fast's period is 20: new neurons at each of steps 1-19 unless told otherwise); scaled like
    a period at other step counts; None keeps the period; bad values are refused."""
    from chipmunk_compile.schedule import step_scale

    def selecting(c, steps=50, scale=None):
        return [s for s in range(steps) if mlp_step_kind(c, s, 5, scale) == SPARSE and mlp_recompute_indices(c, s, scale)]

    period_rule = MlpConfig(full_step_every=20, block_mask_cache=4)
    assert selecting(period_rule) == list(range(1, 20)) + [24, 28, 32, 36, 44, 48]
    early = MlpConfig(full_step_every=20, block_mask_cache=4, select_every_step_until=10)
    assert selecting(early) == list(range(1, 10)) + [12, 16, 24, 28, 32, 36, 44, 48]
    assert selecting(MlpConfig(full_step_every=20, block_mask_cache=4, select_every_step_until=20)) == selecting(period_rule)
    # at 28 steps: the period 20 -> 11, the every-step window 10 -> 6
    assert selecting(early, 28, step_scale(28, 50)) == [1, 2, 3, 4, 5, 8, 12, 16, 20, 24]
    for bad in (-1, True, 2.5, "10"):
        with pytest.raises(ValueError, match="select_every_step_until"):
            MlpConfig(select_every_step_until=bad)


def test_periods_scale_with_the_generations_step_count():
    """A schedule is written for `schedule_steps` (50): at 28 steps the default's refresh every 5 and
    dense MLP every 10 become every 3 and 6, at 16 steps every 2 and 3; at 4 every step is a refresh;
    an explicit schedule keeps its steps 0 and 1 and scales the rest; None keeps everything as written."""
    from chipmunk_compile.schedule import step_scale

    a, m = AttnConfig(first_n_dense_layers=0), MlpConfig(first_n_dense_layers=0)
    for steps, every, dense_every in ((28, 3, 6), (16, 2, 3), (100, 10, 20)):
        scale = step_scale(steps, 50)
        refresh = [s for s in range(steps) if attn_step_kind(a, s, 0, scale) == REFRESH]
        assert refresh == [1] + [s for s in range(every, steps, every) if s != 1], (steps, refresh)
        assert [s for s in range(steps) if mlp_step_kind(m, s, 0, scale) == DENSE] == list(range(0, steps, dense_every))
        assert all(mlp_recompute_indices(m, s, scale) for s in range(1, dense_every))
    # a few-step sampler: period 1, no sparse step would read a cache, so dense (no cache build)
    assert {attn_step_kind(a, s, 0, step_scale(8, 50)) for s in range(8)} == {DENSE}
    assert {mlp_step_kind(m, s, 0, step_scale(4, 50)) for s in range(4)} == {DENSE}
    assert {attn_step_kind(AttnConfig(first_n_dense_layers=0, full_step_every=1), s, 0) for s in range(5)} == {DENSE}
    hv = AttnConfig(first_n_dense_layers=0, full_step_schedule=[0, 1, 10, 40])
    assert [s for s in range(25) if attn_step_kind(hv, s, 0, step_scale(25, 50)) == REFRESH] == [1, 5, 20]
    assert step_scale(50, 50) is None and step_scale(28, None) is None and step_scale(None, 50) is None


def test_the_last_scheduled_refresh_is_the_latest_refresh_step_up_to_now():
    """What a site's caches must be at least as new as (catch_up): for every step, the latest step
    up to it that the schedule makes a refresh (attention) or dense step (MLP), as written, scaled
    and explicit; -1 during the attention's warm-up."""
    from chipmunk_compile.schedule import last_dense_mlp_step, last_refresh_step, step_scale

    for attn, scale in ((AttnConfig(first_n_dense_layers=0), None), (AttnConfig(first_n_dense_layers=0), 28 / 50),
                        (AttnConfig(first_n_dense_layers=0, full_step_schedule=[0, 1, 10, 40]), 25 / 50),
                        (AttnConfig(first_n_dense_layers=0, warmup_steps=3, full_step_every=4), None)):
        refreshes = [s for s in range(50) if attn_step_kind(attn, s, 0, scale) == REFRESH]
        want = [max((r for r in refreshes if r <= s), default=-1) for s in range(50)]
        assert [last_refresh_step(attn, s, scale) for s in range(50)] == want, (attn, scale)
    mlp = MlpConfig(first_n_dense_layers=0)
    for scale in (None, step_scale(28, 50)):
        dense = [s for s in range(50) if mlp_step_kind(mlp, s, 0, scale) == DENSE]
        assert [last_dense_mlp_step(mlp, s, scale) for s in range(50)] == [max(d for d in dense if d <= s)
                                                                           for s in range(50)]


def test_a_site_catches_up_on_a_skipped_refresh_once_its_caches_are_old_enough():
    """catch_up: a sparse step refreshes instead when a scheduled refresh after its caches' step was
    skipped and the caches are catch_up periods old (2 by default; 1: the next call; 0: never)."""
    from chipmunk_compile.schedule import attn_catches_up, mlp_catches_up

    a = AttnConfig(first_n_dense_layers=0, full_step_every=5)  # refreshes at 1, 5, 10, ...
    assert not attn_catches_up(a, 7, filled=5)  # nothing missed
    assert not attn_catches_up(a, 7, filled=1) and attn_catches_up(a, 11, filled=1)  # 6 and 10 steps old
    assert attn_catches_up(AttnConfig(first_n_dense_layers=0, catch_up=1), 7, filled=1)
    assert not attn_catches_up(AttnConfig(first_n_dense_layers=0, catch_up=0), 40, filled=1)
    hv = AttnConfig(first_n_dense_layers=0, full_step_schedule=[0, 1, 10, 40])  # the gap before 10 is 9
    assert not attn_catches_up(hv, 12, filled=1) and attn_catches_up(hv, 19, filled=1)
    m = MlpConfig(first_n_dense_layers=0)  # dense at 0, 10, 20, ...
    assert not mlp_catches_up(m, 15, filled=0) and mlp_catches_up(m, 21, filled=0)
    assert not mlp_catches_up(m, 25, filled=20)
    with pytest.raises(ValueError, match="catch_up"):
        AttnConfig(catch_up=-1)


# -- tracker, unit ------------------------------------------------------------------------------
def _walk(tracker, sigs, ctx=None):
    out = []
    for s in sigs:
        p = tracker.advance(s, ctx)
        out.append((p.step, p.branch, p.generation))
    return out


def test_timestep_signature_steps():
    t = StepTracker()
    assert _walk(t, [(999.0,), (900.0,), (800.0,)]) == [(0, "0", 0), (1, "0", 0), (2, "0", 0)]


def test_cfg_branches_equal_timesteps_one_step():
    t = StepTracker()
    got = _walk(t, [(999.0,), (999.0,), (900.0,), (900.0,), (800.0,), (800.0,)])
    assert got == [(0, "0", 0), (0, "1", 0), (1, "0", 0), (1, "1", 0), (2, "0", 0), (2, "1", 0)]


def test_new_generation_when_back_at_start():
    t = StepTracker()
    got = _walk(t, [(999.0,), (900.0,), (800.0,), (999.0,), (900.0,)])
    assert got == [(0, "0", 0), (1, "0", 0), (2, "0", 0), (0, "0", 1), (1, "0", 1)]


def test_new_generation_when_schedule_reverses():
    t = StepTracker()
    got = _walk(t, [(999.0,), (900.0,), (800.0,), (950.0,), (850.0,)])
    assert got[3] == (0, "0", 1) and got[4] == (1, "0", 1)
    # an increasing schedule (flow-matching t from 0 to 1) is fine too
    t = StepTracker()
    got = _walk(t, [(0.0,), (0.25,), (0.5,), (0.1,)])
    assert [g[0] for g in got] == [0, 1, 2, 0] and got[-1][2] == 1


def test_multi_value_signature():
    t = StepTracker()  # (timestep, guidance): guidance constant, timestep decreasing
    got = _walk(t, [(999.0, 3.5), (900.0, 3.5), (900.0, 3.5), (800.0, 3.5)])
    assert got == [(0, "0", 0), (1, "0", 0), (1, "1", 0), (2, "0", 0)]


def test_another_batch_size_starts_a_generation_or_goes_on():
    """A timestep per sample: a generation at batch 2 after one at batch 1 begins anew (its values
    are the first generation's first ones); a batch change within a generation (guidance dropped
    late) goes on with the next step. Until session 44 signals of another length never began a
    generation: the batch-2 generation ran on as steps 3, 4, ... of the first."""
    t = StepTracker()
    got = _walk(t, [(999.0,), (900.0,), (800.0,), (999.0, 999.0), (900.0, 900.0), (800.0,), (999.0,)])
    assert got == [(0, "0", 0), (1, "0", 0), (2, "0", 0), (0, "0", 1), (1, "0", 1), (2, "0", 1), (0, "0", 2)]
    t = StepTracker()  # a later start at the other batch size: the schedule went back up
    got = _walk(t, [(999.0,), (900.0,), (800.0,), (950.0, 950.0)])
    assert got[-1] == (0, "0", 1)


def test_compiled_model_new_batch_size_begins_a_generation(fresh_dynamo):
    """Through Dynamo: a generation at batch 2 after one at batch 1 recompiles the graph with a
    symbolic batch, whose timestep has a symbolic length. It was no step signal then (every call a
    step of its own, no generation ever began again: sparse steps on the last generation's caches,
    counted as cache-not-filled fallbacks); now each generation begins at step 0."""
    from helpers import flux, flux_inputs
    from chipmunk_compile.runtime import sessions_of
    from torch._dynamo.utils import counters

    c = chip(flux().eval(), cfg())
    seen = []
    with torch.no_grad():
        for batch in (1, 2, 2):
            for i in range(4):
                c(**flux_inputs(1.0 - i / 4, batch=batch))
                tracker = sessions_of(c)[0].tracker
                seen.append((tracker.generation, tracker.step))
    assert seen == [(g, s) for g in range(3) for s in range(4)]
    assert counters["stats"]["unique_graphs"] == 2  # batch 1, then one graph for any batch
    assert not any(k.startswith("fallback:") for k in counters["chipmunk"]), dict(counters["chipmunk"])


def test_step_index_after_signature_tracking_begins_a_generation():
    """follow_scheduler (or a cache context's step_index) turned on after a generation tracked by
    timesteps: its step 0 begins a new generation; later step indices go on in it."""
    t = StepTracker()
    _walk(t, [(999.0,), (900.0,), (800.0,)])
    got = [t.advance(None, scheduled=s) for s in (0, 1, 2, 0)]
    assert [(p.step, p.generation) for p in got] == [(0, 1), (1, 1), (2, 1), (0, 2)]
    t = StepTracker()  # the first calls of a tracker: nothing to begin again
    assert [(p.step, p.generation) for p in (t.advance(None, scheduled=s) for s in (0, 1))] == [(0, 0), (1, 0)]
    t = StepTracker()  # a step's branches, one tracked by timestep, one by step index: one generation
    got = [t.advance(sig) if sig else t.advance(None, scheduled=s) for s, sig in
           ((0, (999.0,)), (0, None), (1, (900.0,)), (1, None), (0, (999.0,)), (0, None))]
    assert [(p.step, p.generation) for p in got] == [(0, 0), (0, 0), (1, 0), (1, 0), (0, 1), (0, 1)]


def test_no_signature_one_call_one_step_and_calls_mode():
    """Without any step signal, a call is a step; in "auto" mode that is counted
    (`step_signal_none`) and logged once, since guidance calls then count as steps and no new
    generation is detected; "calls" mode asks for it and says nothing."""
    from torch._dynamo.utils import counters

    counters["chipmunk"].clear()
    t = StepTracker()
    assert [p[0] for p in _walk(t, [None, None, None])] == [0, 1, 2]
    assert counters["chipmunk"]["step_signal_none"] == 3
    t = StepTracker("calls")
    assert _walk(t, [(1.0,), (1.0,), (1.0,)]) == [(0, "0", 0), (1, "0", 0), (2, "0", 0)]
    assert counters["chipmunk"]["step_signal_none"] == 3


def test_constant_signature_is_no_step_signal(fresh_dynamo):
    """Values that never change (token ids, no timestep among the small inputs) opened a new
    guidance branch on every call, each with caches of its own, all dense. Past MAX_BRANCHES calls
    in a row the further calls stay on branch 0 (counted, logged); a change still advances."""
    from chipmunk_compile.runtime import MAX_BRANCHES

    t = StepTracker()
    got = _walk(t, [(5.0, 7.0)] * (MAX_BRANCHES + 3) + [(5.0, 6.0)])
    assert [b for _, b, _ in got] == [str(i) for i in range(MAX_BRANCHES)] + ["0"] * 3 + ["0"]
    assert [s for s, _, _ in got] == [0] * (MAX_BRANCHES + 3) + [1]
    assert fresh_dynamo["chipmunk"]["fallback:step_signal_constant"] == 1
    # CFG's two branches per step are untouched, however long the generation
    t = StepTracker()
    assert {b for _, b, _ in _walk(t, [(float(v),) for v in range(40, 0, -1) for _ in (0, 1)])} == {"0", "1"}


def test_skip_layer_guidance_call_is_a_branch_of_its_step():
    """SD3's skip-layer guidance adds a batch-1 call beside each step's batch-2 CFG call, at the
    same timestep: another branch of that step (it was counted as a step: 23 steps in 20)."""
    t = StepTracker()
    got = _walk(t, [(999.0, 999.0), (999.0,), (900.0, 900.0), (900.0,), (999.0, 999.0)])
    assert got == [(0, "0", 0), (0, "1", 0), (1, "0", 0), (1, "1", 0), (0, "0", 1)]


def test_pinned_steps_name_their_guidance_calls():
    """set_step without a branch: the calls at one pinned step are its branches in call order, or
    by the cache context's name (every call was branch "0": two guidance calls shared one branch's
    caches). Timestep tracking after the pin is cleared begins a generation of its own."""
    t = StepTracker()
    got = []
    for step in (0, 1):
        t.explicit = (step, None)
        got += [(p.step, p.branch, p.generation) for p in (t.advance(None), t.advance(None))]
    assert got == [(0, "0", 0), (0, "1", 0), (1, "0", 0), (1, "1", 0)]
    t.explicit = (2, None)
    assert t.advance(None, SimpleNamespace(name="uncond", step_index=None)).branch == "uncond"
    t.explicit = (2, "cond")
    assert t.advance(None).branch == "cond"
    t.explicit = None  # clear_step: the timestep takes over, in a generation of its own
    assert _walk(t, [(999.0,), (900.0,)]) == [(0, "0", 1), (1, "0", 1)]


def test_two_guidance_calls_pinned_to_one_branch_stay_finite(fresh_dynamo):
    """Both calls of a step pinned to branch "0" (set_step(model, i, "0")): the second refresh of a
    step measured the forecast's slope over a zero step span, and the outputs were NaN from then on.
    A zero span now gives a zero slope (a hold)."""
    from helpers import flux, flux_inputs

    c = chip(flux().eval(), cfg(attn={"full_step_every": 3}))
    with torch.no_grad():
        c(**flux_inputs(1.0))
        for i in range(10):
            chipmunk_compile.set_step(c, i, "0")
            for b in range(2):
                x = flux_inputs(1.0 - i / 10)
                x["hidden_states"] = x["hidden_states"] + 0.1 * b
                assert torch.isfinite(c(**x)[0]).all(), (i, b)


def test_reset_bumps_generation():
    t = StepTracker()
    _walk(t, [(999.0,), (900.0,)])
    t.reset()
    assert _walk(t, [(900.0,)]) == [(0, "0", 1)]


def test_cache_context_names_and_step_index():
    t = StepTracker()
    seq = []
    for i in range(3):
        for name in ("cond", "uncond"):
            p = t.advance((123.0,), SimpleNamespace(name=name, step_index=i))  # timestep ignored
            seq.append((p.step, p.branch, p.generation))
    assert seq == [(0, "cond", 0), (0, "uncond", 0), (1, "cond", 0), (1, "uncond", 0), (2, "cond", 0), (2, "uncond", 0)]
    p = t.advance((1.0,), SimpleNamespace(name="cond", step_index=0))
    assert (p.step, p.branch, p.generation) == (0, "cond", 1)


def test_cache_context_without_step_index_names_branch():
    t = StepTracker()
    ctx = lambda n: SimpleNamespace(name=n, step_index=None)  # noqa: E731
    got = [t.advance(s, ctx(n)) for s, n in [((999.0,), "cond"), ((999.0,), "uncond"), ((900.0,), "cond")]]
    assert [(p.step, p.branch) for p in got] == [(0, "cond"), (0, "uncond"), (1, "cond")]


def test_explicit_set_step():
    t = StepTracker()
    t.explicit = (0, "cond")
    assert _walk(t, [(5.0,)]) == [(0, "cond", 0)]
    t.explicit = (0, "uncond")
    assert _walk(t, [(6.0,)]) == [(0, "uncond", 0)]
    t.explicit = (1, None)
    assert _walk(t, [(7.0,)]) == [(1, "0", 0)]
    t.explicit = (0, None)  # back to 0: a new generation
    assert _walk(t, [(7.0,)]) == [(0, "0", 1)]
    t.explicit = None
    assert _walk(t, [(999.0,), (900.0,)])[-1][0] == 1


# -- tracker through a compiled model ------------------------------------------------------------
class TimeNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x, t):
        return self.lin(x) * t.view(-1, 1, 1)


def _pos(model):
    s = chipmunk_compile.stats(model)
    return s["step"], s["branch"], s["generation"], s["calls"]


def test_compiled_model_tracks_timesteps(fresh_dynamo):
    m = TimeNet()
    cm = chip(m, cfg())
    x = torch.randn(1, 4, 8)
    seen = []
    for t in (999.0, 999.0, 900.0, 900.0, 800.0, 999.0):
        cm(x, torch.tensor([t]))
        seen.append(_pos(m)[:3])
    assert seen == [(0, "0", 0), (0, "1", 0), (1, "0", 0), (1, "1", 0), (2, "0", 0), (0, "0", 1)]
    assert _pos(m)[3] == 6
    chipmunk_compile.reset(m)
    cm(x, torch.tensor([900.0]))
    assert _pos(m)[:3] == (0, "0", 2)


def test_compiled_model_tracks_per_token_timesteps(fresh_dynamo):
    """A timestep per token (Cosmos3's `vision_timesteps`, more values than a step signal reads whole)
    beside constant token ids: read by its largest value, it gives the steps. Before, the ids alone
    were the signal, and every call was a new branch of step 0."""

    class PerToken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.emb = torch.nn.Linear(8, 8), torch.nn.Embedding(16, 8)

        def forward(self, x, ids, t):
            return self.lin(x) * t.view(-1, 1) + self.emb(ids).sum()

    m = PerToken()
    cm = chip(m, cfg())
    x, ids = torch.randn(100, 8), torch.arange(8)
    seen = []
    for t in (999.0, 900.0, 800.0, 999.0):
        cm(x, ids, torch.full((100,), t))
        seen.append(_pos(m)[:3])
    assert seen == [(0, "0", 0), (1, "0", 0), (2, "0", 0), (0, "0", 1)]

def test_compiled_model_tracks_per_frame_timesteps(fresh_dynamo):
    """A timestep per sample and frame, (B, F) (SkyReels-V2's diffusion forcing, frames at their own
    noise levels): read whole, it gives the steps, the guidance calls of a step as its branches, and
    a new generation when the frames go back to the start. Before session 47 a 2-D input was no
    signal: every call counted as a step and no later generation began. (A 2-D input counts only when
    it feeds a sin/cos: a pooled text embedding (B, D) is none.)"""

    class PerFrame(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, x, t):  # a sinusoidal embedding per frame, as timestep embedders do
            emb = torch.cat([torch.sin(t[..., None] / 1000), torch.cos(t[..., None] / 1000)], dim=-1)
            return self.lin(x) * emb.mean()

    m = PerFrame()
    cm = chip(m, cfg())
    x = torch.randn(1, 40, 8)
    seen = []
    for row in ((999.0, 999.0), (999.0, 999.0), (900.0, 999.0), (900.0, 999.0), (800.0, 950.0), (999.0, 999.0)):
        cm(x, torch.tensor([row * 5]))  # (1, 10): 5 frames at each of two noise levels
        seen.append(_pos(m)[:3])
    assert seen == [(0, "0", 0), (0, "1", 0), (1, "0", 0), (1, "1", 0), (2, "0", 0), (0, "0", 1)]


def test_compiled_model_diffusers_cache_context(fresh_dynamo):
    from diffusers import ModelMixin
    from diffusers.models.cache_utils import CacheMixin

    class Net(ModelMixin, CacheMixin):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, x, t):
            return self.lin(x) * t.view(-1, 1, 1)

    m = Net().eval()
    cm = chip(m, cfg())
    x = torch.randn(1, 4, 8)
    seen = []
    for i in range(2):
        for name in ("cond", "uncond"):
            with cm.cache_context(name, step_index=i):
                cm(x, torch.tensor([500.0]))  # the same timestep every call: only the context tells
            seen.append(_pos(m)[:2])
    assert seen == [(0, "cond"), (0, "uncond"), (1, "cond"), (1, "uncond")]
    cm(x, torch.tensor([400.0]))  # outside a context: back to the timestep signal
    assert _pos(m)[1] == "0"


def test_compiled_model_set_step(fresh_dynamo):
    m = TimeNet()
    with pytest.raises(TypeError, match="expected the \\(compiled\\) model"):
        chipmunk_compile.set_step(object(), 3)
    cm = chip(m, cfg())
    x = torch.randn(1, 4, 8)
    chipmunk_compile.set_step(cm, 3)  # before the first call (that compiles): its session takes the pin
    cm(x, torch.tensor([1.0]))
    assert _pos(m)[:2] == (3, "0")
    chipmunk_compile.set_step(m, 7, "cond")
    cm(x, torch.tensor([2.0]))
    assert _pos(m)[:2] == (7, "cond")
    chipmunk_compile.clear_step(m)
    cm(x, torch.tensor([0.5]))
    assert _pos(m)[1] == "0"


def _cosmos_timestep(case, i):
    ts = torch.full((1, 1, 3, 1, 1), 1.0 - i / 3)
    ts[:, :, 0] = 0.1  # a conditioning frame
    return ts


def _ltx_timestep(case, i):
    ts = torch.full((1, case.kwargs["hidden_states"].shape[1]), 1000.0 * (1 - i / 3))
    ts[:, :64] = 0.0  # the first frame's 8×8 tokens: the conditioning image
    return ts


@pytest.mark.parametrize("name,timestep", [("cosmos", _cosmos_timestep), ("ltx_video", _ltx_timestep)])
def test_per_frame_and_per_token_timesteps_are_a_step_signal(fresh_dynamo, name, timestep):
    """Cosmos 2 / 2.5 video2world pass the timestep as (B, 1, T, 1, 1), the conditioning frames at
    their own time; LTX-Video's image2video pipeline as (B, N), one per token, the first frame's at
    0. Neither was a step signal (rank > 1): each of a step's two guidance calls counted as a step
    and no later generation began. An input of any rank that feeds a sin/cos is one now, a large
    float one read by its largest value, the noisy tokens' time."""
    import sys

    sys.path.insert(0, "benchmarks")
    import arch_zoo
    from chipmunk_compile.runtime import sessions_of

    case = arch_zoo.MODELS[name][1]()
    c = chip(case.model, cfg())
    seen = []
    with torch.no_grad():
        for _ in range(2):
            for i in range(3):
                for _ in range(2):  # guidance as two calls
                    c(**dict(case.kwargs, timestep=timestep(case, i)))
                    p = sessions_of(case.model)[0].position()
                    seen.append((p.generation, p.step, p.branch))
    g0 = seen[0][0]
    assert seen == [(g0 + g, s, b) for g in range(2) for s in range(3) for b in ("0", "1")]


def test_guidance_calls_with_prompts_of_two_lengths_are_branches(fresh_dynamo):
    """A guider's cond and uncond calls (diffusers' modular pipelines) with a prompt and a negative
    prompt of different, unpadded lengths: Flux2's text position ids then hold few values (12 and 7
    tokens × 4 axes), which made them look like a step signal beside the timestep, and the two calls
    of each step, their ids of different lengths, counted as two steps (every sparse step then fell
    back to the exact op: the branches' caches were never filled). Rotary ids reach the attention
    before any linear, so they are no signal: the calls are branches 0 and 1 of each step."""
    from diffusers import Flux2Transformer2DModel
    from torch._dynamo.utils import counters

    from chipmunk_compile.backend import step_signal_inputs

    torch.manual_seed(0)
    model = Flux2Transformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                    timestep_guidance_channels=256, axes_dims_rope=(4, 4, 4, 4),
                                    guidance_embeds=False).eval()
    signals = []

    def keep(gm, example_inputs):  # the placeholders' sources are known only inside a backend
        names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        signals.extend(names[i] for i in step_signal_inputs(gm))
        return gm.forward

    h = w = 8
    img_ids = torch.cartesian_prod(torch.arange(1), torch.arange(h), torch.arange(w), torch.arange(1))[None]
    x = torch.randn(1, h * w, 4)

    def call(fn, t, text):
        txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(text))[None]
        return fn(hidden_states=x, encoder_hidden_states=torch.randn(1, text, 32), img_ids=img_ids, txt_ids=txt_ids,
                  timestep=torch.tensor([t]), return_dict=False)[0]

    with torch.no_grad():
        call(torch.compile(model, backend=keep), 1.0, 12)
    assert len(signals) == 1 and "timestep" in signals[0], signals  # not img_ids (64 values) nor txt_ids (48)
    torch._dynamo.reset()
    counters["chipmunk"].clear()
    cm = chip(model, cfg(attn={"full_step_every": 3}, mlp={"full_step_every": 3}))
    seen, unfilled = [], []
    with torch.no_grad():
        for _ in range(2):
            for i in range(6):
                for text in (12, 7):
                    call(cm, 1.0 - i / 6, text)
                    seen.append(_pos(model)[:3])
            unfilled.append(counters["chipmunk"]["fallback:mlp_cache_not_filled"])
    assert seen[:4] == [(0, "0", 0), (0, "1", 0), (1, "0", 0), (1, "1", 0)] and seen[-1] == (5, "1", 1), seen
    assert counters["chipmunk"]["attention_sparse"] > 0 and counters["chipmunk"]["mlp_sparse"] > 0
    # Dynamo's second, dynamic graph (the negative prompt's length) begins at step 0's uncond call, so its
    # MLP sites meet step 1's cond call with no cache: counted (exact op) in the first generation only
    assert unfilled[0] == unfilled[1] <= 3, unfilled


def test_rotary_position_ids_of_any_rank_are_no_step_signal(fresh_dynamo):
    """Research code's 1-D position ids (a real-valued rotary table by sin/cos, or a complex one by
    torch.polar) beside a timestep whose sinusoid enters a linear (nn.Linear, or a matmul with a
    weight written out): only the timestep is a signal."""
    import torch.nn.functional as F

    from chipmunk_compile.backend import step_signal_inputs

    class Rope(torch.nn.Module):
        def __init__(self, complex_table: bool):
            super().__init__()
            self.complex_table = complex_table
            self.t_emb, self.qkv, self.out = torch.nn.Linear(8, 16), torch.nn.Linear(16, 48), torch.nn.Linear(16, 16)
            self.w_t, self.w_qkv = torch.nn.Parameter(torch.randn(16, 8)), torch.nn.Parameter(torch.randn(48, 16))

        def forward(self, x, t, pos):
            f = t[:, None] * torch.arange(1, 5.0)
            emb = torch.cat([f.sin(), f.cos()], -1)
            x = x + (emb @ self.w_t.t() if self.complex_table else self.t_emb(emb))[:, None]
            qkv = x @ self.w_qkv.t() if self.complex_table else self.qkv(x)  # (the timestep's next linear)
            q, k, v = qkv.view(1, -1, 3, 2, 8).permute(2, 0, 3, 1, 4)
            angles = pos[:, None].float() * torch.arange(1, 5.0)
            if self.complex_table:
                rot = torch.polar(torch.ones_like(angles), angles)
                q, k = (torch.view_as_real(torch.view_as_complex(a.reshape(1, 2, -1, 4, 2)) * rot).flatten(3)
                        for a in (q, k))
            else:
                cos, sin = angles.cos().repeat(1, 2), angles.sin().repeat(1, 2)
                q, k = (a * cos + a.flip(-1) * sin for a in (q, k))
            return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(1, -1, 16))

    for complex_table in (False, True):
        names = []

        def keep(gm, example_inputs):
            placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
            names.append([placeholders[i] for i in step_signal_inputs(gm)])
            return gm.forward

        torch._dynamo.reset()
        torch.compile(Rope(complex_table), backend=keep)(torch.randn(1, 12, 16), torch.tensor([0.5]), torch.arange(12))
        assert len(names) == 1 and len(names[0]) == 1 and "_t_" in names[0][0], names


def test_a_method_called_after_a_graph_break_is_no_second_step(fresh_dynamo):
    """A forward that calls a method of its own model which graph-breaks (Z-Image's
    `_prepare_sequence`): Dynamo compiles that method as a frame of its own, with the model as
    `self`. Until session 49 that frame counted as an entry graph of the model: each model call
    advanced the step twice, the second time with no step signal (counted and warned), the sites
    after it saw odd steps only, and every generation's first MLP step was a sparse one with no
    cache (a counted fallback). Now one call is one step, and the outputs equal those of the same
    model without the break."""
    from torch._dynamo.utils import counters

    from test_numerics import Net, run, sparse_cfg

    class Prepared(Net):
        def _prepare(self, x):
            x = x * 1.0
            torch._dynamo.graph_break()  # (Z-Image: data-dependent list handling)
            return x + 0.0

        def forward(self, x, t, mask=None):
            x = self._prepare(x + self.t_proj(t.view(-1, 1) / 1000.0)[:, None, :])
            for b in self.blocks:
                x = b(x, mask)
            return x

    plain = Net().eval()  # the same weights, no graph break: the schedule as it should run
    plain_outs = [run(plain, chip(plain, sparse_cfg()), 8)[0] for _ in range(2)]
    torch._dynamo.reset()
    model = Prepared().eval()
    counters["chipmunk"].clear()
    compiled = chip(model, sparse_cfg(), fullgraph=False)
    steps = []
    for gen in range(2):
        outs, _ = run(model, compiled, 8)
        steps.append(_pos(model)[:3])
        for o, p in zip(outs, plain_outs[gen]):
            torch.testing.assert_close(o, p, rtol=1e-5, atol=1e-5)
    assert steps == [(7, "0", 0), (7, "0", 1)], steps
    cc = counters["chipmunk"]
    assert not cc["step_signal_none"] and not [k for k in cc if k.startswith("fallback")], dict(cc)
    kinds = {s["kind"]: s["steps"] for s in chipmunk_compile.stats(model)["sites"]}
    assert kinds["mlp"]["dense"] == 2 * 2 and kinds["attention"]["sparse"] > 0, kinds  # steps 0 and 4, twice


def test_integer_lengths_are_no_step_signal(fresh_dynamo):
    """ErnieImage takes the prompt's token count as a 1-D integer tensor (`text_lens`). With a
    negative prompt of another length it was a step signal beside the timestep, so each guidance
    call looked like a new step, the next cond call like a new generation, and no step ran sparse
    (each 'generation' of 2 steps was all dense, warned about). An integer input that feeds no
    sinusoid is no signal; an integer timestep, which enters a sinusoidal embedding, still is."""
    from torch._dynamo.utils import counters

    from test_numerics import Net, latents, ts

    class WithLengths(Net):
        def forward(self, x, t, text_lens, step_int):
            f = step_int[:, None].float() * torch.arange(1, 3.0)
            emb = self.t_proj(t.view(-1, 1) / 1000.0) + torch.cat([f.sin(), f.cos()], -1).sum() * 0
            keep = (torch.arange(x.shape[1]) < text_lens[:, None] + x.shape[1]).to(x.dtype)  # (all kept)
            x = (x + emb[:, None, :]) * keep[..., None]
            for b in self.blocks:
                x = b(x)
            return x

    model = WithLengths().eval()
    counters["chipmunk"].clear()
    cm = chip(model, cfg(attn={"full_step_every": 3}, mlp={"full_step_every": 3}))
    seen = []
    with torch.no_grad():
        for i in range(6):
            for n_text in (12, 7):  # cond, then uncond with a shorter negative prompt
                cm(latents(i), ts(i), torch.tensor([n_text]), torch.tensor([999 - 50 * i]))
                seen.append(_pos(model)[:3])
    assert seen[:4] == [(0, "0", 0), (0, "1", 0), (1, "0", 0), (1, "1", 0)] and seen[-1] == (5, "1", 0), seen
    assert counters["chipmunk"]["attention_sparse"] > 0 and not counters["chipmunk"]["generation_all_dense"]
