"""Speed/fidelity Pareto sweep (issue 4): step caching alone, chipmunk alone, and chipmunk + step caching.

    python benchmarks/fidelity_pareto.py                          # whole grid, tiny DiT, 8 images
    python benchmarks/fidelity_pareto.py --settings 'sc-*' --resume   # a subset, keeping earlier rows
    python benchmarks/fidelity_pareto.py --settings 'cmsc-*' --resume --rerun   # replace those rows
    python benchmarks/fidelity_pareto.py --replot                 # fronts and plot from the saved JSON
    python benchmarks/fidelity_pareto.py --list                   # the grid

Generates the same seeded images as benchmarks/fidelity.py (its TinyRunner and run()) densely once
and then with every setting of GRID; per setting: PSNR/SSIM against dense per image (mean, spread,
standard error of the mean), latent error, FLOPs ratio against dense, and wall time. Each setting
belongs to one family by its config (sparse ops on/off, step cache on/off); per family the Pareto
front of (FLOPs ratio low, mean PSNR high) is extracted. The summary names the lowest-FLOPs chipmunk
setting at or above --target dB and compares every chipmunk + step caching point with the fronts of
the two single methods at its FLOPs: against the best point costing no more, and against the front
interpolated between its neighbouring points (paired per-image PSNR differences with their standard
error). Rows are written after every setting, so an interrupted sweep can go on with --resume
(--dense-cache FILE keeps the dense reference between runs).
Results: benchmarks/results/fidelity_pareto.{csv,json,png} (the plot uses matplotlib when
installed, else PIL).
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.fidelity import OFF, PUBLISHED_SKIPS, RESULTS, _flux  # noqa: E402

STEPCACHE, CHIPMUNK, COMBO = "stepcache", "chipmunk", "chipmunk+stepcache"
FAMILIES = (STEPCACHE, CHIPMUNK, COMBO)
COLORS = {STEPCACHE: "#1f77b4", CHIPMUNK: "#d62728", COMBO: "#2ca02c"}


def _cached(sc) -> dict:
    """The step_cache section turning step caching on with the patch `sc` (nothing for None)."""
    return {"step_cache": {"enabled": True, **sc}} if sc else {}


def _cm(attn=None, mlp=None, sc=None):
    """A chipmunk config on the flux preset with the published attention refresh period (fidelity's
    `_flux`; the preset itself refreshes every 5 since these rows showed it): attn/mlp patches,
    sc: step_cache patch."""
    return _flux(attn, **({"mlp": mlp} if mlp else {}), **_cached(sc))


def _sc(**sc):
    return {**OFF, **_cached(sc)}


AOFF = MOFF = {"enabled": False}
# name -> chipmunk config. Names: a<attn top_keys>/aoff, m<mlp top_keys>, e<period> = full_step_every
# (both ops), ae<p>/me<p> one op only, t<threshold> = adaptive step caching, fixed25 = published skips.
GRID = {
    # step caching alone: the published schedule and adaptive thresholds (at most 2 skips in a row)
    "sc-fixed25": _sc(skip_steps=PUBLISHED_SKIPS),
    "sc-t0.02": _sc(threshold=0.02, warmup_steps=2),
    "sc-t0.05": _sc(threshold=0.05, warmup_steps=2),
    "sc-t0.08": _sc(threshold=0.08, warmup_steps=2),
    "sc-t0.12": _sc(threshold=0.12, warmup_steps=2),
    "sc-t0.20": _sc(threshold=0.2, warmup_steps=2),
    "sc-t0.30-c3": _sc(threshold=0.3, max_consecutive=3, warmup_steps=2),
    # the low-FLOPs end, where skipped calls compound their error
    "sc-t0.40-c3": _sc(threshold=0.4, max_consecutive=3, warmup_steps=2),
    "sc-t0.50-c4": _sc(threshold=0.5, max_consecutive=4, warmup_steps=2),
    # adaptive with the first 7 steps computed, as the published schedule keeps them (the default
    # since session 14: warm-up 2 skipped steps 2-3 and lost 8-13 dB on the 4096-token model)
    "sc-t0.05-w7": _sc(threshold=0.05, warmup_steps=7),
    "sc-t0.08-w7": _sc(threshold=0.08, warmup_steps=7),
    "sc-t0.12-w7": _sc(threshold=0.12, warmup_steps=7),
    "sc-t0.20-w7": _sc(threshold=0.2, warmup_steps=7),
    "sc-t0.30-c3-w7": _sc(threshold=0.3, max_consecutive=3, warmup_steps=7),
    # chipmunk alone: the flux preset (a.165 m.30 e10), sparser MLP without attention sparsity
    # (attention is where the error comes from), and attention with more refreshes or more keys
    "cm-a.165-m.30": _cm(),
    "cm-aoff-m.30": _cm(AOFF),
    "cm-aoff-m.15": _cm(AOFF, {"top_keys": 0.15}),
    "cm-aoff-m.15-me20": _cm(AOFF, {"top_keys": 0.15, "full_step_every": 20}),
    "cm-aoff-m.05": _cm(AOFF, {"top_keys": 0.05}),
    # neurons ranked by their estimated effect on the MLP output (mlp.score: output) instead of
    # by their pre-activation change (the published rule)
    "cm-aoff-m.30-so": _cm(AOFF, {"score": "output"}),
    "cm-aoff-m.15-so": _cm(AOFF, {"top_keys": 0.15, "score": "output"}),
    "cm-aoff-m.05-so": _cm(AOFF, {"top_keys": 0.05, "score": "output"}),
    "cm-a.165-m.30-ae5": _cm({"full_step_every": 5}),  # attention refreshed twice as often
    "cm-a.50-m.30": _cm({"top_keys": 0.5}),
    "cm-a.165-m.30-g64": _cm({"group": 64}),  # query groups of one 8x8 tile instead of two
    "cm-a.165-m.30-r.01": _cm({"random_keys": 0.01}),  # + 1% random keys (the video presets' extra)
    "cm-a.165-m.30-cq128": _cm({"colsum_queries": 128}),  # columns ranked by all 128 queries, not 32
    # the attention quality guard: layers whose top 16.5% keys hold less than this share of the
    # attention mass at their first selection stay dense
    "cm-a.165-m.30-mm.60": _cm({"min_mass": 0.6}),
    "cm-a.165-m.30-mm.70": _cm({"min_mass": 0.7}),
    "cm-a.165-m.30-ae5-mm.70": _cm({"full_step_every": 5, "min_mass": 0.7}),  # both levers
    # text keys ranked like any other column instead of always kept (the published FLUX rule: pure
    # top-k over all columns, method.md §1): the attention density drops from 16.5% + text to 16.5%
    "cm-a.165-m.30-nt": _cm({"keep_text_keys": False}),
    "cm-a.165-m.30-ae5-nt": _cm({"full_step_every": 5, "keep_text_keys": False}),
    # chipmunk + step caching: the published schedule (it never skips a multiple of 10, i.e. a chipmunk
    # refresh step at full_step_every 10) and adaptive caching (which never skips a refresh step either)
    "cmsc-a.165-m.30-fixed25": _cm(sc={"skip_steps": PUBLISHED_SKIPS}),
    "cmsc-aoff-m.30-fixed25": _cm(AOFF, sc={"skip_steps": PUBLISHED_SKIPS}),
    "cmsc-aoff-m.15-fixed25": _cm(AOFF, {"top_keys": 0.15}, sc={"skip_steps": PUBLISHED_SKIPS}),
    "cmsc-aoff-m.30-t0.05": _cm(AOFF, sc={"threshold": 0.05, "warmup_steps": 2}),
    "cmsc-aoff-m.30-t0.12": _cm(AOFF, sc={"threshold": 0.12, "warmup_steps": 2}),
    "cmsc-aoff-m.15-t0.08": _cm(AOFF, {"top_keys": 0.15}, sc={"threshold": 0.08, "warmup_steps": 2}),
    # the same low-FLOPs end reached by stacking: sparse MLP deltas on the calls that do run
    "cmsc-aoff-m.30-t0.20": _cm(AOFF, sc={"threshold": 0.2, "warmup_steps": 2}),
    "cmsc-aoff-m.30-t0.30-c3": _cm(AOFF, sc={"threshold": 0.3, "max_consecutive": 3, "warmup_steps": 2}),
    "cmsc-aoff-m.15-t0.30-c3": _cm(AOFF, {"top_keys": 0.15}, sc={"threshold": 0.3, "max_consecutive": 3, "warmup_steps": 2}),
    # the flux preset (attention refreshed every 5 steps) and a light MLP-only setting on the published skips
    "cmsc-a.165-m.30-ae5-fixed25": _cm({"full_step_every": 5}, sc={"skip_steps": PUBLISHED_SKIPS}),
    "cmsc-aoff-m.30-t0.12-w7": _cm(AOFF, sc={"threshold": 0.12, "warmup_steps": 7}),
    "cmsc-aoff-m.30-t0.20-w7": _cm(AOFF, sc={"threshold": 0.2, "warmup_steps": 7}),
    "cmsc-aoff-m.50-fixed25": _cm(AOFF, {"top_keys": 0.5}, sc={"skip_steps": PUBLISHED_SKIPS}),
    "cm-aoff-m.50": _cm(AOFF, {"top_keys": 0.5}),
    # sparse attention alone (MLP dense): at 4096 tokens attention holds most of the FLOPs, and the
    # MLP's change is diffuse (delta_stats: top 10% of neurons explain ~25% of it)
    "cm-a.165-moff": _cm(None, MOFF),
    "cm-a.165-moff-ae5": _cm({"full_step_every": 5}, MOFF),
    "cmsc-a.165-moff-fixed25": _cm(None, MOFF, sc={"skip_steps": PUBLISHED_SKIPS}),
    "cmsc-a.165-moff-t0.12-w7": _cm(None, MOFF, sc={"threshold": 0.12, "warmup_steps": 7}),
    # the low-FLOPs end with the 7-step warm-up, for step caching alone and stacked with each op
    "sc-t0.40-c3-w7": _sc(threshold=0.4, max_consecutive=3, warmup_steps=7),
    "sc-t0.50-c4-w7": _sc(threshold=0.5, max_consecutive=4, warmup_steps=7),
    "cmsc-a.165-m.30-t0.30-c3-w7": _cm(sc={"threshold": 0.3, "max_consecutive": 3, "warmup_steps": 7}),
    "cmsc-aoff-m.30-t0.30-c3-w7": _cm(AOFF, sc={"threshold": 0.3, "max_consecutive": 3, "warmup_steps": 7}),
    "cmsc-a.165-moff-t0.30-c3-w7": _cm(None, MOFF, sc={"threshold": 0.3, "max_consecutive": 3, "warmup_steps": 7}),
    "cmsc-a.165-moff-t0.20-w7": _cm(None, MOFF, sc={"threshold": 0.2, "warmup_steps": 7}),
}
# the residual forecast (attn.extrapolate 1, "-x1"): the unselected keys' share of the attention
# output follows its slope between refreshes instead of staying as the last refresh left it;
# "-rm": new indices at every refresh (the preset keeps the first ones)
_X1 = {"extrapolate": 1.0}
_SC_X1 = {"t0.20-w7": {"threshold": 0.2, "warmup_steps": 7},
          "t0.30-c3-w7": {"threshold": 0.3, "max_consecutive": 3, "warmup_steps": 7},
          "t0.50-c4-w7": {"threshold": 0.5, "max_consecutive": 4, "warmup_steps": 7},
          "fixed25": {"skip_steps": PUBLISHED_SKIPS}}
for _p, _a in {"": {}, "-ae5": {"full_step_every": 5}, "-rm": {"recompute_mask": True},
               "-rm-ae5": {"recompute_mask": True, "full_step_every": 5}}.items():
    GRID[f"cm-a.165-moff{_p}-x1"] = _cm({**_a, **_X1}, MOFF)
    GRID[f"cm-a.165-m.30{_p}-x1"] = _cm({**_a, **_X1})
    for _t, _sc_cfg in _SC_X1.items():
        GRID[f"cmsc-a.165-moff{_p}-x1-{_t}"] = _cm({**_a, **_X1}, MOFF, sc=_sc_cfg)
        if _p == "-rm":  # fewer keys, for the low-FLOPs end
            GRID[f"cmsc-a.10-moff{_p}-x1-{_t}"] = _cm({**_a, **_X1, "top_keys": 0.10}, MOFF, sc=_sc_cfg)
# the MLP error forecast (mlp.extrapolate 1, "-mx1") on top: the stale neurons' error rate, measured
# at each dense MLP step after the first, added to the sparse steps' output
GRID["cm-a.165-m.30-ae5-x1-mx1"] = _cm({"full_step_every": 5, **_X1}, {"extrapolate": 1.0})
GRID["cm-aoff-m.30-mx1"] = _cm(AOFF, {"extrapolate": 1.0})
GRID["cm-aoff-m.15-mx1"] = _cm(AOFF, {"top_keys": 0.15, "extrapolate": 1.0})
# skipped calls forecast from the last two computed ones (step_cache.extrapolate 1, "-f1", TaylorSeer's
# first order), for step caching alone and stacked on the attention forecast
for _t, _sc_cfg in {**_SC_X1, "t0.12-w7": {"threshold": 0.12, "warmup_steps": 7},
                    "t0.05-w7": {"threshold": 0.05, "warmup_steps": 7}}.items():
    GRID[f"sc-{_t}-f1"] = _sc(**_sc_cfg, extrapolate=1.0)
    GRID[f"cmsc-a.165-moff-rm-x1-{_t}-f1"] = _cm({"recompute_mask": True, **_X1}, MOFF,
                                                sc={**_sc_cfg, "extrapolate": 1.0})


def _video(preset: str, attn=None, sc=None) -> dict:
    """A video preset (hunyuan-video / wan) with an attention patch and optional step caching."""
    return {"preset": preset, **({"attn": attn} if attn else {}), **_cached(sc)}


# what a model with no preset gets (the `default` preset: 10% keys + 1% random refreshed every 5 steps, with
# the residual forecast; MLP 30% + 5% random) and the method's base values it replaced in session 24 (`method`:
# 5% + 1% refreshed every 10, no forecast), on any of the trained models
GRID["cm-default"] = {"preset": "default"}
GRID["cm-method"] = {"preset": "method"}
# The rows below on `default` were measured in sessions 24-25, when it picked new key indices at every refresh:
# they pin that (RM), so that their names keep meaning what was measured.
RM = {"recompute_mask": True}
# issue 4's check at the default: its self-normalized delta against the exact-normalizer variant (the sparse
# step's softmax over the selected keys normalized by the refresh's lse; session 25)
GRID["cm-default-en"] = {"preset": "default", "attn": {"delta": "exact_normalizer", **RM}}
# the default with new key indices at every refresh (recompute_mask: true, the default until session 26, whose
# `cm-default` rows measured it): against `cm-default` (the first indices kept), a refresh also takes column sums,
# a selection and a second column-sparse pass for the forecast (~20 ms of a 135 ms FLUX.1 refresh step, H200)
GRID["cm-default-rm"] = {"preset": "default", "attn": RM}
# the default stacked on step caching: the published skips, and adaptive 0.20 with the first 7 steps computed,
# both with the skipped calls' forecast
GRID["cmsc-default-fixed25-f1"] = {"preset": "default", "attn": RM,
                                   **_cached({"skip_steps": PUBLISHED_SKIPS, "extrapolate": 1.0})}
GRID["cmsc-default-t0.20-w7-f1"] = {"preset": "default", "attn": RM,
                                    **_cached({"threshold": 0.2, "warmup_steps": 7, "extrapolate": 1.0})}
# the same stacks on the default since session 26 (first indices kept, "-k")
for _t, _sc_cfg in {"fixed25": {"skip_steps": PUBLISHED_SKIPS}, "t0.20-w7": _SC_X1["t0.20-w7"],
                    "t0.30-c3-w7": _SC_X1["t0.30-c3-w7"], "t0.50-c4-w7": _SC_X1["t0.50-c4-w7"]}.items():
    GRID[f"cmsc-default-k-{_t}-f1"] = {"preset": "default", **_cached({**_sc_cfg, "extrapolate": 1.0})}
# the high-speed end (session 25): step caching alone past 4 skips in a row, against the default stacked on
# fewer skips reaching the same FLOPs (all with the skipped calls' forecast)
_SC_FAST = {"t0.50-c6-w7": {"threshold": 0.5, "max_consecutive": 6, "warmup_steps": 7},
            "t0.80-c9-w7": {"threshold": 0.8, "max_consecutive": 9, "warmup_steps": 7},
            "t0.80-c9-w4": {"threshold": 0.8, "max_consecutive": 9, "warmup_steps": 4}}
for _t, _sc_cfg in _SC_FAST.items():
    GRID[f"sc-{_t}-f1"] = _sc(**_sc_cfg, extrapolate=1.0)
for _t, _sc_cfg in {**_SC_FAST, "t0.30-c3-w7": _SC_X1["t0.30-c3-w7"], "t0.50-c4-w7": _SC_X1["t0.50-c4-w7"]}.items():
    GRID[f"cmsc-default-{_t}-f1"] = {"preset": "default", "attn": RM, **_cached({**_sc_cfg, "extrapolate": 1.0})}
# the control for those: step caching alone on the schedule the stacked rows ended up with, every 5th step computed
# after the first 4 / 7 (the default refreshes every 5 steps and a refresh step is never skipped, so from 4 skips
# in a row on, every computed call after the warm-up is a refresh); and that regular schedule at other periods,
# against the adaptive rule at equal FLOPs
for _k, _w in ((5, 4), (5, 7), (2, 7), (3, 7), (4, 7), (6, 7)):
    GRID[f"sc-every{_k}-w{_w}-f1"] = _sc(skip_steps=[s for s in range(_w, 50) if s % _k], extrapolate=1.0)
# stacking with the refresh period in computed calls: step caching computes every k-th step, the default's ops
# refresh every p-th step (a multiple of k), so p/k - 1 of every p/k computed calls are sparse ones
for _k, _p in ((3, 9), (3, 6), (2, 6), (2, 8)):
    GRID[f"cmsc-default-e{_p}-every{_k}-w7-f1"] = {
        "preset": "default", "attn": {"full_step_every": _p, **RM}, "mlp": {"full_step_every": _p},
        **_cached({"skip_steps": [s for s in range(7, 50) if s % _k], "extrapolate": 1.0})}
# the candidates for `default` (session 24), on the method's base: refreshed every 5 steps, with and without
# the residual forecast, at 5% + 1% keys, 10% + 1% (the chosen one: "dflt-a.10-e5-x1") and the flux preset's 16.5%
for _k, _a in {"a.05": {}, "a.10": {"top_keys": 0.10}, "a.165": {"top_keys": 0.165, "random_keys": 0.0}}.items():
    GRID[f"dflt-{_k}-e5"] = {"preset": "method", "attn": {**_a, "full_step_every": 5}}
    GRID[f"dflt-{_k}-e5-x1"] = {"preset": "method", "attn": {**_a, "full_step_every": 5, **_X1}}
# the default's MLP neuron budget (session 27): its 5% random draws make the sparse GEMMs 35% of the dense ones
# (FLUX.1: mm1 + mm2 ~26.6 ms of an 88 ms sparse step). Without them (30%), the draws spent on top-ranked
# neurons instead (35% top), and fewer top neurons with the draws kept (25% + 5%)
# and (session 31) 256-token blocks instead of the published 128: each gathered weight row then serves
# twice the tokens (ncu: the sparse GEMMs wait on their gathered loads), at a coarser selection
for _k, _m in {"mr0": {"random_keys": 0.0}, "m.35r0": {"top_keys": 0.35, "random_keys": 0.0},
               "m.25": {"top_keys": 0.25}, "mb256": {"block": 256}}.items():
    GRID[f"cm-default-{_k}"] = {"preset": "default", "mlp": _m}
# cheaper schedules of the default on FLUX.1 (session 27), each worth ~1% of a 50-step generation there by
# the session-26 profile: MLP neurons re-selected every 4th step from step 10 instead of every 2nd (selection
# ~5 ms a step), MLP dense every 20 steps instead of 10 (+34 ms per dense MLP step, but selection then runs
# every step up to 20), no dense first layers (2 of 57 blocks, ~1.4 ms a step), attention refreshed every 7
# steps instead of 5 (~+21 ms per refresh)
for _k, _c in {"bmc4": {"mlp": {"block_mask_cache": 4}}, "me20": {"mlp": {"full_step_every": 20}},
               "fd0": {"attn": {"first_n_dense_layers": 0}, "mlp": {"first_n_dense_layers": 0}},
               "ae7": {"attn": {"full_step_every": 7}}}.items():
    GRID[f"cm-default-{_k}"] = {"preset": "default", **_c}
# fewer sampling steps (session 46; run with --steps 28 / 16): the default's periods are in steps of a 50-step
# schedule, so at 28 steps a refresh covers 1.8x the trajectory. The periods scaled down with the count, as the
# backend now does itself when it knows the step count (schedule_steps): at 28 steps ae3-me6, at 16 ae2-me3
for _k, (_a, _m) in {"ae4-me8": (4, 8), "ae3-me6": (3, 6), "ae2-me4": (2, 4), "ae2-me3": (2, 3)}.items():
    GRID[f"cm-default-{_k}"] = {"preset": "default", "attn": {"full_step_every": _a}, "mlp": {"full_step_every": _m}}
# the default at 5% keys and 15% neurons (session 49): the cheapest of calibrate's candidates that stays above
# 30 dB on both trained image models, timed on FLUX.1-dev at its published depth
GRID["cm-default-a.05-m.15"] = {"preset": "default", "attn": {"top_keys": 0.05}, "mlp": {"top_keys": 0.15}}
# cheaper still for FLUX.1 (session 50), each a FLUX.1-dev cost named by its profile: text keys ranked like any
# column ("nt"; FLUX attends 512 T5 keys beside the top keys, 12% of its 4352; the tiny DiTs have 8 text tokens,
# so they barely measure it), the MLP dense every 20 steps ("me20", +34 ms per dense MLP step), no random neurons
# ("mr0": a quarter of the sparse GEMMs' work at 15% + 5%)
for _k, _c in {"nt": {"attn": {"keep_text_keys": False}}, "me20": {"mlp": {"full_step_every": 20}},
               "nt-me20": {"attn": {"keep_text_keys": False}, "mlp": {"full_step_every": 20}},
               "nt-me20-mr0": {"attn": {"keep_text_keys": False}, "mlp": {"full_step_every": 20, "random_keys": 0.0}},
               # session 57: MLP blocks of 256 tokens, each gathered weight row serving twice the tokens in the
               # sparse GEMMs (at 15% + 5% neurons they wait on those gathered loads)
               "nt-me20-mb256": {"attn": {"keep_text_keys": False}, "mlp": {"full_step_every": 20, "block": 256}},
               # session 58: neurons re-selected every 4th step instead of every 2nd after the first period (a
               # selection costs FLUX.1 5.5 ms of a 76 ms sparse step; 7 fewer of them at this schedule)
               "nt-me20-bmc4": {"attn": {"keep_text_keys": False}, "mlp": {"full_step_every": 20, "block_mask_cache": 4}},
               # session 60: new neurons on every step only before step 10 (the published rule, whose dense
               # period is 10) or 14 instead of the whole first 20-step period, then every 4th / 3rd step:
               # 8 / 5 / 4 fewer selections of FLUX.1's 27 at flux-fast
               **{f"nt-me20-bmc{b}-s{u}": {"attn": {"keep_text_keys": False},
                                           "mlp": {"full_step_every": 20, "block_mask_cache": b,
                                                   "select_every_step_until": u}}
                  for b, u in ((4, 10), (4, 14), (3, 10))},
               }.items():
    GRID[f"cm-default-a.05-m.15-{_k}"] = {"preset": "default", "attn": {"top_keys": 0.05, **_c.get("attn", {})},
                                          "mlp": {"top_keys": 0.15, **_c.get("mlp", {})}}
# session 60: flux-fast's schedule with fewer neurons at a count FLUX.1's sparse GEMMs run in fewer waves (at most
# 7 tiles of 256 per 128-token block: 1792 of 12288 neurons, 14.6%; mlp_mm1_masked_tail_h100_session60.txt:
# mm1 + mm2 ~0.23 against ~0.32 ms at flux-fast's 2457), with more attention keys to pay for them
for _an, _a in (("a.075", 0.075), ("a.10", 0.10)):
    for _mn, _t, _r in (("m.10r.045", 0.10, 0.045), ("m.12r.025", 0.12, 0.025)):
        GRID[f"cm-default-{_an}-{_mn}-nt-me20-bmc4"] = {
            "preset": "default", "attn": {"top_keys": _a, "keep_text_keys": False},
            "mlp": {"top_keys": _t, "random_keys": _r, "full_step_every": 20, "block_mask_cache": 4}}
# session 61: flux-fast with the MLP's error forecast ("mx1": the stale neurons' error rate measured at each dense
# step, added on the sparse ones), and with it fewer neurons (12% / 10% + 5% random: 2089 / 1843 of FLUX.1's 12288
# per 128-token block, against 2457), each a candidate only if the forecast buys back what the neurons cost;
# "m.0959": 1178 + 614 = 1792, 7 full tiles of 256 (mm1 0.106 against 0.121 ms at 1843 on an H100, session 60);
# session 62: "m.07" / "m.05", 1474 / 1228 neurons (6 / 5 tiles)


def _flux_fast(**mlp) -> dict:
    """flux-fast's setting as of session 61 (`default` with these keys), the given MLP keys changed."""
    return {"preset": "default", "attn": {"top_keys": 0.05, "keep_text_keys": False},
            "mlp": {"top_keys": 0.10, "full_step_every": 20, "block_mask_cache": 4, "extrapolate": 1.0, **mlp}}


for _mn, _t in (("m.15", 0.15), ("m.12", 0.12), ("m.10", 0.10), ("m.0959", 0.0959), ("m.07", 0.07), ("m.05", 0.05)):
    GRID[f"cm-default-a.05-{_mn}-nt-me20-bmc4-mx1"] = _flux_fast(top_keys=_t)
# session 62: flux-fast with one dense MLP step fewer (FLUX.1: a dense MLP step with the forecast costs ~90 ms
# more than a sparse one): dense every 25 steps (steps 0 and 25) instead of 20 (0, 20, 40), neurons picked on
# every step of the first period ("me25", 5 more selections at ~5.5 ms) or only until step 20 as now ("s20"),
# then every 4th; "me30-s20": dense at 0 and 30
for _k, _m in {"me25": {"full_step_every": 25}, "me25-s20": {"full_step_every": 25, "select_every_step_until": 20},
               "me30-s20": {"full_step_every": 30, "select_every_step_until": 20}}.items():
    GRID[f"cm-default-a.05-m.10-nt-{_k}-bmc4-mx1"] = _flux_fast(**_m)
# session 62: flux-fast's 1843 neurons per block split otherwise between the top-ranked and the random draws
# (the draws refresh stale neurons; without them flux-fast's ancestor lost 1.2 dB): the split costs nothing
for _mn, _t, _r in (("m.08r.07", 0.08, 0.07), ("m.06r.09", 0.06, 0.09), ("m.12r.03", 0.12, 0.03)):
    GRID[f"cm-default-a.05-{_mn}-nt-me20-bmc4-mx1"] = _flux_fast(top_keys=_t, random_keys=_r)
# session 62: flux-fast's forecast at half and 1.5x its rate (mlp.extrapolate 0.5 / 1.5)
for _e in (0.5, 1.5):
    GRID[f"cm-default-a.05-m.10-nt-me20-bmc4-mx{_e:g}"] = _flux_fast(extrapolate=_e)
# session 61: the default with the MLP's error forecast, at its neurons and at fewer (20% + 5%)
GRID["cm-default-mx1"] = {"preset": "default", "mlp": {"extrapolate": 1.0}}
GRID["cm-default-m.20-mx1"] = {"preset": "default", "mlp": {"top_keys": 0.20, "extrapolate": 1.0}}
# the default's refreshes written as noise levels (session 55; FLUX.1 samples 1280x768 with a flow shift of about
# 3): "l10" every 5 steps' levels with equal steps in t (1 - step/50), "l9" the video rows' vcm-hv-l9 levels,
# bunched at high noise (8 refreshes with equal steps, 9 under a shift)
for _k, _lv in {"l10": [round(1 - k / 50, 2) for k in range(5, 50, 5)],
                "l9": [0.98, 0.94, 0.88, 0.80, 0.70, 0.56, 0.40, 0.20]}.items():
    GRID[f"cm-default-{_k}"] = {"preset": "default", "attn": {"full_step_levels": _lv}}
    GRID[f"cm-default-a.05-m.15-{_k}"] = {"preset": "default", "attn": {"top_keys": 0.05, "full_step_levels": _lv},
                                         "mlp": {"top_keys": 0.15}}
    # session 57: the same levels, and a refresh at most 6 steps after the last (`attn.max_refresh_gap`)
    GRID[f"cm-default-{_k}-g6"] = {"preset": "default", "attn": {"full_step_levels": _lv, "max_refresh_gap": 6}}
    GRID[f"cm-default-a.05-m.15-{_k}-g6"] = {"preset": "default", "mlp": {"top_keys": 0.15},
                                            "attn": {"top_keys": 0.05, "full_step_levels": _lv, "max_refresh_gap": 6}}
GRID["dflt-a.10-e5-x1-me5"] = {"preset": "method", "attn": {"top_keys": 0.10, "full_step_every": 5, **_X1},
                               "mlp": {"full_step_every": 5}}

# the video presets on the video tiny DiT (--weights examples/tiny_dit/weights/tiny_flux_video.safetensors
# --settings 'v*' 'sc-*'): hunyuan-video = 5% keys + 1% random, refreshed at steps 0, 1, 10, 40; wan = 10%
# + 1%, refreshed every 10. The MLPs stay dense in both. "-x1": the residual forecast (off in both presets:
# with no trained video model it could not be checked over their refresh gaps of up to 30 steps)
_HV, _WAN = "hunyuan-video", "wan"
GRID.update({
    "vcm-hv": _video(_HV),
    "vcm-hv-x1": _video(_HV, _X1),
    "vcm-hv-e10": _video(_HV, {"full_step_schedule": None, "full_step_every": 10}),
    "vcm-hv-e10-x1": _video(_HV, {"full_step_schedule": None, "full_step_every": 10, **_X1}),
    "vcm-hv-s25": _video(_HV, {"full_step_schedule": [1, 10, 25, 40]}),  # one more refresh, in the 30-step gap
    # refreshed every 5 steps, as `default` (session 47): new key indices at each refresh / the first ones kept
    "vcm-hv-e5": _video(_HV, {"full_step_schedule": None, "full_step_every": 5}),
    "vcm-hv-e5-k": _video(_HV, {"full_step_schedule": None, "full_step_every": 5, "recompute_mask": False}),
    "vcm-hv-e5-x1": _video(_HV, {"full_step_schedule": None, "full_step_every": 5, **_X1}),
    "vcm-hv-e5-k-x1": _video(_HV, {"full_step_schedule": None, "full_step_every": 5, "recompute_mask": False, **_X1}),
    # the same at longer periods (session 53): HunyuanVideo measured 2.445x at every 5 (H100), its 10
    # refreshes 231 s of 438; each refresh fewer saves ~18 s there
    **{f"vcm-hv-e{p}-k-x1": _video(_HV, {"full_step_schedule": None, "full_step_every": p, "recompute_mask": False,
                                          **_X1}) for p in (6, 7, 8)},
    # fewer refreshes than every 5's 10 (session 54: one fewer is what 2.5x on HunyuanVideo needs), placed early
    # ("front"), late ("back"), evenly ("even"), as every 5 without its last or second one ("drop45", "drop5");
    # early ones won, so also earlier still ("front2") and 8 or 7 of them
    **{f"vcm-hv-{k}-k-x1": _video(_HV, {"full_step_schedule": s, "recompute_mask": False, **_X1})
       for k, s in {"s9front": [1, 4, 8, 13, 19, 25, 31, 38, 45], "s9back": [1, 8, 15, 21, 27, 32, 37, 41, 45],
                    "s9even": [1, 7, 13, 19, 24, 29, 34, 39, 44], "s9drop45": [1, 5, 10, 15, 20, 25, 30, 35, 40],
                    "s9drop5": [1, 10, 15, 20, 25, 30, 35, 40, 45], "s9front2": [1, 3, 6, 10, 15, 21, 28, 36, 45],
                    "s8front": [1, 4, 8, 13, 19, 26, 34, 43], "s8front2": [1, 3, 6, 10, 15, 22, 30, 40],
                    "s7front": [1, 4, 9, 15, 22, 31, 41], "s7front2": [1, 3, 6, 11, 18, 27, 38],
                    # for --shift 7 (HunyuanVideo's sampler: small steps in t first, large ones last), where
                    # the early placements lose: "s9sig" puts s8front2's refreshes at the same t as under
                    # equal steps, "s9late" and "s8late" in between
                    "s9sig": [1, 6, 15, 24, 32, 38, 42, 46, 48], "s9late": [1, 10, 18, 25, 31, 36, 40, 44, 47],
                    "s8late": [1, 10, 20, 28, 35, 40, 44, 47]}.items()},
    # the refreshes written as noise levels (attn.full_step_levels, session 55), so that one list places them
    # at the same noise under any --shift: "l8" puts s8front2's last 7 at its equal-step levels (1 - step/50),
    # "l9" also its first (0.98: step 1 at equal steps, step 6 under shift 7, as "s9sig")
    **{f"vcm-hv-{k}-k-x1": _video(_HV, {"full_step_schedule": None, "full_step_levels": lv, "recompute_mask": False,
                                        **_X1})
       for k, lv in {"l8": [0.94, 0.88, 0.80, 0.70, 0.56, 0.40, 0.20],
                     "l9": [0.98, 0.94, 0.88, 0.80, 0.70, 0.56, 0.40, 0.20]}.items()},
    "vcm-wan": _video(_WAN),
    "vcm-wan-x1": _video(_WAN, _X1),
    "vcm-wan-e5": _video(_WAN, {"full_step_every": 5}),
    # the preset's 5 refreshes (1, 10, 20, 30, 40) placed early, as the HunyuanVideo sweep above favours with equal
    # steps (session 54: +3 dB there; with Wan's own --shift 5, -3.7 dB: early in t is late in steps)
    **{f"vcm-wan-{k}": _video(_WAN, {"full_step_schedule": s})
       for k, s in {"s5front": [1, 4, 9, 17, 30], "s5front2": [1, 3, 6, 12, 24]}.items()},
    "vcm-wan-e5-x1": _video(_WAN, {"full_step_every": 5, **_X1}),
    "vcm-a.20": _video(_WAN, {"top_keys": 0.2}),
    "vcm-a.20-x1": _video(_WAN, {"top_keys": 0.2, **_X1}),
    "vcm-a.30-x1": _video(_WAN, {"top_keys": 0.3, **_X1}),
    # query groups of one whole 4×6×8 voxel (the method's 192 for video) / of half a 128-group
    "vcm-wan-g192": _video(_WAN, {"group": 192}),
    "vcm-wan-g64": _video(_WAN, {"group": 64}),
    # what the voxel grouping buys: the same settings with raster-order groups ("-ng")
    "vcm-wan-ng": {**_video(_WAN), "grouping": {"enabled": False}},
    "vcm-wan-x1-ng": {**_video(_WAN, _X1), "grouping": {"enabled": False}},
    # chipmunk + step caching: the published HunyuanVideo stack (its preset + the 25-of-50 skips, 3.72×)
    "vcmsc-hv-fixed25": _video(_HV, sc={"skip_steps": PUBLISHED_SKIPS}),
    "vcmsc-hv-x1-fixed25-f1": _video(_HV, _X1, sc={"skip_steps": PUBLISHED_SKIPS, "extrapolate": 1.0}),
    "vcmsc-wan-t0.20-w7": _video(_WAN, sc={"threshold": 0.2, "warmup_steps": 7}),
    "vcmsc-wan-x1-t0.20-w7-f1": _video(_WAN, _X1, sc={"threshold": 0.2, "warmup_steps": 7, "extrapolate": 1.0}),
})

# -- pure helpers (tests/test_fidelity_pareto.py) ---------------------------------------------------
# what the images of a sweep depend on besides the setting: rows resumed (--resume) and a dense reference
# reused (--dense-cache, which also keys on the device) must agree on all of them; a meta written before a
# field existed holds its default
SAMPLING = ("classes", "steps", "seed", "guidance", "shift")
_SAMPLING_DEFAULTS = {"guidance": None, "shift": 1.0}


def sampling(meta: dict) -> tuple:
    return tuple(meta.get(k, _SAMPLING_DEFAULTS.get(k)) for k in SAMPLING)


def family_of(config: dict) -> str:
    """stepcache / chipmunk / chipmunk+stepcache, from which of sparse ops and step caching are on."""
    sparse = any((config.get(op) or {}).get("enabled", True) for op in ("attn", "mlp"))
    cached = bool((config.get("step_cache") or {}).get("enabled", False))
    if cached and sparse:
        return COMBO
    if cached:
        return STEPCACHE
    if sparse:
        return CHIPMUNK
    raise ValueError("setting with neither sparse ops nor step caching (that is dense)")


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated (cost, quality) points (lower cost and higher quality are
    better), by increasing cost. Of equal points only the first is kept."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1], i))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def best_within(points: list[tuple[float, float]], cost: float, tol: float = 1e-9):
    """Index of the highest-quality point costing at most `cost` (the front's value there), or None."""
    ok = [i for i, (c, _) in enumerate(points) if c <= cost + tol]
    return max(ok, key=lambda i: (points[i][1], -points[i][0])) if ok else None


def cheapest_at_least(points: list[tuple[float, float]], quality: float):
    """Index of the lowest-cost point with quality >= `quality`, or None."""
    ok = [i for i, (_, q) in enumerate(points) if q >= quality]
    return min(ok, key=lambda i: (points[i][0], -points[i][1])) if ok else None


def interp_front(points: list[tuple[float, float]], front: list[int], cost: float):
    """The front drawn as straight segments between its points (`front`: indices by increasing cost,
    as from pareto_front), at `cost`: (i, j, w) with value w * q_i + (1 - w) * q_j; held flat right
    of the last point; None left of the first."""
    if not front or cost < points[front[0]][0]:
        return None
    for a, b in zip(front, front[1:]):
        ca, cb = points[a][0], points[b][0]
        if cost <= cb:
            return a, b, (cb - cost) / (cb - ca)
    return front[-1], front[-1], 1.0


def mean_sem(values: list[float]) -> tuple[float, float, float]:
    """Mean, sample standard deviation and standard error of the mean (0 spread for one value)."""
    vals = [float(v) for v in values]
    m = statistics.fmean(vals)
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return m, sd, sd / math.sqrt(len(vals))


def paired_delta(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean and standard error of the per-image differences a - b (same images in the same order)."""
    if len(a) != len(b):
        raise ValueError(f"paired values of different lengths: {len(a)} vs {len(b)}")
    m, _, se = mean_sem([x - y for x, y in zip(a, b)])
    return m, se


# -- analysis of measured rows ---------------------------------------------------------------------
def _usable(rows, family):
    """Rows of `family` with a FLOPs ratio and a finite PSNR (a setting that skipped nothing equals dense)."""
    return [r for r in rows if r["family"] == family and r.get("flops_ratio") is not None
            and math.isfinite(r["psnr_db"])]


def fronts_of(rows: list[dict]) -> dict[str, list[str]]:
    out = {}
    for fam in FAMILIES:
        fr = _usable(rows, fam)
        idx = pareto_front([(r["flops_ratio"], r["psnr_db"]) for r in fr])
        out[fam] = [fr[i]["setting"] for i in idx]
    return out


def compare(row: dict, rows: list[dict], family: str) -> dict:
    """`row` against `family`'s front at its FLOPs, with paired per-image PSNR differences: against the
    best point costing no more (strict dominance) and against the front interpolated between its
    neighbouring points (per image, same weights)."""
    fr = _usable(rows, family)
    pts = [(r["flops_ratio"], r["psnr_db"]) for r in fr]
    i = best_within(pts, row["flops_ratio"])
    if i is None:
        return {"against": family, "reference": None, "note": f"cheaper than every {family} point"}
    ref = fr[i]
    d, se = paired_delta(row["psnr_per_image"], ref["psnr_per_image"])
    out = {"against": family, "reference": ref["setting"], "ref_psnr_db": ref["psnr_db"],
           "ref_flops_ratio": ref["flops_ratio"], "delta_db": d, "delta_sem": se, "above": d > 0}
    a, b, w = interp_front(pts, pareto_front(pts), row["flops_ratio"])
    ref_per = [w * x + (1 - w) * y for x, y in zip(fr[a]["psnr_per_image"], fr[b]["psnr_per_image"])]
    d, se = paired_delta(row["psnr_per_image"], ref_per)
    out.update(interp_between=[fr[a]["setting"], fr[b]["setting"]], interp_psnr_db=w * pts[a][1] + (1 - w) * pts[b][1],
               interp_delta_db=d, interp_delta_sem=se, interp_above=d > 0)
    return out


def summarize(rows: list[dict], target: float) -> dict:
    cm = _usable(rows, CHIPMUNK)
    i = cheapest_at_least([(r["flops_ratio"], r["psnr_db"]) for r in cm], target)
    best = None
    if i is not None:
        r = cm[i]
        best = {"setting": r["setting"], "psnr_db": r["psnr_db"], "psnr_sem": r["psnr_sem"],
                "flops_ratio": r["flops_ratio"], "config": r["config"]}
    combos = [{"setting": r["setting"], "psnr_db": r["psnr_db"], "flops_ratio": r["flops_ratio"],
               "vs": [compare(r, rows, fam) for fam in (STEPCACHE, CHIPMUNK)]}
              for r in _usable(rows, COMBO)]
    return {"target_db": target, "best_chipmunk_at_target": best, "combo_vs_fronts": combos,
            "fronts": fronts_of(rows)}


# -- measurement -----------------------------------------------------------------------------------
def measure(runner, name, config, ref_img, ref_tok, args, dense_flops) -> dict:
    from benchmarks.fidelity import run
    from chipmunk_compile.metrics import psnr, relative_error, ssim

    img, tok, secs, flops = run(runner, name, config, args.steps, args.seed, args.compiler, dense_flops)
    skipped = skipped_steps(runner.transformer)
    per_psnr = [psnr(img[i:i + 1], ref_img[i:i + 1]) for i in range(len(img))]
    per_ssim = [ssim(img[i:i + 1], ref_img[i:i + 1]) for i in range(len(img))]
    finite = [p for p in per_psnr if math.isfinite(p)] or [math.inf]
    m, sd, se = mean_sem(finite)
    sm, _, sse = mean_sem(per_ssim)
    return {"setting": name, "family": family_of(config), "psnr_db": m, "psnr_std": sd, "psnr_sem": se,
            "psnr_min": min(finite), "psnr_max": max(finite), "ssim": sm, "ssim_sem": sse,
            "latent_rel_err": relative_error(tok, ref_tok), "flops_ratio": flops, "seconds": secs,
            "psnr_per_image": per_psnr, "ssim_per_image": per_ssim, "config": config, "skipped_steps": skipped}


def skipped_steps(transformer):
    """Steps the step cache skipped in the last generation (first branch), or None without one."""
    from chipmunk_compile.runtime import sessions_of

    for ses in sessions_of(transformer):
        if ses.step_cache is not None:
            lists = list(ses.step_cache.summary()["skipped_steps"].values())
            return lists[0] if lists else []
    return None


def code_hash() -> str:
    """Short hash of chipmunk_compile's sources, stored per row (the package may change between runs)."""
    h = hashlib.sha256()
    pkg = os.path.join(ROOT, "chipmunk_compile")
    for dirpath, _, files in sorted(os.walk(pkg)):
        for name in sorted(files):
            if name.endswith((".py", ".yaml")):
                with open(os.path.join(dirpath, name), "rb") as f:
                    h.update(name.encode() + f.read())
    return h.hexdigest()[:12]


def git_state() -> dict:
    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"commit": git("rev-parse", "HEAD"), "dirty": git("status", "--porcelain").splitlines()}


CSV_FIELDS = ["setting", "family", "psnr_db", "psnr_std", "psnr_sem", "psnr_min", "psnr_max", "ssim", "ssim_sem",
              "latent_rel_err", "flops_ratio", "seconds", "on_front", "config"]


def write(stem: str, meta: dict, rows: list[dict], target: float) -> dict:
    summary = summarize(rows, target)
    on_front = {s for names in summary["fronts"].values() for s in names}
    for r in rows:
        r["on_front"] = r["setting"] in on_front
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows, "summary": summary}, f, indent=1)
    with open(stem + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**r, "config": json.dumps(r["config"], separators=(",", ":"))})
    return summary


# -- plot --------------------------------------------------------------------------------------------
def _staircase(pts, x_end=1.0):
    """(x, y) polyline of a front: the quality reached at each cost (a step up at every front point),
    held to `x_end`."""
    xs, ys = [], []
    for k, (x, y) in enumerate(pts):
        if k:
            xs.append(x)
            ys.append(pts[k - 1][1])
        xs.append(x)
        ys.append(y)
    if pts and x_end > pts[-1][0]:
        xs.append(x_end)
        ys.append(pts[-1][1])
    return xs, ys


def plot(rows: list[dict], summary: dict, path: str, title: str) -> str:
    """The three families with ±SEM bars and their fronts; returns the library used."""
    rows = [r for fam in FAMILIES for r in _usable(rows, fam)]
    by = {r["setting"]: r for r in rows}
    fronts = {fam: [(by[s]["flops_ratio"], by[s]["psnr_db"]) for s in names]
              for fam, names in summary["fronts"].items()}
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _plot_pil(rows, fronts, summary["target_db"], path, title)
        return "PIL"
    fig, ax = plt.subplots(figsize=(9, 6), dpi=120)
    for fam in FAMILIES:
        rs = [r for r in rows if r["family"] == fam]
        if not rs:
            continue
        ax.errorbar([r["flops_ratio"] for r in rs], [r["psnr_db"] for r in rs], yerr=[r["psnr_sem"] for r in rs],
                    fmt="o", ms=5, capsize=2, color=COLORS[fam], alpha=0.85, label=f"{fam} (±SEM)")
        for r in rs:
            ax.annotate(r["setting"].split("-", 1)[1], (r["flops_ratio"], r["psnr_db"]), fontsize=6,
                        xytext=(3, 3), textcoords="offset points", color=COLORS[fam])
        if fronts[fam]:
            ax.plot(*_staircase(fronts[fam]), "-", color=COLORS[fam], lw=1.5, alpha=0.7)
    ax.axhline(summary["target_db"], color="gray", ls="--", lw=1)
    ax.set_xlabel("FLOPs ratio vs dense (lower = faster)")
    ax.set_ylabel("PSNR vs dense [dB] (mean over images)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return "matplotlib"


def _plot_pil(rows, fronts, target, path, title):
    from PIL import Image, ImageDraw

    W, H, L, R, T, B = 960, 640, 60, 20, 50, 50
    xs = [r["flops_ratio"] for r in rows] + [1.0]
    ys = [r["psnr_db"] + s * r["psnr_sem"] for r in rows for s in (-1, 1)] + [target]
    x0, x1 = math.floor(min(xs) * 10 - 0.5) / 10, math.ceil(max(xs) * 10) / 10
    y0, y1 = math.floor(min(ys) / 2) * 2, math.ceil(max(ys) / 2) * 2
    px = lambda x: L + (x - x0) / (x1 - x0) * (W - L - R)  # noqa: E731
    py = lambda y: H - B - (y - y0) / (y1 - y0) * (H - T - B)  # noqa: E731
    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)
    for k in range(round((x1 - x0) * 10) + 1):
        x = x0 + k / 10
        d.line([(px(x), T), (px(x), H - B)], fill="#e6e6e6")
        d.text((px(x) - 8, H - B + 5), f"{x:.1f}", fill="black")
    for y in range(int(y0), int(y1) + 1, 2):
        d.line([(L, py(y)), (W - R, py(y))], fill="#e6e6e6")
        d.text((L - 25, py(y) - 6), f"{y}", fill="black")
    d.rectangle([L, T, W - R, H - B], outline="black")
    d.line([(L, py(target)), (W - R, py(target))], fill="gray", width=1)
    d.text((L + 4, py(target) - 14), f"{target:g} dB", fill="gray")
    d.text((W // 2 - 120, H - 25), "FLOPs ratio vs dense (lower = faster)", fill="black")
    d.text((L, 6), title, fill="black")
    d.text((5, T - 18), "PSNR vs dense [dB], mean over images, bars = ±SEM", fill="black")
    for fam in FAMILIES:
        c = COLORS[fam]
        if fronts.get(fam):
            sx, sy = _staircase(fronts[fam])
            d.line([(px(a), py(b)) for a, b in zip(sx, sy)], fill=c, width=2)
        for r in rows:
            if r["family"] != fam:
                continue
            x, y, e = px(r["flops_ratio"]), py(r["psnr_db"]), r["psnr_sem"]
            d.line([(x, py(r["psnr_db"] - e)), (x, py(r["psnr_db"] + e))], fill=c)
            d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=c)
            d.text((x + 5, y - 12), r["setting"].split("-", 1)[1], fill=c)
    for k, fam in enumerate(FAMILIES):  # legend, lower right
        y = H - B - 62 + 18 * k
        d.ellipse([W - R - 230, y + 2, W - R - 222, y + 10], fill=COLORS[fam])
        d.text((W - R - 215, y), f"{fam} (line: Pareto front)", fill="black")
    im.save(path)


# -- main --------------------------------------------------------------------------------------------
def print_table(rows, summary):
    print(f"\n{'setting':<28}{'family':<20}{'PSNR dB':>9}{'±SEM':>6}{'sd':>6}{'SSIM':>8}{'FLOPs':>7}{'s':>7}  front")
    for r in sorted(rows, key=lambda r: (FAMILIES.index(r["family"]), r["flops_ratio"])):
        print(f"{r['setting']:<28}{r['family']:<20}{r['psnr_db']:>9.2f}{r['psnr_sem']:>6.2f}{r['psnr_std']:>6.2f}"
              f"{r['ssim']:>8.4f}{r['flops_ratio']:>7.3f}{r['seconds']:>7.0f}  {'*' if r['on_front'] else ''}")
    for fam, names in summary["fronts"].items():
        print(f"front {fam}: {' -> '.join(names)}")
    b = summary["best_chipmunk_at_target"]
    print(f"lowest-FLOPs chipmunk >= {summary['target_db']} dB: " +
          (f"{b['setting']} {b['psnr_db']:.2f}±{b['psnr_sem']:.2f} dB @ {b['flops_ratio']:.3f}" if b else "none"))
    for c in summary["combo_vs_fronts"]:
        parts = [f"vs {v['against']}: " + (f"{v['reference']} {v['delta_db']:+.2f}±{v['delta_sem']:.2f} dB, "
                                          f"interpolated {'..'.join(dict.fromkeys(v['interp_between']))} "
                                          f"{v['interp_delta_db']:+.2f}±{v['interp_delta_sem']:.2f} dB"
                                          if v["reference"] else v["note"]) for v in c["vs"]]
        print(f"{c['setting']} ({c['psnr_db']:.2f} dB @ {c['flops_ratio']:.3f}): {'; '.join(parts)}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, nargs="*", default=[0, 1, 2, 3, 5, 6, 7, 8],
                    help="one image per entry (same class twice = two noise draws)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--guidance", type=float, default=None)
    ap.add_argument("--shift", type=float, default=1.0,
                    help="the sampler's flow shift (>1: smaller steps near t = 1, as SD3/FLUX/HunyuanVideo sample)")
    ap.add_argument("--settings", nargs="*", default=None, help="names or globs of GRID (default: all)")
    ap.add_argument("--target", type=float, default=30.0, help="PSNR goal in dB (issue 4: 30)")
    ap.add_argument("--compiler", default=None, help="inner compiler: inductor (GPU default) or eager (CPU default)")
    ap.add_argument("--resume", action="store_true", help="keep the rows of the existing JSON, run only new settings")
    ap.add_argument("--rerun", action="store_true", help="with --resume: run the named settings again, replacing their rows")
    ap.add_argument("--replot", action="store_true", help="recompute fronts, summary and plot from the JSON only")
    ap.add_argument("--list", action="store_true", help="print the grid and exit")
    ap.add_argument("--dense-cache", default=None,
                    help="torch file of the dense reference: loaded if there (same classes/steps/seed), else saved")
    ap.add_argument("--weights", default=None,
                    help="tiny DiT weights (.safetensors beside its .json; default: the shipped 64x64 model)")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)
    if args.list:
        for name, cfg in GRID.items():
            print(f"{name:<28}{family_of(cfg):<20}{json.dumps(cfg)}")
        return
    from examples.tiny_dit.model import weights_tag

    stem = os.path.join(args.out, "fidelity_pareto" + weights_tag(args.weights))
    names = list(GRID) if args.settings is None else \
        list(dict.fromkeys(n for p in args.settings for n in GRID if fnmatch.fnmatchcase(n, p)))  # in given order
    if not names:
        ap.error(f"no setting matches {args.settings}; see --list")
    old = {}
    if args.resume or args.replot:
        with open(stem + ".json") as f:
            saved = json.load(f)
        old = {r["setting"]: r for r in saved["rows"]}
    if args.replot:
        rows, meta = list(old.values()), saved["meta"]
        summary = write(stem, meta, rows, args.target)
        lib = plot(rows, summary, stem + ".png", _title(meta))
        print_table(rows, summary)
        print(f"wrote {stem}.csv/.json/.png ({lib})")
        return

    import torch

    from benchmarks.fidelity import TinyRunner, dense_call_flops, run

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    args.compiler = args.compiler or ("inductor" if device == "cuda" else "eager")
    runner = TinyRunner(device, dtype, args.classes, args.guidance, args.weights, args.shift)
    meta = {"model": runner.name, "device": torch.cuda.get_device_name() if device == "cuda" else "CPU",
            "steps": args.steps, "seed": args.seed, "classes": args.classes, "guidance": args.guidance,
            "shift": args.shift,
            "compiler": args.compiler, "torch": torch.__version__, "git": git_state()}
    if old and sampling(saved["meta"]) != sampling(meta):
        sys.exit(f"--resume: the saved rows were sampled with other {'/'.join(SAMPLING)}: "
                 f"{sampling(saved['meta'])} against {sampling(meta)}")
    todo = [n for n in names if n not in old or args.rerun]
    rows = [r for r in old.values() if r["setting"] not in todo]
    dense_flops = dense_call_flops(runner.one_dense_call())
    print(f"# pareto sweep on {runner.name}, {device}, {len(args.classes)} images, {args.steps} steps, "
          f"{len(todo)} settings to run", flush=True)
    key = {**dict(zip(SAMPLING, sampling(meta))), "device": meta["device"]}
    cached = torch.load(args.dense_cache) if args.dense_cache and os.path.exists(args.dense_cache) else None
    if cached is not None and cached["key"] == key:
        ref_img, ref_tok, ref_s = cached["images"], cached["tokens"], cached["seconds"]
        print(f"dense: from {args.dense_cache}", flush=True)
    else:
        ref_img, ref_tok, ref_s, _ = run(runner, "dense", None, args.steps, args.seed, args.compiler, dense_flops)
        print(f"dense: {ref_s:.1f} s", flush=True)
        if args.dense_cache:
            torch.save({"key": key, "images": ref_img, "tokens": ref_tok, "seconds": ref_s}, args.dense_cache)
    meta["dense_seconds"] = ref_s
    os.makedirs(args.out, exist_ok=True)
    code = code_hash()
    meta["code"] = code
    for name in todo:
        r = measure(runner, name, GRID[name], ref_img, ref_tok, args, dense_flops)
        r["code"] = code
        rows.append(r)
        print(f"{name:<28}{r['psnr_db']:>7.2f} ±{r['psnr_sem']:.2f} dB  SSIM {r['ssim']:.4f}  "
              f"FLOPs {r['flops_ratio']:.3f}  {r['seconds']:.0f} s"
              + (f"  skipped {r['skipped_steps']}" if r["skipped_steps"] else ""), flush=True)
        summary = write(stem, meta, rows, args.target)  # after every setting: an interrupted sweep resumes
    summary = write(stem, meta, rows, args.target)
    lib = plot(rows, summary, stem + ".png", _title(meta))
    print_table(rows, summary)
    print(f"wrote {stem}.csv/.json/.png ({lib})")


def _title(meta):
    shift = f" (flow shift {meta['shift']:g})" if meta.get("shift", 1.0) != 1.0 else ""
    return (f"{meta['model']} on {meta['device']}: {len(meta['classes'])} images, {meta['steps']} steps{shift}, "
            f"PSNR vs dense against FLOPs; lines = Pareto fronts")


if __name__ == "__main__":
    main()
