"""The pure parts of benchmarks/bench_e2e.py: step-kind labels, the coverage sequence, 50-step
totals from per-kind medians, and the linear depth extrapolation behind the video results."""

import os
import sys

import pytest
import torch

from chipmunk_compile.compiled_options import compiled_in_place

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import bench_e2e as be  # noqa: E402
from helpers import fresh_dynamo  # noqa: E402,F401


def test_coverage_holds_every_kind_up_to_reps():
    for preset in ("flux", "hunyuan-video", "wan", "mochi"):
        labels = be.step_labels(preset, 50)
        for reps in (1, 2, 3):
            seq = be.coverage(preset, 50, reps)
            assert seq == sorted(seq)
            for label in set(labels):  # more only where a step must run for another's neuron indices
                assert sum(labels[s] == label for s in seq) >= min(reps, labels.count(label)), (preset, label)
            firsts = [s for i, s in enumerate(range(50)) if labels[:s].count(labels[s]) < reps]
            assert set(firsts) <= set(seq) and set(seq) == set(be.index_state_steps(be.ChipmunkConfig.from_any(preset),
                                                                                     firsts))


def test_flux_labels_split_index_reuse():
    labels = be.step_labels("flux", 50)
    assert labels[0] == "attn:dense/mlp:dense" and labels[1].startswith("attn:refresh")
    # 11 selects: the first sparse step after a dense one (the backend drops the indices there)
    assert labels[13].endswith("+reuse") and labels[12].endswith("+sel") and labels[3].endswith("+sel")
    assert labels[11] == "attn:sparse+fore/mlp:sparse+sel"
    # the preset refreshes attention every 5 steps; MLP dense steps stay every 10; the residual
    # forecast runs from the second refresh (step 5, which measures the slope) on
    assert labels[5] == "attn:refresh+fore/mlp:sparse+sel" and labels[15] == "attn:refresh+fore/mlp:sparse+reuse"
    assert labels[10] == "attn:refresh+fore/mlp:dense"
    assert labels[4] == "attn:sparse/mlp:sparse+sel" and labels[6] == "attn:sparse+fore/mlp:sparse+sel"
    # 11 runs so that 13 reuses (17: the second "+reuse", 21 so that 25 reuses... after 20's dense step)
    assert be.coverage("flux", 50) == [0, 1, 2, 3, 5, 6, 7, 10, 11, 13, 15, 17, 20, 21, 25]
    published = be.with_overrides("flux", ["attn.full_step_every=10", "attn.extrapolate=0"])  # the published schedule
    assert be.step_labels(published, 50)[5] == "attn:sparse/mlp:sparse+sel"
    assert be.coverage(published, 50) == [0, 1, 2, 3, 10, 11, 13, 15, 20]
    # the MLP error forecast: measured at the second dense step (10), applied from step 11 on
    mlp_fore = be.with_overrides("flux", ["mlp.extrapolate=1"])
    mlp_labels = be.step_labels(mlp_fore, 21)
    assert mlp_labels[0].endswith("mlp:dense") and mlp_labels[9].endswith("mlp:sparse+sel")
    assert mlp_labels[10].endswith("mlp:dense+fore") and mlp_labels[11].endswith("mlp:sparse+fore+sel")
    assert mlp_labels[13].endswith("mlp:sparse+fore+reuse")


@pytest.mark.parametrize("every", [4, 6])
def test_labels_say_which_steps_select_neurons_as_the_backend_runs_them(fresh_dynamo, monkeypatch, every):
    """The backend's selecting steps are those labelled "+sel", in a whole generation and when only
    the coverage steps run pinned (as bench_e2e.py times them): the coverage adds the steps that
    keep each step's neuron indices as in a whole generation."""
    import importlib

    import chipmunk_compile as cc
    from helpers import chip
    from test_numerics import Net, latents, sparse_cfg, ts

    mlp_op = importlib.import_module("chipmunk_compile.ops.mlp")
    selected, real = [], mlp_op._select_neurons
    monkeypatch.setattr(mlp_op, "_select_neurons", lambda st, s, b, bm, fh, g, step, act: (
        selected.append(step), real(st, s, b, bm, fh, g, step, act)))
    cfg = sparse_cfg(mlp={"full_step_every": every, "block_mask_cache": 2, "first_n_dense_layers": 0},
                     attn={"first_n_dense_layers": 0})
    m = Net(depth=1).eval()
    compiled = chip(m, cfg)
    labels = be.step_labels(cfg, 20)
    with torch.no_grad():
        for s in range(20):  # a whole generation
            compiled(latents(s), ts(s))
        assert sorted(set(selected)) == [s for s in range(20) if labels[s].endswith("+sel")]
        for reps in (1, 2):
            seq = be.coverage(cfg, 20, reps)
            assert any(labels[s].endswith("+reuse") for s in seq)
            selected.clear()
            for s in seq:  # the coverage pass, pinned (each pass a generation of its own)
                cc.set_step(compiled, s)
                compiled(latents(s), ts(s))
            assert sorted(set(selected)) == [s for s in seq if labels[s].endswith("+sel")], (reps, seq)


def test_total_and_extrapolation_exact_on_linear_data():
    labels = ["a", "b", "b", "a", "b"]
    med = be.medians_by_label({0: 1.0, 1: 5.0, 2: 7.0, 3: 3.0}, labels)
    assert med == {"a": 2.0, "b": 6.0}
    assert be.total_from_medians(med, labels) == 2 * 2.0 + 3 * 6.0
    cost = lambda n, fixed, per: fixed + per * n  # noqa: E731
    m1 = {"a": cost(2, 10, 3), "b": cost(2, 1, 7)}
    m2 = {"a": cost(4, 10, 3), "b": cost(4, 1, 7)}
    assert be.extrapolate(m1, 2, m2, 4, 40) == pytest.approx({"a": cost(40, 10, 3), "b": cost(40, 1, 7)})


def test_parse_blocks_rejects_bad_counts():
    assert be.parse_blocks("3,2") == [2, 3] and be.parse_blocks(None) is None
    for bad in ("2,2", "0", "1,2,3"):
        with pytest.raises(ValueError):
            be.parse_blocks(bad)


def test_one_count_at_the_published_depth_is_the_published_depth():
    published = be.published_units("auraflow")
    assert be.parse_blocks(str(published), published) is None
    assert be.parse_blocks("2", published) == [2] and be.parse_blocks(f"2,{published}", published) == [2, published]
    assert "NOT at the" not in be.depth_statement("auraflow", be.parse_blocks(str(published), published))


def test_resolve_text_mask():
    assert be.resolve_text_mask("hunyuan-video", None) == "ones" and be.resolve_text_mask("mochi", None) == "ones"
    assert be.resolve_text_mask("hunyuan-video", "none") == "none" and be.resolve_text_mask("flux", None) is None
    with pytest.raises(ValueError, match="not possible for mochi"):
        be.resolve_text_mask("mochi", "none")
    with pytest.raises(ValueError, match="no text mask"):
        be.resolve_text_mask("wan", "ones")


def test_hunyuan_text_mask_none_drops_attn_mask_exactly(monkeypatch):
    """--text-mask none on a tiny HunyuanVideoTransformer3DModel (1 refiner, 1 double, 1 single block):
    the all-ones mask reaches SDPA as boolean attn_masks; after apply_text_mask(.., "none") SDPA gets
    attn_mask=None in every call and the output is unchanged. Padding changes the output (the mask
    is not inert), and "none" refuses inputs with padding."""
    import torch
    import torch.nn.functional as F
    from helpers import hunyuan, hunyuan_inputs

    masks, sdpa = [], F.scaled_dot_product_attention

    def recording_sdpa(query, key, value, attn_mask=None, *args, **kwargs):
        masks.append(attn_mask)
        return sdpa(query, key, value, attn_mask, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
    model = hunyuan()
    kw = hunyuan_inputs(900.0, text_valid=8)  # 8 of 8 text tokens valid, 2x8x8 = 128 video tokens
    kw["encoder_attention_mask"] = torch.ones(1, 8, dtype=torch.bool)  # as bench_e2e.inputs
    with torch.no_grad():
        ones = model(**kw)[0]
        masks_ones, masks[:] = list(masks), []
        padded = model(**dict(kw, encoder_attention_mask=torch.arange(8)[None] < 5))[0]
        masks.clear()
        assert be.apply_text_mask("hunyuan-video", model, kw, "none") is kw
        none = model(**kw)[0]

    # "ones": refiner (1, heads=2, 8, 8), double and single block (1, 1, 1, 136) boolean masks, all true
    assert len(masks_ones) == 3 and all(m is not None and m.dtype == torch.bool and bool(m.all()) for m in masks_ones)
    assert sorted(tuple(m.shape) for m in masks_ones) == [(1, 1, 1, 136), (1, 1, 1, 136), (1, 2, 8, 8)]
    assert len(masks) == 3 and all(m is None for m in masks), masks
    assert torch.allclose(none, ones, rtol=1e-5, atol=1e-6), (none - ones).abs().max()
    assert not torch.allclose(padded, ones, rtol=1e-3, atol=1e-4)
    assert all(isinstance(p, be.MaskFreeAttnProcessor) for p in model.attn_processors.values())

    with pytest.raises(ValueError, match="padding"):
        be.apply_text_mask("hunyuan-video", hunyuan(), dict(kw, encoder_attention_mask=torch.arange(8)[None] < 5), "none")


def test_set_overrides_lay_keys_over_the_preset():
    assert be.with_overrides("flux", []) == "flux"
    cfg = be.with_overrides("flux", ["attn.full_step_every=10", "attn.min_mass=0.7"])
    assert cfg == {"preset": "flux", "attn": {"full_step_every": 10, "min_mass": 0.7}}
    # the schedule of the overridden config drives the step labels: no attention refresh at 5, 15, ...
    assert be.step_labels(cfg, 20)[5] != be.step_labels("flux", 20)[5]
    # a top-level key (no section): unknown ones are refused by the config
    assert be.with_overrides("flux", ["cuda_graphs_max_gib=40"]) == {"preset": "flux", "cuda_graphs_max_gib": 40}
    for bad in (["attn.full_step_every"], ["full_step_every=5"], ["attn.min_mass=2"], ["cuda_graphs_max_gib=-1"]):
        with pytest.raises((SystemExit, ValueError)):
            be.with_overrides("flux", bad)


def test_refreshes_written_as_levels_are_timed_at_the_steps_the_shift_gives_them():
    """--shift spaces the timesteps as that flow-matching sampler; a config with attn.full_step_levels
    runs (pinned) the step schedule those timesteps resolve the levels to, the same steps the backend
    resolves from the timesteps."""
    levels = "attn.full_step_levels=[0.98, 0.94, 0.88, 0.80, 0.70, 0.56, 0.40, 0.20]"
    cfg = be.with_overrides("hunyuan-video", ["attn.full_step_schedule=null", levels])
    assert be.levels_as_steps("hunyuan-video", 50, 7.0) == ("hunyuan-video", None)
    equal, at1 = be.levels_as_steps(cfg, 50, 1.0)
    shifted, at7 = be.levels_as_steps(cfg, 50, 7.0)
    assert at1 == [1, 3, 6, 10, 15, 22, 30, 40] and at7 == [1, 6, 15, 25, 32, 38, 43, 46, 49]
    refreshes = [s for s, label in enumerate(be.step_labels(shifted, 50)) if label.startswith("attn:refresh")]
    assert refreshes == at7
    # the timesteps the benchmark feeds give the backend the same levels
    ts = [be.timestep("hunyuan-video", i, 50, "cpu", torch.float64, 7.0).item() for i in range(50)]
    from chipmunk_compile.schedule import steps_at_levels

    written = tuple(be.ChipmunkConfig.from_any(cfg).attn.full_step_levels)
    assert sorted(steps_at_levels(tuple(t / ts[0] for t in ts), written, 1)) == at7
    assert ts[0] == pytest.approx(1000.0) and ts[6] < ts[5] < ts[0]


def test_levels_at_another_step_count_run_the_steps_they_resolve_to():
    """At 28 steps the resolved refreshes are the generation's own steps: the timed schedule runs them
    as printed (not scaled by 28/50 a second time), a gap cap included, and the MLP's period is the
    scaled one the backend would run."""
    cfg = be.with_overrides("default", ["steps=28", "attn.full_step_levels=[0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]",
                                        "attn.max_refresh_gap=6"])
    spec, resolved = be.levels_as_steps(cfg, 28, 3.0)
    refreshes = [s for s, label in enumerate(be.step_labels(spec, 28)) if label.startswith("attn:refresh")]
    assert refreshes == resolved
    from chipmunk_compile.schedule import steps_at_levels

    written = tuple(be.ChipmunkConfig.from_any(cfg).attn.full_step_levels)
    levels = tuple(be.flow_level(i, 28, 3.0) for i in range(28))
    assert resolved == sorted(steps_at_levels(levels, written, 1, 3))  # the cap of 6 at 28 of 50 steps
    assert max(b - a for a, b in zip(resolved, resolved[1:])) <= 3
    mlp_dense = [s for s, label in enumerate(be.step_labels(spec, 28)) if "mlp:dense" in label]
    assert mlp_dense == [s for s, label in enumerate(be.step_labels(cfg, 28)) if "mlp:dense" in label] == [0, 6, 12, 18, 24]


def test_block_units_follow_each_models_published_ratio():
    """One --blocks unit is one double block and the published number of singles per double."""
    assert be.depth_text("flux", 2) == "2 double + 4 single blocks"
    assert be.depth_text("flux2", 2) == "2 double + 12 single blocks"
    assert be.depth_text("flux2", None) == "published depth, 8 double + 48 single blocks"
    assert be.depth_text("wan", 3) == "3 layers"
    assert [be.extra_ratio(m) for m in ("flux", "hunyuan-video", "flux2", "wan")] == [2, 2, 6, 0]


def _hunyuan15(in_channels=4, out_channels=4):
    import torch
    from diffusers import HunyuanVideo15Transformer3DModel

    torch.manual_seed(0)
    return HunyuanVideo15Transformer3DModel(
        in_channels=in_channels, out_channels=out_channels, num_attention_heads=2, attention_head_dim=64, num_layers=2, num_refiner_layers=1,
        mlp_ratio=2.0, text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=12, rope_axes_dim=(16, 24, 24),
        target_size=16, task_type="t2v").eval()


def _hunyuan15_inputs(text_valid=7, byt5_valid=2, image=False):
    import torch

    g = torch.Generator().manual_seed(1)
    text, byt5 = torch.zeros(1, 12), torch.zeros(1, 4)
    text[:, :text_valid], byt5[:, :byt5_valid] = 1, 1
    return dict(hidden_states=torch.randn(1, 4, 2, 8, 8, generator=g), timestep=torch.full((1,), 500.0),
                encoder_hidden_states=torch.randn(1, 12, 16, generator=g), encoder_attention_mask=text,
                encoder_hidden_states_2=torch.randn(1, 4, 8, generator=g), encoder_attention_mask_2=byt5,
                image_embeds=torch.randn(1, 3, 12, generator=g) if image else torch.zeros(1, 3, 12))


@pytest.mark.parametrize("text_valid,byt5_valid,image", [(7, 2, False), (12, 0, False), (3, 4, True)])
def test_hunyuan15_prefix_baseline_equals_the_stock_model(text_valid, byt5_valid, image):
    """The hunyuan-video-1.5 baseline (unmasked attention over the valid key prefix, padded rows zero)
    computes what diffusers' N x N-masked processor computes; a prefix one token off does not."""
    import hunyuan15_baseline as hb

    model = _hunyuan15()
    kw = _hunyuan15_inputs(text_valid, byt5_valid, image)
    L = hb.valid_prefix_length(model, kw)
    assert L == 2 * 8 * 8 + (3 if image else 0) + byt5_valid + text_valid
    assert hb.prefix_is_exact(model, kw) < 1e-5
    stock = model.attn_processors
    assert hb.use_prefix_baseline(model, kw) == stock
    blocks = {k: p for k, p in model.attn_processors.items() if isinstance(p, hb.PrefixKeysProcessor)}
    assert len(blocks) == 2 and all(p.valid == L for p in blocks.values())  # the blocks; the refiner keeps its own
    model.set_attn_processor(stock)
    wrong = hb.valid_prefix_length
    try:
        hb.valid_prefix_length = lambda m, k: wrong(m, k) - 1
        assert hb.prefix_is_exact(model, kw) > 1e-4  # exact: ~3e-7
    finally:
        hb.valid_prefix_length = wrong


def test_hunyuan15_published_inputs():
    """bench_e2e's hunyuan-video-1.5 inputs at 720p / 121 frames: 31 x 45 x 80 video tokens and the
    padded prompts' valid tokens form the baseline's key prefix."""
    import torch
    import hunyuan15_baseline as hb

    kw = be.inputs("hunyuan-video-1.5", None, device="cpu", dtype=torch.float32)
    model = _hunyuan15(in_channels=65, out_channels=32)
    assert kw["hidden_states"].shape == (1, 65, 31, 45, 80)
    assert hb.valid_prefix_length(model, kw) == 31 * 45 * 80 + be.HV15_VALID[1] + be.HV15_VALID[0]
    assert "prefix" in be.baseline_text("hunyuan-video-1.5") and be.baseline_attention("flux", None, {}) is None


def test_whole_generations_run_the_pinned_schedule_under_automatic_tracking(fresh_dynamo, monkeypatch):
    """--generations: a generation with automatic step tracking (the backend reads each call's
    timestep) runs the same step kinds as a pinned one, after the pinned passes that bench_e2e.py
    times per step; each generation is one timer span, after one untimed generation. So do the
    generations in a followed scheduler's loop and in that loop inside a pipeline-shaped call."""
    from collections import Counter

    import chipmunk_compile as cc
    from chipmunk_compile import backend
    from helpers import chip, step_counts
    from test_numerics import Net, latents, sparse_cfg, ts

    m = Net().eval()
    compiled = chip(m, sparse_cfg())
    pin = be.StepPin(compiled)
    spans = []

    def timer(fn):
        spans.append(1)
        fn()
        return 7.0

    def step_kwargs(s):
        return dict(x=latents(s), t=ts(s))

    assert be.run_generations(compiled, step_kwargs, 12, 1, 2, pin, timer) == [7.0, 7.0]
    assert len(spans) == 2
    pinned = Counter(step_counts(m))
    assert pinned["attention_sparse"] > 0 and pinned["attention_refresh"] > 0 and pinned["mlp_sparse"] > 0
    cc.clear_step(compiled)
    be.run_generations(compiled, step_kwargs, 12, 1, 2, None, timer)
    auto = Counter(step_counts(m))
    auto.subtract(pinned)
    assert +auto == pinned  # three generations each way, the same kinds

    # a pipeline's loop: a scheduler stepped after each step, followed by the backend (no timestep read)
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler()
    cc.follow_scheduler(compiled, sched)
    before = Counter(step_counts(m))
    be.run_generations(compiled, step_kwargs, 12, 1, 2, None, timer, scheduler=sched)
    followed = Counter(step_counts(m))
    followed.subtract(before)
    assert +followed == pinned and sched.step_index == 12
    cc.follow_scheduler(compiled, None)

    # the same loop inside a pipeline-shaped call, nothing followed: the same kinds, no timestep read
    reads, real_read = [], backend.read_signature
    monkeypatch.setattr(backend, "read_signature", lambda *a: reads.append(1) or real_read(*a))
    before = Counter(step_counts(m))
    be.run_generations(compiled, step_kwargs, 12, 1, 2, None, timer, scheduler=FlowMatchEulerDiscreteScheduler(),
                       pipeline=True)
    in_pipeline = Counter(step_counts(m))
    in_pipeline.subtract(before)
    assert +in_pipeline == pinned and reads == []
    monkeypatch.undo()

    res = be.generation_runs(compiled, step_kwargs, 12, 1, 1, pin, timer, chipmunk=True)
    assert res == {"generation_ms": 7.0, "generation_sched_ms": 7.0, "generation_auto_ms": 7.0,
                   "generation_pipe_ms": 7.0}
    assert be.generation_runs(compiled, step_kwargs, 12, 1, 1, None, timer) == {"generation_ms": 7.0,
                                                                                "generation_sched_ms": 7.0}


def test_generation_speedups_and_text():
    res = {be.BASELINE: {"generation_ms": 6600.0}, be.CHIPMUNK: {"generation_ms": 4400.0, "generation_auto_ms": 5000.0}}
    assert be.generation_speedups(res) == {"pinned": 1.5, "auto": 1.32}
    both = {be.BASELINE: {**res[be.BASELINE], "generation_sched_ms": 6660.0},
            be.CHIPMUNK: {**res[be.CHIPMUNK], "generation_sched_ms": 4440.0}}
    assert be.generation_speedups(both)["scheduler"] == 1.5
    piped = {**both, be.CHIPMUNK: {**both[be.CHIPMUNK], "generation_pipe_ms": 4500.0}}
    assert be.generation_speedups(piped)["pipeline"] == 1.48
    assert "inside a pipeline's call, nothing followed (the backend finds its scheduler): chipmunk 4500 ms (1.480x)" \
        in be.generation_text(piped, "x")
    assert "in a scheduler's loop (follow_scheduler): inductor+cudnn 6660 ms, chipmunk 4440 ms (1.500x)" in \
        be.generation_text(both, "x")
    text = be.generation_text(res, "published depth")
    assert "inductor+cudnn 6600 ms; chipmunk pinned 4400 ms (1.500x), automatic step tracking 5000 ms (1.320x)" in text
    assert be.generation_speedups({be.BASELINE: {}, be.CHIPMUNK: {}}) is None
    assert be.generation_text({be.BASELINE: {}, be.CHIPMUNK: {}}, "x") is None


def test_warm_up_runs_again_while_a_run_records(fresh_dynamo):
    from torch._dynamo.utils import counters

    records = [1, 1, 0, 0, 0]  # graphs recorded by each run

    def run():
        counters["chipmunk"]["graph_recorded"] += records.pop(0)

    assert be.warm_up(run) == 3 and len(records) == 2
    records[:] = [1] * 6
    assert be.warm_up(run) == 4  # at most `limit`
    assert be.warm_up(lambda: None) == 1  # the baseline: nothing recorded


def test_regional_variants_compile_the_blocks_and_undo_it():
    """--regional: each variant compiles FLUX's blocks in place (compile_repeated_blocks) and gives
    the model itself back; after the variant its blocks are plain again for the next one. No
    automatic-tracking generations there (a block sees no timestep)."""
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))

    def compiled_blocks():
        return sum(compiled_in_place(m) for m in model.modules())

    for variant in (be.BASELINE, be.CHIPMUNK):
        assert be.compile_variant(variant, model, "flux", regional=True) is model
        assert compiled_blocks() == 3
        be.uncompile_blocks(model)
        assert compiled_blocks() == 0
    assert be.compile_variant(be.BASELINE, model, "flux") is not model and compiled_blocks() == 0

    class Pin:
        compiled = None

        def __call__(self, step, call):
            pass

    res = be.generation_runs(lambda **kw: None, lambda s: {}, 3, 1, 1, Pin(), lambda fn: fn() or 5.0, auto=False)
    assert res == {"generation_ms": 5.0}


def test_omnigen_inputs_make_one_biased_grouped_site(fresh_dynamo):
    """bench_e2e's OmniGen inputs (1024x1024, the pipeline's N×N mask) on a narrow model of its kind:
    the mask fits the sequence, the attention is a biased site grouped on the 64×64 patch grid."""
    import diffusers
    import torch

    import chipmunk_compile

    torch.manual_seed(0)
    model = diffusers.OmniGenTransformer2DModel(
        hidden_size=64, num_attention_heads=2, num_key_value_heads=2, intermediate_size=128, num_layers=1,
        pad_token_id=0, vocab_size=1000, time_step_dim=16,
        rope_scaling={"long_factor": [1.0] * 16, "short_factor": [1.0] * 16}).eval()
    kw = be.inputs("omnigen", model, device="cpu", dtype=torch.float32)
    kw.update(be.timestep_inputs("omnigen", kw, 3, 50, device="cpu", dtype=torch.float32))
    n = be.OMNIGEN_TEXT + 1 + 64 * 64
    assert kw["attention_mask"].shape == (1, n, n) and kw["position_ids"].shape == (1, n)
    rep = chipmunk_compile.inspect(model, **kw, return_dict=False, config="default")
    (attn,) = [s for s in rep.sites if s.kind == "attention"]
    assert attn.shapes["bias"] == (1, 1, n, n) and "64×64" in attn.grouping, str(rep)


@pytest.mark.parametrize("name", ["sd3", "qwen-image", "auraflow"])
def test_joint_attention_model_inputs_make_grouped_sites(fresh_dynamo, name):
    """bench_e2e's SD3.5-Large, Qwen-Image and AuraFlow inputs (1024x1024, their text lengths) on narrow
    models of their kind: the joint attention (4096 + 333 / 77 / 264 tokens, AuraFlow's 256 text and 8
    register tokens; the first two not a multiple of 8) is a site grouped on the 64×64 latent grid with the
    text kept whole, the image MLP (4096 tokens) a site on the same grid; the dense step through the sites
    matches eager and the next step runs the image MLP sparse with no fallback."""
    import diffusers
    import torch

    import chipmunk_compile

    torch.manual_seed(0)
    if name == "sd3":
        model = diffusers.SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, num_layers=1, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=4096, caption_projection_dim=32, pooled_projection_dim=2048, out_channels=16,
            pos_embed_max_size=192, qk_norm="rms_norm").eval()
        n_txt = be.SD3_TEXT
    elif name == "auraflow":
        model = diffusers.AuraFlowTransformer2DModel(
            num_mmdit_layers=1, num_single_dit_layers=1, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=2048, caption_projection_dim=32, **be.MODELS["auraflow"]["config"]).eval()
        n_txt = be.AURAFLOW_TEXT + model.register_tokens.shape[1]  # its 8 learned register tokens join the text
    else:
        model = diffusers.QwenImageTransformer2DModel(
            num_layers=1, attention_head_dim=16, num_attention_heads=2, axes_dims_rope=(4, 6, 6)).eval()
        n_txt = be.QWEN_TEXT
    kw = be.inputs(name, model, device="cpu", dtype=torch.float32)
    kw.update(be.timestep_inputs(name, kw, 3, 50, device="cpu", dtype=torch.float32))
    assert (4096 + n_txt) % 8 != 0 or name == "auraflow"
    rep = chipmunk_compile.inspect(model, **kw, return_dict=False, config="default")
    attn = [s for s in rep.sites if s.kind == "attention"]
    assert attn and all("64×64" in s.grouping and f"text {n_txt}" in s.grouping for s in attn), str(rep)
    assert any(s.kind == "mlp" and "64×64" in s.grouping for s in rep.sites), str(rep)
    opts = {"compiler": "eager", "config": {"preset": "default", "attn": {"first_n_dense_layers": 0},
                                            "mlp": {"first_n_dense_layers": 0}}}
    compiled = torch.compile(model, backend="chipmunk", options=opts)
    with torch.no_grad():
        ref = model(**kw, return_dict=False)[0]
        torch.testing.assert_close(compiled(**kw, return_dict=False)[0], ref, rtol=1e-4, atol=1e-4)  # step 0: dense
        chipmunk_compile.set_step(compiled, 1)  # a refresh step and sparse MLPs over the caches step 0 filled
        out = compiled(**kw, return_dict=False)[0]
    from torch._dynamo.utils import counters

    assert torch.isfinite(out).all()
    assert not [k for k in counters["chipmunk"] if k.startswith("fallback:")], dict(counters["chipmunk"])
    mlp_steps = [st["steps"] for st in chipmunk_compile.stats(compiled)["sites"] if st["kind"] == "mlp"]
    assert {"dense": 1, "sparse": 1} in mlp_steps, mlp_steps  # the image MLP ran sparse over its caches


def test_kontext_inputs_are_a_generated_and_a_reference_image():
    """flux-kontext: 64 x 64 generated tokens, then the 55 x 74 reference's (frame index 1), which
    grouping reads as two runs of one image stream, after 512 text tokens."""
    from chipmunk_compile.grouping import _ids_grid

    kw = be.inputs("flux-kontext", None, device="cpu", dtype=torch.float32)
    assert kw["hidden_states"].shape == (1, 64 * 64 + 55 * 74, 64) and kw["txt_ids"].shape == (512, 3)
    runs = _ids_grid(kw["img_ids"])[4]
    assert [(start, grid) for start, grid, _ in runs] == [(0, (64, 64)), (4096, (55, 74))]
    assert be.MODELS["flux-kontext"]["preset"] == "default" and "flux-kontext" in be.FLOW_TIME
    assert be.inputs("flux", None, device="cpu", dtype=torch.float32)["img_ids"].shape == (48 * 80, 3)
