"""`chipmunk_compile.calibrate`: the cheapest candidate config at or above a PSNR bound against the
dense generation, on the user's own run; the bound is never silently missed; a pipeline's module is
restored; bad candidates fail before any compile."""

import logging
import math
from types import SimpleNamespace

import pytest
import torch

import chipmunk_compile
from chipmunk_compile.calibration import _cost, psnr_against

from helpers import FULL_KEYS, cfg, fresh_dynamo  # noqa: F401
from test_numerics import Net, latents, sparse_cfg, ts

STEPS = 12
FULL = cfg(attn=dict(FULL_KEYS, group=16, full_step_every=4), mlp=dict(FULL_KEYS, block=16, full_step_every=4))
CANDIDATES = [("full budget", FULL), ("25% budget", sparse_cfg())]


def _generation(m) -> torch.Tensor:
    """A 12-step Euler loop over the model's velocity, the same noise every time."""
    x = latents(0)
    for i in range(STEPS):
        x = x - 0.05 * m(x, ts(i))
    return x


def test_the_cheapest_candidate_above_the_bound_is_picked(fresh_dynamo):
    model = Net().eval()
    strict = chipmunk_compile.calibrate(model, _generation, min_psnr=120.0, candidates=CANDIDATES, compiler="eager")
    by_name = {c.name: c for c in strict.candidates}
    assert by_name["full budget"].psnr > 120 > by_name["25% budget"].psnr  # exact up to rounding; not
    assert by_name["25% budget"].flops < by_name["full budget"].flops <= 1.5
    assert strict.met and strict.name == "full budget"  # the only one at 120 dB
    loose = chipmunk_compile.calibrate(model, _generation, min_psnr=by_name["25% budget"].psnr - 1,
                                       candidates=CANDIDATES, compiler="eager", steps=STEPS)
    assert loose.met and loose.name == "25% budget" and loose.config["steps"] == STEPS
    assert "25% budget" in str(loose)


def test_step_caching_candidates_count_their_skipped_calls(fresh_dynamo):
    skips = dict(sparse_cfg(), step_cache={"enabled": True, "skip_steps": [4, 6, 8, 10]})
    found = chipmunk_compile.calibrate(Net().eval(), _generation, min_psnr=0.0, compiler="eager",
                                       candidates=[CANDIDATES[1], ("25% budget + 4 of 12 calls skipped", skips)])
    plain, skipping = found.candidates
    assert skipping.flops < plain.flops and found.name == skipping.name


def test_skipped_calls_count_at_no_cost(monkeypatch):
    """The sites' ratio is over the calls that ran; a step cache's skipped calls join the total."""
    from chipmunk_compile import flops, runtime

    site = SimpleNamespace(steps={"sparse": 8})
    cache = SimpleNamespace(summary=lambda: {"skipped": 4, "computed": 8})
    monkeypatch.setattr(flops, "sites_flops_ratio", lambda sites: 0.5)
    monkeypatch.setattr(runtime, "sessions_of", lambda m: [SimpleNamespace(sites=[site], step_cache=cache)])
    assert _cost(object(), None) == (pytest.approx(0.5 * 8 / 12), pytest.approx(0.5 * 8 / 12), 1, 8 + 4)


def test_step_caching_alone_costs_its_computed_share_of_the_model(fresh_dynamo):
    """The whole model's FLOPs rank the candidates (one dense generation counted): step caching
    alone, skipping 4 of 12 calls, costs 8/12 of the model, while its sites' FLOPs would say nothing
    of the rest of the model it skips; a sparse candidate's savings are diluted by the rest."""
    off = {"enabled": False}
    alone = dict(cfg(attn=off, mlp=off), step_cache={"enabled": True, "skip_steps": [4, 6, 8, 10]})
    found = chipmunk_compile.calibrate(Net().eval(), _generation, min_psnr=0.0, compiler="eager",
                                       candidates=[("step caching alone", alone), CANDIDATES[1]])
    assert found.model_flops and "model FLOPs" in str(found)
    by_name = {c.name: c for c in found.candidates}
    assert by_name["step caching alone"].flops == pytest.approx(8 / 12)
    sparse = by_name["25% budget"]  # the sites' savings diluted by the rest of the model
    assert sparse.site_flops < sparse.flops < 1.0
    sites_only = chipmunk_compile.calibrate(Net().eval(), _generation, min_psnr=0.0, compiler="eager",
                                            candidates=[CANDIDATES[1]], model_flops=False)
    assert not sites_only.model_flops and "site FLOPs" in str(sites_only)
    # work outside the model (a pipeline's text encoders, its VAE) is not the model's: not counted
    big = torch.randn(256, 256)
    outside = chipmunk_compile.calibrate(Net().eval(), lambda m: (big @ big, _generation(m))[1], min_psnr=0.0,
                                         compiler="eager", candidates=[CANDIDATES[1]])
    assert outside.flops == pytest.approx(sparse.flops)


def test_count_flops_counts_attention_on_the_cpu():
    from chipmunk_compile.flops import count_flops

    q = torch.randn(1, 2, 64, 16)
    assert count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q)) == 4 * 2 * 64 * 64 * 16


def test_timed_calibration_picks_the_fastest_at_the_bound(fresh_dynamo, monkeypatch, caplog):
    """`timed`: a second run of every generation is timed; the fastest candidate at the bound wins,
    whatever its FLOPs (here the timer says the full budget is faster); one slower than dense is
    said."""
    from chipmunk_compile import calibration

    times = iter([1.0, 0.5, 0.8])  # dense, full budget, 25% budget
    monkeypatch.setattr(calibration, "_timed", lambda fn: (fn(), next(times))[1])
    found = chipmunk_compile.calibrate(Net().eval(), _generation, min_psnr=0.0, candidates=CANDIDATES,
                                       compiler="eager", timed=True)
    assert [c.speedup for c in found.candidates] == [2.0, 1.25]
    assert found.name == "full budget" and found.speedup == 2.0 and "2.000x" in str(found)
    times = iter([1.0, 1.5, 1.2])  # every candidate slower than dense (the CPU's reference kernels)
    with caplog.at_level(logging.WARNING, logger="chipmunk_compile"):
        slow = chipmunk_compile.calibrate(Net().eval(), _generation, min_psnr=0.0, candidates=CANDIDATES,
                                          compiler="eager", timed=True)
    assert slow.name == "25% budget" and any("slower than dense" in r.getMessage() for r in caplog.records)


def test_no_candidate_at_the_bound_is_said(fresh_dynamo, caplog):
    with caplog.at_level(logging.WARNING, logger="chipmunk_compile"):
        found = chipmunk_compile.calibrate(Net().eval(), _generation, min_psnr=1e9, candidates=CANDIDATES[1:],
                                           compiler="eager")
    assert not found.met and found.name == "25% budget"
    assert any("no candidate reaches" in r.getMessage() for r in caplog.records)
    assert "NO candidate meets" in str(found)


def test_a_candidate_without_sparse_steps_is_never_chosen(fresh_dynamo, caplog):
    """Fewer tokens than min_tokens, or a step count whose periods scale to 1: every op runs dense,
    so the candidate equals dense. That is no speedup, and must not read as a pass."""
    short = cfg(attn={"min_tokens": 10 ** 6}, mlp={"min_tokens": 10 ** 6})
    with caplog.at_level(logging.WARNING, logger="chipmunk_compile"):
        found = chipmunk_compile.calibrate(Net().eval(), _generation, candidates=[("too short", short)],
                                           compiler="eager")
    assert not found.met and found.candidates[0].sites == 0 and found.psnr == math.inf
    assert any("no site was rewritten" in r.getMessage() for r in caplog.records)
    caplog.clear()
    few = dict(sparse_cfg(), schedule_steps=48, steps=STEPS)  # periods of 4 at 48 steps: 1 at 12
    with caplog.at_level(logging.WARNING, logger="chipmunk_compile"):
        found = chipmunk_compile.calibrate(Net().eval(), _generation, candidates=[("few steps", few)],
                                           compiler="eager")
    assert not found.met and found.candidates[0].sites > 0 and found.candidates[0].sparse_calls == 0
    assert any("the step count leaves none" in r.getMessage() for r in caplog.records)


def test_a_pipelines_module_is_swapped_in_and_restored(fresh_dynamo):
    model = Net().eval()
    pipe = SimpleNamespace(transformer=model)
    seen = []

    def run(m):
        seen.append((m is pipe.transformer, m is model))
        return _generation(pipe.transformer)

    chipmunk_compile.calibrate(pipe, run, candidates=CANDIDATES[1:], compiler="eager")
    assert pipe.transformer is model
    assert seen == [(True, True), (True, False)]  # dense first, then the compiled candidate


@pytest.mark.parametrize("where", ["model", "blocks"])
@pytest.mark.parametrize("model_flops", [True, False])
def test_a_module_compiled_in_place_is_calibrated_as_the_module(fresh_dynamo, where, model_flops):
    """`module.compile(backend="chipmunk", ...)` before calibrating: the dense reference and each
    candidate ran that compilation instead (session 72: both candidates 57.92 dB, the 25% budget's),
    so the picks were silently wrong. Its compiled calls are set aside, then put back."""
    model = Net().eval()
    compiled = [model] if where == "model" else list(model.blocks)[:2]
    for m in compiled:
        m.compile(backend="chipmunk", options={"config": CANDIDATES[1][1], "compiler": "eager"})
    impls = [m._compiled_call_impl for m in compiled]
    found = chipmunk_compile.calibrate(model, _generation, min_psnr=120.0, candidates=CANDIDATES, compiler="eager",
                                       model_flops=model_flops)  # without the FLOP count the reference runs plainly
    by_name = {c.name: c for c in found.candidates}
    assert by_name["full budget"].psnr > 120 > by_name["25% budget"].psnr and found.name == "full budget"
    assert [m._compiled_call_impl for m in compiled] == impls  # put back, and they still run chipmunk
    with torch.no_grad():
        _generation(model)
    assert chipmunk_compile.stats(model)["sites"]


def test_bad_input_fails_clearly(fresh_dynamo):
    with pytest.raises(ValueError, match="unknown keys in attn"):
        chipmunk_compile.calibrate(Net().eval(), _generation, candidates=[("typo", {"attn": {"top_key": 0.1}})])
    with pytest.raises(TypeError, match="nn.Module"):
        chipmunk_compile.calibrate(SimpleNamespace(transformer=None), _generation)
    with pytest.raises(ValueError, match="same output"):
        psnr_against(torch.zeros(2, 3), torch.zeros(2, 4))
    assert psnr_against(torch.ones(2, 4), torch.ones(2, 4)) == math.inf
