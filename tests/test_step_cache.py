"""Step caching (step_cache.py): refresh steps of the sparse sites are never skipped, with the fixed
schedule or the adaptive rule, so chipmunk's caches and indices never go stale."""

import torch

from chipmunk_compile.step_cache import refreshes_at

from helpers import ccount, chip, fresh_dynamo  # noqa: F401
from test_numerics import Net, latents, sparse_cfg, ts

STEPS = 10  # sparse_cfg: attention refreshes at 1, 4, 8; MLP dense steps at 0, 4, 8


def _run(step_cache, with_model=False):
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    cm = chip(Net().eval(), {**sparse_cfg(), "step_cache": step_cache})
    with torch.no_grad():
        outs = [cm(latents(i, seed=1), ts(i)) for i in range(STEPS)]
    c = {k: ccount(k) for k in ("attention_refresh", "mlp_dense", "step_cache_skipped", "step_cache_kept_refresh")}
    return (outs, c, cm) if with_model else (outs, c)


def test_refreshes_at_follows_the_schedules():
    class S:
        def __init__(self, kind, cfg):
            self.kind, self.cfg = kind, cfg

    from chipmunk_compile import ChipmunkConfig

    c = ChipmunkConfig.from_any(sparse_cfg())
    attn, mlp = S("attention", c.attn), S("mlp", c.mlp)
    assert [s for s in range(STEPS) if refreshes_at([attn], s)] == [1, 4, 8]
    assert [s for s in range(STEPS) if refreshes_at([mlp], s)] == [0, 4, 8]
    c.mlp.enabled = False
    assert not refreshes_at([mlp], 4)


def test_fixed_schedule_keeps_refresh_steps(fresh_dynamo):
    _, plain = _run({"enabled": False})
    outs, c, cm = _run({"enabled": True, "skip_steps": [2, 3, 4, 5, 6, 7]}, with_model=True)
    assert c["step_cache_kept_refresh"] == 1 and c["step_cache_skipped"] == 5  # step 4 computed
    import chipmunk_compile

    sc = chipmunk_compile.stats(cm)["step_cache"]
    assert list(sc["skipped_steps"].values()) == [[2, 3, 5, 6, 7]] and sc["skipped"] == 5
    with torch.no_grad():  # a second generation: its own list, the counters go on
        for i in range(STEPS):
            cm(latents(i, seed=2), ts(i))
    sc = chipmunk_compile.stats(cm)["step_cache"]
    assert list(sc["skipped_steps"].values()) == [[2, 3, 5, 6, 7]] and sc["skipped"] == 10
    assert c["attention_refresh"] == plain["attention_refresh"] and c["mlp_dense"] == plain["mlp_dense"]
    assert outs[3] is outs[2] and outs[4] is not outs[3]


def test_adaptive_rule_keeps_refresh_steps(fresh_dynamo):
    """A threshold no change reaches would skip every step after warm-up; the refreshes still run."""
    _, plain = _run({"enabled": False})
    _, c = _run({"enabled": True, "threshold": 1e9, "max_consecutive": 100, "warmup_steps": 2})
    assert c["step_cache_skipped"] > 0 and c["step_cache_kept_refresh"] >= 2
    assert c["attention_refresh"] == plain["attention_refresh"] and c["mlp_dense"] == plain["mlp_dense"]


def test_adaptive_rule_computes_the_warmup_steps(fresh_dynamo):
    """The adaptive rule never skips before `warmup_steps` (default 7: the published schedule's first
    skip), however small the input change."""
    import chipmunk_compile

    _, c, cm = _run({"enabled": True, "threshold": 1e9, "max_consecutive": 100}, with_model=True)
    skipped = list(chipmunk_compile.stats(cm)["step_cache"]["skipped_steps"].values())[0]
    assert skipped == [7, 9]  # 8 is a refresh step (kept)
    _, c, cm = _run({"enabled": True, "threshold": 1e9, "max_consecutive": 100, "warmup_steps": 3},
                    with_model=True)
    assert list(chipmunk_compile.stats(cm)["step_cache"]["skipped_steps"].values())[0] == [3, 5, 6, 7, 9]


def test_forecast_extrapolates_the_last_two_computed_calls(fresh_dynamo):
    """step_cache.extrapolate 1: a skipped call returns last + (t - t_last)/(t_last - t_prev)·(last -
    prev) of its branch's last two computed calls (computed here: 0, 1, 4, 8, 9), which on smoothly
    drifting inputs lands closer to the computed output than reusing the last one."""
    plain, _ = _run({"enabled": False})
    reuse, _ = _run({"enabled": True, "skip_steps": [2, 3, 5, 6, 7]})
    outs, c = _run({"enabled": True, "skip_steps": [2, 3, 5, 6, 7], "extrapolate": 1.0})
    assert c["step_cache_skipped"] == 5 and ccount("step_cache_forecast") == 5
    for i in (0, 1, 4, 8, 9):  # computed calls are not touched
        torch.testing.assert_close(outs[i], plain[i], rtol=0, atol=0)
    for t, last, prev in ((2, 1, 0), (3, 1, 0), (5, 4, 1), (6, 4, 1), (7, 4, 1)):
        want = outs[last] + (t - last) / (last - prev) * (outs[last] - outs[prev])
        torch.testing.assert_close(outs[t], want, rtol=1e-5, atol=1e-6)
    err = lambda o: sum(float((o[t] - plain[t]).norm()) for t in (2, 3, 5, 6, 7))  # noqa: E731
    assert err(outs) < 0.5 * err(reuse), (err(outs), err(reuse))


def _pinned(steps, catch_up):
    """The sites see only `steps` (pinned by set_step, as when a hook skips the blocks of the other
    steps' calls: diffusers' FirstBlockCache, cache-dit's DBCache): (outputs by step, dense outputs,
    counters)."""
    import chipmunk_compile
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = Net().eval()
    cm = chip(model, sparse_cfg(attn={"catch_up": catch_up}, mlp={"catch_up": catch_up}))
    outs, dense = {}, {}
    with torch.no_grad():
        for i in steps:
            if i:  # (the first call is step 0 of automatic tracking)
                chipmunk_compile.set_step(cm, i)
            outs[i], dense[i] = cm(latents(i, seed=1), ts(i)), model(latents(i, seed=1), ts(i))
    caught = {k: ccount(k) for k in ("attention_refresh_caught_up", "mlp_dense_caught_up")}
    if ccount("attention_dense_caught_up"):
        caught["attention_dense_caught_up"] = ccount("attention_dense_caught_up")
    return outs, dense, caught


def test_a_refresh_the_sites_skipped_over_runs_at_their_next_call(fresh_dynamo):
    """Steps 4 and 8 hold the attention refreshes and the dense MLP steps (period 4). When the sites
    do not run them, a later call runs them instead once the caches are `catch_up` periods old: at
    catch_up 1 the next call (5 and 9), at the default 2 only 9 (the caches filled at 1 and 0 are 8
    and 9 steps old there), at 0 none. An attention call as far from the previous one runs plain
    dense instead. Its sparse steps then start from caches of that step: closer
    to dense than sparse steps on caches filled 5 to 6 steps before. Until session 51 the sparse
    steps after a missed refresh read the caches of the last one run, however old."""
    every = list(range(STEPS))
    _, _, caught = _pinned(every, 1)
    assert caught == {"attention_refresh_caught_up": 0, "mlp_dense_caught_up": 0}  # nothing missed
    seen = [0, 1, 2, 3, 5, 6, 7, 9]
    blocks = len(Net().blocks)  # one attention and one MLP site each
    outs, dense, caught = _pinned(seen, 1)
    assert caught == {"attention_refresh_caught_up": 2 * blocks, "mlp_dense_caught_up": 2 * blocks}
    _, _, caught = _pinned(seen, 2.0)
    assert caught == {"attention_refresh_caught_up": blocks, "mlp_dense_caught_up": blocks}
    stale, _, held = _pinned(seen, 0)
    assert held == {"attention_refresh_caught_up": 0, "mlp_dense_caught_up": 0}
    # skipped for a long stretch (4 and 8 missed, the previous call at 3): at step 11 attention runs
    # plain dense (a refresh would cost more, for a cache a call as far off would not read) and the
    # MLP its dense step; 13, close to it, refreshes (12 missed), and 14 runs sparse on that cache
    back, dense_back, caught = _pinned([0, 1, 2, 3, 11, 13, 14], 2.0)
    assert caught == {"attention_dense_caught_up": blocks, "attention_refresh_caught_up": blocks,
                      "mlp_dense_caught_up": blocks}
    assert torch.allclose(back[11], dense_back[11], rtol=1e-5, atol=1e-5)  # exact: every site dense
    err = {i: float((outs[i] - dense[i]).norm() / dense[i].norm()) for i in (6, 7)}
    err_stale = {i: float((stale[i] - dense[i]).norm() / dense[i].norm()) for i in (6, 7)}
    assert all(err[i] < err_stale[i] for i in err), (err, err_stale)
